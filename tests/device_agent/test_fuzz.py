"""Fuzzing the parsers that take bytes from the network or from a bundle: manifests, commands
(signed and not) and chunks. Each gets thousands of generated inputs in bounded time, and must
answer with its own error type, never a crash, and never accept a signed command that was changed.
"""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.bundle.manifest import FileEntry, Manifest, SampleCheck, TensorSpec
from device_agent.bundle.signing import load_private_key, trusted_keys
from device_agent.errors import ManifestError, ProtocolError, SignatureError
from device_agent.local_api.framing import decode_raw
from device_agent.protocol.chunks import BundleOffer, Chunk
from device_agent.protocol.commands import (
    COMMANDS, BenchCommand, CertificateCommand, ConfigCommand, DeployCommand, RollbackCommand, TrustCommand,
    parse_command,
)
from device_agent.protocol.signed import UNSIGNED_ALLOWED, sign_command

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)

MANIFEST = Manifest(
    name="digits-cnn", version="1.2.3", runtime="onnxruntime", model_file="model.onnx",
    files=(FileEntry("model.onnx", 10, "ab" * 32), FileEntry("sample.npz", 5, "cd" * 32)),
    inputs=(TensorSpec("image", ("batch", 1, 8, 8), "float32"),),
    outputs=(TensorSpec("logits", ("batch", 10), "float32"),),
    sample=SampleCheck("sample.npz", latency_budget_ms=5.0), created_at="2026-11-23T00:00:00+00:00",
    release=3, expires_at=2e9, target={"arch": ["aarch64"], "min_ram_mb": 512})


def _paths(doc, prefix=()):
    """Every (path to a value) in a JSON document, to mutate one at a time."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _replace(doc, path, value):
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


MANIFEST_PATHS = list(_paths(MANIFEST.to_dict()))


def test_the_unchanged_manifest_parses():
    assert Manifest.from_json(MANIFEST.to_json()) == MANIFEST


@FUZZ
@given(data=st.binary(max_size=600))
def test_manifest_from_arbitrary_bytes(data):
    try:
        Manifest.from_json(data)
    except ManifestError:
        pass


@FUZZ
@given(path=st.sampled_from(MANIFEST_PATHS), value=json_values)
def test_manifest_with_any_field_replaced_by_any_json(path, value):
    try:
        Manifest.from_json(json.dumps(_replace(MANIFEST.to_dict(), path, value)).encode())
    except ManifestError:
        pass


@pytest.fixture(scope="module")
def signed(keys):
    """Valid signed commands of every kind that must be signed, and the keys that verify them."""
    offer = BundleOffer(sha256="ab" * 32, size=100_000, chunk_size=16_384, name="digits-cnn", version="1.0.0",
                        target={"arch": ["x86_64"]})
    private = load_private_key(keys["key"])
    commands = [DeployCommand("d1", offer, 1.5), RollbackCommand("r1", 1.5), BenchCommand("b1", 1.5, offer),
                TrustCommand("t1", 1.5, add=(keys["rogue_pub"].read_text(),), revoke=("0123456789abcdef",)),
                ConfigCommand("c1", 1.5, {"telemetry_interval": 2.0}),
                CertificateCommand("x1", 1.5, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                                   ca="-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n")]
    assert {json.loads(c.to_payload())["type"] for c in commands} == set(COMMANDS) - set(UNSIGNED_ALLOWED)
    return [json.loads(sign_command(c.to_payload(), private)) for c in commands], trusted_keys([keys["pub"]])


def test_the_unchanged_signed_commands_verify(signed):
    docs, trusted = signed
    for doc in docs:
        parse_command(json.dumps(doc).encode(), trusted)


@FUZZ
@given(data=st.data())
def test_a_signed_command_changed_anywhere_is_refused(signed, data):
    docs, trusted = signed
    doc = data.draw(st.sampled_from(docs))
    path = data.draw(st.sampled_from([p for p in _paths(doc) if p]))
    value = data.draw(json_values)
    changed = _replace(doc, path, value)
    try:
        parse_command(json.dumps(changed).encode(), trusted)
    except (ProtocolError, SignatureError):
        return
    # Accepted: then nothing that the signature covers may have changed.
    body = {k: v for k, v in changed.items() if k != "signature"}
    assert body == {k: v for k, v in doc.items() if k != "signature"}


@FUZZ
@given(data=st.binary(max_size=600))
def test_commands_from_arbitrary_bytes(signed, data):
    try:
        parse_command(data, signed[1])
    except (ProtocolError, SignatureError):
        pass


chunk_headers = st.fixed_dictionaries({}, optional={"bundle": json_values | st.just("ab" * 32),
                                                    "index": json_values | st.integers(-5, 5),
                                                    "sha256": json_values | st.text("0123456789abcdef", max_size=64),
                                                    "crc32": json_values | st.integers(0, 2**32)})


@FUZZ
@given(header=chunk_headers | json_values, data=st.binary(max_size=64), lie=st.integers(-8, 8))
def test_chunks_with_any_header_and_length(header, data, lie):
    raw = json.dumps(header).encode()
    payload = Chunk._LEN.pack(max(0, len(raw) + lie)) + raw + data
    try:
        unchecked = Chunk.from_payload(payload, check_crc=False)  # how a device takes it in (CRC kept)
    except ProtocolError:
        unchecked = None
    try:
        chunk = Chunk.from_payload(payload)
    except ProtocolError:
        assert unchecked is None or unchecked.crc32 is not None and unchecked.crc32 != zlib.crc32(unchecked.data)
        return
    assert chunk.data == payload[Chunk._LEN.size + len(raw) + lie:]  # what the header said is the data
    assert unchecked == chunk and unchecked.crc32 == chunk.crc32


def _header_first(nested: bytes) -> bytes:
    """A chunk or raw-tensor message whose length-prefixed JSON header is *nested*."""
    return Chunk._LEN.pack(len(nested)) + nested + b"data"


@pytest.mark.parametrize("parse, error, payload", [
    (parse_command, ProtocolError, b"[" * 100_000),
    (Manifest.from_json, ManifestError, b"[" * 200_000 + b"]" * 200_000),
    # a chunk header may be 1 KiB, deep enough for the parser's recursion limit
    (Chunk.from_payload, ProtocolError, _header_first(b"[" * 1020)),
    (decode_raw, ProtocolError, _header_first(b"[" * 5000)),  # a local application's tensors
])
def test_json_nested_too_deep_for_the_parser_is_refused_not_a_crash(parse, error, payload):
    with pytest.raises(error):
        parse(payload)
