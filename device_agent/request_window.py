"""Which chunks a download asks for, and when: a window of requests in flight, and a retry timer
for those whose answer is overdue (``transfer.Download`` sends the requests and writes the chunks).

How long a download waits before asking again for a chunk adapts to how late answers come, as TCP's
retransmission timer does (RFC 6298): SRTT + 4 * RTTVAR over the times from a chunk's ask to its
arrival, at least *retry_after*; each time chunks are asked for again it doubles, until a chunk asked
for only once arrives (Karn's rule: an answer to a chunk asked for twice says nothing about either
ask). A fleet updating at once on a busy broker gets its answers late, not never: asking again every
3 s only adds copies to the queues that made them late. At most RETRY_CAP_SHARE of the stall
timeout, so a chunk that was lost is asked for again before the attempt is given up. And while bytes
the broker sent wait unread in our socket (a device whose CPU is busy), only after that cap: the
answers may be among them.

Which overdue chunks are asked for again: the server answers a device's asks in the order they
came, so one asked for before a chunk that has arrived was lost, and is asked for again. Those
asked for after the latest chunk that arrived may only be late (a broker answering a fleet, a
download's first window: with large chunks the whole bundle): asking for them all again would have
them all answered twice. Of those, only the last is asked for again, as TCP sends one segment again
when its timer fires. If they were late, the rest arrive before its answer; if they were lost (a
server that was down), its answer makes them the lost kind, asked for again once their retry time
has passed after it. All of them after the connection dropped: what was on its way on it is lost
for certain (QoS 0).
"""

from __future__ import annotations

from typing import Callable, Container

RETRY_CAP_SHARE = 1 / 3


class RequestWindow:
    """The asks of one download attempt over *chunk_count* chunks: at most *window* in flight.
    *unread()*: whether bytes from the broker wait unread in our socket; *connection_held()*:
    whether the last request went out on the connection we are still on."""

    def __init__(self, chunk_count: int, *, window: int, retry_after: float, stall_timeout: float,
                 unread: Callable[[], bool], connection_held: Callable[[], bool]) -> None:
        self._count = chunk_count
        self._window = window
        self._retry_after = retry_after
        self._rto_cap = max(retry_after, stall_timeout * RETRY_CAP_SHARE)
        self._unread = unread
        self._connection_held = connection_held
        self._requested: dict[int, float] = {}  # chunk asked for -> when it was last asked
        self._asks: dict[int, int] = {}  # chunk asked for -> how often, in this attempt
        self._first_ask: dict[int, int] = {}  # chunk asked for -> its place in the order of first asks
        self._answered_upto = -1  # the latest place of a chunk that arrived (one before it still missing: lost)
        self._srtt: float | None = None  # smoothed time from a chunk's ask to its arrival
        self._rttvar = 0.0
        self.rto = retry_after  # seconds after which a chunk is asked for again
        self._next_new = 0

    @property
    def free(self) -> int:
        """Slots of the window not taken by a request in flight."""
        return self._window - len(self._requested)

    def due(self, now: float, last_progress: float, received: Container[int]) -> tuple[list[int], int]:
        """(chunks to ask for now, how many of them are asked for again): timed-out ones again, then
        new ones up to the window. A request times out its retry time after it was sent or after the
        last chunk that arrived (*last_progress*), whichever is later: while chunks keep coming (a
        broker fanning a bundle out to hundreds of devices delivers them late, not never) asking
        again would only add to the queue."""
        wanted = [i for i, t in self._requested.items() if now - max(t, last_progress) >= self.rto]
        if wanted and self._unread():  # answers may be right here, behind our own reading: not yet
            wanted = [i for i, t in self._requested.items() if now - max(t, last_progress) >= self._rto_cap]
        if wanted and self._connection_held():  # which are late and which lost: see the module's docstring
            late = [i for i in wanted if self._first_ask[i] > self._answered_upto]
            if late:
                wanted = [i for i in wanted if self._first_ask[i] < self._answered_upto]  # lost
                wanted.append(max(late, key=self._first_ask.__getitem__))
        if wanted:  # back off (RFC 6298, 5.5)
            self.rto = min(2 * self.rto, self._rto_cap)
        again = len(wanted)
        room = self._window - len(self._requested)  # (in flight, or in *wanted* again)
        while room > 0 and self._next_new < self._count:
            if self._next_new not in received:
                wanted.append(self._next_new)
                room -= 1
            self._next_new += 1
        return wanted, again

    def asked(self, chunks: list[int], now: float) -> None:
        """A request for *chunks* went out."""
        for i in chunks:
            self._requested[i] = now
            self._asks[i] = self._asks.get(i, 0) + 1
            self._first_ask.setdefault(i, len(self._first_ask))

    def arrived(self, index: int, now: float) -> None:
        """Chunk *index* arrived (the first time)."""
        asked = self._requested.pop(index, None)
        if asked is not None:
            if self._asks[index] == 1:  # (which ask an answer came for is unknown)
                self._sample_rtt(now - asked)
            self._answered_upto = max(self._answered_upto, self._first_ask[index])

    def restart(self) -> None:
        """Ask afresh for what is not received (after damaged chunks were dropped); the retry time stays."""
        self._requested.clear()
        self._asks.clear()
        self._first_ask.clear()
        self._answered_upto = -1
        self._next_new = 0  # due() skips what is received

    def _sample_rtt(self, seconds: float) -> None:
        """Fold one ask-to-arrival time into the estimate and set the retry time from it (RFC 6298, 2)."""
        if self._srtt is None:
            self._srtt, self._rttvar = seconds, seconds / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - seconds)
            self._srtt = 0.875 * self._srtt + 0.125 * seconds
        self.rto = min(max(self._retry_after, self._srtt + 4 * self._rttvar), self._rto_cap)
