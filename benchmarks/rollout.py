"""A 4 MiB bundle rolled out to 1,000 simulated devices in three stages, on one local Mosquitto.

    python benchmarks/rollout.py            # 1,000 devices (~5 minutes with the set-up)
    python benchmarks/rollout.py --quick    # 200 devices

Set-up (not timed): a Mosquitto of its own; `edgefleet monitor` as its own process (the device
registry the rollout reads); 1,000 devices from `edgefleet simulate`'s machinery (host_tools.simulate:
real agents, 100 to a worker process, each with its own MQTT session, state directory, update
lifecycle and telemetry, sharing one loaded model per process), every one provisioned with a small
1.0.0 of the model and online in the registry.

Timed: `Rollout.run()` in this process (as `edgefleet rollout start` runs it) of a 4 MiB 2.0.0 of
that model to the group: stages 5% -> 25% -> 100%, health window 0 (the windows are a policy, not
transfer time; each device still serves its new bundle for the agent's 1 s trial before it commits),
until every device has committed. Measured in the same run:
- wall time, per stage and in all;
- bytes the broker sent (its $SYS/broker/bytes/sent counter, before and after), per device, against
  the bundle's size: about one bundle per device when no device is sent chunks it does not need;
- chunk bytes the host published (the bundle server's count), per device: under one bundle per
  device where the broker fans chunks out to devices fetching together;
- bytes of chunk messages each device received (counted by its agent), the largest against the
  bundle's size: that no device fetched the bundle more than once; and the chunks they asked for
  again (no answer within their retry time);
- devices that did not commit (a download that failed on a slow machine), with their reasons;
- CPU seconds of the host side (this process: rollout and bundle server), the monitor, the broker
  and the simulated devices.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, make_bundle, start_broker  # noqa: E402

from device_agent.bundle.signing import generate_key_pair  # noqa: E402
from device_agent.mqtt import BrokerAddress, MqttClient  # noqa: E402
from device_agent.protocol.chunks import DEFAULT_CHUNK_SIZE  # noqa: E402
from host_tools.fleet.store import FleetStore  # noqa: E402
from host_tools.rollout import Rollout, RolloutPlan, RolloutStore  # noqa: E402
from host_tools.signer import CommandSigner  # noqa: E402
from host_tools.simulate import FleetSpec, SimulatedFleet  # noqa: E402

MiB = 2**20
STAGES = [5.0, 25.0, 100.0]
TRIAL_S = 1.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BrokerCounter:
    """Mosquitto's own count of the bytes it has sent ($SYS, published every second here)."""

    def __init__(self, client: MqttClient) -> None:
        self.value, self._at = None, 0.0
        client.subscribe("$SYS/broker/bytes/sent", self._on, qos=0, wait=5.0)

    def _on(self, topic: str, payload: bytes) -> None:
        self.value, self._at = int(payload), time.monotonic()

    def fresh(self) -> int:
        asked = time.monotonic()
        while self._at <= asked + 0.05:  # one published after we asked
            time.sleep(0.1)
        return self.value


def cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def wait_for_fleet(db: Path, count: int, label: str, fleet: SimulatedFleet) -> None:
    store = FleetStore(db)
    deadline, last = time.monotonic() + 900, 0.0
    while time.monotonic() < deadline:
        failure = fleet.failure()
        if failure:
            sys.exit(failure)
        rows = [r for r in store.devices() if r.online and r.active_bundle == label]
        if len(rows) >= count:
            return
        if time.monotonic() - last > 10:
            log(f"  {len(rows)}/{count} devices online with {label}")
            last = time.monotonic()
        time.sleep(1)
    sys.exit(f"only {len(rows)}/{count} devices came online")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 devices instead of 1,000")
    parser.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size-mib", type=float, default=4.0, help="The new bundle's size [4].")
    parser.add_argument("--max-in-flight", type=int, default=250, help="Devices updating at once [250].")
    parser.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK_SIZE // 1024,
                        help=f"Transfer chunk size in KiB [{DEFAULT_CHUNK_SIZE // 1024}].")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (logs, databases).")
    args = parser.parse_args()
    count = args.devices or (200 if args.quick else 1000)

    work = Path(tempfile.mkdtemp(prefix="ef-rollout-", dir="/tmp"))
    broker, stop_broker, broker_name = start_broker(
        work, require_mosquitto=True, extra_conf="max_queued_messages 100000\nset_tcp_nodelay true\nsys_interval 1\n"
                   f"log_dest file {work}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\n")
    me = psutil.Process()
    monitor = fleet = host = None
    try:
        key, pub = generate_key_pair(work, "bench")
        old = make_bundle(work, 64 * 1024, key, name="fleet-model", version="1.0.0")
        new = make_bundle(work, int(args.size_mib * MiB), key, name="fleet-model", version="2.0.0")
        size = new.stat().st_size
        db = work / "fleet.db"
        with open(work / "monitor.log", "wb") as monitor_log:
            monitor = subprocess.Popen([sys.executable, "-m", "host_tools", "monitor", "--broker", broker, "--db",
                                        str(db), "--name", f"bench-{uuid.uuid4().hex[:6]}"], stderr=monitor_log)
        while not db.exists():
            time.sleep(0.1)
        log(f"starting {count} simulated devices with fleet-model 1.0.0")
        fleet = SimulatedFleet(FleetSpec(broker=broker, trusted=[str(pub)], state_root=str(work / "devices"),
                                         first=0, count=count, total=count, labels={"group": "bench"},
                                         bundle=str(old), telemetry_interval=10.0, inference_interval=2.0,
                                         trial_seconds=TRIAL_S), per_worker=100)
        fleet.start()
        wait_for_fleet(db, count, "fleet-model 1.0.0", fleet)
        host = MqttClient(client_id="bench-rollout", broker=BrokerAddress.parse(broker))
        host.connect()
        counter = BrokerCounter(host)
        broker_proc = next(p for p in me.children() if p.name() == "mosquitto")
        workers = [p for p in me.children() if p.pid not in (broker_proc.pid, monitor.pid)]
        time.sleep(2)
        devices_before = {d["id"]: d for d in fleet.devices()}
        sent_before = counter.fresh()
        groups = {"host": [me], "monitor": [psutil.Process(monitor.pid)], "broker": [broker_proc], "devices": workers}
        cpu_before = {name: cpu_of(procs) for name, procs in groups.items()}

        store = RolloutStore(FleetStore(db))
        plan = RolloutPlan(bundle=str(new), selectors=["group=bench"], stages=STAGES, window_s=0.0,
                           stage_timeout_s=600.0, max_p99_ratio=None,
                           max_in_flight=args.max_in_flight, chunk_size=args.chunk_kib * 1024)
        rollout_id = store.create(plan)
        stage_started: list[float] = []

        def on_log(line: str) -> None:
            if line.startswith("stage "):
                stage_started.append(time.monotonic())
            log("  " + line)

        last_line = [0.0]

        def on_progress(stage: int, counts) -> None:
            if time.monotonic() - last_line[0] > 5:
                log(f"    stage {stage + 1}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
                last_line[0] = time.monotonic()

        log(f"rolling fleet-model 2.0.0 ({size / MiB:.2f} MiB) out to {count} devices in stages "
            + " -> ".join(f"{s:g}%" for s in STAGES))
        started = time.monotonic()
        rollout = Rollout(store, rollout_id, host, CommandSigner.load(key), log=on_log, progress=on_progress)
        doc = rollout.run()
        served = rollout.server.stats
        wall = time.monotonic() - started
        stage_times = [b - a for a, b in zip(stage_started, stage_started[1:] + [started + wall])]
        states = {}
        for d in doc["devices"]:
            states[d["state"]] = states.get(d["state"], 0) + 1
        # Devices that did not end active are reported with the results (a slow machine fails some).
        unfinished = [f"{d['device_id']}: {d['reason']}" for d in doc["devices"] if d["state"] != "active"]
        if doc["state"] != "done" and not unfinished:
            sys.exit(f"rollout ended {doc['state']} ({doc['reason']}): {states}")
        sent = counter.fresh() - sent_before
        cpu = {name: cpu_of(procs) - cpu_before[name] for name, procs in groups.items()}
        time.sleep(2)  # the workers' next report
        after = fleet.devices()
        received = {d["id"]: d["chunk_bytes"] - devices_before[d["id"]]["chunk_bytes"] for d in after}
        asked_again = sum(d["asked_again"] - devices_before[d["id"]]["asked_again"] for d in after)
    finally:
        if host is not None:
            host.disconnect()
        if fleet is not None:
            fleet.stop()
        if monitor is not None:
            monitor.send_signal(signal.SIGTERM)  # not SIGINT: a script's background jobs ignore it
            monitor.wait(30)
        stop_broker()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nrollout of a {size / MiB:.2f} MiB bundle in {args.chunk_kib} KiB chunks to {count} simulated devices "
          f"({-(-count // 100)} worker processes), stages {' -> '.join(f'{s:g}%' for s in STAGES)}, "
          f"at most {args.max_in_flight} updating at once, health window 0, {TRIAL_S:g} s trial per device, "
          f"broker {broker_name}")
    print(f"{'':<48} {'value':>12}")
    for n, seconds in enumerate(stage_times):
        print(f"{f'stage {n + 1} ({STAGES[n]:g}%) wall time, s':<48} {seconds:>12.1f}")
    print(f"{'all committed, wall time, s':<48} {wall:>12.1f}   (target <= 120)")
    print(f"{'broker bytes sent per device / bundle size':<48} {sent / count / size:>12.3f}")
    print(f"{'chunk bytes received per device / bundle size':<48} {sum(received.values()) / count / size:>12.3f}")
    ratios = sorted(r / size for r in received.values())
    print(f"{'  per device: median / p99 / max':<48} {ratios[len(ratios) // 2]:>5.2f} / "
          f"{ratios[int(len(ratios) * 0.99)]:.2f} / {ratios[-1]:.2f}   ({sum(r >= 2 for r in ratios)} of {count} "
          f"received 2 bundles' worth or more)")
    print(f"{'chunks devices asked for again (answer late)':<48} {asked_again:>12}")
    print(f"{'host chunk bytes published per device / bundle size':<48} {served.bytes_sent / count / size:>12.3f}   "
          f"({served.fanout_chunks} chunks fanned out, {served.chunks_sent - served.fanout_chunks} sent to one "
          f"device, {served.fanout_saved} not re-sent; answers waited {served.waited_s:.1f} s for the broker)")
    for name, seconds in cpu.items():
        print(f"{f'CPU s: {name}':<48} {seconds:>12.1f}   ({seconds / wall:.0%} of one core)")
    if unfinished:
        print(f"\n{len(unfinished)} of {count} devices did not commit ({states}): " + "; ".join(unfinished)[:2000])
    verdict = "MEETS" if wall <= 120 and ratios[-1] < 2 and not unfinished else "MISSES"
    print(f"\ntarget: all {count} committed within 2 minutes, no device fetching the bundle more than once: {verdict}")
    print(machine_line())


if __name__ == "__main__":
    main()
