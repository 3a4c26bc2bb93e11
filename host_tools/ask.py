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
    reply = ask_each(client, [device], lambda _device, cid: make_command(cid), timeout, signer, "",
                     wait_if_offline=wait_if_offline)[device]
    if not reply.command_id:
        raise NoAnswer(reply.error or "", queued=reply.body["queued"])
    return reply


def ask_each(client: MqttClient, devices: Iterable[str], make_command, timeout: float, signer, kind: str, *,
             wait_if_offline: bool = True, on_answer: Callable[[str], None] | None = None) -> dict[str, Reply]:
    """Send every device its make_command(device, command_id) at once (signed by *signer*) and wait
    up to *timeout* for all their Replies together; {device: its Reply}, *on_answer(device)* as
    each arrives. A device that never connected to this broker is not waited for, nor, unless
    *wait_if_offline*, one the broker says is offline (not even asked, if it is when this starts).
    No answer is a Reply with ok False, no command id, the reason, and body {"queued": whether the
    broker keeps the command for the device until it expires}."""
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
    ended: dict[str, Reply] = {}  # not waited for (any more): why

    def end_if_gone(device: str, sent: bool) -> None:
        note = connectivity.note(device)
        if note == NEVER_SEEN:  # nobody will answer: the broker does not even keep the command
            ended[device] = Reply(device, "", kind, False, {"queued": False}, f"{device} has {NEVER_SEEN}")
        elif note is not None and not wait_if_offline:
            last = connectivity.last_status(device)
            ended[device] = Reply(device, "", kind, False, {"queued": sent}, f"{device}: {note}" + (
                f"; it last ran {last.active_bundle}" if last and last.active_bundle else ""))
    try:
        for device in devices:
            if not wait_if_offline:  # a question for now: not asked at all of a device that is not there (queued
                connectivity.wait_known(device)  # in its session, it would hold up its next commands when it returns)
                end_if_gone(device, sent=False)
                if device in ended:
                    continue
            payload = make_command(device, asked[device]).to_payload()
            client.publish(topics.command(device), signer(payload) if signer else payload, qos=1)
        deadline = time.monotonic() + timeout
        with arrived:
            while True:
                for device in devices:
                    if device not in got and device not in ended:
                        end_if_gone(device, sent=True)
                if time.monotonic() >= deadline or all(d in got or d in ended for d in devices):
                    break
                arrived.wait(0.1)
            answers = {**ended, **got}
    finally:
        connectivity.close()
        for device in devices:  # a client asking again later keeps no stale handlers
            client.unsubscribe(topics.reply(device))
    for device in devices:
        if device not in answers:
            note = connectivity.note(device)
            answers[device] = Reply(device, "", kind, False, {"queued": True}, f"{device} did not answer within "
                                    f"{timeout:g}s" + (f": {note}" if note else ""))
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
