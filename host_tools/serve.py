"""Host side of bundle transfer: answer devices' chunk requests over MQTT.

A request names the bundle (in its topic), the chunk indices, the chunk size the device cut the
bundle into, and whether the device listens on the bundle's shared chunk topic (fan-out). A
fan-out answer is published once to that topic and the broker delivers it to every device
fetching the bundle. A device subscribes to the shared topic before the first request of a
download (its ``session``), so "listening at a publish" means: its session's first request reached
us before it. For a chunk a fan-out device asks for:

- not published to the shared topic in the last FANOUT_REPEAT seconds: published there now;
- the device began listening after the last publish (many devices starting a stage together):
  answered FANOUT_QUIET seconds after that publish, on the shared topic again if at least one in
  REFAN_SHARE of the devices listening asked (one message serves them all), else on each asker's
  own topic (a fan-out also reaches every device that already has the chunk: none is published
  that would send a download already past the chunk over REFAN_BUDGET of the bundle a second
  time); but a device that is the only one downloading the bundle is answered at once on its own
  topic, within those FANOUT_QUIET seconds or after;
- the device was listening at the last publish: not answered for FANOUT_QUIET seconds (it has the
  chunk, or the broker is still delivering it), then answered on the device's own topic (it was
  lost: one unlucky device does not make every device receive the chunk again).

Devices starting together cannot all ask first: one's first ask reaches us just after another's made
the chunk go out, though it was listening. Publishes to a shared topic are numbered (``seq``), and a
download's later requests say the lowest number it received there (``seen``): from that publish on,
every one reached it. A device that has said so for the chunk's last publish counts as listening,
and is left out when the askers of a chunk are answered FANOUT_QUIET after its publish.

Requests without fan-out are answered on the device's own topic. Answers are published with
back-pressure: past MAX_UNACKED unacknowledged messages they wait for the broker, in the order
their requests came, except that a device none of whose answers went out for STARVE_S seconds
gets its next one first (``answer_queue``). A device asking again for a chunk whose answer to its own
topic still waits in our queue is not answered twice (the one queued reaches any download of the
device, a new attempt's too), nor, while answers queue up, one answered there less than
DIRECT_QUIET seconds ago.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from device_agent.bundle import Manifest
from device_agent.errors import ProtocolError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.chunks import DEFAULT_CHUNK_SIZE, BundleOffer, Chunk, ChunkRequest
from host_tools.answer_queue import AnswerQueue, direct_answers

log = logging.getLogger(__name__)
# Seconds after which a chunk is published to a bundle's shared topic again on any request, as for
# the first. Within them, devices that began listening later are answered as below (together only
# when enough of them ask together): a rollout whose stages outlast a minute must not fan every chunk
# out again to every device still downloading, most of which have it.
FANOUT_REPEAT = 600.0
FANOUT_QUIET = 2.5    # seconds a device listening at the publish is assumed to have the chunk (its retry: 3 s)
MAX_QUEUED_ANSWERS = 200_000
INLINE_CHUNKS = 16  # answers this small are published on the network thread (see _on_request)
# Chunks on their way to the broker (published, not acknowledged) past which answers wait on the
# worker thread until the broker has caught up. Without a bound, hundreds of devices asking while
# the broker is busy grow the host's queue without limit (and run paho out of its 65,535 message ids).
MAX_UNACKED = 512
# While answers queue up (a quarter of MAX_UNACKED unacknowledged), a device asking again for a chunk
# answered on its own topic less than this long ago is not answered again: the first answer is on its way.
DIRECT_QUIET = 10.0
# A chunk asked for by devices that began listening after its last fan-out is fanned out again when
# at least 1 in REFAN_SHARE of the devices listening (asked for something in the last ACTIVE_S
# seconds) asked for it; else it goes to each of them on their own topics.
REFAN_SHARE = 3
ACTIVE_S = 10.0
# Share of the bundle a download already past a chunk may be sent again by such fan-outs at most.
REFAN_BUDGET = 0.25


@dataclass
class ServerStats:
    requests: int = 0
    chunks_sent: int = 0
    bytes_sent: int = 0
    fanout_chunks: int = 0        # published once to a shared topic
    fanout_saved: int = 0         # asked for, but just published to the shared topic: not sent again
    waited_s: float = 0.0         # time answers waited for the broker to acknowledge (MAX_UNACKED)
    dropped: int = 0              # answers not sent: MAX_QUEUED_ANSWERS were waiting already
    devices: set[str] = field(default_factory=set)


class BundleServer:
    """Serves the bundles it was given to any device that asks for their chunks.

    Small requests (a device refilling its window as chunks arrive) are answered on the MQTT
    network thread; larger ones on a worker thread, so that reading many chunks never holds up
    the network loop.
    """

    def __init__(self, client: MqttClient, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._client = client
        self._chunk_size = chunk_size
        self._bundles: dict[str, tuple[Path, BundleOffer]] = {}
        self._answers = AnswerQueue(MAX_QUEUED_ANSWERS)  # for the worker
        self._dropped_logged = 0.0
        self._worker = threading.Thread(target=self._serve, name="bundle-server", daemon=True)
        self._fanned_out: dict[tuple[str, int, int], float] = {}
        self._lock = threading.Lock()
        self._files: dict[str, int] = {}  # bundle sha -> open fd, read with pread from any thread
        self._digests: dict[tuple[str, int, int], int] = {}  # (sha, chunk size, index) -> chunk CRC-32
        self._listening: dict[tuple, float] = {}  # (sha, chunk size, device, session) -> its first request
        # chunks asked for by devices that began listening after their last fan-out: when to answer,
        # and who asked (one device: on its own topic; more: on the shared topic again)
        self._refan: dict[tuple[str, int, int], tuple[float, set[str]]] = {}
        # (sha, chunk size, device, session) -> (its last request, the highest chunk it asked for)
        self._active: dict[tuple, tuple[float, int]] = {}
        self._again: dict[tuple, int] = {}  # session -> chunks it had that fan-outs sent it again
        self._direct: dict[tuple, float] = {}  # (device, session, sha, chunk size, index) -> last direct answer
        self._queued: set[tuple] = set()  # (topic, sha, chunk size, index) of answers in self._answers
        self._asked: dict[tuple, bytearray] = {}  # (sha, chunk size, device, session) -> chunks it asked for
        # Each publish to a shared topic carries a number (seq), in the order the broker gets them; a
        # download says the lowest it received (ChunkRequest.seen): it was listening at every publish since.
        self._seq = 0
        self._seq_lock = threading.Lock()  # numbered and handed to paho in one step: numbers keep their order
        self._fanout_seq: dict[tuple[str, int, int], int] = {}  # chunk -> number of its last publish there
        self._seen: dict[tuple, int] = {}  # session -> the lowest number it received
        self._downloads_seen: set[tuple] = set()  # (sha, device, session): logged when it first asks
        self.stats = ServerStats()

    @property
    def chunks_sent(self) -> int:
        return self.stats.chunks_sent

    def offer(self, path: Path, name: str, version: str, target: dict | None = None, *,
              unpacked_size: int | None = None) -> BundleOffer:
        """Serve *path*; it is read once here, for its SHA-256 and every chunk's CRC-32 (which
        serving would otherwise compute while devices wait)."""
        path = Path(path)
        sha, crcs = digest_chunks(path, self._chunk_size)
        offer = BundleOffer(sha256=sha, size=path.stat().st_size, chunk_size=self._chunk_size, name=name,
                            version=version, target=target or None, unpacked_size=unpacked_size)
        with self._lock:
            self._digests.update(((sha, self._chunk_size, i), crc) for i, crc in enumerate(crcs))
        self._bundles[offer.sha256] = (path, offer)
        return offer

    def offer_bundle(self, path: Path, manifest: Manifest) -> BundleOffer:
        """Serve the bundle file *path*, whose manifest is *manifest*."""
        return self.offer(path, manifest.name, manifest.version, manifest.target, unpacked_size=manifest.unpacked_size)

    def withdraw(self, sha256: str) -> None:
        self._bundles.pop(sha256, None)
        with self._lock:
            fd = self._files.pop(sha256, None)
            self._digests = {k: v for k, v in self._digests.items() if k[0] != sha256}
        if fd is not None:
            os.close(fd)

    def start(self) -> None:
        self._client.subscribe(topics.ALL_CHUNK_REQUESTS, self._on_request, qos=1)
        self._worker.start()

    def stop(self) -> None:
        self._client.unsubscribe(topics.ALL_CHUNK_REQUESTS)
        self._answers.close()
        self._worker.join(timeout=5)
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()

    def _on_request(self, topic: str, payload: bytes) -> None:
        sha = topic.split("/")[-2]
        if sha not in self._bundles:
            return
        try:
            request = ChunkRequest.from_payload(payload)
        except ProtocolError as exc:
            log.warning("ignoring malformed chunk request: %s", exc)
            return
        if not topics.valid_device_id(request.device_id):
            return
        job = self._plan(sha, request)  # decided at once, on the network thread: it is cheap
        if job is None:
            return
        if len(job[3]) <= INLINE_CHUNKS and not self._answers and self._client.unacked < MAX_UNACKED:
            # A window's refill: published on the network thread, as a hand-off to the worker would
            # cost a thread switch (up to Python's 5 ms switch interval) per request.
            try:
                self._publish(*job)
            except OSError as exc:  # the file went away or cannot be read: the device will time out
                log.error("cannot serve %s: %s", sha[:12], exc)
            return
        with self._lock:
            self._queued.update(direct_answers(job))
        if not self._answers.put(job):  # full: the device asks again after its retry time
            with self._lock:
                self._queued.difference_update(direct_answers(job))
            self.stats.dropped += 1
            if time.monotonic() - self._dropped_logged > 10:
                self._dropped_logged = time.monotonic()
                log.warning("the broker is not keeping up: %d chunk answers dropped so far (devices ask again)",
                            self.stats.dropped)

    def _fd(self, sha: str, path: Path) -> int:
        with self._lock:
            fd = self._files.get(sha)
            if fd is None:
                fd = self._files[sha] = os.open(path, os.O_RDONLY)
            return fd

    def _serve(self) -> None:
        while True:
            job = self._answers.get(timeout=0.1)  # and publish the fan-outs that are due
            if job is None:
                return
            try:
                if job:
                    try:
                        self._publish(*job)
                    finally:  # on their way (or failed): a device asking for them again is answered again
                        with self._lock:
                            self._queued.difference_update(direct_answers(job))
                self._fan_out_again()
            except OSError as exc:  # the file went away or cannot be read: the device will time out
                log.error("cannot serve: %s", exc)
            except Exception:  # noqa: BLE001 - a failed answer is asked for again; a dead worker answers nothing
                log.exception("answering a chunk request failed")

    def _fan_out_again(self) -> None:
        """Publish the chunks that devices which began listening after their last fan-out asked for."""
        now = time.monotonic()
        jobs = []
        with self._lock:
            due = [key for key, (at, _) in self._refan.items() if at <= now]
            listening: dict[tuple[str, int], int] = {}
            for (sha, chunk_size, _, _), (at, _) in self._active.items() if due else ():
                if now - at < ACTIVE_S:
                    listening[(sha, chunk_size)] = listening.get((sha, chunk_size), 0) + 1
            backlogged = self._backlogged()
            for key in due:
                (sha, chunk_size, index), (_, sessions) = key, self._refan.pop(key)
                # Not those that have said since that the publish reached them: they asked before it did.
                askers = {session[2]: session for session in sessions if not self._heard(session, key)}
                if sha not in self._bundles or not askers:
                    continue
                # Everyone listening gets a fan-out, so it is worth it when enough of them need the
                # chunk: then one publish serves them all; else each asker gets it on its own topic.
                # And not when a download already past the chunk has received REFAN_BUDGET of the
                # bundle again this way (a stage's straggler while the next stage starts).
                if (len(askers) > 1 and len(askers) * REFAN_SHARE >= listening.get((sha, chunk_size), 0)
                        and self._within_budget(key, set(askers), now)):
                    self._fanned_out[key] = now
                    self.stats.fanout_chunks += 1
                    plan = [(index, topics.bundle_chunks(sha, chunk_size))]
                else:  # as in _plan: not again while the last answer to the download waits in the queue
                    plan = [(index, topics.chunks(device)) for device, session in sorted(askers.items())
                            if self._answer_directly(device, session[3], key, now, backlogged)]
                if plan:
                    jobs.append((sha, self._bundles[sha][0], chunk_size, plan))
        for job in jobs:
            self._publish(*job)

    def _plan(self, sha: str, request: ChunkRequest) -> tuple[str, Path, int, list[tuple[int, str]]] | None:
        """What to publish for *request*: (sha, path, chunk size, [(index, topic)]), or None."""
        entry = self._bundles.get(sha)
        if entry is None:
            return None
        path, offer = entry
        chunk_size = request.chunk_size or offer.chunk_size
        count = replace(offer, chunk_size=chunk_size).chunk_count
        stats = self.stats
        now = time.monotonic()
        plan = []
        with self._lock:
            stats.requests += 1
            stats.devices.add(request.device_id)
            download = (sha, request.device_id, request.session)
            if download not in self._downloads_seen:
                if len(self._downloads_seen) >= 100_000:
                    self._downloads_seen.clear()
                self._downloads_seen.add(download)
                log.info("%s is fetching %s %s (%d-byte chunks%s)", request.device_id, offer.name, offer.version,
                         chunk_size, ", with the fan-out" if request.fanout else "")
            since = None
            if request.fanout:
                session = (sha, chunk_size, request.device_id, request.session)
                since = self._listening.setdefault(session, now)
                if request.seen is not None:
                    self._seen[session] = min(request.seen, self._seen.get(session, request.seen))
                _, frontier = self._active.get(session, (now, -1))
                self._active[session] = (now, max(frontier, min(max(request.chunks, default=-1), count - 1)))
                others = functools.cache(lambda: self._others_downloading(session, count, now))  # once a request
            backlogged = self._backlogged()
            for index in request.chunks:
                if index >= count:
                    continue
                key = (sha, chunk_size, index)
                if since is not None:
                    answer = self._answer_listener(session, key, since, count, now, others)
                    if answer == "fan out":
                        plan.append((index, topics.bundle_chunks(sha, chunk_size)))
                    if answer != "direct":
                        continue
                if self._answer_directly(request.device_id, request.session, key, now, backlogged):
                    plan.append((index, topics.chunks(request.device_id)))
            self._forget_old(now)
        return (sha, path, chunk_size, plan) if plan else None

    def _answer_listener(self, session: tuple, key: tuple, since: float, count: int, now: float, others) -> str:
        """How to answer a device listening on the bundle's shared topic (since *since*) asking for the
        chunk *key*: "fan out" (publish it there), "covered" (a publish it gets is out or coming) or
        "direct" (on its own topic). Lock held; *others()*: whether other devices are downloading."""
        first = self._first_ask(session, key[2], count)
        published = self._fanned_out.get(key, -FANOUT_REPEAT)
        age = now - published
        if age >= FANOUT_REPEAT:
            self._fanned_out[key] = now  # everyone listening now gets it from this one publish
            self._refan.pop(key, None)
            self.stats.fanout_chunks += 1
            return "fan out"
        if since >= published and not self._heard(session, key):
            # It began listening after the chunk went out: as many devices starting a stage together
            # do, it waits for one more publish FANOUT_QUIET after the last, collecting who else asks,
            # which then serves them all (a lone straggler gets it on its own topic). Unless no other
            # device is downloading the bundle: then there is nobody to wait with, and it is answered at
            # once (else it would wait up to FANOUT_QUIET for its first window, or the server's next
            # round on every window).
            if key in self._refan or others():
                self._refan.setdefault(key, (published + FANOUT_QUIET, set()))[1].add(session)
                self.stats.fanout_saved += 1
                return "covered"
        elif age < FANOUT_QUIET or first:
            # It was listening when the chunk went out: it has it, or the broker is still delivering
            # it. However long ago that was, a first ask means the device's window reached the chunk
            # before the chunk reached the device (a device behind a queue of the fan-out's messages);
            # an answer of its own would only queue behind them again. A chunk that was lost it asks
            # for again, after its retry time.
            self.stats.fanout_saved += 1
            return "covered"
        return "direct"

    def _backlogged(self) -> bool:
        """Answers queue up: a quarter of MAX_UNACKED are on their way to the broker."""
        return self._client.unacked >= MAX_UNACKED // 4

    def _answer_directly(self, device: str, session_id: str | None, key: tuple[str, int, int], now: float,
                         backlogged: bool) -> bool:
        """Whether to send chunk *key* to *device*'s own topic now: not while an answer there waits in
        our queue, nor while answers queue up (*backlogged*) and its last one to this download
        (*session_id*) is less than DIRECT_QUIET old, as that one is likely still on its way and
        asking again adds nothing; notes the answer (lock held)."""
        direct = (device, session_id, *key)
        if (topics.chunks(device), *key) in self._queued or (
                backlogged and now - self._direct.get(direct, -DIRECT_QUIET) < DIRECT_QUIET):
            self.stats.fanout_saved += 1
            return False
        self._direct[direct] = now
        return True

    def _heard(self, session: tuple, key: tuple[str, int, int]) -> bool:
        """Whether the download *session* said it received a publish to the shared topic no later than
        chunk *key*'s last one there, so that one reached it too (lock held)."""
        seen = self._seen.get(session)
        return seen is not None and seen <= self._fanout_seq.get(key, -1)

    def _forget_old(self, now: float) -> None:
        """Keep the server's memory of chunks, downloads and answers bounded (lock held)."""
        if len(self._fanned_out) > 100_000:  # forget chunks published long ago
            self._fanned_out = {k: t for k, t in self._fanned_out.items() if now - t < FANOUT_REPEAT}
            self._fanout_seq = {k: n for k, n in self._fanout_seq.items() if k in self._fanned_out}
        if len(self._listening) > 100_000:  # downloads that began over an hour ago are long done
            self._listening = {k: t for k, t in self._listening.items() if now - t < 3600}
        if len(self._active) > 10_000:
            self._active = {k: v for k, v in self._active.items() if now - v[0] < ACTIVE_S}
            self._again = {k: n for k, n in self._again.items() if k in self._active}
            self._seen = {k: n for k, n in self._seen.items() if k in self._active}
        if len(self._asked) > 2_000:  # a byte per chunk each: keep downloads that asked in the last minute
            self._asked = {k: v for k, v in self._asked.items()
                           if k in self._active and now - self._active[k][0] < 60}
        if len(self._direct) > 100_000:
            self._direct = {k: t for k, t in self._direct.items() if now - t < DIRECT_QUIET}

    def _first_ask(self, session: tuple, index: int, count: int) -> bool:
        """Whether this download has not asked for chunk *index* before; notes that it has now (lock held)."""
        asked = self._asked.get(session)
        if asked is None:  # (the session names the bundle and chunk size: *count* is always the same)
            asked = self._asked[session] = bytearray(count)
        first = not asked[index]
        asked[index] = 1
        return first

    def _within_budget(self, key: tuple[str, int, int], asked: set[str], now: float) -> bool:
        """Whether a fan-out of chunk *key* again keeps every listening download that has already
        asked for it (so has it, or has it coming) within REFAN_BUDGET of the bundle received twice;
        if so, counts it against them (lock held)."""
        sha, chunk_size, index = key
        budget = REFAN_BUDGET * replace(self._bundles[sha][1], chunk_size=chunk_size).chunk_count
        ahead = [session for session, frontier in self._downloads(sha, chunk_size, now)
                 if frontier >= index and session[2] not in asked]
        if any(self._again.get(session, 0) + 1 > budget for session in ahead):
            return False
        for session in ahead:
            self._again[session] = self._again.get(session, 0) + 1
        return True

    def _others_downloading(self, session: tuple, chunk_count: int, now: float) -> bool:
        """Whether another download of the bundle is under way: it asked for something in the last
        ACTIVE_S seconds, and not yet for the last chunk (lock held)."""
        return any(key != session and frontier < chunk_count - 1
                   for key, frontier in self._downloads(*session[:2], now))

    def _downloads(self, sha: str, chunk_size: int, now: float):
        """(session, highest chunk it asked for) of each download of the bundle that asked for
        something in the last ACTIVE_S seconds (lock held)."""
        return ((key, frontier) for key, (at, frontier) in self._active.items()
                if key[:2] == (sha, chunk_size) and now - at < ACTIVE_S)

    def _publish(self, sha: str, path: Path, chunk_size: int, plan: list[tuple[int, str]]) -> None:
        """Read, and publish each (index, topic) of *plan* (never under the lock); on the worker,
        wait while MAX_UNACKED messages are on their way to the broker."""
        stats = self.stats
        sent = 0
        fd = self._fd(sha, path)
        on_worker = threading.current_thread() is self._worker
        shared = topics.bundle_chunks(sha, chunk_size)
        for index, topic in plan:
            if on_worker and self._client.unacked >= MAX_UNACKED:  # (the network thread never waits)
                began = time.monotonic()
                while self._client.unacked >= MAX_UNACKED and self._client.connected:
                    time.sleep(0.002)
                stats.waited_s += time.monotonic() - began
            data = os.pread(fd, chunk_size, index * chunk_size)
            key = (sha, chunk_size, index)
            digest = self._digests.get(key)
            if digest is None:  # a chunk size other than the offer's: computed once, however many fetch it
                digest = self._digests[key] = zlib.crc32(data)
            if topic == shared:
                with self._seq_lock:
                    self._seq += 1
                    self._fanout_seq[key] = self._seq
                    self._client.publish(topic, Chunk(sha, index, data).to_payload(digest, self._seq), qos=1)
            else:
                self._client.publish(topic, Chunk(sha, index, data).to_payload(digest), qos=1)
            sent += len(data)
        with self._lock:
            stats.chunks_sent += len(plan)
            stats.bytes_sent += sent


def digest_chunks(path: Path, chunk_size: int) -> tuple[str, list[int]]:
    """The file's SHA-256 and the CRC-32 of each *chunk_size* piece, in one read."""
    whole, crcs = hashlib.sha256(), []
    with open(path, "rb", buffering=0) as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            whole.update(block)
            crcs.append(zlib.crc32(block))
    return whole.hexdigest(), crcs
