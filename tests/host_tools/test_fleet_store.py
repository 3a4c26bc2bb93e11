"""The fleet database stores each telemetry sample once, whatever the redelivery."""

from device_agent.protocol.reports import DeploymentEvent, DeviceStatus, TelemetrySample
from host_tools.fleet.store import FleetStore
from host_tools.fleet.view import summarize


def sample(seq, bundle="m 1.0.0", readings=None):
    return TelemetrySample("pi-01", seq, 100.0 + seq, 1.0, bundle, readings or {"inference": {"p50_ms": seq}})


def test_redelivered_samples_are_stored_once_and_newest_wins(tmp_path):
    store = FleetStore(tmp_path / "fleet.db")
    store.record_status(DeviceStatus("pi-01", True, 1.0, "0.1.0", "m 1.0.0", "ab" * 32), 1.0)
    assert store.record_telemetry(sample(1), 2.0)
    assert store.record_telemetry(sample(2), 3.0)
    assert not store.record_telemetry(sample(1), 4.0)  # duplicate
    (row,) = store.devices()
    assert row.samples == 2 and row.telemetry["inference"]["p50_ms"] == 2
    assert store.telemetry_count("pi-01", "m 1.0.0") == 2


def test_offline_will_keeps_the_last_known_bundle_and_missing_readings_stay_missing(tmp_path):
    store = FleetStore(tmp_path / "fleet.db")
    store.record_status(DeviceStatus("pi-01", True, 1.0, "0.1.0", "m 1.0.0", "ab" * 32), 1.0)
    store.record_telemetry(sample(1, readings={"memory": {"process_rss_bytes": 5}}), 2.0)
    store.record_status(DeviceStatus("pi-01", False, 0.0, "0.1.0"), 5.0)  # the last will carries no bundle
    (row,) = store.devices()
    s = summarize(row)
    assert s["online"] is False and s["active_bundle"] == "m 1.0.0"
    assert s["power_watts"] is None and s["latency_p50_ms"] is None
    assert s["process_rss_bytes"] == 5


def test_an_update_whose_final_event_was_lost_ends_with_the_status_that_carries_it_and_is_stored_once(tmp_path):
    store = FleetStore(tmp_path / "fleet.db")
    store.record_event(DeploymentEvent("pi-01", "c1", "activating", "m 2.0.0", 0.9, None, 10.0))
    assert store.in_flight()["pi-01"]["state"] == "activating"  # the "active" event never came
    active = DeploymentEvent("pi-01", "c1", "active", "m 2.0.0", 1.0, None, 11.0)
    status = DeviceStatus("pi-01", True, 12.0, "0.1.0", "m 2.0.0", "cd" * 32, last_update=active)
    store.record_status(status, 12.0)
    assert store.in_flight() == {}  # not shown as updating for ever
    store.record_status(status, 20.0)  # sent again on every reconnect
    store.record_event(active)  # and the event itself, late
    assert store.events("pi-01") == [{"timestamp": 11.0, "state": "active", "bundle": "m 2.0.0", "reason": None}]


def test_the_database_survives_reopening(tmp_path):
    store = FleetStore(tmp_path / "fleet.db")
    store.record_status(DeviceStatus("pi-01", True, 1.0), 1.0)
    store.close()
    assert [r.device_id for r in FleetStore(tmp_path / "fleet.db").devices()] == ["pi-01"]


def test_a_jetsons_power_and_temperature_reach_the_fleet_view_with_their_source(tmp_path):
    from pathlib import Path

    from device_agent.telemetry import CollectorContext, TelemetryCollectors
    from host_tools.fleet.view import fleet_table
    from rich.console import Console

    board = Path(__file__).resolve().parent.parent / "fixtures" / "boards" / "jetson-orin-nano-jp6" / "sys"
    readings = TelemetryCollectors(CollectorContext(sysfs=board, vcgencmd=lambda *a: None),
                                   ["power", "thermal"]).collect()
    store = FleetStore(tmp_path / "fleet.db")
    store.record_status(DeviceStatus("pi-01", True, 1.0, "0.1.0", "m 1.0.0", "ab" * 32), 1.0)
    store.record_telemetry(sample(1, readings=readings), 2.0)
    (row,) = store.devices()
    s = summarize(row)
    assert (s["power_watts"], s["power_source"], s["temperature_c"]) == (5.996, "jetson-ina3221", 48.25)
    console = Console(width=200, record=True)
    console.print(fleet_table([row], now=3.0))
    text = console.export_text()
    assert "6.00 (jetson-ina3221)" in text and "48.2" in text


def test_prometheus_series_carry_the_power_source_and_exist_only_for_readings_sent(tmp_path):
    from pathlib import Path

    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from device_agent.telemetry import CollectorContext, TelemetryCollectors
    from host_tools.fleet.metrics import FleetMetrics

    board = Path(__file__).resolve().parent.parent / "fixtures" / "boards" / "jetson-nano-jp4" / "sys"
    store = FleetStore(tmp_path / "fleet.db")
    store.record_status(DeviceStatus("nano-1", True, 1.0, "0.1.0", "m 1.0.0", "ab" * 32), 1.0)
    store.record_telemetry(TelemetrySample("nano-1", 1, 1.0, 1.0, "m 1.0.0", TelemetryCollectors(
        CollectorContext(sysfs=board, vcgencmd=lambda *a: None), ["power", "thermal"]).collect()), 2.0)
    store.record_status(DeviceStatus("pi-2", True, 1.0, "0.1.0", "m 1.0.0", "cd" * 32), 1.0)
    store.record_telemetry(TelemetrySample("pi-2", 1, 1.0, 1.0, "m 1.0.0", {"inference": {"p50_ms": 0.2559}}), 2.0)
    registry = CollectorRegistry()
    registry.register(FleetMetrics(store))
    text = generate_latest(registry).decode()
    assert 'edgefleet_power_watts{bundle="m 1.0.0",device="nano-1",source="jetson-ina3221"} 2.964' in text
    assert 'edgefleet_temperature_celsius{bundle="m 1.0.0",device="nano-1"} 36.5' in text
    assert 'device="pi-2"' in text and 'edgefleet_power_watts{bundle="m 1.0.0",device="pi-2"' not in text
    # milliseconds become seconds as the decimal they are, not 0.00025590000000000004
    assert 'edgefleet_inference_latency_p50_seconds{bundle="m 1.0.0",device="pi-2"} 0.0002559\n' in text


def test_the_shipped_grafana_dashboard_queries_only_metrics_the_monitor_exports():
    import json
    import re
    from pathlib import Path

    from host_tools.fleet.metrics import GAUGES

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs/grafana/edgefleet-fleet.json").read_text())
    exported = {name for name, *_ in GAUGES}
    queried = {m for panel in dashboard["panels"] for t in panel["targets"]
               for m in re.findall(r"edgefleet_[a-z_0-9]+", t["expr"])}
    assert queried and queried <= exported, queried - exported


def test_old_samples_fold_into_hourly_summaries_and_very_old_hours_go(tmp_path):
    store = FleetStore(tmp_path / "fleet.db")
    now = 100 * 86400.0
    store.record_status(DeviceStatus("pi-01", True, 1.0), 1.0)
    old_hour = now - 10 * 86400 - (now - 10 * 86400) % 3600  # ten days ago, on the hour
    for i, (p50, watts) in enumerate([(1.0, 5.0), (3.0, None), (2.0, 7.0)]):
        readings = {"inference": {"p50_ms": p50}}
        if watts is not None:
            readings["power"] = {"total_watts": watts}
        store.record_telemetry(TelemetrySample("pi-01", i + 1, old_hour + 60 * i, 60.0, "m 1.0.0", readings), now)
    store.record_telemetry(TelemetrySample("pi-01", 9, now - 3600, 60.0, "m 2.0.0", {"inference": {"p50_ms": 9.0}}),
                           now)
    store.record_telemetry(TelemetrySample("pi-01", 10, now - 200 * 86400, 60.0, "m 0.1.0", {}), now)

    assert store.retain(now, raw_days=7, hourly_days=90) == (4, 1)
    assert [seq for seq, _ in store.sample_index("pi-01")] == [9]  # the recent one stays raw
    ((hour, samples, summary),) = store.hourly("pi-01")
    assert hour == old_hour and samples == 3
    assert summary["inference.p50_ms"] == {"mean": 2.0, "max": 3.0, "n": 3}
    assert summary["power.total_watts"] == {"mean": 6.0, "max": 7.0, "n": 2}  # only the samples that had it
    assert "thermal.max_c" not in summary


def test_a_device_clock_behind_the_hosts_is_estimated_from_its_telemetry(tmp_path):
    """A Pi has no RTC: until network time it stamps samples with a clock hours behind. The least
    lag (host arrival - newest sample) over ten minutes estimates it: delivery delays only add, and a
    batch of samples queued during an outage does not hold the estimate up once the window passes."""
    from host_tools.fleet.store import CLOCK_WINDOW

    store = FleetStore(tmp_path / "fleet.db")
    store.record_status(DeviceStatus("pi-01", True, 1.0), 1.0)
    host, behind = 1_000_000.0, 3 * 3600.0
    stamped = lambda seq, at: TelemetrySample("pi-01", seq, at, 1.0, None, {})  # noqa: E731
    store.record_telemetry_many([stamped(1, host - behind)], host + 0.4)  # 0.4 s on the way
    store.record_telemetry_many([stamped(2, host + 5 - behind)], host + 5.1)
    assert abs(store.devices()[0].clock_lag - (behind + 0.1)) < 1e-6
    # Samples queued while the broker was away arrive late: the estimate stays.
    store.record_telemetry_many([stamped(3, host + 10 - behind)], host + 400)
    assert abs(store.devices()[0].clock_lag - (behind + 0.1)) < 1e-6
    # Network time arrives: once the window has passed, the new offset replaces the old one.
    later = host + CLOCK_WINDOW + 60
    store.record_telemetry_many([stamped(4, later - 0.2)], later)
    assert abs(store.devices()[0].clock_lag - 0.2) < 1e-6
    store.close()


def test_devices_show_says_when_a_device_clock_is_off(tmp_path):
    import json
    import time

    from tests.conftest import edgefleet

    store = FleetStore(tmp_path / "fleet.db")
    for device, behind in (("pi-rtc", 0.0), ("pi-nortc", 2 * 86400.0 + 3600.0)):
        store.record_status(DeviceStatus(device, True, time.time()), time.time())
        store.record_telemetry_many([TelemetrySample(device, 1, time.time() - behind, 1.0, None, {})], time.time())
    store.close()
    shown = edgefleet("devices", "show", "pi-nortc", "--db", tmp_path / "fleet.db").stdout
    assert "clock:      about 2 days behind this host's" in shown
    assert "clock:" not in edgefleet("devices", "show", "pi-rtc", "--db", tmp_path / "fleet.db").stdout
    doc = json.loads(edgefleet("devices", "show", "pi-nortc", "--db", tmp_path / "fleet.db", "--json").stdout)
    assert abs(doc["clock_lag_s"] - (2 * 86400 + 3600)) < 5


def test_devices_show_says_how_much_room_is_left_on_the_device_for_bundles(tmp_path):
    import json
    import time

    from tests.conftest import edgefleet

    store = FleetStore(tmp_path / "fleet.db")
    readings = {"pi-full": {"disk": {"free_bytes": 3 * 2**29, "total_bytes": 29 * 2**30}},
                "pi-old": {}, "pi-odd": {"disk": {"free_bytes": "lots", "total_bytes": 29 * 2**30}}}
    for device, sample in readings.items():
        store.record_status(DeviceStatus(device, True, time.time()), time.time())
        store.record_telemetry_many([TelemetrySample(device, 1, time.time(), 1.0, None, sample)], time.time())
    store.close()

    def show(device, *json_flag):
        return edgefleet("devices", "show", device, "--db", tmp_path / "fleet.db", *json_flag).stdout
    assert "disk:       1.50 GiB free of 29.00 GiB (where the bundles are kept)" in show("pi-full")
    assert json.loads(show("pi-full", "--json"))["disk"] == {"free_bytes": 3 * 2**29, "total_bytes": 29 * 2**30}
    for device in ("pi-old", "pi-odd"):  # not reported, or not numbers: nothing is shown, nothing made up
        assert "disk:" not in show(device)
        assert json.loads(show(device, "--json"))["disk"] is None


def test_a_reading_that_is_not_a_number_is_shown_as_not_reported_and_breaks_no_view(tmp_path):
    import time

    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry
    from rich.console import Console

    from host_tools.fleet.metrics import FleetMetrics
    from host_tools.fleet.view import fleet_table

    store = FleetStore(tmp_path / "fleet.db")
    for device, readings in (("pi-ok", {"disk": {"free_bytes": 2**30, "total_bytes": 2**34}}),
                             ("pi-odd", {"disk": {"free_bytes": "lots", "total_bytes": 2**34},
                                         "inference": {"p50_ms": "fast"}})):
        store.record_status(DeviceStatus(device, True, time.time()), time.time())
        store.record_telemetry_many([TelemetrySample(device, 1, time.time(), 1.0, None, readings)], time.time())
    registry = CollectorRegistry()
    registry.register(FleetMetrics(store))
    text = generate_latest(registry).decode()
    assert 'edgefleet_disk_free_bytes{bundle="",device="pi-ok"} 1.073741824e+09' in text
    assert 'edgefleet_disk_size_bytes{bundle="",device="pi-odd"} 1.7179869184e+10' in text  # its numbers stay
    assert 'edgefleet_disk_free_bytes{bundle="",device="pi-odd"}' not in text
    assert 'edgefleet_inference_latency_p50_seconds{bundle="",device="pi-odd"}' not in text
    (odd,) = [r for r in store.devices() if r.device_id == "pi-odd"]
    assert summarize(odd)["latency_p50_ms"] is None and summarize(odd)["disk_free_bytes"] is None
    console = Console(width=200, record=True)
    console.print(fleet_table([odd], now=time.time()))  # the table shows n/a rather than failing
    assert "pi-odd" in console.export_text()
    store.close()


def test_forgetting_a_device_deletes_all_that_is_stored_of_it_and_only_that(tmp_path):
    store = FleetStore(tmp_path / "fleet.db")
    for device in ("pi-01", "pi-02"):
        store.record_status(DeviceStatus(device, False, 1.0), 1.0)
        store.record_telemetry_many([TelemetrySample(device, seq, 10.0 + seq, 1.0, None, {"inference": {"p50_ms": 1}})
                                     for seq in range(3)], 20.0)
        store.record_event(DeploymentEvent(device, "c1", "active", "m 1.0.0", 1.0, None, 30.0))
        store.set_labels(device, {"site": "lab"})
    store.retain(20.0 + 8 * 86400)  # the samples become hourly summaries...
    store.record_telemetry_many([TelemetrySample("pi-01", 9, 40.0, 1.0, None, {})], 40.0)  # ...and a new one

    assert store.forget("pi-01") == {"status": 1, "labels": 1, "samples": 1, "hours": 1, "events": 1}
    assert [r.device_id for r in store.devices()] == ["pi-02"] and store.devices()[0].labels == {"site": "lab"}
    assert store.hourly("pi-01") == [] and store.events("pi-01") == [] and store.telemetry_count("pi-01") == 0
    assert len(store.hourly("pi-02")) == 1 and len(store.events("pi-02")) == 1
    assert store.forget("pi-01") == {"status": 0, "labels": 0, "samples": 0, "hours": 0, "events": 0}


def test_devices_forget_registry_only_needs_no_broker_and_refuses_a_device_the_registry_has_online(tmp_path):
    from tests.conftest import edgefleet, free_port

    store = FleetStore(tmp_path / "fleet.db")
    store.record_status(DeviceStatus("pi-up", True, 1.0), 1.0)
    store.record_status(DeviceStatus("pi-gone", False, 1.0), 1.0)
    nowhere = f"127.0.0.1:{free_port()}"

    def forget(*args):
        return edgefleet("devices", "forget", *args, "--yes", "--db", tmp_path / "fleet.db", "--broker", nowhere)
    unreachable = forget("pi-gone")  # the broker is asked first: not reachable, nothing is deleted
    assert unreachable.returncode == 1 and unreachable.stderr.count("\n") == 1 and "Traceback" not in unreachable.stderr
    refused = forget("pi-up", "pi-gone", "--registry-only")
    assert refused.returncode == 1 and "online: pi-up" in refused.stderr
    assert {r.device_id for r in store.devices()} == {"pi-up", "pi-gone"}
    done = forget("pi-gone", "--registry-only")
    assert done.returncode == 0 and "forgot pi-gone" in done.stdout and "broker" not in done.stdout
    assert [r.device_id for r in store.devices()] == ["pi-up"]


def test_the_client_certificate_each_device_shows_reaches_the_registry_and_metrics_and_one_near_its_end_is_flagged(
        tmp_path):
    import datetime as dt
    import json

    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from host_tools.fleet.metrics import FleetMetrics
    from tests.conftest import edgefleet

    now = dt.datetime.now(dt.timezone.utc)
    store = FleetStore(tmp_path / "fleet.db")
    for device, days, source in (("pi-fresh", 700, "renewed"), ("pi-due", 12.5, "config"), ("pi-late", -1, "config")):
        cert = {"serial": "ab12" * 5, "expires": (now + dt.timedelta(days=days)).isoformat(), "source": source}
        store.record_status(DeviceStatus(device, True, 1.0, certificate=cert), 1.0)
    store.record_status(DeviceStatus("pi-due", False, 0.0), 2.0)  # its last will says nothing of it: kept
    store.record_status(DeviceStatus("pi-ca", True, 1.0, certificate={  # its own is fresh, its CA's is not
        "serial": "cd34" * 5, "expires": (now + dt.timedelta(days=700)).isoformat(), "source": "config",
        "ca_expires": (now + dt.timedelta(days=5.5)).isoformat()}), 1.0)
    store.record_status(DeviceStatus("pi-plain", True, 1.0), 1.0)  # no client certificate (or an older agent)
    store.close()
    db = tmp_path / "fleet.db"

    listed = edgefleet("devices", "list", "--db", db, "--json")
    assert {d["device_id"]: (d["certificate"] or {}).get("source") for d in json.loads(listed.stdout)} == {
        "pi-fresh": "renewed", "pi-due": "config", "pi-late": "config", "pi-plain": None, "pi-ca": "config"}
    table = edgefleet("devices", "list", "--db", db).stdout
    assert "certificate: 12 days left!" in table and "certificate expired!" in table
    assert table.count("certificate") == 2  # the fresh one and the one without are not flagged
    assert table.count("CA: 5 days left!") == 1
    shown = edgefleet("devices", "show", "pi-fresh", "--db", db).stdout
    assert f"certificate: serial {'ab12' * 4}, valid until {now + dt.timedelta(days=700):%Y-%m-%d} (renewed over " \
           f"MQTT)\n" in shown
    assert "12 days left: renew it" in edgefleet("devices", "show", "pi-due", "--db", db).stdout
    assert "certificate" not in edgefleet("devices", "show", "pi-plain", "--db", db).stdout
    assert "(renewed" not in (ca := edgefleet("devices", "show", "pi-ca", "--db", db).stdout)
    assert f"; its CA until {now + dt.timedelta(days=5.5):%Y-%m-%d}, 5 days left: renew it\n" in ca

    registry = CollectorRegistry()
    registry.register(FleetMetrics(FleetStore(db)))
    text = generate_latest(registry).decode()
    due = float(text.split('edgefleet_client_certificate_expiry_timestamp_seconds{bundle="",device="pi-due"} ')[1]
                .split()[0])
    assert abs(due - (now + dt.timedelta(days=12.5)).timestamp()) < 1
    assert 'edgefleet_client_certificate_expiry_timestamp_seconds{bundle="",device="pi-plain"}' not in text
    ca_due = float(text.split('edgefleet_ca_certificate_expiry_timestamp_seconds{bundle="",device="pi-ca"} ')[1]
                   .split()[0])
    assert abs(ca_due - (now + dt.timedelta(days=5.5)).timestamp()) < 1
    assert 'edgefleet_ca_certificate_expiry_timestamp_seconds{bundle="",device="pi-due"}' not in text  # not said


def test_a_message_the_database_refuses_is_dropped_and_does_not_hold_up_the_rest(tmp_path):
    """A constraint the data breaks (NaN, which SQLite stores as NULL, in a NOT NULL column; an
    integer past 64 bits) is the message's fault, not the database's: the ingest drops it rather
    than holding it, and everything after it, until the database "takes writes again"."""
    import math

    from device_agent.mqtt import BrokerAddress, MqttClient
    from host_tools.fleet.ingest import Ingest

    store = FleetStore(tmp_path / "fleet.db")
    client = MqttClient(client_id="unused", broker=BrokerAddress.parse("127.0.0.1:1"), held_acks=True)
    ingest = Ingest(client, store)
    ingest._stored(lambda: store.record_status(DeviceStatus("pi-01", True, math.nan), 1.7e9))
    ingest._stored(lambda: store.record_telemetry_many([sample(2**64)], 1.7e9))
    ingest._stored(lambda: store.record_status(DeviceStatus("pi-01", True, 1.7e9), 1.7e9))
    ingest._stored(lambda: store.record_telemetry_many([sample(1)], 1.7e9))
    assert ingest.rejected == 2 and ingest.unstored == 0 and ingest.samples == 1
    assert [d.device_id for d in store.devices()] == ["pi-01"] and store.telemetry_count("pi-01") == 1


def test_devices_list_hides_nothing_behind_an_ellipsis_and_shows_no_column_of_blanks(tmp_path):
    """Thirty Jetsons, each with two runtimes and two labels: at the table's width, the runtimes and
    the hardware class read "onnxruntim…" and "jetson-orin-…", and the state column went past the
    edge. The state comes second now and is never cut, the other columns wrap, and with no update
    under way there is no "updating" column of blanks."""
    from tests.conftest import edgefleet

    store = FleetStore(tmp_path / "fleet.db")
    hardware = {"class": "jetson-orin-nano-8gb", "arch": "aarch64", "ram_mb": 7620,
                "runtimes": ["onnxruntime", "tflite"], "accelerators": ["cuda", "tensorrt"]}
    for i in range(30):
        store.record_status(DeviceStatus(f"orin-{i:04d}", i % 3 > 0, 1.0, active_bundle="detector 2.1.0",
                                         labels={"group": "warehouse", "site": "north-dock"}, hardware=hardware), 1.0)
    store.close()
    table = edgefleet("devices", "list", "--db", tmp_path / "fleet.db").stdout
    assert "…" not in table and "onnxruntime," in table and "tensorrt" in table
    rows = [line.split() for line in table.splitlines() if line.strip().startswith("orin-")]
    assert [row[1] for row in rows] == ["offline" if i % 3 == 0 else "online" for i in range(30)]
    assert "updating" not in table
