"""``edgefleet demo``: the whole path on one machine, with real parts.

Embedded broker (or --broker) -> key pair -> int8 compression with a before/after
table -> signed bundle -> three agent processes -> deployment over MQTT with
progress -> telemetry -> fleet table -> clean shutdown.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from device_agent.bundle.signing import generate_key_pair
from device_agent.errors import ConfigError
from device_agent.mqtt import BrokerAddress, MqttClient, throwaway_client_id
from host_tools import terminal

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL_NAME = "digits-cnn"
MODEL_VERSION = "1.0.0"


def find_reference_model() -> tuple[Path, Path, Path]:
    """The reference model, its held-out evaluation set and its calibration set."""
    for root in (REPO_MODELS, Path.cwd() / "models"):
        files = root / "digits_cnn.onnx", root / "digits_heldout.npz", root / "digits_calib.npz"
        if all(f.is_file() for f in files):
            return files
    raise ConfigError("reference model models/digits_cnn.onnx not found: run the demo from an edgefleet checkout")


class AgentProcesses:
    """Device agents as separate OS processes, as if each were its own Raspberry Pi."""

    def __init__(self, workdir: Path, broker: BrokerAddress, public_key: Path) -> None:
        self._workdir, self._broker, self._key = workdir, broker, public_key
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, device_id: str, *, telemetry_interval: float = 1.0) -> None:
        state = self._workdir / "devices" / device_id
        state.mkdir(parents=True, exist_ok=True)
        log = open(state / "agent.log", "ab")
        self.procs[device_id] = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--device-id", device_id, "--state-dir", str(state),
             "--broker", str(self._broker), "--trusted-key", str(self._key),
             "--telemetry-interval", str(telemetry_interval),
             # stand in for an application, so the demo's telemetry has inferences to show
             "--inference-interval", "0.05"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def run_demo(*, broker: str | None, device_count: int, workdir: Path | None, timeout: float) -> bool:
    from host_tools.fleet.ingest import Ingest
    from host_tools.fleet.store import FleetStore

    console = terminal.console()
    reference = find_reference_model()  # before anything starts: a checkout without models fails at once
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefleet-demo-")))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)

        address = _broker(stack, broker, console)
        host = MqttClient(client_id=throwaway_client_id("edgefleet-demo"), broker=address)
        host.connect(timeout=5)
        stack.callback(host.disconnect)

        private_key, public_key = generate_key_pair(workdir / "keys", f"demo-{int(time.time())}")
        console.print(f"[bold]2.[/] signing key pair: {private_key.name} / {public_key.name}")

        bundle, manifest = _compressed_bundle(console, workdir, private_key, reference)

        store = FleetStore(workdir / "fleet.db")
        stack.callback(store.close)
        Ingest(host, store).start()

        devices = [f"pi-{i:02d}" for i in range(1, device_count + 1)]
        agents = AgentProcesses(workdir, address, public_key)
        stack.callback(agents.stop)
        for device in devices:
            agents.start(device)
        console.print(f"[bold]5.[/] started {len(devices)} agent processes: {', '.join(devices)}")
        online = lambda: {r.device_id for r in store.devices() if r.online} >= set(devices)  # noqa: E731
        if not _wait_for(online, 30):
            console.print("[red]not every agent came online within 30s; see the agent logs in "
                          f"{workdir / 'devices'}[/]")
            return False

        deployed = _serve_and_deploy(stack, console, host, bundle, devices, private_key, timeout)
        ok = _fleet_reports(console, store, devices, manifest.label) and deployed
        console.print("[bold]8.[/] shutting down agents and broker")
    if ok:
        console.print(f"[green]demo passed:[/] {len(devices)} devices run {manifest.label} and report telemetry")
    else:
        console.print("[red]demo failed:[/] not every device activated the bundle and reported telemetry")
    return ok


def _broker(stack: contextlib.ExitStack, broker: str | None, console) -> BrokerAddress:
    """Step 1: the broker at *broker*, or an embedded one for the demo's length."""
    from host_tools.broker import EmbeddedBroker

    if broker is None:
        address = stack.enter_context(EmbeddedBroker()).address
        console.print(f"[bold]1.[/] embedded MQTT broker (amqtt) on {address}")
        return address
    console.print(f"[bold]1.[/] using MQTT broker at {BrokerAddress.parse(broker)}")
    return BrokerAddress.parse(broker)


def _serve_and_deploy(stack: contextlib.ExitStack, console, host: MqttClient, bundle: Path, devices: list[str],
                      private_key: Path, timeout: float) -> bool:
    """Step 6: serve the bundles' folder as `edgefleet serve --dir` does and deploy *bundle*; whether
    every device activated it."""
    from host_tools.bundle_directory import BundleDirectory
    from host_tools.deploy import run_deployment
    from host_tools.serve import BundleServer
    from host_tools.signer import CommandSigner

    server = BundleServer(host)
    BundleDirectory(server, [], bundle.parent).scan()
    server.start()
    stack.callback(server.stop)
    console.print(f"[bold]6.[/] serving {bundle.parent} (as `edgefleet serve` does) and deploying over MQTT "
                  "(devices fetch the chunks they ask for; the broker fans them out):")
    results = run_deployment(host, bundle, devices, signer=CommandSigner.load(private_key), timeout=timeout,
                             chunk_size=16 * 1024, serve=False)
    for d, p in results.items():
        if not p.succeeded:
            console.print(f"[red]{d}: {p.state}: {p.reason}[/]")
    return all(p.succeeded for p in results.values())


def _fleet_reports(console, store, devices: list[str], label: str) -> bool:
    """Step 7: every device reports telemetry from *label* and names it as active; the fleet table."""
    from host_tools.fleet.view import fleet_table

    console.print("[bold]7.[/] waiting for telemetry from the new model…")

    def reporting() -> bool:
        # telemetry from the new model, and each device's status naming it (sent once committed)
        announced = {r.device_id for r in store.devices() if r.active_bundle == label}
        return all(d in announced and store.telemetry_count(d, label) >= 2 for d in devices)
    telemetry_ok = _wait_for(reporting, 20)
    rows = store.devices()
    console.print(fleet_table(rows))
    return telemetry_ok and all(r.active_bundle == label for r in rows if r.device_id in devices)


def _compressed_bundle(console, workdir: Path, private_key: Path, reference: tuple[Path, Path, Path]):
    """Steps 3 and 4: the reference model quantized and measured, then packaged and signed."""
    from host_tools.compress import ModelFile, load_dataset, load_recipe, run_recipe
    from host_tools.compress.report import report_table, slower_note
    from host_tools.packaging import build_bundle

    model, heldout, calib = reference
    console.print(f"[bold]3.[/] compressing {model.name} with static int8 quantization (calibrated on "
                  f"{calib.name}); measuring both on the {heldout.name} held-out set…")
    report = run_recipe(ModelFile.open(model), load_recipe("int8-static", "onnx"), calib=calib,
                        eval_data=heldout, out=workdir / "digits_cnn.int8.onnx")
    console.print(report_table(report, title="before / after (measured on this machine)"))
    if note := slower_note(report):  # int8 is slower than float on many CPUs: the demo says so, as compress does
        console.print(f"[dim]{note}[/]", highlight=False)
    data = load_dataset(heldout)
    (workdir / "bundles").mkdir(exist_ok=True)
    bundle = workdir / "bundles" / f"{MODEL_NAME}-{MODEL_VERSION}.efb"
    manifest = build_bundle(report.result.model.path, name=MODEL_NAME, version=MODEL_VERSION, key=private_key,
                            out=bundle, sample={"image": data.arrays["x"][:1]}, atol=1e-4,
                            compression=report.to_dict())
    console.print(f"[bold]4.[/] signed bundle {bundle.name}: {manifest.label}, {bundle.stat().st_size} bytes")
    return bundle, manifest
