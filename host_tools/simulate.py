"""A simulated fleet: many real agents in a few processes, for testing rollout policies.

Each simulated device is the real `Agent` (device_agent.agent): its own MQTT connection and
persistent session, client id, state directory, trusted keys, signed-command checks, update state
machine (download, verify, health check, activate, trial, commit, rollback) and telemetry queue.
What is shared, so that 1,000 fit on one machine:

- one loaded runtime per model per process (`SharedModels`): the first device to check a bundle
  loads it and runs the real health check; the others reuse that result (each device still
  downloads, verifies and unpacks its own copy);
- no local inference API, and only the `inference` collector (the others would read this
  machine's CPU, memory and power sensors a thousand times over); each device runs its model on
  the bundle's sample input every `inference_interval` through its own slot, so the latency it
  reports is measured, on this machine.

Faults, so rollout policies can be tried (each a share of the fleet, spread evenly over the ids in
order, so any run of k devices has about k x share of them):

(faults concern the models a device did not have when it started: it can always go back)

- ``reject``: the health check refuses every bundle the device did not have when it started;
- ``slow``:   a new model really runs ``slow_factor`` times longer (the runtime sleeps after each call
  for (factor - 1) x the call's time), so the latency the device measures and reports is that long;
- ``errors``: every fifth inference call of a model the device did not start with fails (the
  health check's calls pass; the failures show in its telemetry);
- ``offline``: the device drops off the network (no DISCONNECT: the broker publishes its will) as its
  first deploy command arrives, and comes back ``offline_for`` seconds later to carry it out.

`edgefleet simulate` runs the devices in worker processes of `--per-worker` each (100 by default:
about 7 open files per device, and paho's select() cannot watch files numbered past 1,023) (this module's
``worker`` entry point) and shows how many are online and what they run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from device_agent.agent import Agent
from device_agent.bundle.signing import trusted_keys
from device_agent.config import AgentConfig
from device_agent.errors import EdgefleetError, HealthCheckError, ModelError
from device_agent.mqtt import BrokerAddress
from device_agent.protocol.commands import DeployCommand, parse_command
from device_agent.runtime import ModelRuntime, RuntimeOptions
from device_agent.store import InstalledBundle
from device_agent.update.health import health_check

log = logging.getLogger(__name__)
FAULTS = ("reject", "slow", "offline", "errors")


@dataclass(frozen=True)
class Faults:
    reject: float = 0.0
    slow: float = 0.0
    slow_factor: float = 5.0
    offline: float = 0.0
    offline_for: float = 30.0
    errors: float = 0.0

    def __post_init__(self) -> None:
        if any(not 0 <= getattr(self, f) <= 1 for f in FAULTS):
            raise EdgefleetError("fault shares (--reject, --slow, --offline, --errors) are fractions between 0 and 1")
        if self.slow_factor < 1 or self.offline_for < 0:
            raise EdgefleetError("--slow-factor is at least 1 and --offline-for is not negative")

    def of(self, index: int) -> frozenset[str]:
        """The faults of the device at *index*: device i has a fault of share s when
        floor((i + 1) s) > floor(i s), so they are spread evenly (s = 0.2: devices 4, 9, 14, ...)."""
        return frozenset(f for f in FAULTS if math.floor((index + 1) * getattr(self, f)) > math.floor(index * getattr(self, f)))


@dataclass(frozen=True)
class FleetSpec:
    """What one process simulates: devices *first* to *first + count* of the fleet."""

    broker: str
    trusted: list[str]
    state_root: str
    first: int
    count: int
    total: int
    prefix: str = "sim"
    labels: dict[str, str] = field(default_factory=dict)
    bundle: str | None = None          # installed and committed on every device before it starts
    faults: Faults = field(default_factory=Faults)
    telemetry_interval: float = 5.0
    inference_interval: float = 0.5
    trial_seconds: float = 1.0

    def device_id(self, index: int) -> str:
        return f"{self.prefix}-{index:0{max(4, len(str(self.total - 1)))}d}"


class SharedModels:
    """One loaded, checked runtime per bundle (by its sha256) for every device in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._checked: dict[str, tuple[ModelRuntime, dict[str, np.ndarray]] | EdgefleetError] = {}

    def check(self, bundle: InstalledBundle, options: RuntimeOptions) -> tuple[ModelRuntime, dict[str, np.ndarray]]:
        with self._lock:
            loading = self._loading.setdefault(bundle.sha256, threading.Lock())
        with loading:  # the first device loads it; the others wait for that and reuse it
            if bundle.sha256 not in self._checked:
                try:
                    self._checked[bundle.sha256] = health_check(bundle, options)
                except EdgefleetError as exc:
                    self._checked[bundle.sha256] = exc
        result = self._checked[bundle.sha256]
        if isinstance(result, EdgefleetError):
            raise result
        return result


class _Wrapped:
    """A runtime that behaves like *runtime* except for how it runs."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._runtime, self.name = runtime, runtime.name

    @property
    def inputs(self):
        return self._runtime.inputs

    @property
    def outputs(self):
        return self._runtime.outputs


class SlowRuntime(_Wrapped):
    """A runtime that takes *factor* times as long: it sleeps (factor - 1) x each call's time."""

    def __init__(self, runtime: ModelRuntime, factor: float) -> None:
        super().__init__(runtime)
        self._factor = factor

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self._runtime.run(feeds)
        time.sleep((time.perf_counter() - start) * (self._factor - 1))
        return out


class FlakyRuntime(_Wrapped):
    """A runtime whose every FAIL_EVERY-th call fails (the first succeeds: it passes the health check)."""

    FAIL_EVERY = 5

    def __init__(self, runtime: ModelRuntime) -> None:
        super().__init__(runtime)
        self._calls, self._lock = 0, threading.Lock()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self._calls += 1
            fail = self._calls % self.FAIL_EVERY == 0
        if fail:
            raise ModelError("simulated fault: this inference failed")
        return self._runtime.run(feeds)


class SimulatedDevice(Agent):
    """The real agent with a shared runtime, no local API, and its faults."""

    def __init__(self, config: AgentConfig, models: SharedModels, faults: frozenset[str], spec: FleetSpec) -> None:
        self.faults, self._spec, self._models = faults, spec, models
        super().__init__(config, check=self._check_model, collectors=["inference"], local_api=False)
        self._accepted = {b.sha256 for b in (self.store.by_name(n) for n in self.store.committed()) if b}
        self._went_offline = False

    def _check_model(self, bundle: InstalledBundle, options: RuntimeOptions):
        if "reject" in self.faults and bundle.sha256 not in self._accepted:
            raise HealthCheckError("simulated fault: this device rejects every new model")
        runtime, sample = self._models.check(bundle, options)
        if bundle.sha256 in self._accepted:  # faults are about models the device did not start with
            return runtime, sample
        if "slow" in self.faults:
            runtime = SlowRuntime(runtime, self._spec.faults.slow_factor)
        if "errors" in self.faults:
            runtime = FlakyRuntime(runtime)
        return runtime, sample

    def preinstall(self, bundle_path: Path) -> None:
        """Install, activate and commit *bundle_path* as a device provisioned with it would have."""
        bundle = self.store.install(bundle_path, self.keys)
        self.store.activate(bundle)
        self.store.commit(bundle, keep=self.config.keep_versions)
        self.store.record_release(bundle.manifest)
        self._accepted.add(bundle.sha256)

    def _on_command(self, topic: str, payload: bytes) -> None:
        if "offline" in self.faults and not self._went_offline and _is_deploy(payload, self.keys):
            self._went_offline = True
            log.warning("%s: simulated fault: offline for %gs", self.config.device_id, self._spec.faults.offline_for)
            self.client.drop()
            timer = threading.Timer(self._spec.faults.offline_for, self._come_back, args=(topic, payload))
            timer.daemon = True
            timer.start()
            return
        super()._on_command(topic, payload)

    def _come_back(self, topic: str, payload: bytes) -> None:
        self.client.connect_in_background()
        super()._on_command(topic, payload)

    def describe(self) -> dict[str, Any]:
        bundle = self.slot.bundle
        return {"id": self.config.device_id, "online": self.client.connected,
                "bundle": bundle.label if bundle else None, "update": self.machine.record.state,
                "chunk_bytes": self._chunks.received, "asked_again": self._chunks.asked_again}


def _is_deploy(payload: bytes, keys) -> bool:
    try:
        return isinstance(parse_command(payload, keys), DeployCommand)
    except EdgefleetError:
        return False


def build_devices(spec: FleetSpec) -> list[SimulatedDevice]:
    keys = tuple(Path(k) for k in spec.trusted)
    trusted_keys(keys)  # one clear error for a bad key file, before a thousand devices say it
    models = SharedModels()
    devices = []
    for index in range(spec.first, spec.first + spec.count):
        device_id = spec.device_id(index)
        config = AgentConfig(device_id=device_id, state_dir=Path(spec.state_root) / device_id, trusted_keys=keys,
                             broker=BrokerAddress.parse(spec.broker), telemetry_interval=spec.telemetry_interval,
                             inference_interval=spec.inference_interval, trial_seconds=spec.trial_seconds,
                             runtime=RuntimeOptions(threads=1),
                             labels={**spec.labels, "simulated": "true"})
        Path(config.state_dir).mkdir(parents=True, exist_ok=True)
        device = SimulatedDevice(config, models, spec.faults.of(index), spec)
        if spec.bundle and not device.store.committed():
            device.preinstall(Path(spec.bundle))
        devices.append(device)
    return devices


def worker(spec: FleetSpec) -> None:
    """Run *spec*'s devices until SIGTERM/SIGINT or stdin closes; a JSON line of their state every second."""
    devices = build_devices(spec)
    stop = threading.Event()
    # A handler only notes the signal (see Agent.on_signal): Ctrl-C reaches a worker twice at once,
    # from the terminal and from its parent, and a second Event.set inside the first would hang it.
    signalled: list[int] = []
    signal.signal(signal.SIGTERM, lambda number, _: signalled.append(number))
    signal.signal(signal.SIGINT, lambda number, _: signalled.append(number))
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()  # parent gone: stop
    for device in devices:
        device.start()
    while not (signalled or stop.wait(1.0)):
        print(json.dumps([d.describe() for d in devices]), flush=True)
    if signalled:  # the last line of its log, which the parent shows if it did not send the signal itself
        print(f"stopped by {signal.Signals(signalled[0]).name}", file=sys.stderr, flush=True)
    for device in devices:
        device.stop()
    # All at once: each waits on its own connection (with the broker gone, up to a second for its
    # network thread to leave its reconnect back-off): one after another, 100 devices took ~50 s.
    closing = [threading.Thread(target=device.shutdown, name=f"shutdown-{i}") for i, device in enumerate(devices)]
    for thread in closing:
        thread.start()
    for thread in closing:
        thread.join()


class SimulatedFleet:
    """The worker processes that together simulate *base.total* devices, *per_worker* each."""

    def __init__(self, base: FleetSpec, per_worker: int = 100) -> None:
        self.base, self.per_worker = base, per_worker
        self._procs: list[subprocess.Popen] = []
        self._latest: dict[int, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        Path(self.base.state_root).mkdir(parents=True, exist_ok=True)
        for n, first in enumerate(range(0, self.base.total, self.per_worker)):
            spec = replace(self.base, first=first, count=min(self.per_worker, self.base.total - first))
            with open(self.log_path(n), "ab") as log_file:
                proc = subprocess.Popen([sys.executable, "-m", "host_tools.simulate", spec_to_json(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file)
            self._procs.append(proc)
            threading.Thread(target=self._read, args=(n, proc), daemon=True).start()

    def log_path(self, n: int) -> Path:
        return Path(self.base.state_root) / f"worker-{n}.log"

    def _read(self, n: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                devices = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self._latest[n] = devices

    def devices(self) -> list[dict[str, Any]]:
        """Every device's last reported state (online, bundle, update state), in id order."""
        with self._lock:
            return [d for n in sorted(self._latest) for d in self._latest[n]]

    def failure(self) -> str | None:
        """Why a worker process ended early (the last line of its log), or None while all run."""
        for n, proc in enumerate(self._procs):
            if proc.poll() is not None:
                lines = self.log_path(n).read_text(errors="replace").strip().splitlines()
                return f"simulator worker {n} exited ({proc.returncode}): {lines[-1] if lines else 'no output'}"
        return None

    def stop(self, timeout: float = 60.0) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def summarize(devices: list[dict[str, Any]]) -> str:
    """"1000 devices: 998 online; digits-cnn 1.0.0 on 700, digits-cnn 2.0.0 on 298; 2 updating"."""
    online = sum(d["online"] for d in devices)
    versions = Counter(d["bundle"] or "no bundle" for d in devices)
    updating = sum(d["update"] != "idle" for d in devices)
    return (f"{len(devices)} devices: {online} online; "
            + ", ".join(f"{v} on {n}" for v, n in sorted(versions.items()))
            + (f"; {updating} updating" if updating else ""))


def spec_from_json(text: str) -> FleetSpec:
    doc = json.loads(text)
    return FleetSpec(**{**doc, "faults": Faults(**doc.get("faults", {}))})


def spec_to_json(spec: FleetSpec) -> str:
    return json.dumps({**asdict(spec), "faults": asdict(spec.faults)})


if __name__ == "__main__":  # python -m host_tools.simulate SPEC_JSON: one worker process
    logging.basicConfig(level=os.environ.get("EDGEFLEET_SIM_LOG", "WARNING"),
                        format=f"%(levelname)s sim[{os.getpid()}] %(name)s: %(message)s")
    worker(spec_from_json(sys.argv[1]))
