"""Every MQTT topic edgefleet uses, built in one place.

Layout (protocol v1, documented in docs/protocol.md)::

    edgefleet/v1/devices/{device}/status      device -> host, retained, QoS 1 (last will: offline)
    edgefleet/v1/devices/{device}/cmd         host -> device, QoS 1
    edgefleet/v1/devices/{device}/events      device -> host, QoS 1 (deployment progress and outcome)
    edgefleet/v1/devices/{device}/telemetry   device -> host, QoS 1
    edgefleet/v1/devices/{device}/reply       device -> host, QoS 1 (answers to status and bench)
    edgefleet/v1/devices/{device}/chunks      host -> device, QoS 1 (bundle chunks it asked for)
    edgefleet/v1/devices/{device}/presence    the agent holding the id <-> one asking for it (presence.py)
    edgefleet/v1/hosts/{role}/{name}/presence the same for a named host process (`edgefleet monitor --name`)
    edgefleet/v1/transfer/{sha256}/request    device -> host, QoS 1 (which chunks it lacks)
    edgefleet/v1/transfer/{sha256}/chunks/{chunk_size}
                                              host -> every device fetching it, QoS 1 (fan-out)
"""

from __future__ import annotations

import re

ROOT = "edgefleet/v1"
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def valid_device_id(device_id: str) -> bool:
    """Device ids become topic levels, so no wildcards, slashes or empty ids."""
    return bool(_DEVICE_ID.fullmatch(device_id))  # (match with $ let a trailing newline through)


def _device(device_id: str, leaf: str) -> str:
    if not valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}")
    return f"{ROOT}/devices/{device_id}/{leaf}"


def status(device_id: str) -> str:
    return _device(device_id, "status")


def command(device_id: str) -> str:
    return _device(device_id, "cmd")


def events(device_id: str) -> str:
    return _device(device_id, "events")


def telemetry(device_id: str) -> str:
    return _device(device_id, "telemetry")


def reply(device_id: str) -> str:
    return _device(device_id, "reply")


def chunks(device_id: str) -> str:
    return _device(device_id, "chunks")


def presence(device_id: str) -> str:
    return _device(device_id, "presence")


def host_presence(role: str, name: str) -> str:
    if not (valid_device_id(role) and valid_device_id(name)):
        raise ValueError(f"invalid host process name {role}/{name}")
    return f"{ROOT}/hosts/{role}/{name}/presence"


def chunk_request(bundle_sha256: str) -> str:
    return f"{ROOT}/transfer/{bundle_sha256}/request"


ALL_CHUNK_REQUESTS = f"{ROOT}/transfer/+/request"


def bundle_chunks(bundle_sha256: str, chunk_size: int) -> str:
    """Chunks of one bundle for every device fetching it: one publish, the broker fans it out."""
    return f"{ROOT}/transfer/{bundle_sha256}/chunks/{chunk_size}"


def all_devices(leaf: str) -> str:
    return f"{ROOT}/devices/+/{leaf}"


def device_of(topic: str) -> str | None:
    """The device id in a per-device topic, or None for any other topic."""
    parts = topic.split("/")
    if len(parts) == 5 and "/".join(parts[:3]) == f"{ROOT}/devices" and valid_device_id(parts[3]):
        return parts[3]
    return None
