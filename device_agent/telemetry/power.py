"""Power, from the sensors the board really has; each reading says where it came from.

Sources, in this order (a board has at most one of the first two):

- ``jetson-ina3221``: NVIDIA Jetson's INA3221 monitors. JetPack 5/6 expose them as hwmon
  (``/sys/bus/i2c/devices/*/hwmon/hwmon*/in<N>_label``, ``in<N>_input`` in mV,
  ``curr<N>_input`` in mA); JetPack 4 as iio (``iio:device*/rail_name_<N>``,
  ``in_power<N>_input`` in mW). The board's total is its input rail (``VDD_IN``,
  ``POM_5V_IN``); the other rails are parts of it and are reported, never added to it. A board
  whose monitors have no input rail (AGX Orin) reports its rails and no total.
- ``rpi5-pmic``: Raspberry Pi 5 PMIC rails from ``vcgencmd pmic_read_adc``: the sum of V×I over
  the rails that have both. That is the SoC's rails, not what the board draws from the wall.
- ``battery``: a discharging battery's ``power_now``, or ``current_now`` × ``voltage_now``: on a
  laptop running on battery, the whole machine's draw.
- ``rapl``: Intel RAPL energy counters (``/sys/class/powercap/intel-rapl:*/energy_uj``), as power
  over the interval, with the counter's wrap-around. ``psys`` (the platform) when present,
  else the sum of the packages; sub-zones (core, uncore, dram) are inside a package. The total
  when there is no discharging battery; reported as ``rapl_watts`` beside it when there is.

With no sensor the collector returns nothing: the sample has no power field, never a zero.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from device_agent.sysfs import number, read
from device_agent.telemetry import CollectorContext, register

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")  # a Jetson board's input, as its INA3221 labels it


# -- NVIDIA Jetson INA3221 ------------------------------------------------------------------
def _ina3221_devices(sysfs: Path) -> list[Path]:
    devices = sysfs / "bus" / "i2c" / "devices"
    if not devices.is_dir():
        return []
    return sorted(d for d in devices.iterdir() if "ina3221" in (read(d / "name") or ""))


def jetson_rail_files(sysfs: Path) -> dict[str, tuple[Path, ...]]:
    """{rail label: the files that give its power} on every INA3221 of the board: (mV, mA) in the
    hwmon layout, (mW,) in the iio one. Found once; read every interval by jetson_rails()."""
    rails: dict[str, tuple[Path, ...]] = {}
    for device in _ina3221_devices(sysfs):
        for hwmon in sorted(device.glob("hwmon/hwmon*")):  # JetPack 5/6
            for label_file in sorted(hwmon.glob("in*_label")):
                n = label_file.name[2:-len("_label")]
                label = read(label_file)
                if label and label != "NC" and n != "7":  # unconnected; in7 is the sum of shunt voltages
                    rails[label] = (hwmon / f"in{n}_input", hwmon / f"curr{n}_input")
        for iio in sorted(device.glob("iio:device*")):  # JetPack 4
            for name_file in sorted(iio.glob("rail_name_*")):
                label = read(name_file)
                if label:
                    rails[label] = (iio / f"in_power{name_file.name[len('rail_name_'):]}_input",)
    return rails


def jetson_rails(files: dict[str, tuple[Path, ...]]) -> dict[str, float]:
    """{rail label: watts} now, for the rails jetson_rail_files() found."""
    rails: dict[str, float] = {}
    for label, paths in files.items():
        values = [number(p) for p in paths]
        if any(v is None for v in values):
            continue
        rails[label] = values[0] * values[1] / 1e6 if len(values) == 2 else values[0] / 1e3
    return rails


# -- Raspberry Pi 5 PMIC --------------------------------------------------------------------
_PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([0-9.]+)[AV]\s*$")


def parse_pmic_read_adc(output: str) -> dict[str, float]:
    """{rail: watts} for every rail with both a current and a voltage reading."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in output.splitlines():
        m = _PMIC_LINE.match(line)
        if m:
            (amps if m.group(2) == "A" else volts)[m.group(1)] = float(m.group(3))
    return {rail: amps[rail] * volts[rail] for rail in sorted(amps) if rail in volts}


def run_vcgencmd(*args: str) -> str | None:
    """vcgencmd's output, or None where there is no vcgencmd (not a Raspberry Pi) or it fails."""
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


# -- Intel RAPL -----------------------------------------------------------------------------
class Rapl:
    """Power over the interval from RAPL energy counters, with wrap-around."""

    def __init__(self, sysfs: Path, clock: Callable[[], float] = time.monotonic) -> None:
        root = sysfs / "class" / "powercap"
        zones = sorted(root.glob("intel-rapl:*")) if root.is_dir() else []
        top = [z for z in zones if z.name.count(":") == 1]  # intel-rapl:N; intel-rapl:N:M are inside
        psys = [z for z in top if read(z / "name") == "psys"]
        self.zones = psys or [z for z in top if (read(z / "name") or "").startswith("package")]
        self.label = "psys" if psys else "packages"
        self._clock = clock
        self._last: tuple[float, list[float]] | None = self._sample()

    def _sample(self) -> tuple[float, list[float]] | None:
        values = [number(z / "energy_uj") for z in self.zones]
        if not self.zones or any(v is None for v in values):
            return None
        return self._clock(), values  # type: ignore[return-value]

    def watts(self) -> float | None:
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        joules = 0.0
        for zone, before, after in zip(self.zones, last[1], now[1]):
            delta = after - before
            if delta < 0:  # the counter wrapped at max_energy_range_uj
                delta += number(zone / "max_energy_range_uj") or 0
            joules += delta / 1e6
        return joules / (now[0] - last[0])


# -- battery --------------------------------------------------------------------------------
def battery_watts(sysfs: Path) -> float | None:
    """What a discharging battery delivers; None when charging, full, or there is no battery."""
    supplies = sysfs / "class" / "power_supply"
    if not supplies.is_dir():
        return None
    total, found = 0.0, False
    for supply in sorted(supplies.iterdir()):
        if read(supply / "type") != "Battery" or read(supply / "status") != "Discharging":
            continue
        uw = number(supply / "power_now")
        if uw is None:
            ua, uv = number(supply / "current_now"), number(supply / "voltage_now")
            uw = abs(ua) * uv / 1e6 if ua is not None and uv is not None else None
        if uw is not None:
            total, found = total + abs(uw) / 1e6, True
    return total if found else None


@register("power")
class PowerCollector:
    def __init__(self, context: CollectorContext) -> None:
        self._sysfs = context.sysfs
        self._vcgencmd = context.vcgencmd
        self._rapl = Rapl(context.sysfs, context.clock)
        self._rail_files = jetson_rail_files(context.sysfs)  # sensors do not come and go: found once
        # vcgencmd is only run if it answered once (on a Pi 5): elsewhere it costs a fork every interval
        self._has_pmic = not self._rail_files and self._vcgencmd("pmic_read_adc") is not None

    def collect(self) -> dict[str, Any] | None:
        rails = jetson_rails(self._rail_files)
        if rails:
            out: dict[str, Any] = {"source": "jetson-ina3221",
                                   "rails_watts": {k: round(v, 3) for k, v in sorted(rails.items())}}
            board_input = next((r for r in TOTAL_RAILS if r in rails), None)
            if board_input is not None:
                out["total_watts"] = round(rails[board_input], 3)
                out["total_is"] = f"board input rail {board_input}"
            return out
        if self._has_pmic:
            output = self._vcgencmd("pmic_read_adc")
            pmic = parse_pmic_read_adc(output) if output else {}
            if pmic:
                return {"source": "rpi5-pmic", "total_watts": round(sum(pmic.values()), 3),
                        "total_is": "sum of PMIC rails (SoC side, not wall power)",
                        "rails_watts": {k: round(v, 4) for k, v in pmic.items()}}
        # A laptop: on battery, the discharge is the whole machine's draw; RAPL is the processor's
        # (and needs two readings, so there is none in the first interval).
        battery = battery_watts(self._sysfs)
        rapl = self._rapl.watts() if self._rapl.zones else None
        out: dict[str, Any] = {}
        if battery is not None:
            out = {"source": "battery", "total_watts": round(battery, 3), "total_is": "battery discharge"}
        elif rapl is not None:
            out = {"source": "rapl", "total_watts": round(rapl, 3), "total_is": f"RAPL {self._rapl.label}"}
        if rapl is not None:
            out["rapl_watts"] = round(rapl, 3)
        return out or None
