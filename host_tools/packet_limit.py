"""Before chunks are sent: does the broker pass a message as large as one?"""

from __future__ import annotations

import logging
import threading
import time

from device_agent.errors import MqttError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.chunks import Chunk


def check_broker_passes_chunks(client: MqttClient, chunk_size: int, timeout: float = 10.0) -> None:
    """Raise MqttError unless the broker passes a message as large as a chunk message of
    *chunk_size*: sent to ourselves on a chunk topic of no bundle, it must come back. A broker with
    a smaller packet limit closes the connection on it (and would again at every resend of a chunk,
    so devices would stall with no word why) or drops it. At QoS 0, so that paho does not resend it
    either. Where we may not subscribe to that topic, nothing is checked."""
    topic = topics.bundle_chunks("0" * 64, chunk_size)
    payload = Chunk("0" * 64, 999_999, bytes(chunk_size)).to_payload(2**32 - 1, 10**12)  # the largest header
    back = threading.Event()
    mqtt_log = logging.getLogger(MqttClient.__module__)
    mqtt_log.addFilter(_quiet)  # a connection lost here is this check's own error, in one line
    try:
        if not client.subscribe(topic, lambda _, data: len(data) == len(payload) and back.set(), qos=0,
                                wait=timeout):
            return
        connection = client.connections
        client.publish(topic, payload, qos=0)
        deadline = time.monotonic() + timeout
        while not back.wait(0.05):
            if client.connections != connection or not client.connected:
                raise MqttError(f"the broker at {client.broker} closed the connection on a {len(payload)}-byte "
                                f"message ({chunk_size}-byte chunks): is its packet limit smaller? "
                                "use a smaller --chunk-size")
            if time.monotonic() >= deadline:
                raise MqttError(f"the broker at {client.broker} did not pass on a {len(payload)}-byte message "
                                f"within {timeout:g}s ({chunk_size}-byte chunks): is its message size limit "
                                "smaller? use a smaller --chunk-size")
    finally:
        client.unsubscribe(topic)
        mqtt_log.removeFilter(_quiet)


def _quiet(record: logging.LogRecord) -> bool:
    return False
