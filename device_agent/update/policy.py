"""What a device refuses even from a genuine, correctly signed bundle: one past its expiry, one
older than the release it has committed (a rollback attack replays an old, vulnerable but
validly signed bundle), and one made for hardware it does not have."""

from __future__ import annotations

import platform
import re
import time
from typing import Any

import psutil

from device_agent.bundle.manifest import Manifest
from device_agent.errors import PolicyError

_ACCELERATORS = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda"}


def device_facts() -> dict[str, Any]:
    """This device, as a bundle's target describes devices."""
    accelerators: set[str] = set()
    try:
        import onnxruntime

        accelerators = {_ACCELERATORS[p] for p in onnxruntime.get_available_providers() if p in _ACCELERATORS}
    except ImportError:
        pass
    return {"arch": platform.machine(), "ram_mb": psutil.virtual_memory().total // 2**20,
            "accelerators": sorted(accelerators)}


def check_target(target: dict[str, Any] | None, facts: dict[str, Any]) -> None:
    if not target:
        return
    arch = target.get("arch")
    if arch and facts["arch"] not in arch:
        raise PolicyError(f"the bundle is for {', '.join(arch)}; this device is {facts['arch']}")
    min_ram = target.get("min_ram_mb")
    if min_ram and facts["ram_mb"] < min_ram:
        raise PolicyError(f"the bundle needs {min_ram} MiB of RAM; this device has {facts['ram_mb']} MiB")
    accelerator = target.get("accelerator")
    if accelerator and accelerator not in facts["accelerators"]:
        raise PolicyError(f"the bundle needs the {accelerator} accelerator; this device has "
                          f"{', '.join(facts['accelerators']) or 'none'}")


def check_expiry(manifest: Manifest, now: float | None = None) -> None:
    now = time.time() if now is None else now
    if manifest.expires_at is not None and now > manifest.expires_at:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(manifest.expires_at))
        raise PolicyError(f"{manifest.label} expired on {when}")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"(\d+)\.(\d+)\.(\d+)", version).groups())


def check_release(manifest: Manifest, committed: dict[str, Any] | None, allow_downgrade: bool) -> None:
    """*committed*: {"release": n or None, "version": v} of the highest committed bundle of this name."""
    if committed is None or allow_downgrade:
        return
    if manifest.release is not None and committed.get("release") is not None:
        older = manifest.release < committed["release"]
        what = f"release {manifest.release} is older than release {committed['release']}"
    else:
        older = _version_key(manifest.version) < _version_key(committed["version"])
        what = f"version {manifest.version} is older than {committed['version']}"
    if older:
        raise PolicyError(f"{manifest.name} {what}, which this device has committed (a rollback attack?); "
                          "deploy with --allow-downgrade to install it on purpose")
