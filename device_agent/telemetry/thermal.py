"""Temperatures, clocks and throttling, as the platform reports them.

- Thermal zones: ``/sys/class/thermal/thermal_zone*/{type,temp}`` (millidegrees C), by type.
  Readings below -100 °C are a driver's "no reading" (Orin's unused zones say -256 °C) and are
  left out, as is Tegra's ``PMIC-Die``, which reports a constant 100 °C (a trip flag, not a
  measurement).
- CPU clocks: ``/sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq`` (kHz): min and max over cores.
- Raspberry Pi throttling: ``vcgencmd get_throttled`` (where vcgencmd answered once), decoded:
  bits 0-3 are now (under-voltage, frequency capped, throttled, soft temperature limit), bits
  16-19 the same since boot.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from device_agent.sysfs import read
from device_agent.telemetry import CollectorContext, register

NOT_MEASURED = ("PMIC-Die",)
THROTTLE_FLAGS = ("under_voltage", "frequency_capped", "throttled", "soft_temp_limit")


def thermal_zones(sysfs: Path) -> dict[str, float]:
    zones: dict[str, float] = {}
    root = sysfs / "class" / "thermal"
    if not root.is_dir():
        return zones
    for zone in sorted(root.glob("thermal_zone*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)):
        kind, temp = read(zone / "type"), read(zone / "temp")
        try:
            value = int(temp) / 1000 if temp is not None else None
        except ValueError:
            value = None
        if kind and value is not None and value > -100 and kind not in NOT_MEASURED:
            name, n = kind, 2
            while name in zones:  # two zones of one type: keep both
                name, n = f"{kind}_{n}", n + 1
            zones[name] = round(value, 2)
    return zones


def cpu_clocks_mhz(sysfs: Path) -> dict[str, float] | None:
    freqs = []
    for f in sorted((sysfs / "devices" / "system" / "cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        text = read(f)
        if text and text.isdigit():
            freqs.append(int(text) / 1000)
    return {"min": min(freqs), "max": max(freqs)} if freqs else None


def parse_get_throttled(output: str) -> dict[str, Any] | None:
    m = re.search(r"throttled=(0x[0-9a-fA-F]+)", output)
    if m is None:
        return None
    bits = int(m.group(1), 16)
    return {"raw": m.group(1),
            "now": [flag for i, flag in enumerate(THROTTLE_FLAGS) if bits >> i & 1],
            "since_boot": [flag for i, flag in enumerate(THROTTLE_FLAGS) if bits >> (16 + i) & 1]}


@register("thermal")
class ThermalCollector:
    def __init__(self, context: CollectorContext) -> None:
        self._sysfs = context.sysfs
        self._vcgencmd = context.vcgencmd
        self._has_throttled = self._vcgencmd("get_throttled") is not None

    def collect(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        zones = thermal_zones(self._sysfs)
        if zones:
            out["zones_c"] = zones
            out["max_c"] = max(zones.values())
        clocks = cpu_clocks_mhz(self._sysfs)
        if clocks:
            out["cpu_mhz"] = clocks
        if self._has_throttled:
            throttled = parse_get_throttled(self._vcgencmd("get_throttled") or "")
            if throttled:
                out["throttling"] = throttled
        return out or None
