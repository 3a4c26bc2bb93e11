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
    questions = _Questions(client, devices, kind, wait_if_offline, on_answer)
    try:
        questions.send(make_command, signer)
        questions.wait(timeout)
    finally:
        questions.close()
    return questions.answers(timeout)


class _Questions:
    """One ask_each: a command id per device, the Replies that came back for them, and the devices
    no longer waited for (with the Reply that says why)."""

    def __init__(self, client: MqttClient, devices: list[str], kind: str, wait_if_offline: bool,
                 on_answer: Callable[[str], None] | None) -> None:
        self._client, self._devices, self._kind = client, devices, kind
        self._wait_if_offline, self._on_answer = wait_if_offline, on_answer
        self._asked = {device: uuid.uuid4().hex for device in devices}
        self._sent: dict[str, bytes] = {}  # each device's command as published (signed)
        self._got: dict[str, Reply] = {}
        self._ended: dict[str, Reply] = {}
        self._arrived = threading.Condition()
        for i, device in enumerate(devices):  # granted before any device can answer
            client.subscribe(topics.reply(device), self._on_reply, qos=1, wait=5.0 if i == len(devices) - 1 else None)
        self._connectivity = Connectivity(client, devices)
        self._connectivity.watch()
        client.on_connected(self._send_again)

    def _on_reply(self, topic: str, payload: bytes) -> None:
        try:
            reply = Reply.from_payload(payload)
        except ProtocolError:
            return
        device = topics.device_of(topic)
        with self._arrived:
            if device not in self._asked or reply.command_id != self._asked[device] or device in self._got:
                return
            self._got[device] = reply
            self._arrived.notify_all()
        if self._on_answer is not None:
            self._on_answer(device)

    def send(self, make_command, signer) -> None:
        for device in self._devices:
            if not self._wait_if_offline:  # a question for now: not asked at all of a device that is not there
                self._connectivity.wait_known(device)  # (queued in its session, it would hold up its next
                self._end_if_gone(device, sent=False)  # commands when it returns)
                if device in self._ended:
                    continue
            payload = make_command(device, self._asked[device]).to_payload()
            signed = signer(payload) if signer else payload
            with self._arrived:
                self._sent[device] = signed
            self._client.publish(topics.command(device), signed, qos=1)

    def _send_again(self) -> None:
        """Our connection came back: a reply sent while it was down is lost (our session is clean),
        so each device that has not answered gets its command again. A device runs none twice: it
        sends again the reply it kept (device_agent.command_log.ReplyLog), or answers when done."""
        with self._arrived:
            waiting = [(d, p) for d, p in self._sent.items() if d not in self._got and d not in self._ended]
        for device, payload in waiting:
            self._client.publish(topics.command(device), payload, qos=1)

    def wait(self, timeout: float) -> None:
        """Until every device answered or is not waited for any more, or *timeout* passed."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                waiting = [d for d in self._devices if d not in self._got and d not in self._ended]
                for device in waiting:
                    self._end_if_gone(device, sent=True)
                if time.monotonic() >= deadline or all(d in self._got or d in self._ended for d in waiting):
                    return
                self._arrived.wait(0.1)

    def _end_if_gone(self, device: str, sent: bool) -> None:
        """Stop waiting for *device* if nothing will answer: it never connected to this broker, or
        (unless waiting for devices that are offline) the broker says it is offline."""
        note = self._connectivity.note(device)
        if note == NEVER_SEEN:  # nobody will answer: the broker does not even keep the command
            self._ended[device] = Reply(device, "", self._kind, False, {"queued": False}, f"{device} has {NEVER_SEEN}")
        elif note is not None and not self._wait_if_offline:
            last = self._connectivity.last_status(device)
            self._ended[device] = Reply(device, "", self._kind, False, {"queued": sent}, f"{device}: {note}" + (
                f"; it last ran {last.active_bundle}" if last and last.active_bundle else ""))

    def close(self) -> None:
        self._client.remove_on_connected(self._send_again)
        self._connectivity.close()
        for device in self._devices:  # a client asking again later keeps no stale handlers
            self._client.unsubscribe(topics.reply(device))

    def answers(self, timeout: float) -> dict[str, Reply]:
        """{device: its Reply, or why there is none}, in the order asked."""
        with self._arrived:
            answers = {**self._ended, **self._got}
        for device in self._devices:
            if device not in answers:
                note = self._connectivity.note(device)
                answers[device] = Reply(device, "", self._kind, False, {"queued": True}, f"{device} did not answer "
                                        f"within {timeout:g}s" + (f": {note}" if note else ""))
        return {device: answers[device] for device in self._devices}


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
