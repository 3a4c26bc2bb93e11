"""Keys on the host (the key pairs in a directory) and the keys devices trust (rotated in and
revoked by signed ``trust`` commands; see ``device_agent.trust``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

from device_agent.bundle.signing import key_id, load_public_key
from device_agent.errors import ConfigError
from device_agent.mqtt import MqttClient
from device_agent.protocol.commands import Reply, TrustCommand
from host_tools.ask import NoAnswer, ask


def local_keys(directory: Path) -> list[dict[str, Any]]:
    """The public keys in *directory* (NAME.pub), with their ids and whether NAME.key is there."""
    out = []
    for pub in sorted(Path(directory).glob("*.pub")):
        try:
            kid = key_id(load_public_key(pub))
        except ConfigError:
            continue  # not an Ed25519 key: not ours to list
        out.append({"name": pub.stem, "key_id": kid, "path": str(pub),
                    "private": pub.with_suffix(".key").is_file()})
    return out


def change_trust(client: MqttClient, devices: Iterable[str], signer, *, add: Iterable[str] = (),
                 revoke: Iterable[str] = (), timeout: float) -> dict[str, Reply]:
    """Send one signed trust change to each device; {device: its Reply} (ok, or the reason it refused)."""
    add, revoke = tuple(add), tuple(revoke)
    replies = {}
    for device in devices:
        try:
            replies[device] = ask(client, device, lambda cid: TrustCommand(cid, time.time(), add, revoke),
                                  timeout, signer)
        except NoAnswer as exc:  # the command waits at the broker until it expires, if it has a session there
            replies[device] = Reply(device, "", "trust", False, {"queued": exc.queued}, str(exc))
    return replies
