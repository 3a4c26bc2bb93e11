"""Where the bundle server sends each chunk a device asks for: once to the bundle's shared chunk
topic, which the broker delivers to every device fetching the bundle (fan-out), or to the asking
device's own topic (``serve`` reads and publishes; this decides).

A device subscribes to the shared topic before the first request of a download (its ``session``),
so "listening at a publish" means: its session's first request reached us before it. For a chunk
a fan-out device asks for:

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

Requests without fan-out are answered on the device's own topic. A device asking again for a
chunk whose answer to its own topic still waits in the server's queue is not answered twice (the
one queued reaches any download of the device, a new attempt's too), nor, while answers queue up,
one answered there less than DIRECT_QUIET seconds ago.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from device_agent.protocol import topics
from device_agent.protocol.chunks import BundleOffer, ChunkRequest

if TYPE_CHECKING:
    from host_tools.serve import ServerStats

# Seconds after which a chunk is published to a bundle's shared topic again on any request, as for
# the first. Within them, devices that began listening later are answered as below (together only
# when enough of them ask together): a rollout whose stages outlast a minute must not fan every chunk
# out again to every device still downloading, most of which have it.
FANOUT_REPEAT = 600.0
FANOUT_QUIET = 2.5    # seconds a device listening at the publish is assumed to have the chunk (its retry: 3 s)
# While answers queue up, a device asking again for a chunk answered on its own topic less than this
# long ago is not answered again: the first answer is on its way.
DIRECT_QUIET = 10.0
# A chunk asked for by devices that began listening after its last fan-out is fanned out again when
# at least 1 in REFAN_SHARE of the devices listening (asked for something in the last ACTIVE_S
# seconds) asked for it; else it goes to each of them on their own topics.
REFAN_SHARE = 3
ACTIVE_S = 10.0
# Share of the bundle a download already past a chunk may be sent again by such fan-outs at most.
REFAN_BUDGET = 0.25

Plan = list[tuple[int, str]]  # (chunk index, topic to publish it to)


class FanoutPolicy:
    """The server's memory of who listens on which shared topic, which chunks went out there and
    when, and what each download asked for; thread-safe (the network thread plans, the worker
    publishes what is due). *offered(sha)*: the bundle's offer, None once withdrawn;
    *backlogged()*: whether answers are queuing up on their way to the broker; *clock*: seconds."""

    def __init__(self, stats: ServerStats, offered: Callable[[str], BundleOffer | None],
                 backlogged: Callable[[], bool], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._stats = stats
        self._offered = offered
        self._backlogged = backlogged
        self._clock = clock
        self._lock = threading.Lock()
        self._fanned_out: dict[tuple[str, int, int], float] = {}
        self._listening: dict[tuple, float] = {}  # (sha, chunk size, device, session) -> its first request
        # chunks asked for by devices that began listening after their last fan-out: when to answer,
        # and who asked (one device: on its own topic; more: on the shared topic again)
        self._refan: dict[tuple[str, int, int], tuple[float, set[tuple]]] = {}
        # (sha, chunk size, device, session) -> (its last request, the highest chunk it asked for)
        self._active: dict[tuple, tuple[float, int]] = {}
        self._again: dict[tuple, int] = {}  # session -> chunks it had that fan-outs sent it again
        self._direct: dict[tuple, float] = {}  # (device, session, sha, chunk size, index) -> last direct answer
        self._queued: set[tuple] = set()  # (topic, sha, chunk size, index) of answers in the server's queue
        self._asked: dict[tuple, bytearray] = {}  # (sha, chunk size, device, session) -> chunks it asked for
        self._fanout_seq: dict[tuple[str, int, int], int] = {}  # chunk -> number of its last publish there
        self._seen: dict[tuple, int] = {}  # session -> the lowest number it received

    def plan(self, offer: BundleOffer, request: ChunkRequest) -> Plan:
        """Where to publish the chunks *request* asks for (none it does not need now)."""
        sha = offer.sha256
        chunk_size = request.chunk_size or offer.chunk_size
        count = replace(offer, chunk_size=chunk_size).chunk_count
        now = self._clock()
        plan = []
        with self._lock:
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
        return plan

    def due(self) -> list[tuple[str, int, Plan]]:
        """(sha, chunk size, plan) of the chunks that devices which began listening after their last
        fan-out asked for, now that FANOUT_QUIET has passed since it."""
        now = self._clock()
        jobs = []
        with self._lock:
            due = [key for key, (at, _) in self._refan.items() if at <= now]
            listening: dict[tuple[str, int], int] = {}
            for (sha, chunk_size, _, _), (at, _) in self._active.items() if due else ():
                if now - at < ACTIVE_S:
                    listening[(sha, chunk_size)] = listening.get((sha, chunk_size), 0) + 1
            backlogged = self._backlogged() if due else False
            for key in due:
                (sha, chunk_size, index), (_, sessions) = key, self._refan.pop(key)
                # Not those that have said since that the publish reached them: they asked before it did.
                askers = {session[2]: session for session in sessions if not self._heard(session, key)}
                offer = self._offered(sha)
                if offer is None or not askers:
                    continue
                # Everyone listening gets a fan-out, so it is worth it when enough of them need the
                # chunk: then one publish serves them all; else each asker gets it on its own topic.
                # And not when a download already past the chunk has received REFAN_BUDGET of the
                # bundle again this way (a stage's straggler while the next stage starts).
                if (len(askers) > 1 and len(askers) * REFAN_SHARE >= listening.get((sha, chunk_size), 0)
                        and self._within_budget(offer, key, set(askers), now)):
                    self._fanned_out[key] = now
                    self._stats.fanout_chunks += 1
                    plan = [(index, topics.bundle_chunks(sha, chunk_size))]
                else:  # as in plan(): not again while the last answer to the download waits in the queue
                    plan = [(index, topics.chunks(device)) for device, session in sorted(askers.items())
                            if self._answer_directly(device, session[3], key, now, backlogged)]
                if plan:
                    jobs.append((sha, chunk_size, plan))
        return jobs

    def queued(self, answers: set[tuple]) -> None:
        """The server queued these answers, (topic, sha, chunk size, index) each, for its worker."""
        with self._lock:
            self._queued.update(answers)

    def sent(self, answers: set[tuple]) -> None:
        """These queued answers are on their way (or failed, or were never queued): a device asking
        for them again is answered again."""
        with self._lock:
            self._queued.difference_update(answers)

    def published(self, key: tuple[str, int, int], seq: int) -> None:
        """Chunk *key* went to its shared topic as publish number *seq* there."""
        with self._lock:
            self._fanout_seq[key] = seq

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
            self._stats.fanout_chunks += 1
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
                self._stats.fanout_saved += 1
                return "covered"
        elif age < FANOUT_QUIET or first:
            # It was listening when the chunk went out: it has it, or the broker is still delivering
            # it. However long ago that was, a first ask means the device's window reached the chunk
            # before the chunk reached the device (a device behind a queue of the fan-out's messages);
            # an answer of its own would only queue behind them again. A chunk that was lost it asks
            # for again, after its retry time.
            self._stats.fanout_saved += 1
            return "covered"
        return "direct"

    def _answer_directly(self, device: str, session_id: str | None, key: tuple[str, int, int], now: float,
                         backlogged: bool) -> bool:
        """Whether to send chunk *key* to *device*'s own topic now: not while an answer there waits in
        the server's queue, nor while answers queue up (*backlogged*) and its last one to this download
        (*session_id*) is less than DIRECT_QUIET old, as that one is likely still on its way and
        asking again adds nothing; notes the answer (lock held)."""
        direct = (device, session_id, *key)
        if (topics.chunks(device), *key) in self._queued or (
                backlogged and now - self._direct.get(direct, -DIRECT_QUIET) < DIRECT_QUIET):
            self._stats.fanout_saved += 1
            return False
        self._direct[direct] = now
        return True

    def _heard(self, session: tuple, key: tuple[str, int, int]) -> bool:
        """Whether the download *session* said it received a publish to the shared topic no later than
        chunk *key*'s last one there, so that one reached it too (lock held)."""
        seen = self._seen.get(session)
        return seen is not None and seen <= self._fanout_seq.get(key, -1)

    def _forget_old(self, now: float) -> None:
        """Keep the memory of chunks, downloads and answers bounded (lock held)."""
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

    def _within_budget(self, offer: BundleOffer, key: tuple[str, int, int], asked: set[str], now: float) -> bool:
        """Whether a fan-out of chunk *key* again keeps every listening download that has already
        asked for it (so has it, or has it coming) within REFAN_BUDGET of the bundle received twice;
        if so, counts it against them (lock held)."""
        sha, chunk_size, index = key
        budget = REFAN_BUDGET * replace(offer, chunk_size=chunk_size).chunk_count
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
