"""Agent process and whole-system CPU use over the last interval, via psutil."""

from __future__ import annotations

from typing import Any

import psutil

from device_agent.telemetry import CollectorContext, register


@register("cpu")
class CpuCollector:
    def __init__(self, context: CollectorContext) -> None:
        self._process = psutil.Process()
        # psutil measures from the previous call; prime both counters now.
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)

    def collect(self) -> dict[str, Any]:
        return {
            # percent of one core, so 150 means one and a half cores busy
            "process_percent": round(self._process.cpu_percent(None), 2),
            "system_percent": round(psutil.cpu_percent(None), 2),
            "cores": psutil.cpu_count(),
        }
