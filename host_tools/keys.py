"""Keys on the host: the key pairs in a directory. (The keys devices trust are rotated in and
revoked by signed ``trust`` commands: `edgefleet keys rotate|revoke`, ``device_agent.trust``.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from device_agent.bundle.signing import key_id, load_public_key
from device_agent.errors import ConfigError


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
