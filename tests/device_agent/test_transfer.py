"""Chunk transfer over a real Mosquitto: device-driven, windowed, hash-checked."""

import errno
import gc
import logging
import os
import random
import struct
import threading
import time
import uuid
import zlib

import pytest

from device_agent.errors import MqttError, StorageError, TransferError, TransferTimeout
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.chunks import DEFAULT_CHUNK_SIZE, BundleOffer, Chunk, ChunkRequest
from device_agent.transfer import CHUNK_QOS, REPAIRS, ChunkRouter, Download
from host_tools import answer_queue, fanout, serve
from host_tools.serve import BundleServer
from tests.conftest import Mosquitto, fill_disk, wait_until


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
    # as the agent, which subscribes long before it downloads: granted before anything is asked, so a
    # test whose server answers a chunk only once does not lose that answer to a subscription in flight
    assert client.subscribe(topics.chunks(device_id), router, qos=CHUNK_QOS, wait=5.0)
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


def test_a_download_begun_offline_leaves_no_subscription_and_no_open_file_behind(clients, tmp_path):
    """With the link down, the broker never grants the bundle's shared chunk topic. The download
    times out; afterwards the client must not subscribe to that topic again when the link comes
    back (it would receive every chunk later fanned out for the bundle), and the partial file and
    its record are closed."""
    offer = BundleOffer(sha256="ef" * 32, size=1000, chunk_size=512, name="m", version="1.0.0")
    client, router = device(clients, "dev-off")
    client.drop()
    gc.collect()  # clients earlier tests let go close their sockets when collected: not while we count
    gc.disable()
    try:
        open_fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(TransferTimeout, match="not connected"):
            Download(client, router, "dev-off", offer, tmp_path / "x.part", stall_timeout=1).run()
        assert len(os.listdir("/proc/self/fd")) == open_fds
    finally:
        gc.enable()
    client.connect_in_background()
    assert wait_until(lambda: client.connected, 10, 0.05)
    time.sleep(0.3)  # the subscriptions a reconnect renews are granted
    host = clients("host")
    fanned = Chunk(offer.sha256, 0, b"x" * 512).to_payload()
    own = Chunk(offer.sha256, 1, b"y" * 100).to_payload()
    host.publish(topics.bundle_chunks(offer.sha256, offer.chunk_size), fanned, qos=1)
    host.publish(topics.chunks("dev-off"), own, qos=1)  # in order after it, to the same subscriber
    wait_until(lambda: router.received >= len(own), 5, 0.05)
    time.sleep(0.2)
    assert router.received == len(own)  # the device's own topic only


def test_a_publish_that_fails_on_the_servers_worker_does_not_stop_it_answering(clients, tmp_path):
    """A window of 32 chunks is answered on the server's worker thread. One publish there failing
    (paho refusing a message) must cost that answer only: the device asks again and is answered,
    rather than every later large request going unanswered by a worker that has ended."""
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(40 * 1024))
    host = clients("host")
    server = BundleServer(host, chunk_size=1024)
    server.start()
    offer = server.offer(blob, "m", "1.0.0")
    publish, failed = host.publish, []

    def publish_once_failing(topic, payload, **kw):
        if not failed and threading.current_thread().name == "bundle-server":
            failed.append(topic)
            raise MqttError(f"publish to {topic} failed: out of memory")
        return publish(topic, payload, **kw)
    host.publish = publish_once_failing
    client, router = device(clients, "dev-w")
    out = Download(client, router, "dev-w", offer, tmp_path / "w.part", window=32, fanout=False, retry_after=1,
                   stall_timeout=8).run()
    server.stop()
    assert failed and out.read_bytes() == blob.read_bytes()


def answering_server(host, offer, content, device_id, how, delay=0.0):
    """Answers chunk requests itself, each *delay* seconds after it came (or *delay(i)*): *how(i, n)* (n:
    how often chunk i was asked for) says what that copy is — "good", "damaged" (one bit flipped after its
    CRC-32 was computed) or "lost". Returns {chunk: times asked}."""
    asked: dict[int, int] = {}

    def answer(topic, payload):
        for i in ChunkRequest.from_payload(payload).chunks:
            asked[i] = asked.get(i, 0) + 1
            copy = how(i, asked[i])
            message = Chunk(offer.sha256, i, content[i * offer.chunk_size:(i + 1) * offer.chunk_size]).to_payload()
            if copy == "damaged":
                message = message[:-1] + bytes([message[-1] ^ 1])
            if copy != "lost":
                wait = delay(i) if callable(delay) else delay
                threading.Timer(wait, host.publish, (topics.chunks(device_id), message)).start()
    assert host.subscribe(topics.chunk_request(offer.sha256), answer, wait=5.0)
    return asked


def answered_by_hand(clients, tmp_path, device_id, how, size=50_000, delay=0.0, **download_args):
    """(content, a Download of it for *device_id*, {chunk: times asked}): a bundle of *size* random
    bytes (16 KiB chunks) whose chunk requests answering_server answers as *how* says."""
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(size))
    host = clients("host")
    offer = BundleServer(host, chunk_size=16 * 1024).offer(blob, "m", "1.0.0")
    asked = answering_server(host, offer, blob.read_bytes(), device_id, how, delay)
    download = Download(*device(clients, device_id), device_id, offer, tmp_path / "got.part", **download_args)
    return blob.read_bytes(), download, asked


@pytest.mark.parametrize("how, asks", [
    (lambda i, n: "damaged" if (i, n) == (1, 1) else "good", {0: 1, 1: 2, 2: 1, 3: 1}),  # only it twice
    (lambda i, n: "damaged" if n == 1 else "good", {0: 2, 1: 2, 2: 2, 3: 2}),
], ids=["one-chunk", "every-chunk"])
def test_chunks_damaged_on_the_way_are_found_by_their_crc_and_only_they_fetched_again(clients, tmp_path, how, asks,
                                                                                     caplog):
    caplog.set_level(logging.WARNING, logger="device_agent.transfer")  # whatever an earlier test set
    content, download, asked = answered_by_hand(clients, tmp_path, "dev-d", how)
    assert download.run().read_bytes() == content
    assert asked == asks
    damaged = sorted(i for i, n in asks.items() if n == 2)  # and the agent's log says which
    assert f"{len(damaged)} chunk(s) arrived damaged ({', '.join(map(str, damaged))})" in caplog.text


def test_a_chunk_that_always_arrives_damaged_fails_the_download_with_the_reason(clients, tmp_path):
    _, download, asked = answered_by_hand(clients, tmp_path, "dev-d3", lambda i, n: "damaged" if i == 2 else "good")
    with pytest.raises(TransferError, match=f"SHA-256 .chunks still arrived damaged after {REPAIRS} repairs"):
        download.run()
    dest = tmp_path / "got.part"
    assert asked[2] == REPAIRS + 1 and not dest.exists() and not dest.with_suffix(".chunks").exists()


def test_answers_that_come_late_are_not_asked_for_again_once_the_download_has_seen_how_late(clients, tmp_path):
    # Every answer takes 0.6 s, three times the download's retry time: at first it asks again (it
    # cannot tell late from lost), then its retry time follows what it measured (RFC 6298).
    content, download, asked = answered_by_hand(clients, tmp_path, "dev-late", lambda i, n: "good",
                                                size=12 * 16 * 1024, delay=0.6, window=2, retry_after=0.2)
    assert download.run().read_bytes() == content
    assert {i for i, n in asked.items() if n > 1} <= {0, 1, 2, 3} and download.asked_again <= 6, asked


def test_a_first_window_answered_late_is_not_asked_for_again_as_a_whole(clients, tmp_path):
    """The window covers the whole bundle and its answers take 1 s (a busy broker in a rollout's stage):
    until the first arrives the download cannot tell late from lost, and asks again for its last chunk
    only, each time its retry time passes. Asking for all eight again would have the whole bundle
    answered twice."""
    content, download, asked = answered_by_hand(clients, tmp_path, "dev-late-window", lambda i, n: "good",
                                                size=8 * 16 * 1024, delay=1.0, window=8, retry_after=0.3)
    requests = request_log(clients, download._offer)
    assert download.run().read_bytes() == content
    # (the watcher hears the last request a moment after the download may have finished)
    wait_until(lambda: len(requests) >= download.asked_again + 1, 5, 0.01)
    asks = [r.chunks for r in requests]
    # one chunk each time the retry time passes (0.3 s, then 0.6: twice, unless the answers come later still)
    assert asks[0] == tuple(range(8)) and len(asks) >= 2, asks
    assert asks[1] == (7,) and all(len(a) == 1 for a in asks[2:]), asks
    assert download.asked_again == len(asks) - 1


def test_the_rest_of_a_window_answered_late_after_its_first_chunk_is_not_asked_for_again(clients, tmp_path):
    """The first chunk comes at once, the others 1.2 s later (the host's answers waiting for a busy
    broker): none of them was asked for before a chunk that arrived, so none is taken for lost."""
    content, download, asked = answered_by_hand(clients, tmp_path, "dev-late-rest", lambda i, n: "good",
                                                size=8 * 16 * 1024, delay=lambda i: 0 if i == 0 else 1.2,
                                                window=8, retry_after=0.3)
    requests = request_log(clients, download._offer)
    assert download.run().read_bytes() == content
    asks = [r.chunks for r in requests]
    assert asks[1] == (7,) and all(len(a) == 1 for a in asks[2:]), asks


def request_log(clients, offer):
    """Every chunk request for *offer* (ChunkRequest), in the order the broker delivered them."""
    requests = []
    assert clients("watch").subscribe(topics.chunk_request(offer.sha256),
                                      lambda t, p: requests.append(ChunkRequest.from_payload(p)), wait=5)
    return requests


def test_a_lost_window_is_asked_for_again_once_one_chunk_shows_the_way_works(clients, tmp_path):
    """The server dropped the first request (it was down): the last chunk asked for again shows that
    answers come, and that the others, asked for before it, were lost: they follow."""
    content, download, asked = answered_by_hand(clients, tmp_path, "dev-lost-window",
                                                lambda i, n: "lost" if n == 1 else "good",
                                                size=8 * 16 * 1024, window=8, retry_after=0.3)
    requests = request_log(clients, download._offer)
    assert download.run().read_bytes() == content
    assert asked == dict.fromkeys(range(8), 2)
    wait_until(lambda: len(requests) >= 3, 5, 0.01)  # (the watcher may hear the last one after the end)
    assert [r.chunks for r in requests] == [tuple(range(8)), (7,), tuple(range(7))], requests


def test_a_window_in_flight_when_the_connection_dropped_is_asked_for_again_whole(clients, tmp_path):
    """Chunks are subscribed at QoS 0: what was on its way when the connection dropped is lost for
    certain, so after the reconnect the whole window is asked for again, without a first chunk alone."""
    content, download, asked = answered_by_hand(clients, tmp_path, "dev-cut-window",
                                                lambda i, n: "lost" if n == 1 else "good",
                                                size=8 * 16 * 1024, window=8, retry_after=2, fanout=False)
    requests = request_log(clients, download._offer)
    client = download._client

    def cut_when_asked():
        wait_until(lambda: requests, 5, 0.01)
        client.drop()  # (up to a second: it stops the network thread)
        client.connect_in_background()
    threading.Thread(target=cut_when_asked).start()
    assert download.run().read_bytes() == content
    wait_until(lambda: len(requests) >= 2, 5, 0.01)  # (the watcher may hear the last one after the end)
    assert [r.chunks for r in requests] == [tuple(range(8))] * 2 and asked == dict.fromkeys(range(8), 2), requests


def test_a_device_too_busy_to_read_its_answers_does_not_ask_for_them_again(clients, tmp_path):
    """The answers came, and wait in the socket behind the device's own network thread (a busy CPU):
    asking again would only queue more copies behind them."""
    content, download, asked = answered_by_hand(clients, tmp_path, "dev-busy", lambda i, n: "good",
                                                size=8 * 16 * 1024, window=8, retry_after=0.2, stall_timeout=6)
    router, handle = download._router, ChunkRouter.__call__
    first = threading.Event()

    def slow_start(self, topic, payload):  # the first chunk takes the network thread 1.5 s
        if not first.is_set():
            first.set()
            time.sleep(1.5)
        handle(self, topic, payload)
    router.__class__ = type("SlowRouter", (ChunkRouter,), {"__call__": slow_start})
    assert download.run().read_bytes() == content
    assert asked == dict.fromkeys(range(8), 1) and download.asked_again == 0


def test_a_chunk_that_never_comes_is_asked_for_again_less_and_less_often(clients, tmp_path):
    asks = []

    def lost(i, n):
        if i == 1:
            asks.append(time.monotonic())
        return "lost" if i == 1 else "good"
    _, download, asked = answered_by_hand(clients, tmp_path, "dev-lost", lost, window=2, retry_after=0.2,
                                          stall_timeout=6)
    with pytest.raises(TransferTimeout):
        download.run()
    gaps = [b - a for a, b in zip(asks, asks[1:])]
    # asked again (the last chunk of the window is checked every 0.5 s), each wait twice the one
    # before up to a third of the stall timeout: 2 s
    assert 3 <= len(asks) <= 7 and gaps[0] < 1.0 and max(gaps) >= 1.5, gaps


@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "chunk-3-damaged"])
def test_an_interrupted_download_resumes_without_fetching_chunks_again(clients, tmp_path, damaged):
    # four chunks arrive (chunk 3 perhaps damaged), then the link dies; nothing is answered twice
    content, download, _ = answered_by_hand(
        clients, tmp_path, "dev-e", lambda i, n: "lost" if i >= 4 or n > 1 else "damaged" if damaged and i == 3
        else "good", size=160_000, window=2, stall_timeout=1.5)  # 10 chunks
    offer, dest = download._offer, tmp_path / "got.part"
    with pytest.raises(TransferTimeout):
        download.run()
    record = dest.with_suffix(".chunks").read_bytes()  # a flag per chunk, then their CRC-32s
    assert dest.exists() and sum(record[:offer.chunk_count]) == 4 and len(record) == 5 * offer.chunk_count

    server = BundleServer(clients("host2"), chunk_size=16 * 1024)  # the link is back
    server.start()
    server.offer(tmp_path / "bundle.efb", "m", "1.0.0")
    again = Download(*device(clients, "dev-e"), "dev-e", offer, dest, window=2)
    assert again.run().read_bytes() == content
    server.stop()
    # the six it lacked (and the damaged one, found by the CRC-32 the record kept)
    assert again.resumed_chunks == 4 and server.chunks_sent == offer.chunk_count - 4 + damaged
    assert not dest.with_suffix(".chunks").exists()


def test_chunks_a_record_claims_that_never_reached_the_disk_are_fetched_again(clients, tmp_path):
    """The record is not fsync'd: after a power cut it can claim chunks the disk lost."""
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(160_000))  # 10 chunks of 16 KiB
    content = blob.read_bytes()
    server = BundleServer(clients("host"), chunk_size=16 * 1024)
    server.start()
    offer = server.offer(blob, "m", "1.0.0")
    dest = tmp_path / "got.part"
    kept = bytearray(content[:6 * offer.chunk_size]) + bytes(offer.size - 6 * offer.chunk_size)
    kept[2 * offer.chunk_size:3 * offer.chunk_size] = bytes(offer.chunk_size)  # chunk 2's data was lost
    dest.write_bytes(kept)
    chunks = [content[i * offer.chunk_size:(i + 1) * offer.chunk_size] for i in range(offer.chunk_count)]
    dest.with_suffix(".chunks").write_bytes(  # what was saved before the cut: chunks 0-5 and their CRCs
        bytes(1 if i < 6 else 0 for i in range(10)) + struct.pack(">10I", *(zlib.crc32(c) for c in chunks)))
    client, router = device(clients, "dev-g")
    download = Download(client, router, "dev-g", offer, dest)
    assert download.run().read_bytes() == content
    server.stop()
    assert download.resumed_chunks == 6 and server.chunks_sent == 5  # chunks 6-9, then chunk 2


def test_a_bundle_larger_than_the_free_disk_is_refused_before_anything_is_written(clients, tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    offer = BundleOffer(sha256="ef" * 32, size=free + 2**30, chunk_size=64 * 1024, name="m", version="1.0.0")
    client, router = device(clients, "dev-f")
    with pytest.raises(StorageError, match="not enough disk space"):
        Download(client, router, "dev-f", offer, tmp_path / "huge.part").run()
    assert list(tmp_path.iterdir()) == []


def _download_then_fill_the_disk(clients, tmp_path, disk, device_id):
    """Start a download into *disk* with no server answering yet, fill the disk once the download
    has made its partial file, then serve it: returns (the download's thread, its result list)."""
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(2 * 2**20))
    server = BundleServer(clients("host"), chunk_size=64 * 1024)
    offer = server.offer(blob, "m", "1.0.0")
    client, router = device(clients, device_id)
    download = Download(client, router, device_id, offer, disk / "got.part", retry_after=0.3, stall_timeout=20)
    result: list = []

    def run():
        try:
            result.append(download.run())
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            result.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    assert wait_until(lambda: (disk / "got.chunks").exists(), 10)  # its file is made, its first ask sent
    fill_disk(disk)
    server.start()
    thread.join(30)
    server.stop()
    return blob, result


def test_a_download_that_fits_when_it_starts_completes_though_the_disk_fills_up_meanwhile(
        clients, tmp_path, small_disk):
    disk = small_disk(3)
    blob, result = _download_then_fill_the_disk(clients, tmp_path, disk, "dev-fill")
    assert isinstance(result[0], os.PathLike) and result[0].read_bytes() == blob.read_bytes()


def test_a_chunk_that_cannot_be_written_ends_the_download_at_once_and_frees_its_room(
        clients, tmp_path, small_disk, monkeypatch):
    # A file system that cannot reserve room ahead (vfat, NFS): its writes are what find the disk full.
    def cannot_reserve(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    monkeypatch.setattr(os, "posix_fallocate", cannot_reserve)
    disk = small_disk(3)
    started = time.monotonic()
    _blob, result = _download_then_fill_the_disk(clients, tmp_path, disk, "dev-full")
    assert isinstance(result[0], StorageError), result
    assert str(result[0]) == "cannot write the download: No space left on device"
    assert time.monotonic() - started < 15  # not after the 20 s stall timeout
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # the partial file and its record are gone


def test_many_devices_fetching_one_bundle_share_one_copy_through_the_broker(clients, tmp_path):
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(640 * 1024))  # 40 chunks of 16 KiB
    server = BundleServer(clients("host"), chunk_size=16 * 1024)
    server.start()
    offer = server.offer(blob, "m", "1.0.0")
    devices = {f"fan-{i}": device(clients, f"fan-{i}") for i in range(6)}
    # one device of an older kind, which takes its chunks on its own topic only
    results, errors = {}, []
    start_together = threading.Barrier(len(devices))

    def fetch(device_id, fanout=True):
        client, router = devices[device_id]
        start_together.wait(10)
        try:
            results[device_id] = Download(client, router, device_id, offer, tmp_path / f"{device_id}.part",
                                          fanout=fanout).run().read_bytes()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(d, d != "fan-5")) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    server.stop()
    assert not errors and all(data == blob.read_bytes() for data in results.values()) and len(results) == 6
    # Every chunk went to the shared topic for all five fan-out devices: once, or twice when devices
    # that began listening after its first publish asked for it together (a first window, say).
    # Direct sends: the sixth device's 40, and what a lone late fan-out device asked for. Without
    # fan-out: 6 x 40 = 240.
    stats = server.stats
    assert offer.chunk_count <= stats.fanout_chunks <= 2 * offer.chunk_count, stats
    assert stats.chunks_sent - stats.fanout_chunks >= offer.chunk_count and stats.fanout_saved > 0
    assert stats.chunks_sent <= 4 * offer.chunk_count, stats  # at least a third less than a copy each
    assert stats.devices == set(devices)


def test_a_request_is_answered_in_the_chunk_size_the_device_asks_for(clients, tmp_path):
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(100_000))
    server = BundleServer(clients("host"))  # as `edgefleet serve`, with the default chunk size
    server.start()
    served = server.offer(blob, "m", "1.0.0")
    offer = BundleOffer(served.sha256, served.size, 8192, "m", "1.0.0")  # the deploy command said 8 KiB
    client, router = device(clients, "dev-size")
    out = Download(client, router, "dev-size", offer, tmp_path / "got.part").run()
    server.stop()
    assert served.chunk_size == DEFAULT_CHUNK_SIZE and served.chunk_count == 2
    assert out.read_bytes() == blob.read_bytes() and server.stats.chunks_sent >= offer.chunk_count == 13


def test_a_device_that_joins_after_a_chunk_went_out_still_gets_it_without_asking_twice(clients, tmp_path):
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(200_000))
    server = BundleServer(clients("host"), chunk_size=16 * 1024)
    server.start()
    offer = server.offer(blob, "m", "1.0.0")
    first = Download(*device(clients, "early"), "early", offer, tmp_path / "early.part").run()
    # Within a second of the first device's download: each chunk was just on the shared topic,
    # before this device listened. With no second asking (retry after 60 s), it must get them all.
    client, router = device(clients, "late")
    late = Download(client, router, "late", offer, tmp_path / "late.part", retry_after=60, stall_timeout=10).run()
    server.stop()
    assert first.read_bytes() == late.read_bytes() == blob.read_bytes()


@pytest.mark.parametrize("pause", [0.0, 0.5], ids=["within-the-quiet-time", "past-it"])
def test_a_device_fetching_alone_after_an_earlier_fan_out_is_answered_at_once(clients, tmp_path, monkeypatch,
                                                                              pause):
    monkeypatch.setattr(fanout, "FANOUT_QUIET", 0.3)
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(640 * 1024))  # 40 chunks of 16 KiB
    server = BundleServer(clients("host"), chunk_size=16 * 1024)
    server.start()
    offer = server.offer(blob, "m", "1.0.0")
    Download(*device(clients, "first"), "first", offer, tmp_path / "first.part").run()
    fanned_out = server.stats.fanout_chunks
    assert fanned_out >= offer.chunk_count  # every chunk is now "published to the shared topic lately"
    time.sleep(pause)
    # Another device on its own: no fan-out round to wait for, neither for its first window while
    # the quiet time after the fan-out lasts (it waited for its end) nor on each window after it
    # (it used to be answered only by the server's next round, ~0.1 s per window of 2 chunks).
    held = server.stats.fanout_saved
    late = Download(*device(clients, "alone"), "alone", offer, tmp_path / "alone.part", window=2).run()
    server.stop()
    assert late.read_bytes() == blob.read_bytes()
    assert server.stats.fanout_saved == held and server.stats.fanout_chunks == fanned_out, server.stats


def watched_server(clients, tmp_path, *device_ids):
    """A server of a bundle of 8 chunks of 16 KiB, and [(topic, chunk index)] of what it publishes on
    the bundle's shared topic and on these devices' own; ask(device, chunks) sends the device's
    fan-out request (its session: "<device>-session"); wait(n) waits until n messages were seen."""
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(8 * 16 * 1024))
    host = clients("host")
    server = BundleServer(host, chunk_size=16 * 1024)
    server.start()
    offer = server.offer(blob, "m", "1.0.0")
    seen = []
    watcher = clients("watch")
    for topic in (topics.bundle_chunks(offer.sha256, offer.chunk_size), *map(topics.chunks, device_ids)):
        assert watcher.subscribe(topic, lambda t, p: seen.append((t, Chunk.peek(p)[1])), wait=5)

    def ask(device_id, chunks, seen=None):
        host.publish(topics.chunk_request(offer.sha256), ChunkRequest(
            device_id, tuple(chunks), offer.chunk_size, True, device_id + "-session", seen).to_payload(), qos=1)

    def wait(count):
        deadline = time.monotonic() + 10
        while len(seen) < count and time.monotonic() < deadline:
            time.sleep(0.02)
    return server, topics.bundle_chunks(offer.sha256, offer.chunk_size), seen, ask, wait


def test_a_fan_out_again_never_sends_a_download_past_the_chunk_over_its_budget_twice(clients, tmp_path,
                                                                                      monkeypatch):
    """A stage's straggler (past chunk 2 already) while three new devices ask for chunks 0-2 together:
    chunks 0 and 1 go to the shared topic again (one message serves the three), chunk 2 would send
    the straggler more than its budget (2 of 8 chunks) a second time, so the three get it directly."""
    monkeypatch.setattr(fanout, "FANOUT_QUIET", 0.5)
    monkeypatch.setattr(fanout, "REFAN_BUDGET", 0.25)
    server, shared, seen, ask, wait = watched_server(clients, tmp_path, "n1", "n2", "n3")
    ask("straggler", range(7))  # the first publish of chunks 0-6 on the shared topic
    wait(7)
    for device_id in ("n1", "n2", "n3"):  # they began listening after it: collected until 0.5 s after
        ask(device_id, range(3))
    wait(7 + 2 + 3)
    time.sleep(0.3)  # nothing more arrives
    server.stop()
    assert sorted(i for t, i in seen if t == shared) == [0, 0, 1, 1, 2, 3, 4, 5, 6], seen
    assert sorted((t, i) for t, i in seen if t != shared) == [(topics.chunks(d), 2) for d in ("n1", "n2", "n3")]


def test_a_device_behind_a_fan_out_is_not_sent_its_chunks_again_until_it_asks_twice(clients, tmp_path,
                                                                                     monkeypatch):
    """A device listening on the shared topic that first asks for chunks long after they went out there
    (its window got to them before the broker's queue to it did) has them coming: sending them again on
    its own topic only queued more behind them (a hundred devices sharing two cores were sent up to a quarter of
    the bundle this way each). A chunk it asks for a second time was lost, and it goes to it directly."""
    monkeypatch.setattr(fanout, "FANOUT_QUIET", 0.3)
    server, shared, seen, ask, wait = watched_server(clients, tmp_path, "behind")
    ask("behind", [0])  # it listens from here on
    wait(1)
    ask("ahead", range(1, 6))  # chunks 1-5 go to the shared topic, reaching both
    wait(6)
    time.sleep(0.5)  # past the quiet time after that publish
    ask("behind", range(1, 6))
    time.sleep(0.3)
    assert len(seen) == 6, seen  # nothing more: the first ask for a chunk it was listening for
    ask("behind", [2, 4])  # asked again: lost on the way
    wait(8)
    time.sleep(0.3)
    server.stop()
    assert sorted(i for t, i in seen if t == shared) == [0, 1, 2, 3, 4, 5], seen
    assert sorted(i for t, i in seen if t == topics.chunks("behind")) == [2, 4], seen


@pytest.mark.parametrize("says_it_heard", [True, False], ids=["says-it-heard-the-publish", "says-nothing"])
def test_a_device_that_asks_just_after_a_fan_out_it_heard_is_not_sent_it_again(clients, tmp_path, monkeypatch,
                                                                                 says_it_heard):
    """Devices starting together: one's first ask reaches the server just after another's made the
    chunks go out on the shared topic, though it was listening already. Once it says (a request
    with no chunks) which publish there was the first to reach it, it is not sent them again; a
    device that says nothing is taken for one that began listening after them, and gets them on
    its own topic."""
    monkeypatch.setattr(fanout, "FANOUT_QUIET", 0.3)
    server, shared, seen, ask, wait = watched_server(clients, tmp_path, "b")
    numbers = []
    watcher = clients("numbers")
    assert watcher.subscribe(shared, lambda t, p: numbers.append(Chunk.peek(p)[2]["seq"]), wait=5)
    ask("a", range(4))  # chunks 0-3 go out on the shared topic, numbered
    wait(4)
    ask("b", range(4))  # its first ask: after that publish
    if says_it_heard:
        ask("b", [], seen=min(numbers))
    time.sleep(0.8)  # past the quiet time after the publish, when askers who were not listening are answered
    server.stop()
    assert sorted(i for t, i in seen if t == shared) == [0, 1, 2, 3], seen
    again = sorted(i for t, i in seen if t == topics.chunks("b"))
    assert again == ([] if says_it_heard else [0, 1, 2, 3]), seen


def test_a_late_joiner_asking_again_while_answers_queue_up_is_not_answered_twice(clients, tmp_path, monkeypatch):
    """A device that began listening after the chunks went out is answered on its own topic; when
    the broker is behind (answers queue up) and it asks again before that answer reached it, the
    answer on its way is all it gets (in a slow phase of the rollout benchmark, a fifth of 1,000
    devices received the bundle twice this way)."""
    monkeypatch.setattr(fanout, "FANOUT_QUIET", 0.3)
    server, shared, seen, ask, wait = watched_server(clients, tmp_path, "late")
    monkeypatch.setattr(server._fanout, "_backlogged", lambda: True)
    ask("early", range(4))  # the fan-out
    wait(4)
    ask("late", range(4))  # after it: answered on its own topic 0.3 s after the fan-out
    wait(8)
    ask("late", range(4))  # again, its retry: that answer is still queued as far as the server knows
    time.sleep(0.8)
    server.stop()
    assert sorted(i for t, i in seen if t == topics.chunks("late")) == [0, 1, 2, 3], seen


def test_an_ask_again_for_an_answer_still_in_the_servers_queue_is_not_answered_twice(clients, tmp_path, monkeypatch):
    """Past the broker's pace, answers wait in the server's queue longer than a device waits to ask
    again (or to start a new attempt, as another session): the answer queued reaches the device's
    own topic either way. Once it has gone out, an ask again is answered again (it may be lost)."""
    monkeypatch.setattr(serve, "INLINE_CHUNKS", 0)  # every answer through the worker's queue
    server, _, seen, _, wait = watched_server(clients, tmp_path, "dev-q")
    gate, publish = threading.Event(), server._publish
    monkeypatch.setattr(server, "_publish", lambda *job: gate.wait(10) and publish(*job))  # the broker is slow
    sha = next(iter(server._bundles))

    def ask(chunks, session):
        clients("asker").publish(topics.chunk_request(sha), ChunkRequest(
            "dev-q", tuple(chunks), 16 * 1024, False, session).to_payload(), qos=1)
    ask(range(4), None)
    assert wait_until(lambda: server.stats.requests == 1, 5, 0.02)
    ask(range(4), None)  # its retry
    ask([1, 2, 5], None)  # a new attempt's first window: only 5 is not on its way
    assert wait_until(lambda: server.stats.requests == 3, 5, 0.02)
    gate.set()
    wait(5)
    ask([2], None)  # gone out: asked again, answered again
    wait(6)
    time.sleep(0.5)
    server.stop()
    assert sorted(i for _, i in seen) == [0, 1, 2, 2, 3, 5], seen


def test_a_device_at_the_end_of_a_long_queue_gets_a_chunk_before_its_turn(clients, tmp_path, monkeypatch):
    """Answers go out first come, first served, except that a device none of whose answers went out
    for STARVE_S gets one first: at the end of a rollout stage's queue it would otherwise wait so long
    for any chunk that it took its download for stalled and asked for all of it again."""
    monkeypatch.setattr(serve, "INLINE_CHUNKS", 0)  # every answer through the worker's queue
    monkeypatch.setattr(answer_queue, "WORKER_BATCH", 2)
    monkeypatch.setattr(answer_queue, "STARVE_S", 0.25)
    server, _, seen, _, wait = watched_server(clients, tmp_path, "first", "last")
    publish = server._publish
    monkeypatch.setattr(server, "_publish", lambda *job: time.sleep(0.1 * len(job[3])) or publish(*job))  # slow
    sha = next(iter(server._bundles))
    asker = clients("asker")  # one connection: the broker passes its two requests on in the order sent
    for device, chunks in (("first", range(8)), ("last", range(2))):
        asker.publish(topics.chunk_request(sha), ChunkRequest(
            device, tuple(chunks), 16 * 1024, False).to_payload(), qos=1)
    wait(10)
    server.stop()
    order = [(t.split("/")[-2], i) for t, i in seen]  # (device, chunk)
    assert sorted(order) == [("first", i) for i in range(8)] + [("last", 0), ("last", 1)], order
    assert order[:2] == [("first", 0), ("first", 1)] and order.index(("last", 0)) < order.index(("first", 7)), order


def first_request_fanned_out(clients, tmp_path):
    """(offer, content, [request payloads]): a bundle of 6 chunks of 16 KiB, and a server that answers
    only the first request, on the bundle's shared topic, numbering its publishes from 7."""
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(6 * 16 * 1024))
    host = clients("host")
    offer = BundleServer(host, chunk_size=16 * 1024).offer(blob, "m", "1.0.0")
    content, payloads = blob.read_bytes(), []
    shared = topics.bundle_chunks(offer.sha256, offer.chunk_size)

    def fan_out(topic, payload):
        payloads.append(payload)
        for n, i in enumerate(ChunkRequest.from_payload(payload).chunks if len(payloads) == 1 else ()):
            data = content[i * offer.chunk_size:(i + 1) * offer.chunk_size]
            host.publish(shared, Chunk(offer.sha256, i, data).to_payload(seq=7 + n))
    assert host.subscribe(topics.chunk_request(offer.sha256), fan_out, wait=5.0)
    return offer, content, payloads


def test_a_download_says_once_which_fan_out_reached_it_first_even_with_nothing_left_to_ask(clients, tmp_path):
    """A window that covers the whole bundle asks no more after its first request, so the server
    would never learn that the fan-out reached the device: the first numbered publish it receives,
    it tells at once, in a request with no chunks."""
    offer, content, payloads = first_request_fanned_out(clients, tmp_path)
    client, router = device(clients, "whole")
    assert Download(client, router, "whole", offer, tmp_path / "got.part", window=8).run().read_bytes() == content
    time.sleep(0.3)
    first, *rest = map(ChunkRequest.from_payload, payloads)
    assert first.chunks == tuple(range(6)) and first.seen is None, payloads
    assert [(r.chunks, r.seen, r.session) for r in rest] == [((), 7, first.session)], payloads


def test_a_download_whose_fan_out_was_not_granted_in_time_never_sends_an_empty_request(clients, tmp_path,
                                                                                        monkeypatch):
    """A busy broker can grant the shared topic after the download gave up waiting: chunks then
    arrive there, but its requests say no fan-out, so they cannot say what it heard either."""
    offer, content, payloads = first_request_fanned_out(clients, tmp_path)
    shared = topics.bundle_chunks(offer.sha256, offer.chunk_size)
    client, router = device(clients, "slow-grant")
    subscribe = client.subscribe
    monkeypatch.setattr(client, "subscribe", lambda topic, *a, **kw: subscribe(topic, *a, **kw) and topic != shared)
    assert Download(client, router, "slow-grant", offer, tmp_path / "got.part", window=8).run().read_bytes() == content
    time.sleep(0.3)
    requests = [ChunkRequest.from_payload(p) for p in payloads]  # each one well formed
    assert [(r.chunks, r.fanout, r.seen) for r in requests] == [(tuple(range(6)), False, None)]


def test_a_download_asks_as_a_new_session_after_its_connection_drops(clients, tmp_path):
    """Chunks fanned out while a device was away never reached it, and the server answers the first
    ask of a session that was listening only when it comes again; after a reconnect the download
    asks as a new session, which the server answers as a device that began listening then. The
    publishes a session heard (`seen`) are its own: a new session starts with none."""
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(12 * 16 * 1024))
    server = BundleServer(clients("host"), chunk_size=16 * 1024)
    server.start()
    offer = server.offer(blob, "m", "1.0.0")
    sessions = request_log(clients, offer)
    client, router = device(clients, "away")
    dropped = threading.Event()

    def reconnect():
        client.drop()
        time.sleep(0.3)
        client.connect_in_background()

    def progress(done):
        if done >= 0.25 and not dropped.is_set():
            dropped.set()
            threading.Thread(target=reconnect).start()  # (not on the network thread it stops)
    out = Download(client, router, "away", offer, tmp_path / "away.part", window=2, retry_after=1,
                   on_progress=progress).run()
    server.stop()
    assert out.read_bytes() == blob.read_bytes() and dropped.is_set()
    wait_until(lambda: len({r.session for r in sessions}) >= 2, 5, 0.01)  # (the watcher may lag the server)
    assert len({r.session for r in sessions}) == 2 and sessions[0].session != sessions[-1].session, sessions
    first, second = ([r for r in sessions if r.session == s] for s in (sessions[0].session, sessions[-1].session))
    assert first[0].seen is None and {r.seen for r in first[1:]} == {1}, first  # the first publish there: 1
    assert second[0].seen is None, second  # what it heard before the cut says nothing of what it missed


def test_chunks_that_arrive_twice_and_out_of_order_make_the_same_file(clients, tmp_path):
    blob = tmp_path / "bundle.efb"
    blob.write_bytes(os.urandom(200_000))
    host = clients("host")
    offer = BundleServer(host, chunk_size=16 * 1024).offer(blob, "m", "1.0.0")
    content = blob.read_bytes()
    rng = random.Random(7)

    def shuffled_twice(topic, payload):  # a misbehaving path: every chunk twice, in any order
        wanted = list(ChunkRequest.from_payload(payload).chunks) * 2
        rng.shuffle(wanted)
        for i in wanted:
            data = content[i * offer.chunk_size:(i + 1) * offer.chunk_size]
            host.publish(topics.chunks("dev-f"), Chunk(offer.sha256, i, data).to_payload())
    host.subscribe(topics.chunk_request(offer.sha256), shuffled_twice)
    client, router = device(clients, "dev-f")
    download = Download(client, router, "dev-f", offer, tmp_path / "got.part", window=8, fanout=False)
    assert download.run().read_bytes() == content
    assert download.duplicates > 0


def test_a_download_survives_a_broker_restart_and_does_not_fetch_what_it_has_again(tmp_path):
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker")  # its own broker: this test restarts it
    broker.start()
    made = []

    def connect(name):
        c = MqttClient(client_id=f"{name}-{uuid.uuid4().hex[:8]}", broker=broker.address)
        made.append(c)
        return c
    try:
        blob = tmp_path / "bundle.efb"
        blob.write_bytes(os.urandom(96 * 16 * 1024))  # 96 chunks
        host = connect("host")
        host.connect()
        server = BundleServer(host, chunk_size=16 * 1024)
        server.start()
        offer = server.offer(blob, "m", "1.0.0")
        client, router = connect("device"), ChunkRouter()
        client.subscribe(topics.chunks("dev-g"), router, qos=CHUNK_QOS)
        client.connect()
        halfway = threading.Event()
        download = Download(client, router, "dev-g", offer, tmp_path / "got.part", window=2, retry_after=1.0,
                            on_progress=lambda done: halfway.set() if done >= 0.5 else None)
        result = {}
        fetching = threading.Thread(target=lambda: result.setdefault("path", download.run()))
        fetching.start()
        assert halfway.wait(30)
        broker.stop()   # the network is gone for a moment...
        time.sleep(1.5)
        broker.start()  # ...and back: both clients reconnect and resubscribe by themselves
        fetching.join(60)
        assert result["path"].read_bytes() == blob.read_bytes()
        # Chunks the device had verified before the outage were not fetched again.
        assert server.stats.chunks_sent < offer.chunk_count + 2 * 4
    finally:
        for c in made:
            c.disconnect()
        broker.stop()


def test_stopping_the_server_while_it_answers_waits_for_that_answer_and_reads_no_closed_file(clients, tmp_path,
                                                                                                monkeypatch, caplog):
    """A rollout stopped with Ctrl-C stops its server while the network thread may be answering a
    request: the bundle's file must not be closed under that answer ("cannot serve: Bad file
    descriptor", or another file's bytes once the number is reused)."""
    caplog.set_level(logging.ERROR, logger="host_tools.serve")  # (so that "not in" below can fail)
    server, _, seen, ask, _ = watched_server(clients, tmp_path, "dev-s")
    answering, go_on, publish = threading.Event(), threading.Event(), server._publish
    monkeypatch.setattr(server, "_publish", lambda *job: answering.set() or go_on.wait(5) and publish(*job))
    ask("dev-s", range(2))
    assert answering.wait(5)
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    time.sleep(0.3)
    assert stopping.is_alive()  # waits for the answer under way
    go_on.set()
    stopping.join(5)
    assert not stopping.is_alive() and "cannot serve" not in caplog.text, caplog.text
    assert seen == []  # stopped: nothing more read and sent
