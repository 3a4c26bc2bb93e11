"""What the agent costs: local inference API latency vs. a bare runtime loop, and the agent's
steady RSS and CPU at idle and while reporting telemetry.

    python benchmarks/agent_overhead.py            # ~2 minutes
    python benchmarks/agent_overhead.py --quick    # ~40 s, fewer calls and shorter windows

Everything is measured in this run on this machine: the bare loop and the API calls
alternate in rounds on the same model, so a noisy neighbour hits both, and the overhead
is quoted as a difference and a ratio of medians. Needs Mosquitto (or the host extra's
embedded broker) for the telemetry part.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_line, start_broker  # noqa: E402

from device_agent.bundle.signing import generate_key_pair, trusted_keys  # noqa: E402
from device_agent.local_api import InferenceClient  # noqa: E402
from device_agent.runtime import load_runtime  # noqa: E402
from device_agent.store import BundleStore  # noqa: E402
from host_tools.packaging import build_bundle  # noqa: E402


def timed_calls(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e6)
    return out


def agent_cpu_and_rss(proc: psutil.Process, seconds: float) -> tuple[float, float]:
    """CPU % of one core over *seconds*, and RSS in MiB at the end (children included: none)."""
    before = proc.cpu_times()
    start = time.monotonic()
    time.sleep(seconds)
    after = proc.cpu_times()
    elapsed = time.monotonic() - start
    cpu = (after.user - before.user + after.system - before.system) / elapsed * 100
    return cpu, proc.memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    calls, rounds, window = (300, 3, 10.0) if args.quick else (1000, 5, 30.0)

    work = Path(tempfile.mkdtemp(prefix="ef-bench-", dir="/tmp"))
    broker, stop_broker, broker_name = start_broker(work)
    agents: list[subprocess.Popen] = []
    try:
        key, pub = generate_key_pair(work, "bench")
        model = REPO / "models" / "digits_cnn.onnx"
        with np.load(REPO / "models" / "digits_heldout.npz") as data:
            x = data["x"][:1]
        bundle = work / "digits.efb"
        build_bundle(model, name="digits-cnn", version="1.0.0", key=key, out=bundle, sample={"image": x})
        state = work / "state"
        store = BundleStore(state)
        installed = store.install(bundle, trusted_keys([pub]))
        store.activate(installed)
        store.commit(installed, keep=3)

        # A second agent, identical but for --api-spin-us 0, shows what the API's polling window buys.
        shutil.copytree(state, work / "state-nospin", symlinks=True)

        def start_agent(telemetry_interval: float, name: str = "", *extra: str) -> subprocess.Popen:
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "device_agent", "run", "--device-id", f"bench-1{name}",
                 "--state-dir", str(work / f"state{name}"),
                 "--broker", broker, "--trusted-key", str(pub), "--telemetry-interval", str(telemetry_interval),
                 "--api-socket", str(work / f"api{name}.sock"), "--control-socket", str(work / f"ctl{name}.sock"),
                 "--threads", "1", "--log-level", "warning", *extra], stderr=subprocess.DEVNULL))
            return agents[-1]

        agent = start_agent(5.0)
        nospin = start_agent(5.0, "-nospin", "--api-spin-us", "0")
        deadline = time.monotonic() + 30
        while not all((work / f"api{n}.sock").is_socket() for n in ("", "-nospin")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)

        bare = load_runtime("onnxruntime", installed.files / installed.manifest.model_file,
                            __import__("device_agent.runtime", fromlist=["RuntimeOptions"]).RuntimeOptions(threads=1))
        feeds = {"image": x}
        results: dict[str, list[float]] = {"bare runtime": [], "API raw": [], "API raw, no spin": [],
                                           "API .npy": [], "API .npz": [], "API JSON": []}
        with InferenceClient(work / "api.sock") as client, InferenceClient(work / "api-nospin.sock") as plain:
            for _ in range(50):  # warm every path
                bare.run(feeds)
                client.infer(feeds)
                plain.infer(feeds)
            for r in range(rounds):
                print(f"round {r + 1}/{rounds}: {calls} calls per path", file=sys.stderr, flush=True)
                results["bare runtime"] += timed_calls(lambda: bare.run(feeds), calls)
                results["API raw"] += timed_calls(lambda: client.infer(feeds), calls)
                results["API raw, no spin"] += timed_calls(lambda: plain.infer(feeds), calls)
                results["API .npy"] += timed_calls(lambda: client.infer(x, format="npy"), calls)
                results["API .npz"] += timed_calls(lambda: client.infer(feeds, format="npz"), calls)
                results["API JSON"] += timed_calls(lambda: client.infer(feeds, format="json"), calls)

        nospin.terminate()
        nospin.wait(15)
        p = psutil.Process(agent.pid)
        print(f"measuring idle agent for {window:g} s", file=sys.stderr, flush=True)
        idle_cpu, idle_rss = agent_cpu_and_rss(p, window)
        agent.terminate()
        agent.wait(15)
        agent = start_agent(1.0)
        time.sleep(3)
        p = psutil.Process(agent.pid)
        print(f"measuring agent reporting every 1 s for {window:g} s", file=sys.stderr, flush=True)
        report_cpu, report_rss = agent_cpu_and_rss(p, window)
        agent.terminate()
        agent.wait(15)
    finally:
        for proc in agents:
            proc.kill()
            proc.wait()
        stop_broker()
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(results["bare runtime"])
    print(f"\nlocal inference API vs. bare runtime loop (digits_cnn.onnx, batch 1, ORT 1 thread, "
          f"{rounds} x {calls} calls per path, interleaved)")
    print(f"{'path':<18} {'p50 µs':>9} {'p90 µs':>9} {'p99 µs':>9} {'+p50 µs':>9} {'× p50':>7}  target")
    budget = max(0.05 * base, 100.0)
    for name, values in results.items():
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        extra = p50 - base
        verdict = "" if name == "bare runtime" else ("meets" if extra <= budget else "MISSES") + \
            f" (≤ {budget:.0f} µs)"
        print(f"{name:<18} {p50:>9.1f} {p90:>9.1f} {p99:>9.1f} {extra:>9.1f} {p50 / base:>7.2f}  {verdict}")
    print(f"\nagent process, {window:g} s windows, broker {broker_name}, no application load")
    print(f"{'state':<30} {'CPU % of one core':>18} {'RSS MiB':>9}  target")
    print(f"{'idle (telemetry every 5 s)':<30} {idle_cpu:>18.2f} {idle_rss:>9.1f}  "
          f"{'meets' if idle_cpu <= 0.5 else 'MISSES'} (≤ 0.5%)")
    print(f"{'reporting every 1 s':<30} {report_cpu:>18.2f} {report_rss:>9.1f}")
    print(f"\n{machine_line()}")


if __name__ == "__main__":
    main()
