"""The on-device bundle store: versions side by side and an atomically swapped ``current`` link.

Layout under the agent's state directory::

    bundles/<name>-<version>-<sha12>/manifest.json   the verified manifest
    bundles/<name>-<version>-<sha12>/files/...       the verified payload
    current -> bundles/<...>                          the active version (symlink)
    committed.json                                    committed versions, oldest first
    releases.json                                     highest release committed per model name
    downloads/<sha256>.part                           bundles being fetched
    downloads/<sha256>.chunks                         which of their chunks are on disk (resume)
    staging/                                          extraction in progress
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.bundle import BundleReader, Manifest
from device_agent.errors import BundleError, StorageError
from device_agent.files import replaced_when_written, size_text


@dataclass(frozen=True)
class InstalledBundle:
    directory: Path
    manifest: Manifest
    sha256: str

    @property
    def files(self) -> Path:
        return self.directory / "files"

    @property
    def label(self) -> str:
        return self.manifest.label


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace *path* with *data* so that a crash leaves either the old or the new bytes, durably."""
    with replaced_when_written(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _disk_usage(directory: Path) -> int:
    """Bytes the files under *directory* take on disk."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


class BundleStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.bundles = self.root / "bundles"
        self.downloads = self.root / "downloads"
        self.staging = self.root / "staging"
        self.current_link = self.root / "current"
        self._committed_file = self.root / "committed.json"
        self._releases_file = self.root / "releases.json"
        for d in (self.bundles, self.downloads, self.staging):
            d.mkdir(parents=True, exist_ok=True)

    def download_path(self, sha256: str) -> Path:
        return self.downloads / f"{sha256}.part"

    def discard_download(self, sha256: str) -> None:
        """Remove a partial download and its received-chunk record."""
        path = self.download_path(sha256)
        path.unlink(missing_ok=True)
        path.with_suffix(".chunks").unlink(missing_ok=True)

    def make_room(self, sha256: str, download_size: int, unpacked_size: int, keep: int) -> None:
        """Check that the disk has room to fetch bundle *sha256* (*download_size* bytes, less what
        its partial file holds already) and unpack it (*unpacked_size*). If it has not, what no
        update needs goes first: partial downloads of other bundles, leftovers of an unpacking,
        versions neither active nor committed (one rolled back from, one fetched for a benchmark),
        and committed ones past the newest *keep* (keep_versions, lowered since they were
        committed). The rest stay: they are what a rollback goes back to. StorageError if it still
        does not fit, saying what they take."""
        try:
            held = self.download_path(sha256).stat().st_blocks * 512
        except OSError:
            held = 0
        need = max(0, download_size - held) + unpacked_size
        if shutil.disk_usage(self.root).free >= need:
            return
        for path in [*self.downloads.iterdir(), *self.staging.iterdir()]:
            if not path.name.startswith(f"{sha256}."):
                _remove(path)
        committed = self.committed()
        if len(committed) > keep:  # what commit() would have removed
            committed = committed[-keep:]
            write_atomically(self._committed_file, json.dumps(committed).encode())
        self._prune(set(committed))  # (never the active one)
        free = shutil.disk_usage(self.root).free
        if free >= need:
            return
        message = (f"not enough disk space: the bundle needs {size_text(download_size)} to download"
                   + (f" and {size_text(unpacked_size)} unpacked" if unpacked_size else "")
                   + f", {size_text(free)} are free")
        active = self.active()
        earlier = [self.bundles / name for name in committed if active is None or name != active.directory.name]
        if earlier:
            taken = size_text(sum(_disk_usage(d) for d in earlier))
            message += (f" ({len(earlier)} earlier version{'s take' if len(earlier) > 1 else ' takes'} {taken}, "
                        "kept for rollback; keep_versions sets how many)")
        raise StorageError(message)

    def active(self) -> InstalledBundle | None:
        if not self.current_link.is_symlink():
            return None
        return self._load(self.current_link.resolve())

    def by_name(self, directory_name: str | None) -> InstalledBundle | None:
        """The installed bundle in ``bundles/<directory_name>``, if it is there and intact."""
        if not directory_name or "/" in directory_name or directory_name.startswith("."):
            return None
        return self._load(self.bundles / directory_name)

    def installed(self, sha256: str) -> InstalledBundle | None:
        for directory in self.bundles.glob(f"*-{sha256[:12]}"):
            bundle = self._load(directory)
            if bundle is not None and bundle.sha256 == sha256:
                return bundle
        return None

    def _load(self, directory: Path) -> InstalledBundle | None:
        try:
            meta = json.loads((directory / "bundle.json").read_text())
            manifest = Manifest.from_json((directory / "manifest.json").read_bytes())
        except (OSError, ValueError, BundleError):
            return None
        return InstalledBundle(directory, manifest, meta["sha256"])

    def install(self, bundle_path: Path, keys: Mapping[str, Ed25519PublicKey], *,
                sha256: str | None = None) -> InstalledBundle:
        """Verify *bundle_path* and unpack it beside the other versions (not yet active);
        *sha256*: the file's hash, when a download has just checked it."""
        work = self.staging / bundle_path.stem
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.mkdir(parents=True)
            with BundleReader(bundle_path) as reader:
                verified = reader.verify(keys, extract_to=work / "files", sha256=sha256)
                (work / "manifest.json").write_bytes(reader.manifest_bytes)
            (work / "bundle.json").write_text(json.dumps({"sha256": verified.sha256, "key_id": verified.key_id}))
            m = verified.manifest
            target = self.bundles / f"{m.name}-{m.version}-{verified.sha256[:12]}"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(work, target)
            fsync_dir(self.bundles)
        except OSError as exc:  # (BundleReader says what is wrong with the bundle file itself)
            raise StorageError(f"cannot unpack the bundle: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return InstalledBundle(target, m, verified.sha256)

    def remove(self, bundle: InstalledBundle) -> None:
        """Delete an installed version that is neither active nor committed."""
        shutil.rmtree(bundle.directory, ignore_errors=True)
        fsync_dir(self.bundles)

    def activate(self, bundle: InstalledBundle) -> None:
        """Point ``current`` at *bundle* with one atomic rename."""
        tmp = self.root / "current.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(bundle.directory, self.root), tmp)
        os.replace(tmp, self.current_link)
        fsync_dir(self.root)

    def deactivate(self) -> None:
        """Remove ``current``: the device runs no model (a first install that had to be rolled back)."""
        self.current_link.unlink(missing_ok=True)
        fsync_dir(self.root)

    # -- committed versions -------------------------------------------------------------
    def committed(self) -> list[str]:
        """Directory names of committed versions, oldest first (missing or corrupt file: none)."""
        try:
            names = json.loads(self._committed_file.read_text())
        except (OSError, ValueError):
            return []
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def commit(self, bundle: InstalledBundle, keep: int) -> list[str]:
        """Record *bundle* as the newest committed version and remove all but the newest *keep*.

        Returns the directory names removed. Whatever ``current`` points at is never removed.
        """
        names = [n for n in self.committed() if n != bundle.directory.name] + [bundle.directory.name]
        kept = names[-max(1, keep):]
        write_atomically(self._committed_file, json.dumps(kept).encode())
        return self._prune(set(kept))

    def highest_release(self, name: str) -> dict | None:
        """{"release", "version"} of the highest bundle of model *name* ever committed here."""
        try:
            doc = json.loads(self._releases_file.read_text())
        except (OSError, ValueError):
            return None
        entry = doc.get(name) if isinstance(doc, dict) else None
        return entry if isinstance(entry, dict) and isinstance(entry.get("version"), str) else None

    def record_release(self, manifest: Manifest) -> None:
        """Remember *manifest* as the highest release of its name committed here."""
        try:
            doc = json.loads(self._releases_file.read_text())
            doc = doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            doc = {}
        doc[manifest.name] = {"release": manifest.release, "version": manifest.version}
        write_atomically(self._releases_file, json.dumps(doc, sort_keys=True).encode())

    def uncommit(self, directory_name: str) -> None:
        """Forget a committed version (after rolling back from it); its files go at the next prune."""
        names = [n for n in self.committed() if n != directory_name]
        write_atomically(self._committed_file, json.dumps(names).encode())

    def rollback_target(self) -> InstalledBundle | None:
        """The newest committed version other than the active one that is still intact on disk."""
        active = self.active()
        for name in reversed(self.committed()):
            if active is not None and name == active.directory.name:
                continue
            bundle = self.by_name(name)
            if bundle is not None:
                return bundle
        return None

    def _prune(self, keep: set[str]) -> list[str]:
        active = self.active()
        if active is not None:
            keep.add(active.directory.name)
        removed = []
        for directory in self.bundles.iterdir():
            if directory.name not in keep:
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory.name)
        if removed:
            fsync_dir(self.bundles)
        return sorted(removed)
