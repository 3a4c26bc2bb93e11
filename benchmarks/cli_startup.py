"""How long the commands a user types take before they do anything: wall time of short host and
agent commands, each a fresh process, against a bare interpreter (`python -c pass`) in the same run.

    python benchmarks/cli_startup.py                    # the installed environment, ~1 min
    python benchmarks/cli_startup.py --site /tmp/mldt7  # and with DIR first on the path, alternating

`--site DIR` (repeatable) adds a variant with DIR first on PYTHONPATH: a directory holding another
version of a dependency (a wheel unpacked with `unzip`) shows what that version costs every command.
Commands and variants alternate round by round, so a noisy neighbour hits them alike; the table gives
each one's median and its time over the bare interpreter's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_line  # noqa: E402


def commands(work: Path) -> dict[str, list[str]]:
    py, model = sys.executable, str(REPO / "models" / "digits_cnn.onnx")
    subprocess.run([py, "-m", "host_tools", "keys", "gen", "--out", str(work)], check=True, capture_output=True)
    return {
        "python -c pass": [py, "-c", "pass"],
        "edgefleet --help": [py, "-m", "host_tools", "--help"],
        "edgefleet-agent --help": [py, "-m", "device_agent", "--help"],
        "edgefleet bundle build (cnn)": [py, "-m", "host_tools", "bundle", "build", model, "--name", "d",
                                         "--version", "1.0.0", "--key", str(work / "release.key"),
                                         "-o", str(work / "d.efb")],
        "edgefleet compress (bad recipe)": [py, "-m", "host_tools", "compress", model, "-o", str(work / "x.onnx"),
                                            "--recipe", "no-such"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--site", action="append", default=[], type=Path, help="a variant with DIR first on the path")
    args = parser.parse_args()
    variants = {"installed": None, **{str(d): d for d in args.site}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cmds = commands(work)
        times: dict[tuple[str, str], list[float]] = {(c, v): [] for c in cmds for v in variants}
        for r in range(args.rounds):
            for v, site in variants.items():
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                    [str(site)] * (site is not None) + [str(REPO)])}
                for name, cmd in cmds.items():
                    start = time.perf_counter()
                    done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
                    times[name, v].append(time.perf_counter() - start)
                    if done.returncode != ("bad" in name):  # a command that fails early is no measure
                        sys.exit(f"{name} ({v}) exited {done.returncode}: {done.stderr.strip()[-500:]}")
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        versions = {v: subprocess.run([sys.executable, "-c", "import ml_dtypes; print(ml_dtypes.__version__)"],
                                      env={**os.environ, "PYTHONPATH": str(site or "")}, cwd=work,
                                      capture_output=True, text=True).stdout.strip() or "-"
                    for v, site in variants.items()}
    print(machine_line())
    print(f"{args.rounds} rounds; median wall time per command (its time over `python -c pass`)")
    print(f"{'command':34s}" + "".join(f"{v + ' (ml_dtypes ' + versions[v] + ')':>34s}" for v in variants))
    for name in cmds:
        cells = []
        for v in variants:
            p50, bare = statistics.median(times[name, v]), statistics.median(times["python -c pass", v])
            cells.append(f"{p50:.2f} s (+{p50 - bare:.2f} s)")
        print(f"{name:34s}" + "".join(f"{c:>34s}" for c in cells))


if __name__ == "__main__":
    main()
