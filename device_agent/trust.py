"""The keys a device trusts, and how that set changes: rotated in and revoked by signed commands.

The keys named in the config (``trusted_keys``) are where trust starts. A ``trust`` command,
signed by a key the device already trusts, adds keys (rotation: the new release key is
vouched for by the old one) and revokes key ids. Revocation is for good: a revoked key
verifies nothing again, even if it is still in the config or offered for adding, and a
change that would leave no trusted key is refused, so a device cannot be locked out.

The added keys and the revoked ids live in ``<state_dir>/trust.json``, written atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.bundle.signing import key_id, public_key_from_pem, public_key_pem
from device_agent.errors import PolicyError
from device_agent.store import write_atomically

log = logging.getLogger(__name__)
MAX_KEYS = 64


class TrustStore(Mapping[str, Ed25519PublicKey]):
    """{key_id: public key} of the keys this device trusts now; ``revoked`` holds the ids it never will."""

    def __init__(self, state_dir: Path, configured: Mapping[str, Ed25519PublicKey]) -> None:
        self._path = Path(state_dir) / "trust.json"
        self._configured = dict(configured)
        self._added: dict[str, Ed25519PublicKey] = {}
        self.revoked: frozenset[str] = frozenset()
        self.problem: str | None = None  # set when trust.json is damaged: then nothing verifies
        self._load()

    # -- Mapping: what verification looks keys up in ---------------------------------------
    def _active(self) -> dict[str, Ed25519PublicKey]:
        if self.problem:
            return {}
        keys = {**self._configured, **self._added}
        return {k: v for k, v in keys.items() if k not in self.revoked}

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._active()[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._active())

    def __len__(self) -> int:
        return len(self._active())

    # -- changes --------------------------------------------------------------------------
    def change(self, add: list[str], revoke: list[str]) -> dict[str, Any]:
        """Add the PEM public keys in *add* and revoke the ids in *revoke*, all or nothing.

        Raises PolicyError, and changes nothing, if a key is malformed, revoked, or the result
        would trust no key."""
        if self.problem:
            raise PolicyError(self.problem)
        new = {}
        for pem in add:
            key = _parse_public_key(pem)
            kid = key_id(key)
            if kid in self.revoked or kid in revoke:
                raise PolicyError(f"key {kid} has been revoked and cannot be trusted again")
            new[kid] = key
        for kid in revoke:
            if not isinstance(kid, str) or len(kid) != 16:
                raise PolicyError(f"{kid!r} is not a key id")
        revoked = self.revoked | set(revoke)
        added = {**self._added, **new}
        remaining = {k for k in {**self._configured, **added} if k not in revoked}
        if not remaining:
            raise PolicyError("the change would leave this device with no trusted key; refused")
        if len(added) > MAX_KEYS:
            raise PolicyError(f"at most {MAX_KEYS} added keys")
        self._save(added, revoked)
        self._added, self.revoked = added, frozenset(revoked)
        log.info("trusted keys now %s (revoked %s)", ", ".join(sorted(self)), ", ".join(sorted(self.revoked)) or "none")
        return self.describe()

    def describe(self) -> dict[str, Any]:
        return {"trusted": [{"key_id": k, "source": "config" if k in self._configured else "added"}
                            for k in sorted(self)],
                "revoked": sorted(self.revoked), "problem": self.problem}

    # -- persistence ----------------------------------------------------------------------
    def _save(self, added: Mapping[str, Ed25519PublicKey], revoked: set[str] | frozenset[str]) -> None:
        doc = {"added": {k: public_key_pem(v) for k, v in sorted(added.items())}, "revoked": sorted(revoked)}
        write_atomically(self._path, json.dumps(doc, indent=1).encode())

    def _load(self) -> None:
        # Damaged (it is written atomically, so only the disk or a person can do that): we cannot
        # know what was revoked, so trust nothing until it is repaired; the active model serves on.
        try:
            doc = json.loads(self._path.read_text())
            added = {kid: _parse_public_key(pem) for kid, pem in doc["added"].items()}
            revoked = frozenset(doc["revoked"])
            if not all(isinstance(k, str) for k in revoked):
                raise ValueError("revoked ids must be strings")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError, PolicyError) as exc:
            self.problem = (f"{self._path} is damaged ({exc}); this device trusts no key until it is "
                            f"restored or deliberately removed")
            log.error("%s", self.problem)
            return
        self._added, self.revoked = added, revoked


def _parse_public_key(pem: Any) -> Ed25519PublicKey:
    if not isinstance(pem, str) or len(pem) > 4096:
        raise PolicyError("a key to add must be a PEM string")
    try:
        return public_key_from_pem(pem.encode())
    except ValueError as exc:
        raise PolicyError(str(exc)) from None
