"""Reading and writing bundle files.

A bundle is one tar archive whose first two members are ``manifest.json`` and
``manifest.sig``; every other member is a file listed in the manifest with its
size and SHA-256, stored as it is or, when that makes it smaller (a pruned or
quantized model usually does), zstd-compressed under the name ``<path>.zst``.
The manifest always describes the uncompressed file, so decompression never
writes more than the signed size, and the hash is checked on what comes out.
Nothing is trusted until the signature over the manifest checks out against a
trusted key, and nothing is written out until its hash does.
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
from device_agent.errors import BundleError, IntegrityError, StorageError
from device_agent.files import replaced_when_written, size_text

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
BUNDLE_SUFFIX = ".efb"
COMPRESSED_SUFFIX = ".zst"
# zstd level of compressed members: most of the gain of 19, at a speed a big model tolerates.
ZSTD_LEVEL = 10
# zstd window of compressed members: 1 MiB, which a device holds in memory while it decompresses one.
# Level 10 alone picks 4 MiB for a big model; model weights compress no worse with 1 MiB (the reference
# models, and 16 MiB of float, int8 and 80 %-sparse weights: docs/benchmarks.md), and a fleet of
# installs faulting in 4 MiB each spent 7 % of its CPU there (benchmarks/delivery.py (b)).
ZSTD_WINDOW_LOG = 20
# The largest window a device decompresses with: twice what any edgefleet has written (level 10's own
# 4 MiB before ZSTD_WINDOW_LOG). zstd would allow 128 MiB, allocated before a member's hash can be checked.
MAX_WINDOW = 8 << 20
# Compress a member only when that saves at least this fraction of it.
_MIN_SAVING = 0.01
_COPY_BLOCK = 1 << 16


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_COPY_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bundle(out: Path, manifest: Manifest, signature: signing.Signature,
                 sources: Mapping[str, Path], *, compress: bool = True) -> Path:
    """Write a bundle holding *manifest*, its *signature* and the files in *sources*; with
    *compress*, each file that zstd makes smaller is stored compressed."""
    if set(sources) != {f.path for f in manifest.files}:
        raise BundleError("the files given do not match the files the manifest lists")
    with replaced_when_written(out) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((MANIFEST_NAME, manifest.to_json()), (SIGNATURE_NAME, signature.to_json())):
            _add_bytes(tar, name, data)
        packed = tmp.with_name(tmp.name + ".member.zst")
        for entry in manifest.files:
            try:
                if compress:
                    _zstd_file(Path(sources[entry.path]), packed)
                if compress and worth_compressing(entry.size, packed.stat().st_size):
                    _add_file(tar, entry.path + COMPRESSED_SUFFIX, packed)
                else:
                    _add_file(tar, entry.path, Path(sources[entry.path]))
            finally:  # (however far the compression got)
                packed.unlink(missing_ok=True)
    return out


def worth_compressing(size: int, compressed: int) -> bool:
    """Whether a member is stored compressed: only when that saves at least _MIN_SAVING of it."""
    return compressed <= size * (1 - _MIN_SAVING)


def stored_size(path: Path) -> int:
    """Bytes *path* takes in a bundle written with compression (what a device downloads for it)."""
    size = Path(path).stat().st_size
    packer = _compressor().compressobj()
    with open(path, "rb") as src:
        compressed = sum(len(packer.compress(block)) for block in iter(lambda: src.read(1 << 20), b""))
    compressed += len(packer.flush())
    return compressed if worth_compressing(size, compressed) else size


def _zstd_file(source: Path, packed: Path) -> Path:
    with open(source, "rb") as src, open(packed, "wb") as dst:
        _compressor().copy_stream(src, dst)
    return packed


def _compressor():
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, window_log=ZSTD_WINDOW_LOG)
    return zstandard.ZstdCompressor(compression_params=params)


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
    with open(path, "rb") as fh:
        tar.addfile(info, fh)


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

    def verify(self, keys: Mapping[str, Ed25519PublicKey], extract_to: Path | None = None, *,
               sha256: str | None = None) -> VerifiedBundle:
        """Check the signature, then every file's size and hash; optionally extract them.

        Extraction writes into *extract_to* only files whose hash matched; on any
        failure the directory is removed, so a half-verified bundle never remains.
        *sha256*: the bundle file's own SHA-256 when the caller has just checked it (a download
        does), so the file is not read and hashed a second time for its identity.
        """
        key = signing.verify(self.manifest_bytes, signing.Signature.from_json(self.signature_bytes), keys)
        expected = {f.path: f for f in self.manifest.files}
        payload = self._members[2:]
        seen = [_stored_as(m.name, expected) for m in payload]
        if sorted(seen) != sorted(expected):
            extra, missing = set(seen) - set(expected), set(expected) - set(seen)
            raise IntegrityError(f"bundle files differ from the manifest (unexpected: {sorted(extra)}, "
                                 f"missing: {sorted(missing)})")
        if extract_to is not None:  # the sizes are signed: room for them all, or nothing is written
            free = shutil.disk_usage(extract_to.parent).free
            if free < self.manifest.unpacked_size:
                raise StorageError(f"not enough disk space to unpack the bundle: its files take "
                                   f"{size_text(self.manifest.unpacked_size)}, {size_text(free)} are free")
        try:
            for member, name in zip(payload, seen):
                self._check_member(member, expected[name], extract_to)
        except BaseException:
            if extract_to is not None:
                shutil.rmtree(extract_to, ignore_errors=True)
            raise
        return VerifiedBundle(self.manifest, key, sha256 or sha256_file(self.path))

    def _check_member(self, member: tarfile.TarInfo, entry, extract_to: Path | None) -> None:
        compressed = member.name != entry.path
        if not compressed and member.size != entry.size:
            raise IntegrityError(f"{member.name}: {member.size} bytes, manifest says {entry.size}")
        digest = hashlib.sha256()
        src = self._tar.extractfile(member)
        assert src is not None
        if compressed:
            src = _zstd_reader(src, entry.path)
        out = None
        written = 0
        # One buffer, read into again and again, rather than a new bytes object per block (with the 1 MiB
        # zstd window: 16 installs at once took 0.85x the CPU, docs/benchmarks.md).
        buffer = memoryview(bytearray(_COPY_BLOCK))
        try:
            if extract_to is not None:
                target = extract_to / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                out = open(target, "wb")
            # Never more than the signed size, however much a compressed member expands to.
            while n := src.readinto(buffer[:min(_COPY_BLOCK, entry.size - written + 1)]):
                block = buffer[:n]
                written += n
                if written > entry.size:
                    raise IntegrityError(f"{entry.path}: more data than the {entry.size} bytes the manifest declares")
                digest.update(block)
                if out is not None:
                    out.write(block)
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
        except IntegrityError:
            raise
        except OSError as exc:  # the device's disk: full, or failing (zstd and tarfile raise no OSError)
            raise StorageError(f"cannot unpack {entry.path}: {exc.strerror or exc}") from None
        except Exception as exc:  # zstandard.ZstdError: a corrupt frame
            raise IntegrityError(f"{member.name}: cannot decompress: {exc}") from None
        finally:
            if out is not None:
                try:
                    out.close()
                except OSError:  # what it could not write: the error above says so
                    pass
        if written != entry.size:
            raise IntegrityError(f"{entry.path}: {written} bytes, manifest says {entry.size}")
        if digest.hexdigest() != entry.sha256:
            raise IntegrityError(f"{entry.path}: SHA-256 does not match the manifest")


def _stored_as(member_name: str, expected: Mapping) -> str:
    """The manifest path a member holds: itself, or the file it is the zstd-compressed form of."""
    if member_name.endswith(COMPRESSED_SUFFIX) and member_name not in expected:
        return member_name[:-len(COMPRESSED_SUFFIX)]
    return member_name


def _zstd_reader(src, name: str):
    try:
        import zstandard
    except ImportError:
        raise BundleError(f"{name} is zstd-compressed in this bundle: pip install zstandard") from None
    return zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_reader(src)
