"""Golden tests: power, temperatures, clocks and throttling from fixture trees laid out as the
real boards lay them out (tests/fixtures/boards: a Jetson Orin Nano on JetPack 6, a Jetson Nano on
JetPack 4, a Raspberry Pi 5 with recorded `vcgencmd` output, an x86 laptop), each with the exact
sample expected; and no power field at all where there is no sensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from device_agent.telemetry import CollectorContext, TelemetryCollectors
from device_agent.telemetry.histogram import LatencyHistogram

BOARDS = Path(__file__).resolve().parent.parent / "fixtures" / "boards"


def recorded_vcgencmd(board: str):
    """What `vcgencmd ARGS` printed on the board; None where the board has no vcgencmd."""
    def run(*args: str) -> str | None:
        path = BOARDS / board / "vcgencmd" / args[0]
        return path.read_text() if path.exists() else None
    return run


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sample(sysfs: Path, board: str, clock=None, latency=None) -> dict:
    context = CollectorContext(sysfs=sysfs, vcgencmd=recorded_vcgencmd(board), clock=clock or Clock(),
                               latency=latency or LatencyHistogram())
    readings = TelemetryCollectors(context, ["power", "thermal"]).collect()
    assert all(h["ok"] for h in readings.pop("collectors").values())
    return readings


GOLDEN = {
    "jetson-orin-nano-jp6": {
        "power": {"source": "jetson-ina3221", "total_watts": 5.996, "total_is": "board input rail VDD_IN",
                  # 5064 mV x 1184 mA etc.; the sub-rails are inside VDD_IN, not added to it
                  "rails_watts": {"VDD_CPU_GPU_CV": 1.456, "VDD_IN": 5.996, "VDD_SOC": 2.957}},
        "thermal": {"zones_c": {"cpu-thermal": 48.25, "gpu-thermal": 47.72, "soc0-thermal": 46.56,
                                "tj-thermal": 48.25},  # cv0-thermal's -256 °C means "no reading"
                    "max_c": 48.25, "cpu_mhz": {"min": 729.6, "max": 1510.4}},
    },
    "jetson-nano-jp4": {
        "power": {"source": "jetson-ina3221", "total_watts": 2.964, "total_is": "board input rail POM_5V_IN",
                  "rails_watts": {"POM_5V_CPU": 0.397, "POM_5V_GPU": 0.039, "POM_5V_IN": 2.964}},
        "thermal": {"zones_c": {"AO-therm": 36.5, "CPU-therm": 31.0, "GPU-therm": 31.0, "PLL-therm": 29.5,
                                "thermal-fan-est": 31.2},  # PMIC-Die's constant 100 °C is no reading
                    "max_c": 36.5, "cpu_mhz": {"min": 1479.0, "max": 1479.0}},
    },
    "rpi5": {
        "power": {"source": "rpi5-pmic", "total_watts": 1.545,
                  "total_is": "sum of PMIC rails (SoC side, not wall power)",
                  "rails_watts": {"0V8_AON": 0.0035, "0V8_SW": 0.2455, "1V1_SYS": 0.2036, "1V8_SYS": 0.3069,
                                  "3V3_ADC": 0.0004, "3V3_DAC": 0.0004, "3V3_SYS": 0.1793, "3V7_WL_SW": 0.0146,
                                  "DDR_VDD2": 0.0423, "DDR_VDDQ": 0.0, "HDMI": 0.1231, "VDD_CORE": 0.4256}},
        "thermal": {"zones_c": {"cpu-thermal": 52.35}, "max_c": 52.35, "cpu_mhz": {"min": 2400.0, "max": 2400.0},
                    # 0x50000: under-voltage and throttling have happened since boot, neither now
                    "throttling": {"raw": "0x50000", "now": [], "since_boot": ["under_voltage", "throttled"]}},
    },
}


@pytest.mark.parametrize("board", sorted(GOLDEN))
def test_a_board_reports_exactly_what_its_sensors_say(board):
    assert sample(BOARDS / board / "sys", board) == GOLDEN[board]


def test_a_laptop_reports_its_battery_draw_and_rapl_over_the_interval_across_a_counter_wrap(tmp_path):
    sysfs = tmp_path / "sys"
    shutil.copytree(BOARDS / "x86-laptop" / "sys", sysfs)
    clock = Clock()
    context = CollectorContext(sysfs=sysfs, vcgencmd=recorded_vcgencmd("x86-laptop"), clock=clock)
    collectors = TelemetryCollectors(context, ["power", "thermal"])
    first = collectors.collect()
    assert first["power"] == {"source": "battery", "total_watts": 8.45, "total_is": "battery discharge"}
    assert first["thermal"] == {"zones_c": {"acpitz": 45.0, "INT3400 Thermal": 20.0, "x86_pkg_temp": 52.0},
                                "max_c": 52.0, "cpu_mhz": {"min": 800.0, "max": 1500.0}}

    psys = sysfs / "class" / "powercap" / "intel-rapl:1" / "energy_uj"
    psys.write_text("9171150\n")  # wrapped at max_energy_range_uj: 262143328850 - 262143000000 + 9171150 µJ
    clock.now += 2.0
    assert collectors.collect()["power"]["rapl_watts"] == 4.75  # 9.5 J over 2 s: psys, not psys + package

    (sysfs / "class" / "power_supply" / "BAT0" / "status").write_text("Charging\n")  # plugged in
    psys.write_text("14171150\n")
    clock.now += 1.0
    assert collectors.collect()["power"] == {"source": "rapl", "total_watts": 5.0, "total_is": "RAPL psys",
                                             "rapl_watts": 5.0}


def test_a_battery_without_power_now_is_current_times_voltage(tmp_path):
    battery = tmp_path / "sys" / "class" / "power_supply" / "BAT1"
    battery.mkdir(parents=True)
    for name, value in [("type", "Battery"), ("status", "Discharging"), ("current_now", "-1250000"),
                        ("voltage_now", "7600000")]:  # some drivers sign the current of a discharge
        (battery / name).write_text(value + "\n")
    assert sample(tmp_path / "sys", "none")["power"] == {"source": "battery", "total_watts": 9.5,
                                                         "total_is": "battery discharge"}


def test_no_sensor_means_no_power_field_not_a_zero(tmp_path):
    (tmp_path / "sys").mkdir()
    readings = sample(tmp_path / "sys", "none")
    assert "power" not in readings and "thermal" not in readings


def test_energy_per_inference_where_power_is_known():
    latency = LatencyHistogram()
    context = CollectorContext(sysfs=BOARDS / "jetson-orin-nano-jp6" / "sys", latency=latency,
                               vcgencmd=recorded_vcgencmd("none"))
    collectors = TelemetryCollectors(context, ["inference", "power"])
    for _ in range(50):
        latency.record(0.004)
    readings = collectors.collect()
    per_s = readings["inference"]["per_s"]
    assert readings["inference"]["energy_mj"] == round(5.996 / per_s * 1000, 3)


@pytest.mark.parametrize("board, expected", [("jetson-orin-nano-jp6", "jetson-orin-nano"), ("jetson-nano-jp4", "jetson-nano"),
                                             ("rpi5", "rpi5"), ("x86-laptop", "x86_64-generic")])
def test_the_hardware_class_comes_from_the_device_tree_and_an_unknown_board_is_generic(board, expected, tmp_path):
    from device_agent.hardware import board_model, hardware_class

    sysfs = BOARDS / board / "sys"
    arch = "aarch64" if board != "x86-laptop" else "x86_64"
    assert hardware_class(board_model(sysfs, tmp_path), arch) == expected
    assert hardware_class(None, "riscv64") == "riscv64-generic"  # never a guess
