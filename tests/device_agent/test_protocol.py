"""Every message that crosses MQTT round-trips, and anything malformed is a ProtocolError."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.errors import ProtocolError
from device_agent.protocol import topics
from device_agent.protocol.messages import (
    BundleOffer, Chunk, ChunkRequest, DeployCommand, DeploymentEvent, DeviceStatus, TelemetrySample,
)

OFFER = BundleOffer(sha256="ab" * 32, size=100_000, chunk_size=16_384, name="digits-cnn", version="1.0.0")
MESSAGES = [
    DeployCommand("c1", OFFER, 1.5),
    ChunkRequest("pi-01", (0, 1, 7)),
    Chunk("ab" * 32, 3, b"\x00\xffdata"),
    DeploymentEvent("pi-01", "c1", "downloading", "digits-cnn 1.0.0", 0.5, None, 2.0),
    DeploymentEvent("pi-01", "c1", "failed", "digits-cnn 1.0.0", 0.0, "signature mismatch", 2.0),
    DeviceStatus("pi-01", True, 3.0, "0.1.0", "digits-cnn 1.0.0", "ab" * 32),
    TelemetrySample("pi-01", 7, 4.0, 1.0, "digits-cnn 1.0.0", {"inference": {"p50_ms": 0.4}}),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert type(message).from_payload(message.to_payload()) == message


def test_chunk_count_rounds_up():
    assert OFFER.chunk_count == 7  # 100000 / 16384 = 6.1


@pytest.mark.parametrize("cls", [DeployCommand, ChunkRequest, Chunk, DeploymentEvent, DeviceStatus,
                                 TelemetrySample])
@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(cls, payload):
    try:
        cls.from_payload(payload)
    except ProtocolError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda children: st.lists(children) | st.dictionaries(st.text(), children),
                           max_leaves=20)


@pytest.mark.parametrize("cls, kind", [(DeployCommand, "deploy"), (ChunkRequest, "chunk_request"),
                                       (DeploymentEvent, "deployment"), (DeviceStatus, "status"),
                                       (TelemetrySample, "telemetry")])
@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["command_id", "bundle", "device_id", "chunks", "state", "seq",
                                             "online", "timestamp", "readings", "progress", "issued_at"]),
                            json_values))
def test_wrongly_typed_json_is_a_protocol_error(cls, kind, body):
    import json
    try:
        cls.from_payload(json.dumps({"type": kind, **body}).encode())
    except ProtocolError:
        pass


def test_oversized_json_is_refused():
    with pytest.raises(ProtocolError, match="exceeds"):
        TelemetrySample.from_payload(b"{" + b" " * 300_000 + b"}")


@pytest.mark.parametrize("bad_id", ["", "a/b", "+", "#", "x" * 65, "pi 01"])
def test_device_ids_that_would_break_topics_are_refused(bad_id):
    assert not topics.valid_device_id(bad_id)
    with pytest.raises(ValueError):
        topics.command(bad_id)


def test_topics_are_versioned_and_parse_back():
    assert topics.telemetry("pi-01") == "edgefleet/v1/devices/pi-01/telemetry"
    assert topics.device_of(topics.events("pi-01")) == "pi-01"
    assert topics.device_of("edgefleet/v1/transfer/x/request") is None
