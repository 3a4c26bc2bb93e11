"""The bundle server's answers waiting for the worker thread to publish them (see ``serve``): by the
topic each goes to, first come first served, and a topic kept waiting too long served first."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

from device_agent.protocol import topics

# A topic none of whose queued answers went out for this long gets its next one before the queue's
# turn: well within a download's stall timeout (30 s by default).
STARVE_S = 5.0
WORKER_BATCH = 16  # answers to one topic the worker publishes before it looks at the queue's order again


class AnswerQueue:
    """Answers waiting for the worker, by the topic they go to. First come, first served: one
    device's window, then the next, so that the first devices are done early and make room for
    others. But a topic none of whose answers went out for STARVE_S seconds gets its next one first:
    in a queue of hundreds of windows (a rollout's stage on a slow broker), the devices at its end
    keep receiving a chunk every few seconds, instead of taking their downloads for stalled after
    half a minute and asking for all of it again while the first answers are still on their way."""

    def __init__(self, limit: int) -> None:
        self._topics: OrderedDict[str, deque] = OrderedDict()  # topic -> its answers; first come first
        self._served: OrderedDict[str, float] = OrderedDict()  # topic -> last served (or queued); oldest first
        self._count = 0
        self._limit = limit
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return self._count

    def put(self, job: tuple) -> bool:
        """Queue *job*'s answers; False (none queued) if that would pass the limit."""
        sha, path, chunk_size, plan = job
        with self._cond:
            if self._count + len(plan) > self._limit:
                return False
            now = time.monotonic()
            for index, topic in plan:
                if topic not in self._topics:
                    self._topics[topic], self._served[topic] = deque(), now
                self._topics[topic].append((sha, path, chunk_size, index))
            self._count += len(plan)
            self._cond.notify()
        return True

    def get(self, timeout: float) -> tuple | None:
        """A job of up to WORKER_BATCH answers to one topic; () if none came within *timeout*, None once closed."""
        with self._cond:
            if not self._count and not self._closed:
                self._cond.wait(timeout)
            if self._closed:
                return None
            if not self._count:
                return ()
            now = time.monotonic()
            topic, served = next(iter(self._served.items()))
            take = 1  # a starved topic's next answer
            if now - served < STARVE_S:
                topic, take = next(iter(self._topics)), WORKER_BATCH
            answers = self._topics[topic]
            sha, path, chunk_size, _ = answers[0]
            plan = []
            while answers and len(plan) < take and answers[0][:3] == (sha, path, chunk_size):
                plan.append((answers.popleft()[3], topic))
            self._count -= len(plan)
            if answers:
                self._served[topic] = now
                self._served.move_to_end(topic)
            else:
                del self._topics[topic], self._served[topic]
            return sha, path, chunk_size, plan

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def direct_answers(job: tuple) -> set[tuple]:
    """(topic, sha, chunk size, index) of each answer of *job* to a device's own topic."""
    sha, _, chunk_size, plan = job
    shared = topics.bundle_chunks(sha, chunk_size)
    return {(topic, sha, chunk_size, index) for index, topic in plan if topic != shared}
