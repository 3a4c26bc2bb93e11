"""Room on the disk the agent keeps its bundles on: what the next update has to fit in.

The file system holding the state directory, as statvfs reports it: ``free_bytes`` is what the
agent's user may still write (root's reserved blocks are not counted, as ``df`` shows them), like
node_exporter's ``node_filesystem_avail_bytes``. Without a state directory (a collector run on
its own) there is nothing to read, and no reading.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from device_agent.files import size_text
from device_agent.telemetry import CollectorContext, register


def room(path: Path) -> dict[str, int]:
    """{"free_bytes", "total_bytes"} of the file system holding *path*."""
    st = os.statvfs(path)
    return {"free_bytes": st.f_bavail * st.f_frsize, "total_bytes": st.f_blocks * st.f_frsize}


def valid_room(doc: Any) -> dict[str, int] | None:
    """*doc* as a room() reading if it is one (it came from another process), else None."""
    if not isinstance(doc, dict):
        return None
    sizes = {k: doc.get(k) for k in ("free_bytes", "total_bytes")}
    return sizes if all(type(v) is int and v >= 0 for v in sizes.values()) else None


def room_text(doc: dict[str, int]) -> str:
    """A room() reading as a status line shows it."""
    return f"{size_text(doc['free_bytes'])} free of {size_text(doc['total_bytes'])} (where the bundles are kept)"


@register("disk")
class DiskCollector:
    def __init__(self, context: CollectorContext) -> None:
        self._path = context.state_dir

    def collect(self) -> dict[str, Any] | None:
        return None if self._path is None else room(self._path)
