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

from device_agent.telemetry import CollectorContext, register

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")  # a Jetson board's input, as its INA3221 labels it


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _number(path: Path) -> float | None:
    text = _read(path)
    try:
        return float(text.split()[0]) if text else None
    except ValueError:
        return None


# -- NVIDIA Jetson INA3221 ------------------------------------------------------------------
def _ina3221_devices(sysfs: Path) -> list[Path]:
    devices = sysfs / "bus" / "i2c" / "devices"
    if not devices.is_dir():
        return []
    return sorted(d for d in devices.iterdir() if "ina3221" in (_read(d / "name") or ""))


def jetson_rails(sysfs: Path) -> dict[str, float]:
    """{rail label: watts} from every INA3221 on the board, hwmon or iio layout."""
    rails: dict[str, float] = {}
    for device in _ina3221_devices(sysfs):
        for hwmon in sorted(device.glob("hwmon/hwmon*")):  # JetPack 5/6
            for label_file in sorted(hwmon.glob("in*_label")):
                n = label_file.name[2:-len("_label")]
                label = _read(label_file)
                if not label or "NC" == label or n == "7":  # unconnected; in7 is the sum of shunt voltages
                    continue
                mv, ma = _number(hwmon / f"in{n}_input"), _number(hwmon / f"curr{n}_input")
                if mv is not None and ma is not None:
                    rails[label] = mv * ma / 1e6
        for iio in sorted(device.glob("iio:device*")):  # JetPack 4
            for name_file in sorted(iio.glob("rail_name_*")):
                n = name_file.name[len("rail_name_"):]
                label, mw = _read(name_file), _number(iio / f"in_power{n}_input")
                if label and mw is not None:
                    rails[label] = mw / 1e3
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
        psys = [z for z in top if _read(z / "name") == "psys"]
        self.zones = psys or [z for z in top if (_read(z / "name") or "").startswith("package")]
        self.label = "psys" if psys else "packages"
        self._clock = clock
        self._last: tuple[float, list[float]] | None = self._sample()

    def _sample(self) -> tuple[float, list[float]] | None:
        values = [_number(z / "energy_uj") for z in self.zones]
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
                delta += _number(zone / "max_energy_range_uj") or 0
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
        if _read(supply / "type") != "Battery" or _read(supply / "status") != "Discharging":
            continue
        uw = _number(supply / "power_now")
        if uw is None:
            ua, uv = _number(supply / "current_now"), _number(supply / "voltage_now")
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
        # vcgencmd is only run if it answered once (on a Pi 5): elsewhere it costs a fork every interval
        self._has_pmic = not jetson_rails(context.sysfs) and self._vcgencmd("pmic_read_adc") is not None

    def collect(self) -> dict[str, Any] | None:
        rails = jetson_rails(self._sysfs)
        if rails:
            total = next((rails[r] for r in TOTAL_RAILS if r in rails), None)
            out: dict[str, Any] = {"source": "jetson-ina3221",
                                   "rails_watts": {k: round(v, 3) for k, v in sorted(rails.items())}}
            if total is not None:
                out["total_watts"] = round(total, 3)
                out["total_is"] = "board input rail " + next(r for r in TOTAL_RAILS if r in rails)
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
