"""Agent process memory (RSS and peak) and system memory available, via psutil."""

from __future__ import annotations

import resource
from typing import Any

import psutil

from device_agent.telemetry import CollectorContext, register


@register("memory")
class MemoryCollector:
    def __init__(self, context: CollectorContext) -> None:
        self._process = psutil.Process()

    def collect(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        return {
            "process_rss_bytes": self._process.memory_info().rss,
            # ru_maxrss is in KiB on Linux
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "system_available_bytes": vm.available,
            "system_total_bytes": vm.total,
        }
