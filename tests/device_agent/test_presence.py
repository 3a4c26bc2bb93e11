"""One live process per MQTT identity (device_agent/presence.py), against the real test broker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from device_agent.mqtt import MqttClient
from device_agent.presence import Presence, holder_of, identity
from tests.conftest import wait_until


def _topic(name: str) -> str:
    return f"edgefleet/v1/devices/{name}-{time.time_ns()}/presence"


def _client(mosquitto, name: str) -> MqttClient:
    return MqttClient(client_id=f"test-{name}-{time.time_ns()}", broker=mosquitto)


def _publish_retained(mosquitto, topic: str, payload: bytes) -> None:
    writer = _client(mosquitto, "writer")
    writer.connect()
    try:
        writer.publish(topic, payload, qos=1, retain=True, wait=5)
    finally:
        writer.disconnect()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_answers_and_notes_who_asked(mosquitto):
    topic = _topic("held")
    holder = _client(mosquitto, "holder")
    presence = Presence(holder, topic, "device id held")
    holder.connect()
    try:
        asker = identity()
        found = holder_of(mosquitto, topic, me=asker, wait=10)  # (returns once answered)
        assert found == presence.me  # who holds it: instance, host, pid, start time
        assert wait_until(lambda: presence.rivals, 5)
        assert presence.rivals[0]["instance"] == asker["instance"] and presence.rivals[0]["how"] == "asked"
        assert holder.connected  # asking took nothing over
    finally:
        holder.disconnect()


def test_nobody_on_record_is_known_at_once(mosquitto):
    started = time.monotonic()
    assert holder_of(mosquitto, _topic("free"), me=identity(), wait=10) is None
    assert time.monotonic() - started < 5  # it did not wait for an answer nobody could give


def test_a_claim_left_by_an_exited_process_of_this_host_is_not_waited_for(mosquitto):
    """An agent killed with -9 leaves its claim; the agent started after it must not sit out a wait."""
    topic = _topic("crashed")
    gone = {**identity(), "pid": _dead_pid()}
    _publish_retained(mosquitto, topic, json.dumps({"claim": gone}).encode())
    started = time.monotonic()
    assert holder_of(mosquitto, topic, me=identity(), wait=10) is None
    assert time.monotonic() - started < 5


def test_a_claim_from_another_host_is_given_time_to_answer(mosquitto):
    topic = _topic("elsewhere")
    other = {**identity(), "host": "pi-kitchen-clone"}
    _publish_retained(mosquitto, topic, json.dumps({"claim": other}).encode())
    started = time.monotonic()
    assert holder_of(mosquitto, topic, me=identity(), wait=1.0) is None  # nobody answered: gone
    assert time.monotonic() - started >= 1.0


def test_a_clean_exit_clears_the_claim(mosquitto):
    topic = _topic("clean")
    holder = _client(mosquitto, "holder")
    presence = Presence(holder, topic, "device id clean")
    holder.connect()
    retained: list[bytes] = []
    watcher = _client(mosquitto, "watcher")
    watcher.subscribe(topic, lambda t, p: retained.append(p))
    watcher.connect()
    try:
        assert wait_until(lambda: any(b"claim" in p for p in retained), 5)
        presence.release()
        holder.disconnect()
        retained.clear()
        watcher.unsubscribe(topic)
        watcher.subscribe(topic, lambda t, p: retained.append(p), wait=5)
        time.sleep(0.3)
        assert not any(b"claim" in p for p in retained)  # none on record: the next process need not ask
    finally:
        watcher.disconnect()


def test_malformed_messages_on_the_topic_change_nothing(mosquitto):
    topic = _topic("noise")
    holder = _client(mosquitto, "holder")
    displaced = threading.Event()
    presence = Presence(holder, topic, "device id noise", on_displaced=lambda who: displaced.set())
    holder.connect()
    noise = _client(mosquitto, "noise")
    noise.connect()
    try:
        for payload in (b"", b"{", b"[]", b"null", b'{"ask": 5}', b'{"claim": {"instance": 1}}', b"x" * 5000,
                        json.dumps({"claim": {**identity(), "pid": "7"}}).encode(),
                        json.dumps({"here": identity(), "to": "nobody"}).encode(), b"[" * 100000,
                        json.dumps({"claim": {**identity(), "since": 1e300}}).encode(),
                        json.dumps({"ask": "x", "from": {**identity(), "since": float("nan")}}).encode(),
                        json.dumps({"claim": {**identity(), "since": True}}).encode()):
            noise.publish(topic, payload, qos=1, wait=5)
        asker = identity()
        assert holder_of(mosquitto, topic, me=asker, wait=10) == presence.me  # still answers
        assert not displaced.is_set() and holder.connected
        assert [r["instance"] for r in presence.rivals] == [asker["instance"]]  # no garbage noted
    finally:
        noise.disconnect()
        holder.disconnect()


def test_of_two_holders_the_one_that_started_later_steps_back(mosquitto):
    """Two processes that connected under one client id without asking (they started together):
    each takes the session from the other when it reconnects, and sees the other's claim. The one
    that started later is told to step back; the other keeps the identity."""
    topic = _topic("pair")
    client_id = f"test-pair-{time.time_ns()}"
    first, second = (MqttClient(client_id=client_id, broker=mosquitto, clean_session=False) for _ in range(2))
    stepped_back = {"first": threading.Event(), "second": threading.Event()}
    older = Presence(first, topic, "device id pair", on_displaced=lambda who: stepped_back["first"].set())
    newer = Presence(second, topic, "device id pair",
                     on_displaced=lambda who: (stepped_back["second"].set(), threading.Thread(
                         target=second.disconnect).start()))
    newer.me["since"] = older.me["since"] + 1  # started a second later
    first.connect()
    try:
        second.connect()  # takes the session over; the first reconnects and takes it back
        assert wait_until(stepped_back["second"].is_set, 20), "the later one did not step back"
        assert wait_until(lambda: first.connected, 20)
        time.sleep(1.5)
        assert first.connected and not stepped_back["first"].is_set()
        assert any(r["instance"] == newer.me["instance"] for r in older.rivals)
        assert holder_of(mosquitto, topic, me=identity(), wait=10) == older.me
    finally:
        second.disconnect()
        first.disconnect()



def test_two_holders_under_different_client_ids_find_each_other(mosquitto):
    """Connected side by side (no session taken over: agents keep their client ids in their state
    directories, so two set up apart get two), each sees the other's claim, asks, and is answered:
    the later one steps back."""
    topic = _topic("apart")
    first, second = (MqttClient(client_id=f"test-apart-{i}-{time.time_ns()}", broker=mosquitto) for i in range(2))
    stepped_back = {"first": threading.Event(), "second": threading.Event()}
    older = Presence(first, topic, "device id apart", on_displaced=lambda who: stepped_back["first"].set())
    newer = Presence(second, topic, "device id apart", on_displaced=lambda who: stepped_back["second"].set())
    newer.me["since"] = older.me["since"] + 1
    first.connect()
    second.connect()
    try:
        assert wait_until(stepped_back["second"].is_set, 10), "the later one did not step back"
        time.sleep(0.5)
        assert not stepped_back["first"].is_set()
        assert [r["instance"] for r in older.rivals] == [newer.me["instance"]]
    finally:
        second.disconnect()
        first.disconnect()
