"""The demo's path with real parts: Mosquitto, agent processes, the CLI, the ingest and SQLite."""

import contextlib
import datetime as dt
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device_agent.mqtt import MqttClient
from device_agent.protocol.reports import DeviceStatus, TelemetrySample
from host_tools.fleet.ingest import Ingest
from host_tools.fleet.store import FleetStore
from tests.conftest import MODELS, Mosquitto, announced, edgefleet, free_port, wait_until

DEVICES = ["pi-01", "pi-02", "pi-03"]
V1 = "digits-cnn 1.0.0"



def is_online(store, device_id):
    return any(r.device_id == device_id and r.online for r in store.devices())


def fleet_status(db):
    result = edgefleet("fleet", "status", "--db", db, "--json")
    assert result.returncode == 0, result.stderr
    return {row["device_id"]: row for row in json.loads(result.stdout)}


def deploy(bundle, devices, broker, *extra):
    args = ["deploy", bundle, "--broker", broker, "--timeout", "60", "--chunk-size", "8192", "--json", *extra]
    for d in devices:
        args += ["--device", d]
    result = edgefleet(*args)
    return result.returncode, json.loads(result.stdout)


def test_bundle_reaches_three_devices_over_mqtt_and_telemetry_comes_back(
        mosquitto, agents, monitor, make_bundle, keys):
    procs = {d: agents.start(d) for d in DEVICES}
    store = FleetStore(monitor)
    assert wait_until(lambda: {r.device_id for r in store.devices() if r.online} == set(DEVICES), 30)
    rows = fleet_status(monitor)  # (the session's broker may hold other tests' devices' retained status)
    assert all(rows[d]["active_bundle"] is None for d in DEVICES)

    code, results = deploy(make_bundle("1.0.0"), DEVICES, mosquitto)
    assert code == 0 and {d: r["state"] for d, r in results.items()} == {d: "active" for d in DEVICES}

    # every device runs the model and says so in telemetry
    assert wait_until(lambda: all(store.telemetry_count(d, V1) >= 2 for d in DEVICES), 20)
    assert wait_until(lambda: all(fleet_status(monitor)[d]["active_bundle"] == V1 for d in DEVICES), 10)
    rows = fleet_status(monitor)
    for d in DEVICES:
        row = rows[d]
        assert row["online"] and row["active_bundle"] == V1
        assert row["inferences_per_s"] > 1
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] <= row["latency_p99_ms"]
        assert row["process_rss_bytes"] > 20 * 2**20
        assert row["power_watts"] is None  # no sensor here: n/a, not 0
    table = edgefleet("fleet", "status", "--db", monitor)
    assert table.returncode == 0 and V1 in table.stdout and "n/a" in table.stdout

    # a bundle signed by a key the devices do not trust is refused, and the old model keeps running
    code, results = deploy(make_bundle("2.0.0", key=keys["rogue_key"]), ["pi-01"], mosquitto)
    assert code == 1 and results["pi-01"]["state"] == "failed"
    assert "does not trust" in results["pi-01"]["reason"]
    before = store.telemetry_count("pi-01", V1)
    assert wait_until(lambda: store.telemetry_count("pi-01", V1) > before + 1, 10)
    assert fleet_status(monitor)["pi-01"]["active_bundle"] == V1
    assert procs["pi-01"].proc.poll() is None

    # the same bundle again is a no-op
    code, results = deploy(make_bundle("1.0.0"), ["pi-02"], mosquitto)
    assert code == 0 and results["pi-02"]["state"] == "already_installed"

    # a clean stop says offline; a restart comes back on the committed bundle, from disk
    assert procs["pi-03"].terminate() == 0
    assert wait_until(lambda: not fleet_status(monitor)["pi-03"]["online"], 10)
    samples_before_restart = store.telemetry_count("pi-03", V1)
    agents.start("pi-03")
    assert wait_until(lambda: fleet_status(monitor)["pi-03"]["online"], 20)
    assert fleet_status(monitor)["pi-03"]["active_bundle"] == V1
    # its new samples are stored, not mistaken for ones the host already has
    assert wait_until(lambda: store.telemetry_count("pi-03", V1) >= samples_before_restart + 2, 15)


def test_a_killed_agent_is_reported_offline_by_its_last_will(mosquitto, agents, monitor):
    agent = agents.start("pi-09")
    store = FleetStore(monitor)
    assert wait_until(lambda: is_online(store, "pi-09"), 30)
    agent.kill()  # SIGKILL: no goodbye, the broker publishes the will after the keep-alive lapses
    assert wait_until(lambda: not fleet_status(monitor)["pi-09"]["online"], 60, interval=1)


def test_agent_and_ingest_come_back_after_a_broker_restart(tmp_path, agents):
    broker = Mosquitto(tmp_path)  # its own broker: this test restarts it
    broker.start()
    store = FleetStore(tmp_path / "fleet.db")
    host = MqttClient(client_id="test-ingest", broker=broker.address)
    Ingest(host, store).start()
    host.connect()
    try:
        agent = agents.start("pi-20", broker=broker.address)
        online = lambda: is_online(store, "pi-20")  # noqa: E731
        assert wait_until(online, 30)
        broker.stop()  # no persistence: retained status is gone with it
        store.record_status(DeviceStatus("pi-20", False, 0.0), 0.0)  # what the host knew after the outage
        broker.start()
        assert wait_until(online, 40, interval=0.5), "agent did not re-announce itself after reconnecting"
        seq_before = store.telemetry_count("pi-20")
        assert wait_until(lambda: store.telemetry_count("pi-20") > seq_before, 10)
        assert agent.proc.poll() is None
    finally:
        host.disconnect()
        broker.stop()


def test_deploying_to_a_device_that_never_connected_fails_for_it_at_once_with_a_reason(mosquitto, make_bundle):
    started = time.monotonic()
    result = edgefleet("deploy", make_bundle(), "--device", "ghost-1", "--broker", mosquitto,
                       "--timeout", "60", "--json")
    assert result.returncode == 1
    outcome = json.loads(result.stdout)["ghost-1"]
    assert outcome["state"] == "unreachable" and outcome["reason"].startswith("never connected to this broker")
    assert time.monotonic() - started < 50  # not the 60 s: the broker kept the command for nobody


@pytest.mark.parametrize("serve", [True, False])
def test_ctrl_c_during_a_deploy_says_what_becomes_of_the_devices_in_one_line(mosquitto, make_bundle, serve):
    from device_agent.protocol import topics

    device = f"away-{int(serve)}"  # offline as far as the broker knows: the deploy waits for it
    host = MqttClient(client_id=f"test-ctrl-c-{device}", broker=mosquitto)
    host.connect()
    try:
        host.publish(topics.status(device), DeviceStatus(device, False, time.time()).to_payload(), retain=True, wait=5)
        proc = subprocess.Popen([sys.executable, "-m", "host_tools", "deploy", str(make_bundle()), "--device", device,
                                 "--broker", str(mosquitto), "--timeout", "60", *([] if serve else ["--no-serve"])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        assert wait_until(lambda: any(line.startswith("deploying") for line in lines), 60), lines
        time.sleep(1)  # into waiting for the device
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        reader.join(10)
        err = "".join(lines)
    finally:
        host.publish(topics.status(device), b"", retain=True, wait=5)  # the shared broker forgets it
        host.disconnect()
    assert proc.returncode == 130 and "Traceback" not in err and "Aborted" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == ("stopped following the deployment and serving its chunks: devices already downloading keep "
                    "asking for them for a while, then fail; deploy the bundle again (or run `edgefleet serve`) to "
                    "let them finish" if serve else
                    "stopped following the deployment: the devices carry on with it (`edgefleet device status` shows "
                    "how far one is)")


GARBAGE = [b"", b"\xff\xfe\x00", b"[]", b"{}", b"null", b'"text"', b"[" * 100_000, b"{" + b" " * 300_000 + b"}",
           b'{"type": ["deploy"]}', b'{"type": "deploy", "command_id": 5, "bundle": []}',
           b'{"type": "telemetry", "device_id": "pi-30", "seq": "x", "readings": 7}',
           b'{"type": "status", "device_id": {"a": 1}, "online": "yes"}',
           b'{"type": "chunk_request", "device_id": "pi-30", "chunks": [-1, 1e9, "a"]}',
           b'{"type": "trust", "command_id": "t", "issued_at": 1, "add": [1], "revoke": null}',
           b"\x00\x00\x00\x10{\"index\": \"x\"}data",
           b"\x00\x00\x03\xfc" + b"[" * 1020 + b"data",  # a chunk header nested past the JSON parser's limit
           # Well formed but for NaN, which Python's JSON reads: SQLite would store the status time as
           # NULL, and the ingest held everything after it, from every device, behind that write
           b'{"type": "status", "device_id": "pi-30", "online": true, "timestamp": NaN}',
           b'{"type": "telemetry", "device_id": "pi-30", "seq": 1, "timestamp": NaN, "interval_s": 5, "readings": {}}',
           b'{"type": "telemetry", "device_id": "pi-30", "seq": 1180591620717411303424, "timestamp": 1, '
           b'"interval_s": 5, "readings": {}}',  # past SQLite's 64-bit integers
           b'{"type": "deployment", "device_id": "pi-30", "command_id": "c", "state": "active", "bundle": "x 1", '
           b'"progress": NaN, "timestamp": Infinity}']


def test_garbage_on_every_topic_harms_neither_the_agent_nor_the_ingest(mosquitto, agents, monitor, make_bundle):
    from device_agent.protocol import topics

    agent = agents.start("pi-30")
    store = FleetStore(monitor)
    assert wait_until(lambda: is_online(store, "pi-30"), 30)
    vandal = MqttClient(client_id="test-vandal", broker=mosquitto)
    vandal.connect()
    try:
        for topic in (topics.command("pi-30"), topics.chunks("pi-30"), topics.status("pi-30"),
                      topics.events("pi-30"), topics.telemetry("pi-30"), topics.reply("pi-30"),
                      topics.chunk_request("ab" * 32)):
            for payload in GARBAGE:
                vandal.publish(topic, payload, qos=1, wait=5.0)  # delivered before we hang up
    finally:
        vandal.disconnect()
    code, results = deploy(make_bundle("1.0.0"), ["pi-30"], mosquitto)  # both still do their work
    assert code == 0 and results["pi-30"]["state"] == "active"
    assert wait_until(lambda: store.telemetry_count("pi-30", V1) >= 2, 20)
    log = agent.log.read_text()
    assert agent.proc.poll() is None and "Traceback" not in log
    assert log.count("refused command") == len(GARBAGE)  # every one arrived, and was refused with a reason
    assert fleet_status(monitor)["pi-30"]["active_bundle"] == V1
    assert "Traceback" not in (monitor.parent / "monitor.log").read_text()


def test_edgefleet_serve_answers_for_deploys_that_do_not_serve_and_picks_up_new_bundles(
        mosquitto, agents, make_bundle, tmp_path):
    import shutil

    shelf = tmp_path / "bundles"
    shelf.mkdir()
    shutil.copy(make_bundle("1.0.0"), shelf / "v1.efb")
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "host_tools", "--verbose", "serve", "--dir", str(shelf),
                                   "--broker", str(mosquitto), "--stats-every", "1"], stderr=log)
    try:
        agents.start("pi-40")
        assert wait_until(lambda: "answering chunk requests" in (tmp_path / "serve.log").read_text(), 20)
        assert announced(mosquitto, "pi-40")
        from device_agent.bundle import sha256_file
        from device_agent.protocol import topics

        vandal = MqttClient(client_id="test-vandal-serve", broker=mosquitto)
        vandal.connect()
        for payload in GARBAGE:  # on the very topic the server answers
            vandal.publish(topics.chunk_request(sha256_file(shelf / "v1.efb")), payload, qos=1, wait=5.0)
        vandal.disconnect()
        # --verbose: each device's steps on the deploy (and who fetches what on the server); without it none
        told = edgefleet("--verbose", "deploy", make_bundle("1.0.0"), "--device", "pi-40", "--broker", mosquitto,
                         "--no-serve", "--json")
        assert json.loads(told.stdout)["pi-40"]["state"] == "active", told.stderr
        steps = [line.removeprefix("INFO host_tools.deploy: pi-40: ") for line in told.stderr.splitlines()]
        assert steps[-1] == "active" and "downloading" in steps and "verifying" in steps, told.stderr
        shutil.copy(make_bundle("2.0.0"), shelf / "v2.efb")  # served without a restart
        assert wait_until(lambda: "digits-cnn 2.0.0" in (tmp_path / "serve.log").read_text(), 10)
        quiet = edgefleet("deploy", make_bundle("2.0.0"), "--device", "pi-40", "--broker", mosquitto, "--no-serve",
                          "--json")
        assert json.loads(quiet.stdout)["pi-40"]["state"] == "active" and quiet.stderr == ""
        said = (tmp_path / "serve.log").read_text()
        assert said.count("INFO host_tools.serve: pi-40 is fetching digits-cnn 1.0.0 (65536-byte chunks") == 1
        assert said.count("INFO host_tools.serve: pi-40 is fetching digits-cnn 2.0.0 (65536-byte chunks") == 1
        assert wait_until(lambda: "chunks," in (tmp_path / "serve.log").read_text(), 15)  # its progress line
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    missing = edgefleet("serve", tmp_path / "nope.efb", "--broker", mosquitto)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr


def test_two_monitors_in_one_share_group_split_the_telemetry_and_store_each_sample_once(mosquitto, agents,
                                                                                        tmp_path):
    stores, clients = [], []
    for i in range(2):
        store = FleetStore(tmp_path / f"fleet-{i}.db")  # a database each, to see who got what
        client = MqttClient(client_id=f"test-monitor-{i}", broker=mosquitto)
        Ingest(client, store, share="ingest").start()
        client.connect()
        stores.append(store)
        clients.append(client)
    try:
        for d in ("pi-50", "pi-51", "pi-52"):
            agents.start(d, telemetry_interval=0.2)
        assert wait_until(lambda: all(sum(s.telemetry_count(d) for s in stores) >= 20
                                      for d in ("pi-50", "pi-51", "pi-52")), 30)
    finally:
        for c in clients:
            c.disconnect()
    for d in ("pi-50", "pi-51", "pi-52"):
        got = [{seq for seq, _ in s.sample_index(d)} for s in stores]
        assert not got[0] & got[1]  # no sample went to both
        union = got[0] | got[1]
        assert union == set(range(1, max(union) + 1))  # and none went to neither
    assert all(sum(s.telemetry_count(d) for d in ("pi-50", "pi-51", "pi-52")) > 0 for s in stores)  # both worked


def test_the_monitor_serves_prometheus_metrics_without_made_up_power(mosquitto, agents, make_bundle, tmp_path):
    import urllib.request

    port, db = free_port(), tmp_path / "fleet.db"
    with open(tmp_path / "monitor.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "host_tools", "monitor", "--broker", str(mosquitto),
                                 "--db", str(db), "--name", "metrics-test", "--metrics-port", str(port),
                                 "--metrics-address", "127.0.0.1"], stderr=log)
    try:
        agents.start("pi-60")
        assert wait_until(lambda: "Prometheus metrics" in (tmp_path / "monitor.log").read_text(), 15)
        assert announced(mosquitto, "pi-60")
        code, _ = deploy(make_bundle("1.0.0"), ["pi-60"], mosquitto)
        assert code == 0

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()
        # A sample from an interval without inferences (the first after activation can be one) has a
        # rate of 0 and no latency series; wait for one that has run the model.
        line = 'edgefleet_inference_latency_p99_seconds{bundle="digits-cnn 1.0.0",device="pi-60"}'
        assert wait_until(lambda: line in scrape(), 20), scrape()[-2000:]
        text = scrape()
        assert 'edgefleet_device_online{bundle="digits-cnn 1.0.0",device="pi-60"} 1.0' in text
        assert 'edgefleet_inferences_per_second{bundle="digits-cnn 1.0.0",device="pi-60"}' in text
        assert 'edgefleet_power_watts{' not in text  # no sensor on this machine: no series, not a zero
        free = re.search(r'^edgefleet_disk_free_bytes\{bundle="digits-cnn 1.0.0",device="pi-60"\} (\S+)$', text, re.M)
        assert free and abs(float(free[1]) / shutil.disk_usage(tmp_path).free - 1) < 0.1, text[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_a_monitor_whose_disk_fills_up_says_so_once_runs_on_and_loses_nothing_devices_reported_meanwhile(
        mosquitto, tmp_path, small_disk):
    from device_agent.protocol import topics
    from device_agent.protocol.reports import TelemetryBatch, TelemetrySample
    from tests.conftest import fill_disk

    disk, log_path = small_disk(4), tmp_path / "monitor.log"
    db = disk / "fleet.db"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "host_tools", "monitor", "--broker", str(mosquitto),
                                 "--db", str(db), "--name", f"full-{time.time_ns()}"], stderr=log)
    device = MqttClient(client_id=f"pi-91-{time.time_ns()}", broker=mosquitto)
    device.connect()

    def send(seq: int) -> None:
        sample = TelemetrySample("pi-91", seq, time.time(), 1.0, None, {"pad": "x" * 3000})
        device.publish(topics.telemetry("pi-91"), TelemetryBatch("pi-91", (sample,)).to_payload(), qos=1, wait=10)

    def stored() -> set[int]:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                return {seq for seq, in con.execute("SELECT seq FROM telemetry WHERE device_id = 'pi-91'")}
        except sqlite3.Error:  # not made yet
            return set()
    try:
        # sent until it is stored: the monitor may not have subscribed yet when it first goes out
        assert wait_until(lambda: send(1) or 1 in stored(), 15, interval=0.5), log_path.read_text()
        filler = fill_disk(disk)
        for seq in range(2, 62):  # more than Mosquitto's 20 in flight: the rest wait at the broker
            send(seq)
        assert wait_until(lambda: "cannot store what devices report" in log_path.read_text(), 15), log_path.read_text()
        time.sleep(3)  # a try or two to store them, on the full disk
        text = log_path.read_text()
        assert text.count("cannot store what devices report") == 1 and "Traceback" not in text, text[-3000:]
        assert proc.poll() is None and stored() == {1}
        filler.unlink()
        assert wait_until(lambda: stored() == set(range(1, 62)), 20), (sorted(stored()), log_path.read_text()[-3000:])
        assert wait_until(lambda: "storing again; the " in log_path.read_text(), 5), log_path.read_text()[-3000:]
        send(100)
        assert wait_until(lambda: 100 in stored(), 10)
    finally:
        device.disconnect()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    store = FleetStore(db)
    seqs = [seq for seq, _ in store.sample_index("pi-91")]
    store.close()
    assert seqs == [*range(1, 62), 100]  # each once
    assert "dropped" not in log_path.read_text()


def test_devices_carry_their_labels_and_the_fleet_views_filter_by_them(mosquitto, agents, monitor):
    agents.start("pi-70", extra_args=("--label", "group=canary", "--label", "site=lab"))
    agents.start("pi-71", extra_args=("--label", "group=main",))
    store = FleetStore(monitor)
    assert wait_until(lambda: is_online(store, "pi-70") and is_online(store, "pi-71"), 30)

    result = edgefleet("fleet", "status", "--db", monitor, "--group", "canary", "--json")
    rows = json.loads(result.stdout)
    assert [r["device_id"] for r in rows] == ["pi-70"] and rows[0]["labels"] == {"group": "canary", "site": "lab"}
    assert [r["device_id"] for r in json.loads(edgefleet("fleet", "status", "--db", monitor, "--label", "site=lab",
                                                         "--label", "group=main", "--json").stdout)] == []
    watch = edgefleet("fleet", "watch", "--db", monitor, "--label", "group=main", "--count", "2", "--every", "0.2")
    assert watch.returncode == 0 and "pi-71" in watch.stdout and "pi-70" not in watch.stdout
    bad = edgefleet("fleet", "status", "--db", monitor, "--label", "canary")
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr


def test_the_dashboard_renders_real_plots_rollout_marks_and_versions_in_headless_chromium(
        mosquitto, agents, monitor, make_bundle, tmp_path):
    import shutil as sh
    import socket

    chromium = sh.which("chromium") or sh.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: run the README's test command (make test), which installs it",
                    pytrace=False)
    jetson = Path(__file__).resolve().parent / "fixtures" / "boards" / "jetson-orin-nano-jp6" / "sys"
    agents.start("pi-80", telemetry_interval=0.3, extra_args=("--sysfs", str(jetson)))  # a Jetson's sensors
    agents.start("pi-81", telemetry_interval=0.3)  # this machine: no power sensor
    store = FleetStore(monitor)
    assert wait_until(lambda: is_online(store, "pi-80") and is_online(store, "pi-81"), 30)
    for version in ("1.0.0", "2.0.0"):  # two rollouts to mark
        code, _ = deploy(make_bundle(version), ["pi-80", "pi-81"], mosquitto)
        assert code == 0
    assert wait_until(lambda: store.telemetry_count("pi-80", "digits-cnn 2.0.0") >= 4
                      and store.telemetry_count("pi-81", "digits-cnn 2.0.0") >= 4, 20)
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=12.5)  # a device whose certificate runs out
    store.record_status(DeviceStatus("pi-82", False, time.time(), certificate={
        "serial": "ab12", "expires": soon.isoformat(), "source": "config",
        "ca_expires": (soon - dt.timedelta(days=9)).isoformat()}), time.time())  # ... and its CA's sooner
    for seq, ago in enumerate((300, 299, 298, 60, 59), 1):  # ... and that was switched off for four minutes
        store.record_telemetry(TelemetrySample("pi-82", seq, time.time() - ago, 1.0, None,
                                               {"inference": {"p50_ms": 1.0}}), time.time())

    port = free_port()
    page = subprocess.Popen([sys.executable, "-m", "host_tools", "dashboard", "--db", str(monitor),
                             "--port", str(port)], stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 15)
        dom = subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000",
                              "--dump-dom", f"http://127.0.0.1:{port}/"],
                             capture_output=True, text=True, timeout=90).stdout
    finally:
        page.terminate()
        page.wait(10)
    assert 'data-ready="1"' in dom, dom[-2000:]
    cards = {m.group(1): m.group(0) for m in re.finditer(r'<div class="device" data-device="([^"]+)">.*?(?=<div class="device"|$)',
                                                         dom, re.S)}
    jetson_card, plain_card = cards["pi-80"], cards["pi-81"]
    for card in (jetson_card, plain_card):
        assert '<span class="version">digits-cnn 2.0.0</span>' in card
        latency = re.search(r'data-series="p50_ms" points="([^"]+)"', card)
        assert latency and len(latency.group(1).split()) >= 4  # a line through the real samples
        assert re.search(r'class="rollout"[^>]*data-bundle="digits-cnn 2.0.0"', card)
    watts = re.search(r'data-series="watts" points="([^"]+)"', jetson_card)
    assert watts and len(watts.group(1).split()) >= 4 and "power (W) — jetson-ina3221" in jetson_card
    assert 'data-plot="watts">not reported by this device' in plain_card  # not a line at zero
    assert '<span class="alarm" data-alarm="certificate">certificate: 12 days left, renew it</span> ' \
           '<span class="alarm" data-alarm="CA">CA: 3 days left, renew it</span>' in cards["pi-82"]
    assert 'data-alarm' not in jetson_card + plain_card  # (no client certificate at all: nothing to say)
    # the time it sent nothing is a break in its line, not a line drawn across it
    assert [len(points.split()) for points in re.findall(r'data-series="p50_ms" points="([^"]+)"', cards["pi-82"])] \
        == [3, 2]


def test_the_registry_knows_each_devices_hardware_takes_labels_and_keeps_bundles_from_devices_that_cannot_run_them(
        mosquitto, agents, monitor, keys, heldout, tmp_path):
    from host_tools.packaging import build_bundle

    agent = agents.start("pi-90")
    store = FleetStore(monitor)
    assert wait_until(lambda: is_online(store, "pi-90"), 30)
    listed = json.loads(edgefleet("devices", "list", "--db", monitor, "--json").stdout)
    (row,) = [r for r in listed if r["device_id"] == "pi-90"]
    assert row["hardware"]["arch"] == "x86_64" and row["hardware"]["class"] == "x86_64-generic"
    assert "onnxruntime" in row["hardware"]["runtimes"] and row["hardware"]["ram_mb"] > 1000

    assert edgefleet("devices", "label", "pi-90", "group=canary", "--db", monitor).returncode == 0
    assert [r["device_id"] for r in json.loads(edgefleet("fleet", "status", "--db", monitor, "--group", "canary",
                                                         "--json").stdout)] == ["pi-90"]
    shown = edgefleet("devices", "show", "pi-90", "--db", monitor)
    assert shown.returncode == 0 and "x86_64-generic" in shown.stdout and "group=canary" in shown.stdout
    assert edgefleet("devices", "label", "pi-99", "a=b", "--db", monitor).returncode == 1  # never connected

    riscv = tmp_path / "riscv.efb"
    build_bundle(MODELS / "digits_cnn.onnx", name="digits-cnn", version="1.0.0", key=keys["key"], out=riscv,
                 sample={"image": heldout[0][:1]}, target={"arch": ["riscv64"]})
    result = edgefleet("deploy", riscv, "--device", "pi-90", "--broker", mosquitto, "--db", monitor, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pi-90"]["state"] == "skipped" and "riscv64" in result.stderr
    assert "update" not in agent.log.read_text()  # it was never sent the command


def test_a_forgotten_device_leaves_the_registry_and_the_brokers_retained_status_and_an_online_one_is_refused(
        mosquitto, agents, monitor, tmp_path):
    from device_agent.protocol import topics

    gone, kept = agents.start("pi-95"), agents.start("pi-96")
    store = FleetStore(monitor)
    assert wait_until(lambda: is_online(store, "pi-95") and is_online(store, "pi-96"), 30)
    assert wait_until(lambda: store.telemetry_count("pi-95") > 0, 20)
    assert edgefleet("devices", "label", "pi-95", "site=lab", "--db", monitor).returncode == 0

    def listed():
        return {r["device_id"] for r in json.loads(edgefleet("devices", "list", "--db", monitor, "--json").stdout)}

    def forget(*args, input=None):
        return edgefleet("devices", "forget", *args, "--db", monitor, "--broker", mosquitto, input=input)

    refused = forget("pi-95", "--yes")  # online: its agent would bring it back at once
    assert refused.returncode == 1 and "online: pi-95" in refused.stderr and "Traceback" not in refused.stderr
    unknown = forget("pi-95", "pi-nope", "--yes")
    assert unknown.returncode == 1 and "pi-nope" in unknown.stderr and "pi-95" not in unknown.stderr

    assert gone.terminate() == 0 and kept.terminate() == 0
    assert wait_until(lambda: not is_online(store, "pi-95") and not is_online(store, "pi-96"), 30)
    # A killed agent leaves its presence claim retained; forgetting the device clears that too.
    stale = MqttClient(client_id="test-stale-claim", broker=mosquitto)
    stale.connect()
    stale.publish(topics.presence("pi-95"), b'{"claim": {"instance": "x", "host": "h", "pid": 1, "since": 1}}',
                  qos=1, retain=True, wait=5)
    stale.disconnect()
    declined = forget("pi-95", input="n\n")  # asked first, and no changes nothing
    assert declined.returncode == 1 and "pi-95" in listed()

    done = forget("pi-95", "--yes")
    assert done.returncode == 0, done.stderr
    samples = int(re.search(r"forgot pi-95: (\d+) telemetry samples", done.stdout).group(1))
    assert samples > 0 and "1 labels" in done.stdout
    assert "pi-95" not in listed() and "pi-96" in listed()
    assert edgefleet("devices", "show", "pi-95", "--db", monitor).returncode == 1
    assert store.telemetry_count("pi-95") == 0 and store.events("pi-95") == []

    # What the broker still holds: a monitor started now on an empty database learns of pi-96, not pi-95.
    claims: list[bytes] = []
    later = MqttClient(client_id="test-later-monitor", broker=mosquitto)
    later.subscribe(topics.presence("pi-95"), lambda t, p: claims.append(p))
    fresh = FleetStore(tmp_path / "later.db")
    Ingest(later, fresh).start()
    later.connect()
    try:
        assert wait_until(lambda: "pi-96" in {r.device_id for r in fresh.devices()}, 10)
        time.sleep(1.0)  # retained messages come right after the subscription is granted
        assert "pi-95" not in {r.device_id for r in fresh.devices()} and claims == []
    finally:
        later.disconnect()
    assert "pi-95" not in listed()  # the running monitor took the cleared status as no news
