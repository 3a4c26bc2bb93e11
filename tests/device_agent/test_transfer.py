"""Chunk transfer over a real Mosquitto: device-driven, windowed, hash-checked."""

import os
import uuid

import pytest

from device_agent.errors import TransferError, TransferTimeout
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.messages import BundleOffer, Chunk, ChunkRequest
from device_agent.transfer import ChunkRouter, Download
from host_tools.serve import BundleServer


@pytest.fixture
def clients(mosquitto):
    made = []

    def make(prefix):
        c = MqttClient(client_id=f"{prefix}-{uuid.uuid4().hex[:8]}", broker=mosquitto)
        c.connect()
        made.append(c)
        return c
    yield make
    for c in made:
        c.disconnect()


def device(clients, device_id):
    client, router = clients("device"), ChunkRouter()
    client.subscribe(topics.chunks(device_id), router, qos=1)
    return client, router


def test_a_multi_chunk_file_arrives_byte_for_byte(clients, tmp_path):
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(300_000))  # 19 chunks of 16 KiB, the last one short
    server = BundleServer(clients("host"), chunk_size=16 * 1024)
    server.start()
    offer = server.offer(blob, "m", "1.0.0")
    client, router = device(clients, "dev-a")
    seen = []
    out = Download(client, router, "dev-a", offer, tmp_path / "got.part", window=4,
                   on_progress=seen.append).run()
    server.stop()
    assert out.read_bytes() == blob.read_bytes()
    assert offer.chunk_count == 19 and server.chunks_sent >= 19
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_a_corrupted_chunk_fails_the_whole_file_hash(clients, tmp_path):
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(40_000))
    host = clients("host")
    server = BundleServer(host, chunk_size=16 * 1024)
    offer = server.offer(blob, "m", "1.0.0")

    content = blob.read_bytes()

    def evil(topic, payload):  # answers requests with flipped data instead of the real server
        req = ChunkRequest.from_payload(payload)
        for i in req.chunks:
            data = content[i * offer.chunk_size:(i + 1) * offer.chunk_size]
            host.publish(topics.chunks(req.device_id), Chunk(offer.sha256, i, bytes(b ^ 1 for b in data)).to_payload())
    host.subscribe(topics.chunk_request(offer.sha256), evil)
    client, router = device(clients, "dev-b")
    with pytest.raises(TransferError, match="SHA-256"):
        Download(client, router, "dev-b", offer, tmp_path / "got.part").run()
    assert not (tmp_path / "got.part").exists()


def test_nobody_serving_the_bundle_ends_in_a_timeout_not_a_hang(clients, tmp_path):
    offer = BundleOffer(sha256="cd" * 32, size=1000, chunk_size=512, name="m", version="1.0.0")
    client, router = device(clients, "dev-c")
    with pytest.raises(TransferTimeout, match="no chunk arrived"):
        Download(client, router, "dev-c", offer, tmp_path / "x.part", stall_timeout=1.5).run()
