"""One live process per MQTT identity: a device id, or a named monitor.

Two agents set up with one device id — a Raspberry Pi's SD card cloned, config and all, is the
usual way — would take each other's MQTT session over: the broker closes the older connection
when the newer one arrives, the older one reconnects a moment later and closes the newer one, and
so on, while commands, chunks and status go to whichever holds the session that second. Here:

- Before it connects under its identity, a process asks on the identity's presence topic from a
  throwaway connection (`holder_of`), which takes nothing over. A live holder answers; the asker
  then stays off the broker and says who holds the identity. The holder stays connected and notes
  the asker (`Presence.rivals`).
- While connected, the holder keeps a retained *claim* on that topic (who it is, since when). A
  claim that is not its own, seen when it reconnects, means another process connected under its
  identity while it was away (two that started within a second of each other, or one that asked
  while the other was cut off); one seen otherwise is asked about, and its process, if it answers,
  is connected beside this one (under another client id: agents keep theirs in their state
  directory). Then the one that started later steps back (`on_displaced`), the other keeps the
  identity: an odd pair of clocks may pick the other one, but both pick the same.

Messages on the topic are small JSON objects: ``{"claim": WHO}`` (retained; an empty retained
message clears it), ``{"ask": NONCE, "from": WHO}`` and ``{"here": WHO, "to": NONCE}``, where WHO
is ``{"instance", "host", "pid", "since"}``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections import deque
from datetime import datetime
from typing import Any, Callable

from device_agent.errors import MqttError
from device_agent.mqtt import BrokerAddress, MqttClient, throwaway_client_id
from device_agent.tls import TlsFiles
from device_agent.protocol.reports import MAX_RIVALS, MAX_TIME

log = logging.getLogger(__name__)

ANSWER_WAIT = 1.0  # how long an asker waits for a holder whose claim is on record to answer
MAX_PAYLOAD = 2048


def identity() -> dict[str, Any]:
    """This process, as it tells others: a random instance id, host name, pid, start time."""
    return {"instance": secrets.token_hex(8), "host": _hostname(), "pid": os.getpid(), "since": round(time.time(), 3)}


def _hostname() -> str:
    return socket.gethostname()[:255]


def describe(who: dict[str, Any]) -> str:
    since = datetime.fromtimestamp(who["since"]).isoformat(sep=" ", timespec="seconds")
    return f"host {who['host']}, pid {who['pid']}, up since {since}"


def _who(value: Any) -> dict[str, Any] | None:
    """A WHO from the network, or None if it is not one."""
    if not isinstance(value, dict):
        return None
    instance, host, pid, since = (value.get(k) for k in ("instance", "host", "pid", "since"))
    if not (isinstance(instance, str) and 0 < len(instance) <= 64 and isinstance(host, str) and len(host) <= 255
            and type(pid) is int and type(since) in (int, float) and 0 <= since < MAX_TIME):
        return None  # (NaN fails the range too)
    return {"instance": instance, "host": host, "pid": pid, "since": float(since)}


def _message(payload: bytes) -> dict[str, Any] | None:
    if not payload or len(payload) > MAX_PAYLOAD:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether *a* started after *b*; the instance ids break a tie, so two processes always agree."""
    return (a["since"], a["instance"]) > (b["since"], b["instance"])


class Presence:
    """Holds an identity on *client*: claims it on every connect, answers asks, and calls
    *on_displaced* (on the network thread) when another process that started earlier holds it too."""

    def __init__(self, client: MqttClient, topic: str, label: str, *,
                 on_displaced: Callable[[dict[str, Any]], None] | None = None,
                 on_rival: Callable[[], None] | None = None, me: dict[str, Any] | None = None) -> None:
        self.label = label  # what the identity is, for the log: "device id pi-01", "monitor 'default'"
        self.me = me or identity()
        self.rivals: list[dict[str, Any]] = []  # others that asked for or took this identity, newest last
        self._client = client
        self._topic = topic
        self._on_displaced = on_displaced
        self._on_rival = on_rival  # called (on the network thread) when `rivals` gains one, or one connects beside us
        self._claims = 0
        self._asked: deque[str] = deque(maxlen=8)  # nonces of our own questions to a claim's process
        self._lock = threading.Lock()
        client.subscribe(topic, self._on_message, qos=1)
        client.on_connected(self._claim)

    def release(self) -> None:
        """Clear the claim on a clean exit, so that the next process need not ask. Connected only."""
        if self._client.connected:
            try:
                self._client.publish(self._topic, b"", qos=1, retain=True, wait=5.0)
            except MqttError as exc:  # the next process asks, and waits a second for an answer
                log.warning("could not clear the presence claim: %s", exc)

    def _claim(self) -> None:
        self._claims += 1
        self._client.publish(self._topic, _encode({"claim": self.me}), qos=1, retain=True)

    def _note(self, who: dict[str, Any], how: str) -> bool:
        """Add or refresh *who* in `rivals`; whether it is new."""
        with self._lock:
            new = all(r["instance"] != who["instance"] for r in self.rivals)
            self.rivals = [r for r in self.rivals if r["instance"] != who["instance"]][-(MAX_RIVALS - 1):]
            self.rivals.append({**who, "how": how, "seen": round(time.time(), 3)})
        if new and self._on_rival is not None:
            self._on_rival()
        return new

    def _on_message(self, topic: str, payload: bytes) -> None:
        doc = _message(payload)
        if doc is None:
            return
        if isinstance(doc.get("ask"), str) and len(doc["ask"]) <= 64:
            asker = _who(doc.get("from"))
            if asker is not None and asker["instance"] == self.me["instance"]:
                return
            self._client.publish(self._topic, _encode({"here": self.me, "to": doc["ask"]}), qos=1)
            if asker is not None and self._note(asker, "asked"):
                log.warning("another process asked for %s (%s); it was told this one holds it", self.label,
                            describe(asker))
            return
        here = _who(doc.get("here"))
        if here is not None:
            if doc.get("to") in self._asked and here["instance"] != self.me["instance"]:
                self._asked.remove(doc["to"])
                self._conflict(here)  # it answered our question: it holds the identity now, as we do
            return
        claim = _who(doc.get("claim"))
        if claim is None or claim["instance"] == self.me["instance"]:
            return
        if self._claims >= 2:
            # A reconnect: it connected after our first connect, while we were away — it may have
            # taken our session (the same client id), so the two of us are never connected at once.
            self._conflict(claim)
        else:
            # The process before us (holder_of found it gone), or one connected beside us under
            # another client id: only a live one answers.
            nonce = secrets.token_hex(8)
            self._asked.append(nonce)
            self._client.publish(self._topic, _encode({"ask": nonce, "from": self.me}), qos=1)

    def _conflict(self, other: dict[str, Any]) -> None:
        """Another process holds the identity too: the one that started later steps back."""
        if _newer(other, self.me):
            if not self._note(other, "connected") and self._on_rival is not None:
                self._on_rival()  # (what it said on connecting, a status, was said over ours)
            log.warning("another process connected as %s (%s); it started later and steps back", self.label,
                        describe(other))
            self._claim()  # the claim on record is ours again
        elif self._on_displaced is not None:
            self._on_displaced(other)


class Seat:
    """An agent's place on the broker under its identity. `join` connects *client* once no other
    live process holds the identity; while one does, the agent stays off the broker (its local API
    serves on), says who holds it, and asks again every *retry* seconds. `step_back` (Presence's
    *on_displaced*) leaves and joins again. Connecting and disconnecting go one at a time, and
    there is no connecting once *stop* is set: an agent stopped as it started had its MQTT thread
    joined before it began, or connected after it had shut down."""

    def __init__(self, client: MqttClient, topic: str, label: str, *, me: dict[str, Any],
                 tls: Callable[[], TlsFiles | None], retry: float, stop: threading.Event) -> None:
        self.held_by: dict[str, Any] | None = None  # the other process holding the identity, while one does
        self._client, self._topic, self._label, self._me = client, topic, label, me
        self._tls, self._retry, self._stop = tls, retry, stop  # (tls: the files in use now, renewed ones too)
        self._lock = threading.Lock()

    def join(self) -> None:
        while not self._stop.is_set():
            try:
                holder = holder_of(self._client.broker, self._topic, me=self._me, tls=self._tls())
            except MqttError:
                holder = None  # the broker is away or turns us away: connecting says why, and retries
            if holder is None:
                self.held_by = None
                with self._lock:
                    if not self._stop.is_set():
                        self._client.connect_in_background()
                return
            if self.held_by is None or self.held_by["instance"] != holder["instance"]:
                log.error("%s is in use by another agent (%s); this agent stays off the broker and asks again every "
                          "%g s. Two devices must not share an id: give this one its own (device_id in the agent's "
                          "config)", self._label, describe(holder), self._retry)
            self.held_by = holder
            self._stop.wait(self._retry * random.uniform(0.8, 1.2))

    def step_back(self, holder: dict[str, Any]) -> None:
        """Another process with our identity, running since before us, connected while we were away."""
        self.held_by = holder

        def again() -> None:
            self.leave()
            self.join()

        threading.Thread(target=again, name="step-back", daemon=True).start()

    def leave(self) -> None:
        with self._lock:
            self._client.disconnect()


class StatusGuard:
    """Keeps the holder's retained status on top. Another process connected under the same identity
    leaves its last will (offline) on the status topic when its connection ends without a clean
    DISCONNECT — as a connection stepping back can: closed with messages for it unread, its socket
    is reset, and the broker's next write to it fails before the broker has read the DISCONNECT
    (Mosquitto 2.0 logs "disconnected due to out of memory"). Seen after the holder's own
    latest status, such an offline status is said over at once with *republish* — unless it is
    *own_will*, which names this process (a broker shutting down publishes every client's will,
    ours too, before our connection ends)."""

    def __init__(self, client: MqttClient, topic: str, republish: Callable[[], None],
                 leaving: Callable[[], bool], own_will: bytes) -> None:
        self._republish, self._leaving, self._own_will = republish, leaving, own_will
        self._said: bytes | None = None
        self._echoed = False  # whether our latest status has come back to us: what arrives after it is newer
        client.subscribe(topic, self._on_status, qos=1)

    def said(self, payload: bytes) -> None:
        """The holder publishes *payload* as its status now."""
        self._said, self._echoed = payload, False

    def _on_status(self, topic: str, payload: bytes) -> None:
        if payload == self._said:
            self._echoed = True
            return
        if payload == self._own_will:
            return
        doc = _message(payload)
        # Before the echo it is older than ours (the broker replays what was retained when we
        # subscribed); an online one is another connection's own, which Presence answers.
        if not self._echoed or self._leaving() or doc is None or doc.get("online") is not False:
            return
        log.info("another connection under this identity went away and its last will says offline; "
                 "saying online again")
        self._republish()


def holder_of(broker: BrokerAddress, topic: str, *, me: dict[str, Any], tls: TlsFiles | None = None,
              wait: float = ANSWER_WAIT) -> dict[str, Any] | None:
    """The live process holding the identity of *topic*, or None. Asks from a connection of its own
    under a throwaway client id, so asking takes nothing over. Without a claim on record it returns
    as soon as its own question comes back; with one, it waits up to *wait* for the holder — unless
    the claim is from a process of this host that has exited. Raises BrokerUnreachable."""
    probe = MqttClient(client_id=throwaway_client_id("edgefleet-ask"), broker=broker, tls=tls)
    nonce = secrets.token_hex(8)
    found: list[dict[str, Any]] = []
    claim: list[dict[str, Any]] = []
    echoed = threading.Event()
    answered = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        doc = _message(payload) or {}
        here = _who(doc.get("here"))
        if here is not None and doc.get("to") == nonce:
            found.append(here)
            answered.set()
        elif doc.get("ask") == nonce:
            echoed.set()
        elif (claimed := _who(doc.get("claim"))) is not None:
            claim.append(claimed)

    probe.connect(timeout=5)
    try:
        if not probe.subscribe(topic, on_message, qos=1, wait=5):
            log.warning("the broker does not let this client use %s, so whether another process holds this "
                        "identity is not known (a broker ACL from before presence: write it again with "
                        "`edgefleet broker config`)", topic)
            return None
        probe.publish(topic, _encode({"ask": nonce, "from": me}), qos=1)
        # The broker sends the retained claim right after the SUBACK, so before our question comes back.
        echoed.wait(5)
        if claim and not _exited_here(claim[-1]):
            answered.wait(wait)
        return found[0] if found else None
    finally:
        probe.disconnect()


def _exited_here(who: dict[str, Any]) -> bool:
    if who["host"] != _hostname():
        return False
    try:
        os.kill(who["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, and another user's
        return False
    return False
