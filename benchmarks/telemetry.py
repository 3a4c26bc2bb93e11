"""Telemetry at fleet scale: ingest throughput with 1,000 devices on real MQTT connections, and
what the collectors cost on one device.

    python benchmarks/telemetry.py           # ~2 minutes
    python benchmarks/telemetry.py --quick   # 200 devices

(1) Ingest. `edgefleet monitor` (a separate process, as deployed) ingests from one local
    Mosquitto. 1,000 simulated devices (worker processes of 250, one MQTT connection each,
    publishing what the agent publishes: `telemetry_batch` messages, readings as a Jetson's) first
    report at 1 Hz for a while, then all send a 30-sample backlog at once, as they would after an
    outage (encoded before the clock starts: a fleet's devices encode on their own CPUs, not on
    the 2 cores the monitor has here). Measured: samples/s the ingest stores while catching up,
    with every (device, seq) checked to be there exactly once; against a raw SQLite loop inserting
    the same rows into the same schema in the same run (one transaction per message, as the
    ingest does).
(2) Collectors. The agent's default collectors on this machine (real /proc and /sys) and on the
    fixture trees of real boards (tests/fixtures/boards): CPU time per collection, and that as a
    share of one core at one collection a second.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_line, start_broker  # noqa: E402

from device_agent.mqtt import BrokerAddress, MqttClient  # noqa: E402
from device_agent.protocol import topics  # noqa: E402
from device_agent.protocol.reports import TelemetryBatch, TelemetrySample  # noqa: E402
from device_agent.telemetry import REGISTRY, CollectorContext, TelemetryCollectors  # noqa: E402

PER_WORKER = 250
BACKLOG = 30
BOARDS = REPO / "tests" / "fixtures" / "boards"


def jetson_readings() -> dict:
    ctx = CollectorContext(sysfs=BOARDS / "jetson-orin-nano-jp6" / "sys", vcgencmd=lambda *a: None)
    readings = TelemetryCollectors(ctx).collect()
    readings["queue"] = {"pending": 0, "dropped": 0}
    return readings


# -- simulated devices (worker processes) -----------------------------------------------------
def worker(args) -> None:
    broker = BrokerAddress.parse(args.broker)
    ids = [f"sim-{i:04d}" for i in range(args.first, args.first + args.devices)]
    readings = jetson_readings()
    clients = []
    for device_id in ids:
        c = MqttClient(client_id=f"bench-{device_id}", broker=broker)
        c.connect(timeout=60)
        clients.append(c)
    print("ready", flush=True)
    seq = {d: 0 for d in ids}

    def batch(device_id: str, n: int) -> bytes:
        samples = []
        for _ in range(n):
            seq[device_id] += 1
            samples.append(TelemetrySample(device_id, seq[device_id], time.time(), 1.0, "digits-cnn 1.0.0", readings))
        return TelemetryBatch(device_id, tuple(samples)).to_payload()

    backlog: list[bytes] = []
    for line in sys.stdin:
        command = line.split()
        if command[0] == "tick":  # one sample from every device, spread over the second
            for device_id, client in zip(ids, clients):
                client.publish(topics.telemetry(device_id), batch(device_id, 1), qos=1)
                time.sleep(0.9 / len(ids))
        elif command[0] == "prepare":  # what each queued during an outage, in batches of 30 (untimed)
            backlog = [batch(device_id, BACKLOG) for device_id in ids]
        elif command[0] == "backlog":  # ... and sent at once
            for device_id, client, payload in zip(ids, clients, backlog):
                client.publish(topics.telemetry(device_id), payload, qos=1)
        elif command[0] == "quit":
            break
        print(json.dumps(seq), flush=True)
    for c in clients:
        c.disconnect()


def stored(db: Path) -> tuple[int, int]:
    """(rows, distinct (device, seq)) in the fleet database."""
    with sqlite3.connect(db, timeout=30) as con:
        return con.execute("SELECT COUNT(*), COUNT(DISTINCT device_id || ':' || seq) FROM telemetry").fetchone()


def raw_sqlite_rate(work: Path, rows: int, per_transaction: int) -> float:
    """Samples/s for a bare loop inserting the same rows into the fleet schema."""
    from host_tools.fleet.store import SCHEMA

    con = sqlite3.connect(work / "raw.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.executescript(SCHEMA)
    body = json.dumps(jetson_readings())
    start = time.perf_counter()
    for first in range(0, rows, per_transaction):
        con.execute("BEGIN IMMEDIATE")
        con.executemany("INSERT OR IGNORE INTO telemetry VALUES (?,?,?,?,?)",
                        [(f"raw-{i % 1000:04d}", i, time.time(), "digits-cnn 1.0.0", body)
                         for i in range(first, min(rows, first + per_transaction))])
        con.execute("COMMIT")
    elapsed = time.perf_counter() - start
    con.close()
    return rows / elapsed


def collector_cost() -> list[tuple[str, float]]:
    """(where, CPU ms per collection) for the default collectors."""
    out = []
    state = Path(tempfile.gettempdir())  # the disk collector's file system: this machine's in every row
    contexts = [("this machine (/proc, /sys)", CollectorContext(state_dir=state))]
    for board in ("jetson-orin-nano-jp6", "jetson-nano-jp4", "x86-laptop"):
        contexts.append((f"fixture: {board}", CollectorContext(sysfs=BOARDS / board / "sys",
                                                                vcgencmd=lambda *a: None, state_dir=state)))
    recorded = lambda *a: (BOARDS / "rpi5" / "vcgencmd" / a[0]).read_text()  # noqa: E731
    contexts.append(("fixture: rpi5 (recorded vcgencmd, no fork)", CollectorContext(
        sysfs=BOARDS / "rpi5" / "sys", vcgencmd=recorded, state_dir=state)))
    for where, ctx in contexts:
        collectors = TelemetryCollectors(ctx)
        collectors.collect()
        n = 200
        start = time.thread_time()
        for _ in range(n):
            collectors.collect()
        out.append((where, (time.thread_time() - start) / n * 1000))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    devices, ticks = (200, 5) if args.quick else (1000, 10)
    work = Path(tempfile.mkdtemp(prefix="ef-telemetry-", dir="/tmp"))
    broker, stop_broker, broker_name = start_broker(work, require_mosquitto=True,
                                                    extra_conf="max_queued_messages 100000\nset_tcp_nodelay true\n")
    db = work / "fleet.db"
    log = open(work / "monitor.log", "wb")
    monitor = subprocess.Popen([sys.executable, "-m", "host_tools", "monitor", "--broker", broker, "--db", str(db),
                                "--name", "bench"], stderr=log)
    workers = []
    try:
        while not db.exists():
            time.sleep(0.1)
        time.sleep(1)
        print(f"connecting {devices} simulated devices", file=sys.stderr, flush=True)
        for first in range(0, devices, PER_WORKER):
            workers.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", "--broker", broker, "--first", str(first),
                 "--devices", str(min(PER_WORKER, devices - first))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for w in workers:
            assert w.stdout.readline().strip() == "ready"

        def everyone(command: str) -> dict[str, int]:
            for w in workers:
                w.stdin.write(command + "\n")
                w.stdin.flush()
            seqs: dict[str, int] = {}
            for w in workers:
                seqs.update(json.loads(w.stdout.readline()))
            return seqs

        print(f"reporting at 1 Hz for {ticks} s", file=sys.stderr, flush=True)
        for _ in range(ticks):
            everyone("tick")
        sent = devices * ticks
        deadline = time.monotonic() + 60
        while stored(db)[0] < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        steady_rows = stored(db)[0]
        everyone("prepare")
        print(f"all {devices} devices send a {BACKLOG}-sample backlog at once", file=sys.stderr, flush=True)
        start = time.perf_counter()
        seqs = everyone("backlog")
        total = sum(seqs.values())
        last_change, last = time.perf_counter(), stored(db)[0]
        while last < total and time.perf_counter() - last_change < 30:
            time.sleep(0.05)
            now_rows = stored(db)[0]
            if now_rows != last:
                last, last_change = now_rows, time.perf_counter()
        elapsed = last_change - start
        rows, distinct = stored(db)
        backlog_rows = rows - steady_rows
        for w in workers:
            w.stdin.write("quit\n")
            w.stdin.flush()
    finally:
        for w in workers:
            w.kill()
        monitor.terminate()
        monitor.wait(30)
        log.close()
        stop_broker()
    raw_per_message = raw_sqlite_rate(work, 30_000, BACKLOG)
    raw_single = raw_sqlite_rate(work, 5_000, 1)
    shutil.rmtree(work, ignore_errors=True)
    costs = collector_cost()

    rate = backlog_rows / elapsed if elapsed > 0 else float("nan")
    print(f"\n(1) ingest: `edgefleet monitor`, {devices} devices on their own MQTT connections, broker {broker_name}")
    print(f"    1 Hz for {ticks} s: {steady_rows} of {sent} samples stored")
    print(f"    backlog: {backlog_rows} samples ({devices} x {BACKLOG}) stored in {elapsed:.2f} s = {rate:,.0f} samples/s"
          f"  target ≥ 5,000: {'meets' if rate >= 5000 else 'MISSES'}")
    print(f"    stored {rows} rows for {total} samples sent, {distinct} distinct (device, seq): "
          f"{total - distinct} lost, {rows - distinct} duplicated")
    print(f"    raw SQLite loop, same rows and schema: {raw_per_message:,.0f} samples/s at {BACKLOG} per transaction, "
          f"{raw_single:,.0f} at 1 per transaction; ingest / raw = {rate / raw_per_message:.2f}")
    print(f"\n(2) collectors ({', '.join(n for n, c in REGISTRY.items() if c.enabled_by_default)}), "
          "CPU per collection")
    print(f"{'where':<46} {'ms':>7} {'% of a core at 1 Hz':>20}")
    for where, ms in costs:
        print(f"{where:<46} {ms:>7.3f} {ms / 10:>20.3f}  target ≤ 1%: {'meets' if ms / 10 <= 1 else 'MISSES'}")
    print(f"\n{machine_line()}")


if __name__ == "__main__":
    main()
