"""What this device is, as the host's registry records it: hardware class, CPU arch, RAM,
runtimes and accelerators. Reported in the device's status at every connect.

The class comes from the device tree's model string on ARM boards (Raspberry Pi, Jetson) and
from DMI on PCs; a board this does not know is ``<arch>-generic``, never a guess.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from device_agent.sysfs import read
from device_agent.update.policy import device_facts

# (substring of the device-tree model, hardware class), most specific first
_MODELS = [
    ("Raspberry Pi 5", "rpi5"), ("Raspberry Pi 4", "rpi4"), ("Raspberry Pi 3", "rpi3"),
    ("Raspberry Pi Zero 2", "rpi-zero-2"), ("Compute Module 4", "rpi-cm4"), ("Compute Module 5", "rpi-cm5"),
    ("Jetson AGX Orin", "jetson-agx-orin"), ("Orin NX", "jetson-orin-nx"), ("Orin Nano", "jetson-orin-nano"),
    ("Jetson Xavier NX", "jetson-xavier-nx"), ("Jetson AGX Xavier", "jetson-agx-xavier"),
    ("Jetson Nano", "jetson-nano"), ("Jetson TX2", "jetson-tx2"),
]


def board_model(sysfs: Path = Path("/sys"), procfs: Path = Path("/proc")) -> str | None:
    return (read(sysfs / "firmware" / "devicetree" / "base" / "model")
            or read(procfs / "device-tree" / "model")
            or read(sysfs / "class" / "dmi" / "id" / "product_name"))


def hardware_class(model: str | None, arch: str) -> str:
    for needle, name in _MODELS:
        if model and needle in model:
            return name
    return f"{arch}-generic"


def runtimes() -> list[str]:
    """The model runtimes this device can load."""
    found = ["onnxruntime"] if importlib.util.find_spec("onnxruntime") else []
    if any(importlib.util.find_spec(m) for m in ("ai_edge_litert", "tflite_runtime")):
        found.append("tflite")
    return found


def describe(sysfs: Path = Path("/sys"), procfs: Path = Path("/proc")) -> dict[str, Any]:
    facts = device_facts()
    model = board_model(sysfs, procfs)
    return {"class": hardware_class(model, facts["arch"]), "model": model, "arch": facts["arch"],
            "ram_mb": facts["ram_mb"], "accelerators": facts["accelerators"], "runtimes": runtimes()}
