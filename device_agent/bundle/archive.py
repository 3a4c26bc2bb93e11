"""Reading and writing bundle files.

A bundle is one uncompressed tar archive (the model files are already dense)
whose first two members are ``manifest.json`` and ``manifest.sig``; every
other member is a regular file listed in the manifest with its size and
SHA-256. Nothing is trusted until the signature over the manifest checks out
against a trusted key, and nothing is written out until its hash does.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.bundle import signing
from device_agent.bundle.manifest import Manifest
from device_agent.errors import BundleError, IntegrityError

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
BUNDLE_SUFFIX = ".efb"
_COPY_BLOCK = 1 << 16


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_COPY_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bundle(out: Path, manifest: Manifest, signature: signing.Signature,
                 sources: Mapping[str, Path]) -> Path:
    """Write a bundle holding *manifest*, its *signature* and the files in *sources*."""
    if set(sources) != {f.path for f in manifest.files}:
        raise BundleError("the files given do not match the files the manifest lists")
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((MANIFEST_NAME, manifest.to_json()), (SIGNATURE_NAME, signature.to_json())):
            _add_bytes(tar, name, data)
        for entry in manifest.files:
            info = tarfile.TarInfo(entry.path)
            info.size, info.mode, info.mtime = entry.size, 0o644, 0
            with open(sources[entry.path], "rb") as fh:
                tar.addfile(info, fh)
    os.replace(tmp, out)
    return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    key_id: str
    sha256: str


class BundleReader:
    """Opens a bundle file and checks it against trusted keys."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, "r:")
            self._members = self._tar.getmembers()
        except FileNotFoundError:
            raise BundleError(f"bundle {self.path} does not exist") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BundleError(f"{self.path} is not a readable bundle: {exc}") from None
        names = [m.name for m in self._members]
        if names[:2] != [MANIFEST_NAME, SIGNATURE_NAME]:
            raise BundleError(f"{self.path} is not a bundle: it does not start with "
                              f"{MANIFEST_NAME} and {SIGNATURE_NAME}")
        for member in self._members:
            if not member.isreg():
                raise IntegrityError(f"bundle member {member.name!r} is not a regular file")
        self.manifest_bytes = self._read(self._members[0])
        self.signature_bytes = self._read(self._members[1])
        # Parsed for inspection only; callers that act on it must call verify().
        self.manifest = Manifest.from_json(self.manifest_bytes)

    def __enter__(self) -> "BundleReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._tar.close()

    def _read(self, member: tarfile.TarInfo) -> bytes:
        fh = self._tar.extractfile(member)
        assert fh is not None  # regular files always have data
        return fh.read()

    def verify(self, keys: Mapping[str, Ed25519PublicKey], extract_to: Path | None = None) -> VerifiedBundle:
        """Check the signature, then every file's size and hash; optionally extract them.

        Extraction writes into *extract_to* only files whose hash matched; on any
        failure the directory is removed, so a half-verified bundle never remains.
        """
        key = signing.verify(self.manifest_bytes, signing.Signature.from_json(self.signature_bytes), keys)
        expected = {f.path: f for f in self.manifest.files}
        payload = self._members[2:]
        seen = [m.name for m in payload]
        if sorted(seen) != sorted(expected):
            extra, missing = set(seen) - set(expected), set(expected) - set(seen)
            raise IntegrityError(f"bundle files differ from the manifest (unexpected: {sorted(extra)}, "
                                 f"missing: {sorted(missing)})")
        try:
            for member in payload:
                self._check_member(member, expected[member.name], extract_to)
        except BaseException:
            if extract_to is not None:
                shutil.rmtree(extract_to, ignore_errors=True)
            raise
        return VerifiedBundle(self.manifest, key, sha256_file(self.path))

    def _check_member(self, member: tarfile.TarInfo, entry, extract_to: Path | None) -> None:
        if member.size != entry.size:
            raise IntegrityError(f"{member.name}: {member.size} bytes, manifest says {entry.size}")
        digest = hashlib.sha256()
        src = self._tar.extractfile(member)
        assert src is not None
        out = None
        if extract_to is not None:
            target = extract_to / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            out = open(target, "wb")
        try:
            for block in iter(lambda: src.read(_COPY_BLOCK), b""):
                digest.update(block)
                if out is not None:
                    out.write(block)
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
        finally:
            if out is not None:
                out.close()
        if digest.hexdigest() != entry.sha256:
            raise IntegrityError(f"{member.name}: SHA-256 does not match the manifest")
