"""Ask one device something over MQTT and wait for its reply: status, or a benchmark."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from device_agent.bundle import BundleReader
from device_agent.errors import ConfigError, EdgefleetError, ProtocolError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.chunks import DEFAULT_CHUNK_SIZE
from device_agent.protocol.commands import BenchCommand, Reply, StatusRequest
from host_tools.connectivity import NEVER_SEEN, Connectivity
from host_tools.serve import BundleServer


class NoAnswer(EdgefleetError):
    """The device did not answer in time, or never connected to the broker (nothing will answer)."""

    def __init__(self, message: str, *, queued: bool = True) -> None:
        super().__init__(message)
        self.queued = queued  # whether the broker holds the command for the device (it has a session there)


def ask(client: MqttClient, device: str, make_command, timeout: float, signer=None, *,
        wait_if_offline: bool = True) -> Reply:
    """Send make_command(command_id), signed by *signer* if given, to *device*; return its Reply
    (raises NoAnswer: at once if it never connected to the broker, or, unless *wait_if_offline*,
    if the broker says it is offline)."""
    if not topics.valid_device_id(device):
        raise ConfigError(f"invalid device id {device!r}")
    command_id = uuid.uuid4().hex
    got: list[Reply] = []
    arrived = threading.Event()

    def on_reply(topic: str, payload: bytes) -> None:
        try:
            reply = Reply.from_payload(payload)
        except ProtocolError:
            return
        if reply.command_id == command_id:
            got.append(reply)
            arrived.set()

    client.subscribe(topics.reply(device), on_reply, qos=1, wait=5.0)  # granted before the device can answer
    connectivity = Connectivity(client, [device])
    connectivity.watch()

    def not_there(sent: bool) -> None:
        note = connectivity.note(device)
        if note == NEVER_SEEN:  # nobody will answer: the broker does not even keep the command
            raise NoAnswer(f"{device} has {NEVER_SEEN}", queued=False)
        if note is not None and not wait_if_offline:
            last = connectivity.last_status(device)
            raise NoAnswer(f"{device}: {note}" + (f"; it last ran {last.active_bundle}"
                                                  if last and last.active_bundle else ""), queued=sent)
    try:
        if not wait_if_offline:  # a question for now: not asked at all of a device that is not there (queued in
            connectivity.wait_known(device)  # its session, it would hold up its next commands when it returns)
            not_there(sent=False)
        payload = make_command(command_id).to_payload()
        client.publish(topics.command(device), signer(payload) if signer else payload, qos=1)
        deadline = time.monotonic() + timeout
        while not arrived.wait(0.1):
            not_there(sent=True)
            if time.monotonic() >= deadline:
                note = connectivity.note(device)
                raise NoAnswer(f"{device} did not answer within {timeout:g}s" + (f": {note}" if note else ""))
        return got[0]
    finally:
        connectivity.close()
        client.unsubscribe(topics.reply(device))  # a client asking many devices in turn keeps no stale handlers


def ask_each(client: MqttClient, devices: Iterable[str], make_command, timeout: float, signer, kind: str, *,
             on_answer: Callable[[str], None] | None = None) -> dict[str, Reply]:
    """Send every device its make_command(device, command_id) at once (signed by *signer*) and wait
    up to *timeout* for all their Replies together; {device: its Reply}, *on_answer(device)* as
    each arrives. A device that never connected to this broker is not waited for. No answer is a
    Reply with ok False, no command id, the reason, and body {"queued": whether the broker keeps
    the command for the device until it expires}."""
    devices = list(dict.fromkeys(devices))
    for device in devices:
        if not topics.valid_device_id(device):
            raise ConfigError(f"invalid device id {device!r}")
    asked = {device: uuid.uuid4().hex for device in devices}
    got: dict[str, Reply] = {}
    arrived = threading.Condition()

    def on_reply(topic: str, payload: bytes) -> None:
        try:
            reply = Reply.from_payload(payload)
        except ProtocolError:
            return
        device = topics.device_of(topic)
        with arrived:
            if device not in asked or reply.command_id != asked[device] or device in got:
                return
            got[device] = reply
            arrived.notify_all()
        if on_answer is not None:
            on_answer(device)

    for i, device in enumerate(devices):  # granted before any device can answer
        client.subscribe(topics.reply(device), on_reply, qos=1, wait=5.0 if i == len(devices) - 1 else None)
    connectivity = Connectivity(client, devices)
    connectivity.watch()
    try:
        for device in devices:
            payload = make_command(device, asked[device]).to_payload()
            client.publish(topics.command(device), signer(payload) if signer else payload, qos=1)
        deadline = time.monotonic() + timeout
        with arrived:
            while time.monotonic() < deadline and any(
                    d not in got and connectivity.note(d) != NEVER_SEEN for d in devices):
                arrived.wait(0.1)
        answers = dict(got)
    finally:
        connectivity.close()
        for device in devices:  # a client asking again later keeps no stale handlers
            client.unsubscribe(topics.reply(device))
    for device in devices:
        if device not in answers:
            note = connectivity.note(device)
            why = f"{device} has {NEVER_SEEN}" if note == NEVER_SEEN else \
                f"{device} did not answer within {timeout:g}s" + (f": {note}" if note else "")
            answers[device] = Reply(device, "", kind, False, {"queued": note != NEVER_SEEN}, why)
    return {device: answers[device] for device in devices}


def device_status(client: MqttClient, device: str, timeout: float) -> Reply:
    """The device's own account; a device the broker says is offline is said to be at once (what it
    would answer when it is back, the caller would no longer be waiting for)."""
    return ask(client, device, lambda cid: StatusRequest(cid, time.time()), timeout, wait_if_offline=False)


def bench_bundle(client: MqttClient, device: str, bundle: Path, *, runs: int, warmup: int, timeout: float,
                 signer, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Reply:
    """Benchmark *bundle* on *device* (which fetches and verifies it first if it lacks it); one the
    broker says is offline is said to be at once (the bundle is served only while this waits)."""
    with BundleReader(bundle) as reader:
        manifest = reader.manifest
    server = BundleServer(client, chunk_size=chunk_size)
    server.start()
    try:
        offer = server.offer_bundle(bundle, manifest)
        return ask(client, device, lambda cid: BenchCommand(cid, time.time(), offer, runs, warmup), timeout,
                   signer, wait_if_offline=False)
    finally:
        server.stop()
