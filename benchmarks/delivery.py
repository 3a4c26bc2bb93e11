"""Bundle delivery over MQTT against raw MQTT and HTTP, in one run against one local Mosquitto.

    python benchmarks/delivery.py            # 64 MiB to one device, 16 MiB to 100 devices (~5 min)
    python benchmarks/delivery.py --quick    # 16 MiB to one device, 4 MiB to 20 devices

(a) One device fetches a 64 MiB signed bundle the way the agent does (device_agent.transfer:
    windowed chunk requests, chunks subscribed at QoS 0, written to disk, whole-file SHA-256 (the
    chunks' CRC-32s looked at only if it fails), then BundleStore.install: signature and file
    hashes, unpacked; then the download deleted), against the same bytes as raw
    QoS 1 messages of the same size through the same broker (received and counted, nothing
    else; and once more with the subscriber doing the least a device must do with the bytes: one
    running SHA-256 over them as they arrive, and the write), and an HTTP GET of the file from a
    local stdlib server (read and discarded); --rounds times (9), the paths interleaved, medians
    reported; before each path the page cache is flushed (sync), and a round's files are deleted
    after it.
(b) 100 devices fetch a 16 MiB bundle at once (fan-out on), until every one has verified and
    installed it, against the broker fanning the same bytes out raw to 100 subscribers; for each
    path, the CPU seconds of the broker, of the host side and of the devices (they all share
    this machine's cores, so the fleet's time follows their sum).
(c) The device process's CPU seconds per MiB in (a), and what that would be on a Raspberry Pi 4
    (taken as 5x slower per core than this machine) downloading at 10 MB/s.

Devices run in worker processes of their own (25 per process, each with its own MQTT
connection and state directory); the host side (the BundleServer, the raw publisher, the HTTP
server) runs in this process. Every number is measured in this run.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, make_bundle, start_broker  # noqa: E402

from device_agent.bundle.signing import generate_key_pair, trusted_keys  # noqa: E402
from device_agent.mqtt import BrokerAddress, MqttClient  # noqa: E402
from device_agent.protocol import topics  # noqa: E402
from device_agent.protocol.chunks import DEFAULT_CHUNK_SIZE, BundleOffer  # noqa: E402
from device_agent.store import BundleStore  # noqa: E402
from device_agent.transfer import CHUNK_QOS, ChunkRouter, Download  # noqa: E402
from host_tools.serve import BundleServer  # noqa: E402

CHUNK = DEFAULT_CHUNK_SIZE  # what devices are offered unless `edgefleet deploy --chunk-size` says otherwise
DEVICES_PER_WORKER = 25
MiB = 2**20


# -- the device side, in worker processes ----------------------------------------------------
def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args: argparse.Namespace) -> None:
    """Connect args.devices MQTT clients, say "ready", wait for "go" on stdin, receive, report JSON."""
    broker = BrokerAddress.parse(args.broker)
    work = Path(args.workdir)
    ids = [f"{args.prefix}-{i}" for i in range(args.first, args.first + args.devices)]
    offer = BundleOffer(**json.loads(args.offer)) if args.offer else None
    clients, routers, counters = {}, {}, {}
    done, finished, downloaded = threading.Event(), {}, {}
    lock = threading.Lock()

    for device_id in ids:
        client = MqttClient(client_id=f"bench-{device_id}", broker=broker)
        if args.mode in ("raw", "rawcheck"):
            counters[device_id] = 0
            # rawcheck: the least a device must do with the bytes, without asking for them: one running
            # SHA-256 over them as they arrive (the whole file's, which the download checks), and the write
            out = open(work / f"{device_id}.raw", "wb") if args.mode == "rawcheck" else None
            digest = hashlib.sha256()

            def on_raw(topic, payload, device_id=device_id, out=out, digest=digest):
                if out is not None:
                    digest.update(payload)
                    out.write(payload)
                with lock:
                    counters[device_id] += len(payload)
                    if counters[device_id] >= args.size and device_id not in finished:
                        if out is not None:
                            out.close()
                            digest.hexdigest()
                        finished[device_id] = time.time()
                        if len(finished) == len(ids):
                            done.set()
            client.subscribe(args.topic, on_raw, qos=1)
        else:
            routers[device_id] = ChunkRouter()
            client.subscribe(topics.chunks(device_id), routers[device_id], qos=CHUNK_QOS)  # as the agent
        client.connect(timeout=30)
        clients[device_id] = client
    time.sleep(0.5)  # subscriptions granted
    print("ready", flush=True)
    sys.stdin.readline()
    cpu0 = cpu_seconds()
    errors = []
    if args.mode != "bundle":
        done.wait(600)
    else:
        keys = trusted_keys([Path(args.trusted)])

        def fetch(device_id: str) -> None:
            try:
                state = work / device_id
                store = BundleStore(state)
                download = Download(clients[device_id], routers[device_id], device_id, offer,
                                    store.download_path(offer.sha256), window=args.window)
                path = download.run()
                downloaded[device_id] = (time.time(), cpu_seconds())
                with lock:
                    counters[device_id] = (download.messages, download.duplicates, download.asked_again)
                try:
                    store.install(path, keys, sha256=offer.sha256)  # as the Verifying state does,
                finally:
                    path.unlink(missing_ok=True)  # which then deletes the download
                finished[device_id] = time.time()
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                errors.append(f"{device_id}: {exc}")
        threads = [threading.Thread(target=fetch, args=(d,)) for d in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    cpu = cpu_seconds() - cpu0
    for client in clients.values():
        client.disconnect()
    download_cpu = max((c for _, c in downloaded.values()), default=cpu0) - cpu0
    print(json.dumps({"finished": finished, "downloaded": {d: t for d, (t, _) in downloaded.items()},
                      "messages": sum(c[0] for c in counters.values()) if args.mode == "bundle" else 0,
                      "duplicates": sum(c[1] for c in counters.values()) if args.mode == "bundle" else 0,
                      "asked_again": sum(c[2] for c in counters.values()) if args.mode == "bundle" else 0,
                      "cpu_s": cpu, "download_cpu_s": download_cpu, "errors": errors}), flush=True)


class Workers:
    """Device worker processes for one measurement."""

    def __init__(self, count: int, mode: str, broker: str, workdir: Path, *, size: int, topic: str = "",
                 offer: BundleOffer | None = None, trusted: Path | None = None, prefix: str = "dev",
                 window: int = 8) -> None:
        self.procs = []
        for first in range(0, count, DEVICES_PER_WORKER):
            n = min(DEVICES_PER_WORKER, count - first)
            cmd = [sys.executable, __file__, "--worker", mode, "--broker", broker, "--workdir", str(workdir),
                   "--prefix", prefix, "--first", str(first), "--devices", str(n), "--size", str(size),
                   "--topic", topic, "--offer", json.dumps(offer.__dict__) if offer else "",
                   "--trusted", str(trusted or ""), "--window", str(window)]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a device worker did not start")

    def go(self) -> float:
        start = time.time()
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return start

    def results(self) -> dict:
        """finished/downloaded: {device: Unix time}; cpu_s, download_cpu_s: summed over workers."""
        out = {"finished": {}, "downloaded": {}, "cpu_s": 0.0, "download_cpu_s": 0.0, "errors": [],
               "messages": 0, "duplicates": 0, "asked_again": 0}
        for p in self.procs:
            doc = json.loads(p.stdout.readline())
            for key in ("finished", "downloaded"):
                out[key].update(doc[key])
            for key in ("cpu_s", "download_cpu_s", "messages", "duplicates", "asked_again"):
                out[key] += doc[key]
            out["errors"] += doc["errors"]
            p.wait(30)
        return out


# -- the host side ---------------------------------------------------------------------------
def publish_raw(client: MqttClient, topic: str, data: bytes) -> None:
    for offset in range(0, len(data), CHUNK):
        client.publish(topic, data[offset:offset + CHUNK], qos=1)


def serve_http(directory: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(directory), **kw)

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def http_get(url: str) -> int:
    import urllib.request

    total = 0
    with urllib.request.urlopen(url) as response:
        while block := response.read(1 << 20):
            total += len(block)
    return total


def single(label: str, size: int, seconds: float) -> str:
    return f"{label:<52} {size / MiB:>7.0f} {seconds:>9.2f} {size / MiB / seconds:>9.1f}"


def measure_one(host: MqttClient, server: BundleServer, broker: str, work: Path, bundle: Path, pub: Path,
                window: int, rounds: int) -> dict:
    """(a) and (c): raw MQTT, HTTP, then our transfer + verify + install, to one device; *rounds*
    times, the paths interleaved, so that a slow moment of this shared machine hits one round of
    every path rather than all of one. Medians per path, and the median of each round's ratio."""
    data = bundle.read_bytes()
    offer = server.offer(bundle, "big", "1.0.0")
    per_round = []
    for r in range(rounds):
        log(f"(a) round {r + 1}/{rounds}: raw QoS 1, raw with the device's per-chunk work, HTTP GET, "
            f"edgefleet transfer + verify + install (window {window})")
        os.sync()  # each path starts with no other path's writes still to flush
        w = Workers(1, "raw", broker, work, size=len(data), topic=f"bench/raw/one{r}", prefix=f"raw1-{r}")
        start = w.go()
        publish_raw(host, f"bench/raw/one{r}", data)
        raw = w.results()
        os.sync()
        w = Workers(1, "rawcheck", broker, work, size=len(data), topic=f"bench/raw/checked{r}", prefix=f"rawc-{r}")
        checked_start = w.go()
        publish_raw(host, f"bench/raw/checked{r}", data)
        checked = w.results()
        url, httpd = serve_http(bundle.parent)
        http_start = time.time()
        assert http_get(f"{url}/{bundle.name}") == len(data)
        http_seconds = time.time() - http_start
        httpd.shutdown()
        (work / f"rawc-{r}-0.raw").unlink(missing_ok=True)
        os.sync()
        w = Workers(1, "bundle", broker, work, size=len(data), offer=offer, trusted=pub, prefix=f"one-{r}",
                    window=window)
        ours_start = w.go()
        ours = w.results()
        if ours["errors"]:
            sys.exit(f"delivery failed: {ours['errors']}")
        shutil.rmtree(work / f"one-{r}-0", ignore_errors=True)  # (its pages need not reach the disk)
        per_round.append({
            "raw_s": max(raw["finished"].values()) - start, "raw_cpu_s": raw["cpu_s"],
            "checked_s": max(checked["finished"].values()) - checked_start, "checked_cpu_s": checked["cpu_s"],
            "http_s": http_seconds, "fetched_s": max(ours["downloaded"].values()) - ours_start,
            "installed_s": max(ours["finished"].values()) - ours_start,
            "download_cpu_s": ours["download_cpu_s"], "cpu_s": ours["cpu_s"],
            "messages": ours["messages"], "duplicates": ours["duplicates"]})
    out = {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}
    out["size"], out["rounds"] = len(data), rounds
    out["ratios"] = [r["raw_s"] / r["fetched_s"] for r in per_round]
    out["medians_ratio"] = out["raw_s"] / out["fetched_s"]
    out["checked_ratios"] = [r["checked_s"] / r["fetched_s"] for r in per_round]
    return out


def measure_fleet(host: MqttClient, server: BundleServer, broker: str, work: Path, bundle: Path, pub: Path,
                  window: int, fleet: int) -> dict:
    """(b): raw fan-out to the fleet, then our transfer + verify + install on every device."""
    data = bundle.read_bytes()
    log(f"(b) raw fan-out of {len(data) / MiB:.0f} MiB to {fleet} subscribers")
    w = Workers(fleet, "raw", broker, work, size=len(data), topic="bench/raw/fleet", prefix="rawf")
    cpu = CpuMeter()
    start = w.go()
    publish_raw(host, "bench/raw/fleet", data)
    raw = w.results()
    raw_s, raw_cpu = max(raw["finished"].values()) - start, cpu.spent(raw["cpu_s"])
    log(f"(b) raw fan-out to {fleet} subscribers that hash and write like devices")
    w = Workers(fleet, "rawcheck", broker, work, size=len(data), topic="bench/raw/fleet-checked", prefix="rawfc")
    cpu = CpuMeter()
    checked_start = w.go()
    publish_raw(host, "bench/raw/fleet-checked", data)
    checked = w.results()
    checked_cpu = cpu.spent(checked["cpu_s"])
    log(f"(b) edgefleet transfer + verify + install on {fleet} devices")
    offer = server.offer(bundle, "big", "1.0.0")
    sent_before, chunks_before, fanouts_before = (server.stats.bytes_sent, server.stats.chunks_sent,
                                                  server.stats.fanout_chunks)
    w = Workers(fleet, "bundle", broker, work, size=len(data), offer=offer, trusted=pub, prefix="fleet",
                window=window)
    cpu = CpuMeter()
    start = w.go()
    ours = w.results()
    ours_cpu = cpu.spent(ours["cpu_s"])
    if ours["errors"] or len(ours["finished"]) != fleet:
        sys.exit(f"fleet delivery failed: {len(ours['finished'])}/{fleet} finished; {ours['errors'][:3]}")
    return {"size": len(data), "fleet": fleet, "raw_s": raw_s,
            "checked_s": max(checked["finished"].values()) - checked_start, "checked_cpu_s": checked["cpu_s"],
            "fetched_s": max(ours["downloaded"].values()) - start, "ours_s": max(ours["finished"].values()) - start,
            "fetched_spread": spread(ours["downloaded"].values(), start),
            "installed_spread": spread(ours["finished"].values(), start),
            "sent": server.stats.bytes_sent - sent_before, "cpu_s": ours["cpu_s"],
            "fanouts": server.stats.fanout_chunks - fanouts_before,
            "direct": server.stats.chunks_sent - chunks_before - (server.stats.fanout_chunks - fanouts_before),
            "messages": ours["messages"], "duplicates": ours["duplicates"], "asked_again": ours["asked_again"],
            "cpu_by_party": {"raw fan-out": raw_cpu, "raw fan-out, hash + write": checked_cpu, "edgefleet": ours_cpu}}


class CpuMeter:
    """CPU seconds the broker and this process (the host side) spend from now, to set beside
    the devices' own (which their workers report): on one machine they all share its cores."""

    def __init__(self) -> None:
        self._broker = [p for p in psutil.Process().children() if p.name() == "mosquitto"]
        self._start = self._now()

    def _now(self) -> tuple[float, float]:
        broker = sum(sum(p.cpu_times()[:2]) for p in self._broker)
        return broker, cpu_seconds()

    def spent(self, devices: float) -> dict:
        now = self._now()
        return {"broker": now[0] - self._start[0], "host": now[1] - self._start[1], "devices": devices}


def spread(times, start: float) -> tuple[float, float, float]:
    """Seconds from *start* to the first, the median and the last of *times*."""
    elapsed = sorted(t - start for t in times)
    return elapsed[0], statistics.median(elapsed), elapsed[-1]


def report_one(r: dict, window: int, broker_name: str) -> None:
    size = r["size"]
    print(f"\n(a) one device, {size / MiB:.0f} MiB, {CHUNK // 1024} KiB chunks/messages, device window {window}, "
          f"broker {broker_name}; median of {r['rounds']} interleaved rounds")
    print(f"{'path':<52} {'MiB':>7} {'seconds':>9} {'MiB/s':>9}")
    print(single("raw MQTT QoS 1 publish -> subscribe", size, r["raw_s"]))
    print(single("raw MQTT, subscriber hashes (running) + writes", size, r["checked_s"]))
    print(single("HTTP GET (stdlib server, read and discard)", size, r["http_s"]))
    print(single("edgefleet transfer (chunks checked, on disk, SHA-256)", size, r["fetched_s"]))
    print(single("edgefleet transfer, then verify + install", size, r["installed_s"]))
    ratio = statistics.median(r["ratios"])
    print(f"chunk messages the device received: {r['messages']:.0f} ({r['duplicates']:.0f} not needed)")
    print(f"edgefleet transfer / raw MQTT throughput, median of the rounds' ratios: {ratio:.2f} "
          f"(rounds: {' '.join(f'{x:.2f}' for x in r['ratios'])})  target ≥ 0.70: "
          f"{'meets' if ratio >= 0.7 else 'MISSES'}; ratio of the two paths' median times: "
          f"{r['medians_ratio']:.2f}; / raw MQTT with the same per-chunk work: "
          f"{statistics.median(r['checked_ratios']):.2f}")
    mib = size / MiB
    per_mib = r["download_cpu_s"] / mib
    pi = per_mib * 5 * (10e6 / MiB) * 100
    print(f"\n(c) device CPU while downloading in (a): {r['download_cpu_s']:.2f} s for {mib:.0f} MiB = "
          f"{per_mib * 1000:.2f} ms per MiB (raw subscriber: {r['raw_cpu_s'] / mib * 1000:.2f} ms, with the same "
          f"per-chunk work: {r['checked_cpu_s'] / mib * 1000:.2f} ms; "
          f"verify + install after it: {(r['cpu_s'] - r['download_cpu_s']) / mib * 1000:.2f} ms)")
    print(f"    a Raspberry Pi 4 (5x slower per core) downloading at 10 MB/s: {pi:.0f}% of one core  "
          f"target < 25%: {'meets' if pi < 25 else 'MISSES'}")


def report_fleet(r: dict) -> None:
    fleet, size = r["fleet"], r["size"]
    print(f"\n(b) {fleet} devices, {size / MiB:.0f} MiB each, until every one has verified and installed it")
    print(f"{'path':<52} {'seconds':>9}")
    print(f"{'raw MQTT fan-out to ' + str(fleet) + ' subscribers':<52} {r['raw_s']:>9.2f}")
    print(f"{'raw fan-out, subscribers hash (running) + write':<52} {r['checked_s']:>9.2f}")
    print(f"{'edgefleet, fan-out on: every device has it':<52} {r['fetched_s']:>9.2f}")
    print(f"{'edgefleet: every device has verified + installed it':<52} {r['ours_s']:>9.2f}")
    for label, key in (("had it", "fetched_spread"), ("had verified + installed it", "installed_spread")):
        print(f"  devices that {label}: first after {r[key][0]:.2f} s, half after {r[key][1]:.2f} s, "
              f"the last after {r[key][2]:.2f} s")
    ratio = r["ours_s"] / r["raw_s"]
    print(f"edgefleet / raw fan-out time: {ratio:.2f}  target ≤ 1.5: {'meets' if ratio <= 1.5 else 'MISSES'}; "
          f"transfer / raw fan-out with the same per-chunk work: {r['fetched_s'] / r['checked_s']:.2f}")
    print(f"host uplink: {r['sent'] / MiB:.1f} MiB published for {fleet} x {size / MiB:.0f} MiB delivered "
          f"({r['sent'] / (fleet * size):.3f} copies per device); devices received {r['messages']} chunk "
          f"messages, {r['duplicates']} of them not needed")
    print(f"server: {r['fanouts']} chunks published to the shared topic, {r['direct']} to one device's own topic; "
          f"devices asked again for {r['asked_again']} chunks whose answer was late")
    print("CPU seconds (broker / host process / devices):  " + ";  ".join(
        f"{label} {c['broker']:.1f} / {c['host']:.1f} / {c['devices']:.1f}" for label, c in r["cpu_by_party"].items()))
    print(f"device CPU per MiB per device: {r['cpu_s'] / fleet / (size / MiB) * 1000:.2f} ms (download + verify + "
          f"install); raw subscriber with the same per-chunk work: "
          f"{r['checked_cpu_s'] / fleet / (size / MiB) * 1000:.2f} ms")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=["a", "b", "all"], default="all",
                        help="Only (a) one device (with (c)), or only (b) the fleet.")
    parser.add_argument("--rounds", type=int, default=9, help="Interleaved rounds of (a) (medians are reported).")
    parser.add_argument("--window", type=int, default=32, help="Chunk requests a device keeps in flight "
                        "(the agent's limits.chunk_window).")
    parser.add_argument("--worker", choices=["raw", "rawcheck", "bundle"], help=argparse.SUPPRESS)
    for opt in ("--broker", "--workdir", "--prefix", "--topic", "--offer", "--trusted"):
        parser.add_argument(opt, default="", help=argparse.SUPPRESS)
    for opt in ("--first", "--devices", "--size"):
        parser.add_argument(opt, type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.mode = args.worker
        worker(args)
        return

    one_size, fleet_size, fleet = (16 * MiB, 4 * MiB, 20) if args.quick else (64 * MiB, 16 * MiB, 100)
    work = Path(tempfile.mkdtemp(prefix="ef-delivery-", dir="/tmp"))
    broker, stop_broker, broker_name = start_broker(work, require_mosquitto=True,
                                                    extra_conf="max_queued_messages 100000\nset_tcp_nodelay true\n")
    host = MqttClient(client_id="bench-host", broker=BrokerAddress.parse(broker))
    host.connect()
    one = many = None
    try:
        key, pub = generate_key_pair(work, "bench")
        server = BundleServer(host, chunk_size=CHUNK)
        server.start()
        if args.part in ("a", "all"):
            log(f"building a {one_size // MiB} MiB signed bundle")
            one = measure_one(host, server, broker, work, make_bundle(work, one_size, key), pub, args.window,
                              args.rounds)
        if args.part in ("b", "all"):
            log(f"building a {fleet_size // MiB} MiB signed bundle")
            many = measure_fleet(host, server, broker, work, make_bundle(work, fleet_size, key), pub, args.window,
                                 fleet)
        server.stop()
    finally:
        host.disconnect()
        stop_broker()
        shutil.rmtree(work, ignore_errors=True)
    if one:
        report_one(one, args.window, broker_name)
    if many:
        report_fleet(many)
    print(f"\n{machine_line()}")


if __name__ == "__main__":
    main()
