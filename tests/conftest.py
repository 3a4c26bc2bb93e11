"""Shared fixtures: a real Mosquitto broker, signing keys, the reference model and bundles,
and real agent processes that are killed when a test ends."""

from __future__ import annotations

import os

# Under xdist each worker would give PyTorch (OpenMP) a thread per core: with `-n 2`, four threads that
# spin-wait at every barrier, on two cores, made tests/host_tools 3x slower (466 s -> 146 s with one thread
# each). Set before numpy and torch are loaded; a run in one process keeps the defaults.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.signing import generate_key_pair
from device_agent.mqtt import BrokerAddress

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
FIXTURES = REPO / "tests" / "fixtures" / "models"  # made by the scripts there


# Tests run in three processes (`make test` passes `-n 3`). Ports the tests choose come from a range
# of their own per worker, below the kernel's ephemeral range (32768-60999 on Linux): no other
# worker, and no outgoing connection's source port, can take a port a test holds or has stopped
# a broker on and is about to use again.
_PORTS_PER_WORKER = 1000
_FIRST_PORT = 10000 + _PORTS_PER_WORKER * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
_ports_handed_out = 0


def free_port() -> int:
    """A loopback port nobody listens on, from this test process's own range."""
    global _ports_handed_out
    for _ in range(_PORTS_PER_WORKER):
        port = _FIRST_PORT + _ports_handed_out % _PORTS_PER_WORKER
        _ports_handed_out += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left in this test process's range")


# Tests marked `waits` spend most of a minute waiting (a broker outage, devices kept offline).
# They start first, so that the other worker runs the rest beside them rather than after them.
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("waits") is None)


def edgefleet(*args, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the host CLI as a user would, in its own process (*input*: what is typed at its prompts)."""
    return subprocess.run([sys.executable, "-m", "host_tools", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, input=input)


def wait_until(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def announced(broker, device_id: str, timeout: float = 30) -> bool:
    """Whether the agent *device_id* has announced itself online over MQTT. It subscribes to its
    command topic before it announces itself, so a command published after this reaches it; its
    local API answering (``wait_for_api``) says nothing of its broker connection, which it makes in
    the background and, on a loaded machine, later."""
    import threading

    from device_agent.mqtt import MqttClient
    from device_agent.protocol import topics
    from device_agent.protocol.reports import DeviceStatus

    online = threading.Event()
    watcher = MqttClient(client_id=f"test-announced-{device_id}-{os.getpid()}", broker=broker)
    watcher.subscribe(topics.status(device_id), lambda t, p: DeviceStatus.from_payload(p).online and online.set())
    watcher.connect()
    try:
        return online.wait(timeout)
    finally:
        watcher.disconnect()


class Mosquitto:
    """A real Mosquitto on a free loopback port; can be stopped and started again on the same port."""

    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.fail("mosquitto is not installed: run the README's test command (make test), "
                        "which installs it", pytrace=False)
        self.exe = exe
        self.address = BrokerAddress("127.0.0.1", free_port())
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(f"listener {self.address.port} 127.0.0.1\nallow_anonymous true\n"
                               "persistence false\nmax_queued_messages 10000\nset_tcp_nodelay true\n" + extra_conf)
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.config)], stdout=log, stderr=log)

        def accepting() -> bool:
            with socket.socket() as s:
                return s.connect_ex((self.address.host, self.address.port)) == 0
        if not wait_until(accepting, 10):
            raise RuntimeError(f"mosquitto did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> BrokerAddress:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker.address
    broker.stop()


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs: 'release' (devices trust it) and 'rogue' (nobody does)."""
    d = tmp_path_factory.mktemp("keys")
    release_key, release_pub = generate_key_pair(d, "release")
    rogue_key, rogue_pub = generate_key_pair(d, "rogue")
    # The host CLI signs commands with EDGEFLEET_SIGNING_KEY, as with a user's own default key.
    os.environ["EDGEFLEET_SIGNING_KEY"] = str(release_key)
    return {"key": release_key, "pub": release_pub, "rogue_key": rogue_key, "rogue_pub": rogue_pub}


@pytest.fixture(scope="session")
def reference_model() -> Path:
    return MODELS / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / "digits_heldout.npz") as data:
        return data["x"], data["y"]


@pytest.fixture(scope="session")
def expected_logits(heldout):
    """Four held-out images and the reference model's logits for them."""
    from device_agent.runtime import load_runtime

    reference = load_runtime("onnxruntime", MODELS / "digits_cnn.onnx")
    return heldout[0][:4], reference.run({"image": heldout[0][:4]})["logits"]


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory, keys, reference_model, heldout):
    """Build (and cache) a bundle of the reference model: make_bundle(version, key=..., model=...)."""
    from host_tools.packaging import build_bundle

    out_dir = tmp_path_factory.mktemp("bundles")
    cache: dict[tuple, Path] = {}

    def make(version: str = "1.0.0", *, key: Path | None = None, model: Path | None = None,
             name: str = "digits-cnn", input_name: str = "image", latency_budget_ms: float | None = None,
             compress: bool = True) -> Path:
        ident = (version, str(key), str(model), name, input_name, latency_budget_ms, compress)
        if ident not in cache:
            out = out_dir / f"{name}-{version}-{len(cache)}.efb"
            build_bundle(model or reference_model, name=name, version=version, key=key or keys["key"],
                         out=out, sample={input_name: heldout[0][:1]}, latency_budget_ms=latency_budget_ms,
                         compress=compress)
            cache[ident] = out
        return cache[ident]
    return make


@pytest.fixture(scope="session")
def padded_bundle(tmp_path_factory, keys):
    """padded_bundle(version, mib) -> a bundle whose model carries *mib* MiB of zero weights: it
    travels as a few KiB (zstd) and takes *mib* MiB once unpacked, as a pruned model does."""
    from onnx import TensorProto, helper, numpy_helper, save

    from host_tools.packaging import build_bundle

    out_dir = tmp_path_factory.mktemp("padded")

    def make(version: str, mib: float) -> Path:
        out = out_dir / f"padded-{version}-{mib:g}MiB.efb"  # (by size too: tests ask for one version in several)
        if not out.exists():
            pad = numpy_helper.from_array(np.zeros(int(mib * 2**18), np.float32), "pad")
            graph = helper.make_graph(
                [helper.make_node("Gather", ["pad", "first"], ["p"]), helper.make_node("Add", ["x", "p"], ["y"])],
                "padded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                [pad, numpy_helper.from_array(np.array([0], np.int64), "first")])
            model = out_dir / f"padded-{version}-{mib:g}MiB.onnx"
            save(helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
            build_bundle(model, name="padded", version=version, key=keys["key"], out=out,
                         sample={"x": np.ones((1, 4), np.float32)})
        return out
    return make


@pytest.fixture(scope="session")
def forge_bundle(tmp_path_factory, keys, reference_model, heldout):
    """A correctly signed bundle whose *content* is bad, as a broken build would make it:
    forge_bundle(version, model_bytes=...) or forge_bundle(version, output_offset=...)."""
    import datetime as dt

    from device_agent.bundle import FileEntry, Manifest, SampleCheck, sha256_file, write_bundle
    from device_agent.bundle.signing import load_private_key, sign
    from device_agent.runtime import load_runtime
    from device_agent.sample import save_sample

    out_dir = tmp_path_factory.mktemp("forged")

    def forge(version: str, *, model_bytes: bytes | None = None, output_offset: float = 0.0) -> Path:
        work = out_dir / version
        work.mkdir()
        model = work / "model.onnx"
        model.write_bytes(model_bytes if model_bytes is not None else reference_model.read_bytes())
        reference = load_runtime("onnxruntime", reference_model)
        inputs = {"image": heldout[0][:1]}
        expected = {k: v + output_offset for k, v in reference.run(inputs).items()}
        save_sample(work / "sample.npz", inputs, expected)
        files = {"model.onnx": model, "sample.npz": work / "sample.npz"}
        manifest = Manifest(
            name="digits-cnn", version=version, runtime="onnxruntime", model_file="model.onnx",
            files=tuple(FileEntry(p, f.stat().st_size, sha256_file(f)) for p, f in files.items()),
            inputs=reference.inputs, outputs=reference.outputs, sample=SampleCheck("sample.npz"),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        out = out_dir / f"digits-cnn-{version}.efb"
        write_bundle(out, manifest, sign(load_private_key(keys["key"]), manifest.to_json()), files)
        return out
    return forge


class AgentProcess:
    """A real `edgefleet-agent run` process. Its sockets live in a short directory of their own
    (a Unix socket path must fit in 107 bytes; pytest's tmp paths may not)."""

    def __init__(self, device_id: str, state_dir: Path, broker: BrokerAddress, trusted: Path, *,
                 telemetry_interval: float = 1.0, inference_interval: float = 0.05,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.device_id, self.state_dir = device_id, state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir = Path(tempfile.mkdtemp(prefix="ef-", dir="/tmp"))
        self.api_socket = self.socket_dir / "inference.sock"
        self.control_socket = self.socket_dir / "control.sock"
        self.args = [sys.executable, "-m", "device_agent", "run", "--device-id", device_id,
                     "--state-dir", str(state_dir), "--broker", str(broker), "--trusted-key", str(trusted),
                     "--telemetry-interval", str(telemetry_interval),
                     "--inference-interval", str(inference_interval),
                     "--api-socket", str(self.api_socket), "--control-socket", str(self.control_socket),
                     "--trial-seconds", "0.5", *extra_args]
        self.log = log or state_dir / "agent.log"  # (elsewhere for a test that fills the state directory's disk)
        self.proc: subprocess.Popen | None = None
        self.start(env)

    def start(self, env: dict[str, str] | None = None) -> "AgentProcess":
        """(Re)start the process on the same state directory, optionally with fault-injection *env*."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        return self

    def wait_for_api(self, timeout: float = 30) -> bool:
        """Wait until the agent answers on its inference and its control socket (a killed agent leaves
        stale files; the agent opens the inference socket first, so a test that asked for its status
        as soon as that one answered could find no control socket yet on a loaded machine)."""
        def answers(path) -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                return s.connect_ex(str(path)) == 0
        return bool(wait_until(lambda: self.proc.poll() is None and answers(self.api_socket)
                               and answers(self.control_socket), timeout))

    def wait_for_broker(self, timeout: float = 30) -> bool:
        """Wait until the agent says it is connected to its broker (it connects in the background,
        after its local API answers and after asking whether its device id is free)."""
        from device_agent.local_api import AgentClient

        def connected() -> bool:
            with AgentClient(self.control_socket, timeout=10) as client:
                return client.status()["connected"]
        return bool(wait_until(lambda: self.proc.poll() is None and connected(), timeout))

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def agents(tmp_path, mosquitto, keys):
    """Start real agent processes: agents.start('pi-01'); all are killed when the test ends."""
    started: list[AgentProcess] = []

    class Factory:
        def start(self, device_id: str, *, broker=None, state_dir: Path | None = None, **options) -> AgentProcess:
            agent = AgentProcess(device_id, state_dir or tmp_path / "devices" / device_id, broker or mosquitto,
                                 keys["pub"], **options)
            started.append(agent)
            return agent

    yield Factory()
    for agent in started:
        agent.cleanup()


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(mib, inodes=None) -> a directory on a file system of that size of its own (a
    tmpfs), to see what a full disk does. Mounting needs root: without it the test is skipped."""
    mounted: list[Path] = []

    def mount(mib: float, *, inodes: int | None = None) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small file system needs root")
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        options = f"size={int(mib * 2**20)}" + (f",nr_inodes={inodes}" if inodes else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "edgefleet-test", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path
    yield mount
    for path in mounted:  # lazily: an agent the test started may still have files open there
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(directory: Path) -> Path:
    """Write a file in *directory* until its file system has no room left; returns the file."""
    filler = directory / "filler"
    block = b"\xff" * 4096
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError:
            pass
    assert shutil.disk_usage(directory).free < len(block)
    return filler


@pytest.fixture
def monitor(tmp_path, mosquitto):
    """`edgefleet monitor` ingesting from the test broker; yields its database (the fleet registry)."""
    db = tmp_path / "fleet.db"
    with open(tmp_path / "monitor.log", "wb") as log:  # a file, not a pipe nobody reads that could fill up
        # A name of its own: monitors keep persistent sessions, and one test's must not inherit another's.
        proc = subprocess.Popen([sys.executable, "-m", "host_tools", "monitor", "--broker", str(mosquitto),
                                 "--db", str(db), "--name", f"test-{time.time_ns()}"], stderr=log)
    assert wait_until(db.exists, 15), "monitor did not create its database"
    yield db
    proc.send_signal(signal.SIGINT)
    proc.wait(10)
