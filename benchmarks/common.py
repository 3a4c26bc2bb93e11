"""What the benchmark scripts share: a broker of their own, and the machine they ran on."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
# A script measures the code of the checkout it sits in, whatever PYTHONPATH says; the processes it
# starts with `python -m` import from the working directory first. To compare with older code, run
# the older worktree's copy of the script from inside that worktree (`cd /tmp/old && python
# benchmarks/...`), alternating with this one.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from host_tools.broker import EmbeddedBroker, free_port  # noqa: E402


def mosquitto_exe() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def _more_files() -> None:
    """Let the broker hold thousands of connections (the default soft limit is 1024 files)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def start_broker(workdir: Path, *, require_mosquitto: bool = False, extra_conf: str = ""):
    """(address, stop, name) of a broker on a free loopback port: Mosquitto if installed, else
    (unless *require_mosquitto*) the host extra's embedded broker."""
    exe = mosquitto_exe()
    if exe:
        port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{extra_conf}")
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_more_files)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)

        def stop() -> None:
            proc.terminate()
            proc.wait(10)
        version = subprocess.run([exe, "-h"], capture_output=True, text=True).stdout.split("\n", 1)[0]
        return f"127.0.0.1:{port}", stop, version.strip() or "mosquitto"
    if require_mosquitto:
        sys.exit("this benchmark needs Mosquitto (apt-get install mosquitto)")
    broker = EmbeddedBroker()
    broker.start()
    return str(broker.address), broker.stop, "amqtt (embedded)"


def machine_line() -> str:
    return (f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
            f"python {sys.version.split()[0]}")


def make_bundle(work: Path, size: int, key: Path, *, name: str = "big", version: str = "1.0.0") -> Path:
    """A signed bundle whose model is a MatMul with a size-byte weight, summed to one number: a real,
    loadable ONNX model, and a bundle of about *size* bytes (random weights do not compress)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from host_tools.packaging import build_bundle

    cols = max(1, size // (16 * 4))
    weight = np.random.default_rng(0).standard_normal((16, cols)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("ReduceSum", ["xw"], ["y"], keepdims=0)],
        name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(weight, "w")])
    model = work / f"{name}-{version}-{size}.onnx"
    onnx.save(helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    out = work / f"{name}-{version}-{size}.efb"
    build_bundle(model, name=name, version=version, key=key, out=out, sample={"x": np.ones((1, 16), np.float32)})
    return out
