"""Whether the devices a command goes to are connected, from what the broker holds for them.

Every agent publishes a retained status on each connect, and its last will (or its shutdown) says
``online: false``; a device id that has never connected to this broker has no status at all. A
host that sends a command and waits for its outcome watches those statuses, so that a device
that is not there is named as such — offline (since when, when it said so itself), or never seen
here (not installed yet, or a mistyped id) — while the command waits, not only as a bare time-out.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

from device_agent.errors import ProtocolError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.reports import DeviceStatus
from host_tools.fleet.view import ago

# After the broker has granted the last status subscription, how long retained statuses have to
# arrive before a device without one is said never to have connected. A status arriving later
# corrects it (on_change is called again).
SETTLE_S = 1.0
SHORT_NEVER_SEEN = "never connected to this broker"
NEVER_SEEN = ("never connected to this broker: not installed yet, or a wrong device id? (the broker keeps "
              "commands only for devices it has seen)")


class Connectivity:
    """Follows the retained status of *devices*; ``note(device)`` says why one may not answer."""

    def __init__(self, client: MqttClient, devices: Iterable[str],
                 on_change: Callable[[str], None] | None = None) -> None:
        self._client = client
        self.devices = list(dict.fromkeys(devices))
        self._on_change = on_change
        self._lock = threading.Condition()
        self._status: dict[str, DeviceStatus] = {}
        self._settled = False
        self._timer: threading.Timer | None = None

    def watch(self) -> None:
        """Subscribe to the devices' statuses; returns once the broker has granted them."""
        for i, device in enumerate(self.devices):
            last = i == len(self.devices) - 1
            self._client.subscribe(topics.status(device), self._on_status, qos=1, wait=5.0 if last else None)
        self._timer = threading.Timer(SETTLE_S, self._settle)
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for device in self.devices:
            self._client.unsubscribe(topics.status(device))

    def wait_known(self, device: str, timeout: float = SETTLE_S + 5) -> None:
        """Block until *device*'s status has arrived or it is settled that none will (after watch())."""
        with self._lock:
            self._lock.wait_for(lambda: device in self._status or self._settled, timeout)

    def last_status(self, device: str) -> DeviceStatus | None:
        with self._lock:
            return self._status.get(device)

    def note(self, device: str, *, short: bool = False) -> str | None:
        """Why *device* may not be answering, or None (online, or not known yet); *short* for a
        progress line."""
        with self._lock:
            status, settled = self._status.get(device), self._settled
        if status is None:
            return None if not settled else SHORT_NEVER_SEEN if short else NEVER_SEEN
        if status.online:
            return None
        if not status.timestamp:  # its last will: the broker lost the connection
            return "offline (connection dropped)" if short else "device offline (its connection dropped)"
        if short:
            return f"offline since {time.strftime('%H:%M:%S', time.localtime(status.timestamp))}"
        return (f"device offline since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status.timestamp))} "
                f"({ago(status.timestamp, time.time())}, when its agent stopped)")

    def _on_status(self, topic: str, payload: bytes) -> None:
        try:
            status = DeviceStatus.from_payload(payload)
        except ProtocolError:
            return
        if status.device_id not in self.devices or topic != topics.status(status.device_id):
            return
        with self._lock:
            self._status[status.device_id] = status
            self._lock.notify_all()
        if self._on_change is not None:
            self._on_change(status.device_id)

    def _settle(self) -> None:
        with self._lock:
            self._settled = True
            self._lock.notify_all()
            unseen = [d for d in self.devices if d not in self._status]
        if self._on_change is not None:
            for device in unseen:
                self._on_change(device)
