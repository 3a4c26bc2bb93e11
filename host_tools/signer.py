"""Signing the commands the host sends (devices refuse unsigned ones)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle.signing import load_private_key
from device_agent.protocol.signed import DEFAULT_EXPIRY, sign_command


@dataclass(frozen=True)
class CommandSigner:
    private_key: Ed25519PrivateKey
    expires_in: float = DEFAULT_EXPIRY

    @classmethod
    def load(cls, path: Path, expires_in: float = DEFAULT_EXPIRY) -> "CommandSigner":
        return cls(load_private_key(path), expires_in)

    def __call__(self, payload: bytes) -> bytes:
        return sign_command(payload, self.private_key, expires_in=self.expires_in)
