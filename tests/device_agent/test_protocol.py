"""Every message that crosses MQTT round-trips, and anything malformed is a ProtocolError."""

import json
import math
from dataclasses import asdict, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.errors import ProtocolError
from device_agent.protocol import topics
from device_agent.protocol.chunks import DEFAULT_CHUNK_SIZE, BundleOffer, Chunk, ChunkRequest
from device_agent.protocol.commands import (
    BenchCommand, ConfigCommand, DeployCommand, Reply, RollbackCommand, StatusRequest, parse_command,
)
from device_agent.protocol.reports import DeploymentEvent, DeviceStatus, TelemetryBatch, TelemetrySample

OFFER = BundleOffer(sha256="ab" * 32, size=100_000, chunk_size=16_384, name="digits-cnn", version="1.0.0")
MESSAGES = [
    DeployCommand("c1", OFFER, 1.5),
    DeployCommand("c1", replace(OFFER, unpacked_size=8 * 2**20), 1.5),
    RollbackCommand("c2", 1.5),
    StatusRequest("c3", 1.5),
    BenchCommand("c4", 1.5, OFFER, runs=50, warmup=5),
    BenchCommand("c5", 1.5, None),
    Reply("pi-01", "c4", "bench", True, {"p50_ms": 0.3}),
    Reply("pi-01", "c5", "bench", False, {}, "no bundle is active"),
    ChunkRequest("pi-01", (0, 1, 7)),
    ChunkRequest("pi-01", (8,), 16_384, True, "0a1b2c3d", 41),
    ChunkRequest("pi-01", (), 16_384, True, "0a1b2c3d", 41),  # only says what the fan-out download heard
    Chunk("ab" * 32, 3, b"\x00\xffdata"),
    DeploymentEvent("pi-01", "c1", "downloading", "digits-cnn 1.0.0", 0.5, None, 2.0),
    DeploymentEvent("pi-01", "c1", "failed", "digits-cnn 1.0.0", 0.0, "signature mismatch", 2.0),
    DeviceStatus("pi-01", True, 3.0, "0.1.0", "digits-cnn 1.0.0", "ab" * 32),
    DeviceStatus("pi-01", True, 3.0, id_shared_with=[{"host": "pi-clone", "pid": 812, "since": 1.5, "seen": 2.5,
                                                      "how": "asked"}]),
    DeviceStatus("pi-01", True, 3.0, active_bundle="digits-cnn 1.0.0",
                 last_update=DeploymentEvent("pi-01", "c1", "active", "digits-cnn 1.0.0", 1.0, None, 2.0)),
    DeviceStatus("pi-01", False, 0.0, "0.1.0", instance="0a1b2c3d4e5f6071"),  # a last will
    TelemetrySample("pi-01", 7, 4.0, 1.0, "digits-cnn 1.0.0", {"inference": {"p50_ms": 0.4}}),
    TelemetryBatch("pi-01", (TelemetrySample("pi-01", 8, 5.0, 1.0, None, {}),
                             TelemetrySample("pi-01", 9, 6.0, 1.0, None, {"power": {"total_watts": 5.0}}))),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert type(message).from_payload(message.to_payload()) == message


def test_a_telemetry_sample_sends_every_field_it_has():
    """to_dict is written out by hand (asdict copied the readings value by value); a field added to
    the class and not to it would be missing from every message."""
    sample = next(m for m in MESSAGES if type(m) is TelemetrySample)
    assert sample.to_dict() == asdict(sample)


@pytest.mark.parametrize("body", [{"chunks": []}, {"chunks": [], "seen": 3}, {"chunks": [], "fanout": True},
                                  {"chunks": [1], "seen": -1}, {"chunks": [1], "seen": "3"}])
def test_a_chunk_request_with_no_chunks_only_says_what_a_fan_out_download_heard(body):
    with pytest.raises(ProtocolError):
        ChunkRequest.from_payload(json.dumps({"type": "chunk_request", "device_id": "pi-01", **body}).encode())


@pytest.mark.parametrize("unpacked_size", [-1, "8", 1.5, True])
def test_an_offer_with_a_negative_or_non_integer_unpacked_size_is_refused(unpacked_size):
    with pytest.raises(ProtocolError, match="unpacked"):
        BundleOffer.from_dict({**asdict(OFFER), "unpacked_size": unpacked_size})


def test_chunk_count_rounds_up():
    assert OFFER.chunk_count == 7  # 100000 / 16384 = 6.1


@pytest.mark.parametrize("cls", [DeployCommand, ChunkRequest, Chunk, DeploymentEvent, DeviceStatus,
                                 TelemetrySample, RollbackCommand, StatusRequest, BenchCommand, Reply,
                                 TelemetryBatch])
@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(cls, payload):
    try:
        cls.from_payload(payload)
    except ProtocolError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda children: (st.lists(children, max_size=5)
                                             | st.dictionaries(st.text(), children, max_size=5)),
                           max_leaves=20)


@pytest.mark.parametrize("cls, kind", [(DeployCommand, "deploy"), (ChunkRequest, "chunk_request"),
                                       (DeploymentEvent, "deployment"), (DeviceStatus, "status"),
                                       (TelemetrySample, "telemetry"), (BenchCommand, "bench"),
                                       (Reply, "reply"), (RollbackCommand, "rollback")])
@settings(max_examples=100, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["command_id", "bundle", "device_id", "chunks", "state", "seq",
                                             "online", "timestamp", "readings", "progress", "issued_at",
                                             "runs", "warmup", "kind", "ok", "body", "session", "seen",
                                             "id_shared_with", "last_update"]),
                            json_values))
def test_wrongly_typed_json_is_a_protocol_error(cls, kind, body):
    import json
    try:
        cls.from_payload(json.dumps({"type": kind, **body}).encode())
    except ProtocolError:
        pass


@pytest.mark.parametrize("shared", [[1], [{"host": "h", "pid": "1", "since": 1, "seen": 1, "how": "asked"}],
                                    [{"host": "h", "pid": 1, "since": 1, "seen": 1, "how": "stole"}],
                                    [{"host": "h" * 256, "pid": 1, "since": 1, "seen": 1, "how": "asked"}],
                                    [{"host": "h", "pid": 1, "since": 1, "seen": 1e300, "how": "asked"}],
                                    [{"host": "h", "pid": 1, "since": 1, "seen": 1, "how": "asked"}] * 9, "h"])
def test_a_status_naming_other_agents_with_the_id_is_checked(shared):
    with pytest.raises(ProtocolError):
        DeviceStatus.from_payload(json.dumps({"type": "status", "device_id": "pi-01", "online": True,
                                              "timestamp": 1.0, "id_shared_with": shared}).encode())


@pytest.mark.parametrize("last_update", [
    {"device_id": "pi-01", "command_id": "c1", "state": "downloading", "bundle": "m 1", "progress": 0.5,
     "timestamp": 2.0},  # not an outcome
    {"device_id": "pi-02", "command_id": "c1", "state": "active", "bundle": "m 1", "progress": 1.0,
     "timestamp": 2.0},  # another device's
    {"device_id": "pi-01", "command_id": 7, "state": "active", "bundle": "m 1", "progress": 1.0, "timestamp": 2.0},
    {"device_id": "pi-01", "command_id": "c1", "state": "active", "bundle": "m 1", "progress": 1.0},
    "active", [1]])
def test_the_last_update_a_status_carries_is_a_final_event_of_that_device(last_update):
    with pytest.raises(ProtocolError):
        DeviceStatus.from_payload(json.dumps({"type": "status", "device_id": "pi-01", "online": True,
                                              "timestamp": 1.0, "last_update": last_update}).encode())


@pytest.mark.parametrize("instance", ["", "x" * 65, 7])
def test_the_instance_a_last_will_names_is_checked(instance):
    with pytest.raises(ProtocolError):
        DeviceStatus.from_payload(json.dumps({"type": "status", "device_id": "pi-01", "online": False,
                                              "timestamp": 0.0, "instance": instance}).encode())


def test_a_status_without_an_instance_says_none():
    assert b"instance" not in DeviceStatus("pi-01", True, 3.0).to_payload()


GOOD_CERT = {"serial": "1f" * 20, "expires": "2029-03-09T08:33:20+00:00", "source": "renewed"}


@pytest.mark.parametrize("certificate", [{**GOOD_CERT, "serial": "1f" * 21}, {**GOOD_CERT, "expires": "soon"},
                                         {**GOOD_CERT, "expires": "2029-03-09T08:33:20"},  # no zone
                                         {**GOOD_CERT, "source": "stolen"}, {**GOOD_CERT, "serial": 31},
                                         {"serial": "1f"}, "1f", {**GOOD_CERT, "ca_keys": "ab" * 32 + ","},
                                         {**GOOD_CERT, "ca_keys": ",".join(["ab" * 32] * 17)},
                                         {**GOOD_CERT, "ca_keys": "AB" * 32}, {**GOOD_CERT, "ca_keys": ["ab" * 32]}])
def test_a_status_describing_its_certificate_is_checked(certificate):
    def status(cert):
        return DeviceStatus.from_payload(json.dumps({"type": "status", "device_id": "pi-01", "online": True,
                                                     "timestamp": 1.0, "certificate": cert}).encode())
    assert status(GOOD_CERT).certificate == GOOD_CERT
    with_keys = {**GOOD_CERT, "ca_keys": ",".join(["ab" * 32] * 16)}
    assert status(with_keys).certificate == with_keys
    with pytest.raises(ProtocolError):
        status(certificate)


def test_oversized_json_is_refused():
    with pytest.raises(ProtocolError, match="exceeds"):
        TelemetrySample.from_payload(b"{" + b" " * 300_000 + b"}")


@pytest.mark.parametrize("bad_id", ["", "a/b", "+", "#", "x" * 65, "pi 01", "pi-01\n"])
def test_device_ids_that_would_break_topics_are_refused(bad_id):
    assert not topics.valid_device_id(bad_id)
    with pytest.raises(ValueError):
        topics.command(bad_id)


def test_topics_are_versioned_and_parse_back():
    assert topics.telemetry("pi-01") == "edgefleet/v1/devices/pi-01/telemetry"
    assert topics.device_of(topics.events("pi-01")) == "pi-01"
    assert topics.device_of("edgefleet/v1/transfer/x/request") is None


@pytest.mark.parametrize("message", [m for m in MESSAGES
                                     if isinstance(m, (DeployCommand, RollbackCommand, StatusRequest, BenchCommand))],
                         ids=lambda m: type(m).__name__)
def test_a_device_tells_commands_apart_by_type(message):
    assert parse_command(message.to_payload()) == message


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=512))
def test_any_bytes_on_the_command_topic_are_a_command_or_a_protocol_error(payload):
    try:
        parse_command(payload)
    except ProtocolError:
        pass


def test_a_bench_asking_for_absurd_runs_is_refused():
    import json
    with pytest.raises(ProtocolError, match="runs must be"):
        BenchCommand.from_payload(json.dumps({"type": "bench", "command_id": "c", "issued_at": 1,
                                              "bundle": None, "runs": 10**9, "warmup": 1}).encode())


@pytest.fixture(scope="module")
def command_keys(tmp_path_factory):
    from device_agent.bundle.signing import generate_key_pair, load_private_key, trusted_keys

    d = tmp_path_factory.mktemp("cmdkeys")
    key, pub = generate_key_pair(d, "release")
    return load_private_key(key), trusted_keys([pub])


def test_a_signed_command_verifies_and_any_change_breaks_it(command_keys):
    import json

    from device_agent.errors import SignatureError
    from device_agent.protocol.signed import sign_command

    private, trusted = command_keys
    payload = sign_command(RollbackCommand("c9", 1.0).to_payload(), private, expires_in=60)
    assert parse_command(payload, trusted) == RollbackCommand("c9", 1.0)
    doc = json.loads(payload)
    doc["command_id"] = "c10"
    with pytest.raises(SignatureError, match="does not match the command"):
        parse_command(json.dumps(doc).encode(), trusted)
    doc = json.loads(payload)
    doc["expires_at"] += 3600  # extending the expiry is a change too
    with pytest.raises(SignatureError):
        parse_command(json.dumps(doc).encode(), trusted)


def test_unsigned_and_expired_commands_are_refused_but_a_status_request_needs_no_signature(command_keys):
    from device_agent.errors import SignatureError
    from device_agent.protocol.signed import sign_command

    private, trusted = command_keys
    with pytest.raises(SignatureError, match="not signed"):
        parse_command(DeployCommand("c1", OFFER, 1.5).to_payload(), trusted)
    with pytest.raises(ProtocolError, match="expired"):
        parse_command(sign_command(DeployCommand("c1", OFFER, 1.5).to_payload(), private, expires_in=-1), trusted)
    assert parse_command(StatusRequest("c3", 1.5).to_payload(), trusted) == StatusRequest("c3", 1.5)


def test_a_signed_command_with_nan_or_infinite_times_or_settings_is_refused(command_keys):
    """Python's JSON reads NaN and Infinity, and NaN passes every comparison: an expiry of NaN
    would never expire, an issue time of NaN would slip past the replay horizon (and then
    become it), and a telemetry interval of NaN would send telemetry in a busy loop."""
    from device_agent.protocol.signed import sign_command

    private, trusted = command_keys
    with pytest.raises(ProtocolError, match="no expiry"):
        parse_command(sign_command(RollbackCommand("c1", 1.0).to_payload(), private, expires_in=math.nan), trusted)
    with pytest.raises(ProtocolError, match="'issued_at' must be a finite number"):
        parse_command(sign_command(RollbackCommand("c2", math.nan).to_payload(), private), trusted)
    for value in (math.nan, math.inf):
        with pytest.raises(ProtocolError, match="finite numbers"):
            parse_command(sign_command(ConfigCommand("c3", 1.0, {"telemetry_interval": value}).to_payload(),
                                       private), trusted)
    assert parse_command(sign_command(ConfigCommand("c4", 1.0, {"telemetry_interval": 0.5}).to_payload(), private),
                         trusted).settings == {"telemetry_interval": 0.5}


def test_reports_with_nan_times_are_refused_and_nan_readings_are_not_measurements():
    with pytest.raises(ProtocolError, match="'timestamp' must be a Unix time"):
        DeviceStatus.from_payload(b'{"type": "status", "device_id": "d", "online": true, "timestamp": NaN}')
    with pytest.raises(ProtocolError, match="'progress' must be a finite number"):
        DeploymentEvent.from_payload(b'{"type": "deployment", "device_id": "d", "command_id": "c", '
                                     b'"state": "active", "bundle": "m 1", "progress": NaN, "timestamp": 1}')
    for stamp in (b"NaN", b"Infinity", b"-1", b"1e300"):
        with pytest.raises(ProtocolError, match="'timestamp' must be a Unix time"):
            TelemetrySample.from_payload(b'{"type": "telemetry", "device_id": "d", "seq": 1, "timestamp": ' + stamp
                                         + b', "interval_s": 5, "readings": {}}')
    sample = TelemetrySample.from_payload(
        b'{"type": "telemetry", "device_id": "d", "seq": 1, "timestamp": 1.7e9, "interval_s": 5, "readings": '
        b'{"inference": {"p50_ms": NaN, "p99_ms": Infinity, "count": 3}, "power": {"rails": [-Infinity, 1.5]}}}')
    assert sample.readings == {"inference": {"p50_ms": None, "p99_ms": None, "count": 3},
                               "power": {"rails": [None, 1.5]}}
    status = DeviceStatus.from_payload(b'{"type": "status", "device_id": "d", "online": true, "timestamp": 1.7e9, '
                                       b'"hardware": {"ram_mb": NaN, "arch": "aarch64"}}')
    assert status.hardware == {"ram_mb": None, "arch": "aarch64"}
    json.loads(sample.to_payload(), parse_constant=pytest.fail)  # what the host stores and serves: strict JSON


def test_a_device_whose_clock_runs_far_ahead_is_told_to_check_it(command_keys):
    """Every command looks expired to a device whose clock is months ahead; the refusal says so."""
    import time

    from device_agent.protocol.signed import sign_command, verify_command

    private, trusted = command_keys
    now = time.time()
    doc = json.loads(sign_command(RollbackCommand("c1", now).to_payload(), private, now=now))
    with pytest.raises(ProtocolError, match=r"expired .* issued 60 days before this device's clock, .* is the clock"):
        verify_command(doc, trusted, now=now + 60 * 86400)
    with pytest.raises(ProtocolError) as late:  # a day late: expired, nothing about the clock
        verify_command(doc, trusted, now=now + 2 * 86400)
    assert "clock" not in str(late.value)


@settings(max_examples=300, deadline=None)
@given(signature=json_values)
def test_any_signature_field_is_a_signature_error_or_protocol_error_never_a_crash(command_keys, signature):
    import json

    from device_agent.errors import SignatureError

    doc = json.loads(RollbackCommand("c", 1.0).to_payload())
    doc["signature"], doc["expires_at"] = signature, 1e12
    try:
        parse_command(json.dumps(doc).encode(), command_keys[1])
    except (SignatureError, ProtocolError):
        pass


def test_a_default_chunk_message_fits_the_128_kb_a_managed_broker_allows():
    """AWS IoT Core refuses a message over 128 KB: a chunk of the default size, with its header at
    the largest index a 1 GiB bundle has and the longer of the two topics it travels on, fits
    (taking KB as 1,000 bytes, the stricter reading)."""
    sha = "f" * 64
    payload = Chunk(sha, (2**30 // DEFAULT_CHUNK_SIZE), bytes(DEFAULT_CHUNK_SIZE)).to_payload(crc=2**32 - 1)
    topic = max(topics.bundle_chunks(sha, DEFAULT_CHUNK_SIZE), topics.chunks("d" * 64), key=len)
    # + a PUBLISH's fixed header (5), topic length (2), packet id (2) and empty properties (1)
    assert len(payload) + len(topic.encode()) + 10 <= 128_000
