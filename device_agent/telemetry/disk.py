"""Room on the disk the agent keeps its bundles on: what the next update has to fit in.

The file system holding the state directory, as statvfs reports it: ``free_bytes`` is what the
agent's user may still write (root's reserved blocks are not counted, as ``df`` shows them), like
node_exporter's ``node_filesystem_avail_bytes``. Without a state directory (a collector run on
its own) there is nothing to read, and no reading.
"""

from __future__ import annotations

import os
from typing import Any

from device_agent.telemetry import CollectorContext, register


@register("disk")
class DiskCollector:
    def __init__(self, context: CollectorContext) -> None:
        self._path = context.state_dir

    def collect(self) -> dict[str, Any] | None:
        if self._path is None:
            return None
        st = os.statvfs(self._path)
        return {"free_bytes": st.f_bavail * st.f_frsize, "total_bytes": st.f_blocks * st.f_frsize}
