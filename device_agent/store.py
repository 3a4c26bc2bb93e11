"""The on-device bundle store: versions side by side and an atomically swapped ``current`` link.

Layout under the agent's state directory::

    bundles/<name>-<version>-<sha12>/manifest.json   the verified manifest
    bundles/<name>-<version>-<sha12>/files/...       the verified payload
    current -> bundles/<...>                          the active version (symlink)
    downloads/<sha256>.part                           bundles being fetched
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
from device_agent.errors import BundleError


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BundleStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.bundles = self.root / "bundles"
        self.downloads = self.root / "downloads"
        self.staging = self.root / "staging"
        self.current_link = self.root / "current"
        for d in (self.bundles, self.downloads, self.staging):
            d.mkdir(parents=True, exist_ok=True)

    def download_path(self, sha256: str) -> Path:
        return self.downloads / f"{sha256}.part"

    def active(self) -> InstalledBundle | None:
        if not self.current_link.is_symlink():
            return None
        return self._load(self.current_link.resolve())

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

    def install(self, bundle_path: Path, keys: Mapping[str, Ed25519PublicKey]) -> InstalledBundle:
        """Verify *bundle_path* and unpack it beside the other versions (not yet active)."""
        work = self.staging / bundle_path.stem
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            with BundleReader(bundle_path) as reader:
                verified = reader.verify(keys, extract_to=work / "files")
                (work / "manifest.json").write_bytes(reader.manifest_bytes)
            (work / "bundle.json").write_text(json.dumps({"sha256": verified.sha256, "key_id": verified.key_id}))
            m = verified.manifest
            target = self.bundles / f"{m.name}-{m.version}-{verified.sha256[:12]}"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(work, target)
            _fsync_dir(self.bundles)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return InstalledBundle(target, m, verified.sha256)

    def activate(self, bundle: InstalledBundle) -> None:
        """Point ``current`` at *bundle* with one atomic rename."""
        tmp = self.root / "current.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(bundle.directory, self.root), tmp)
        os.replace(tmp, self.current_link)
        _fsync_dir(self.root)
