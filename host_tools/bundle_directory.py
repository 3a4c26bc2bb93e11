"""What `edgefleet serve` serves: bundle files given by name, and every bundle in a directory."""

from __future__ import annotations

from pathlib import Path

from device_agent.bundle import BundleReader
from device_agent.errors import EdgefleetError
from host_tools.serve import BundleServer


class BundleDirectory:
    """What `edgefleet serve` serves: given bundle files, and every ``*.efb`` in a directory,
    looked at again on each scan() so that new bundles are served without a restart."""

    def __init__(self, server: BundleServer, files: list[Path], directory: Path | None = None) -> None:
        self._server, self._files, self._dir = server, [Path(f) for f in files], directory
        self._seen: dict[Path, tuple[float, int]] = {}
        self._by_path: dict[Path, str] = {}

    def scan(self) -> list[str]:
        """Offer new or changed bundles, withdraw vanished ones; returns one line per change."""
        paths = list(self._files) + (sorted(self._dir.glob("*.efb")) if self._dir and self._dir.is_dir() else [])
        lines = []
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue
            if self._seen.get(path) == (st.st_mtime, st.st_size):
                continue
            self._seen[path] = (st.st_mtime, st.st_size)
            try:
                with BundleReader(path) as reader:
                    manifest = reader.manifest
                offer = self._server.offer_bundle(path, manifest)
            except (EdgefleetError, OSError) as exc:
                lines.append(f"skipping {path}: {exc}")
                continue
            self._by_path[path] = offer.sha256
            lines.append(f"serving {manifest.label} ({offer.size / 2**20:.1f} MiB, sha256 {offer.sha256[:12]}) "
                         f"from {path}")
        for path in [p for p in self._by_path if p not in paths or not p.exists()]:
            self._server.withdraw(self._by_path.pop(path))
            self._seen.pop(path, None)
            lines.append(f"no longer serving {path}")
        return lines
