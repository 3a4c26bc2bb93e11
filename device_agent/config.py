"""Agent configuration: one frozen value, read from a TOML file and overridden by flags.

``/etc/edgefleet/agent.toml`` (written by ``edgefleet-agent install``)::

    device_id = "pi-01"
    state_dir = "/var/lib/edgefleet"
    trusted_keys = ["/etc/edgefleet/keys/release.pub"]

    [broker]
    address = "broker.example:8883"
    tls_ca = "/etc/edgefleet/tls/ca.pem"      # TLS is on when tls_ca is set
    tls_cert = "/etc/edgefleet/tls/device.pem" # client certificate (optional)
    tls_key = "/etc/edgefleet/tls/device.key"
    reconnect_max_delay = 30.0                  # longest wait between attempts to reach the broker

    [runtime]
    threads = 2
    onnx_providers = []                         # empty: the best the device has

    [limits]
    telemetry_interval = 5.0
    keep_versions = 3
    trial_seconds = 2.0
    max_start_attempts = 3
    download_stall_timeout = 30.0

    [labels]                                      # free-form; `edgefleet fleet status --label`
    # site = "kitchen"                            # filters by them, rollouts target them
    # group = "canary"

    [api]
    socket = "/run/edgefleet/inference.sock"
    control_socket = "/run/edgefleet/control.sock"
    # http_port = 8765                            # the same API over HTTP on 127.0.0.1 (off by default)
    # spin_us = 200                               # poll this long for a connection's next request before
                                                  # sleeping (default 200 with 2+ cores, 0 on one core)

Command-line flags and ``EDGEFLEET_*`` environment variables override the file.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: JetPack 6 on a Jetson
    import tomli as tomllib
from device_agent.mqtt import BrokerAddress
from device_agent.tls import TlsFiles
from device_agent.protocol import topics
from device_agent.protocol.codec import is_number
from device_agent.runtime.base import RuntimeOptions
from device_agent.store import write_atomically

DEFAULT_CONFIG = Path("/etc/edgefleet/agent.toml")


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    trusted_keys: tuple[Path, ...]
    broker: BrokerAddress = field(default_factory=BrokerAddress)
    tls: TlsFiles | None = None
    # Attempts to reach the broker wait 1 s, then twice as long each time, up to this: how soon a
    # device is back after a broker outage, against how often a whole fleet knocks meanwhile.
    reconnect_max_delay: float = 30.0
    telemetry_interval: float = 5.0
    telemetry_queue_max: int = 10_000  # samples kept while the broker is away (~14 h at 5 s); then the oldest go
    # How often the built-in workload runs the active model on its sample input, standing in
    # for an application until one uses the local API; 0 turns it off.
    inference_interval: float = 0.0
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    chunk_window: int = 32           # chunk requests in flight (32 x 64 KiB: 2 MiB on the way)
    download_stall_timeout: float = 30.0  # no new chunk for this long: the attempt has stalled
    download_attempts: int = 3        # stalled attempts before the download fails (each resumes)
    download_backoff: float = 5.0     # seconds before the 2nd attempt, doubling after that
    keep_versions: int = 3           # committed versions kept on disk for instant rollback
    trial_seconds: float = 2.0       # a new bundle serves this long without errors before it is committed
    max_start_attempts: int = 3      # starts in one update state before the agent gives up on it
    api_socket: Path | None = None   # default: <state_dir>/inference.sock
    control_socket: Path | None = None  # default: <state_dir>/control.sock
    http_port: int | None = None     # the local API over HTTP on 127.0.0.1; None: off
    labels: dict[str, str] = field(default_factory=dict)  # e.g. site, group: the host filters and targets by them
    sysfs: Path = Path("/sys")  # where sensors are read: /host/sys when the agent runs in a container
    # Microseconds the local API polls for a connection's next request before blocking: saves the
    # wake-up (tens of µs) for clients that call back to back. Off on one core, where it would
    # take the CPU from the client itself.
    api_spin_us: int = field(default_factory=lambda: 200 if (os.cpu_count() or 1) > 1 else 0)

    def __post_init__(self) -> None:
        if not topics.valid_device_id(self.device_id):
            raise ConfigError(f"device id {self.device_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not self.trusted_keys:
            raise ConfigError("no trusted public key given: the agent would accept no bundle")
        if Path(self.state_dir).exists() and not Path(self.state_dir).is_dir():
            raise ConfigError(f"state_dir {self.state_dir} is a file: give the folder the agent keeps its bundles in")
        for name in _SECONDS:  # (NaN passes every comparison; TOML and JSON both can say it)
            if not 0 <= getattr(self, name) <= MAX_SECONDS:
                raise ConfigError(f"{name} must be 0 to {MAX_SECONDS:.0f} seconds, not {getattr(self, name)}")
        if self.telemetry_interval <= 0:
            raise ConfigError("intervals must be positive")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ConfigError(f"http port {self.http_port} is out of range")
        if not 0 <= self.api_spin_us <= 100_000:
            raise ConfigError(f"api spin_us {self.api_spin_us} must be between 0 and 100000")
        if self.keep_versions < 1 or self.max_start_attempts < 1 or self.download_attempts < 1:
            raise ConfigError("keep_versions, max_start_attempts and download_attempts must be at least 1")
        if not all(isinstance(k, str) and isinstance(v, str) and k and len(k) <= 64 and len(v) <= 128
                   for k, v in self.labels.items()) or len(self.labels) > 32:
            raise ConfigError("labels are up to 32 NAME = \"value\" strings")
        if self.telemetry_queue_max < 1:
            raise ConfigError("telemetry_queue_max must be at least 1")
        if not 1 <= self.chunk_window <= 1024:
            raise ConfigError("chunk_window must be 1 to 1024")
        if not 1 <= self.reconnect_max_delay <= 3600:
            raise ConfigError("reconnect_max_delay must be 1 to 3600 seconds")
        if self.download_stall_timeout <= 0 or self.download_backoff < 0:
            raise ConfigError("download_stall_timeout must be positive and download_backoff not negative")

    @property
    def inference_socket(self) -> Path:
        return self.api_socket or Path(self.state_dir) / "inference.sock"

    @property
    def control_socket_path(self) -> Path:
        return self.control_socket or Path(self.state_dir) / "control.sock"


# Settings in seconds, each 0 to MAX_SECONDS (a day: longer waits say nothing useful and overflow
# the clock's timeouts at the far end); reconnect_max_delay has tighter bounds of its own.
_SECONDS = ("telemetry_interval", "inference_interval", "download_stall_timeout", "download_backoff",
            "trial_seconds")
MAX_SECONDS = 86400.0

# Settings the host may change on a running device with a signed `config` command; they take
# effect at once and are kept in <state_dir>/remote_config.json, over the config file's values.
REMOTE_SETTINGS = ("telemetry_interval", "chunk_window", "download_stall_timeout", "download_attempts",
                   "download_backoff", "keep_versions", "trial_seconds", "max_start_attempts")
_INTEGER_SETTINGS = {"chunk_window", "download_attempts", "keep_versions", "max_start_attempts"}


class RemoteSettings:
    """The settings changed over MQTT, persisted in the state directory, over *config*'s (the
    config file's and flags') values, which a setting returns to when the host clears it."""

    def __init__(self, config: "AgentConfig") -> None:
        self.path = Path(config.state_dir) / "remote_config.json"
        self.base = {k: getattr(config, k) for k in REMOTE_SETTINGS}
        try:
            doc = json.loads(self.path.read_text())
            self.values = {k: v for k, v in doc.items() if k in REMOTE_SETTINGS and is_number(v)} \
                if isinstance(doc, dict) else {}
        except (OSError, ValueError):  # none, or damaged: the config file's values hold until the host sets them
            self.values = {}

    def apply(self, config: "AgentConfig", changes: dict[str, Any] | None = None) -> "AgentConfig":
        """*config* with the saved settings and then *changes* applied (a value of None: back to
        the config file's). Raises ConfigError, saving nothing, for an unknown setting or a bad value."""
        values = dict(self.values)
        for key, value in (changes or {}).items():
            if key not in REMOTE_SETTINGS:
                raise ConfigError(f"{key!r} cannot be set remotely; these can: {', '.join(REMOTE_SETTINGS)}")
            if value is None:
                values.pop(key, None)
            elif not is_number(value):
                raise ConfigError(f"{key} must be a finite number")
            elif key in _INTEGER_SETTINGS:
                if value != int(value):
                    raise ConfigError(f"{key} must be a whole number")
                values[key] = int(value)
            else:
                values[key] = float(value)
        try:
            updated = replace(config, **{**self.base, **values})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid setting: {exc}") from None
        if changes:
            write_atomically(self.path, json.dumps(values, indent=1, sort_keys=True).encode())
            self.values = values
        return updated

    def describe(self, config: "AgentConfig") -> dict[str, Any]:
        return {"settings": {k: getattr(config, k) for k in REMOTE_SETTINGS}, "changed_remotely": sorted(self.values)}


# TOML table.key -> AgentConfig field
_FILE_KEYS = {
    ("", "device_id"): "device_id", ("", "state_dir"): "state_dir", ("", "trusted_keys"): "trusted_keys",
    ("broker", "address"): "broker", ("broker", "tls_ca"): "tls_ca", ("broker", "tls_cert"): "tls_cert",
    ("broker", "tls_key"): "tls_key", ("broker", "reconnect_max_delay"): "reconnect_max_delay",
    ("runtime", "threads"): "threads", ("runtime", "onnx_providers"): "onnx_providers",
    ("limits", "telemetry_interval"): "telemetry_interval", ("limits", "inference_interval"): "inference_interval",
    ("limits", "telemetry_queue_max"): "telemetry_queue_max", ("telemetry", "sysfs"): "sysfs",
    ("limits", "keep_versions"): "keep_versions", ("limits", "trial_seconds"): "trial_seconds",
    ("limits", "max_start_attempts"): "max_start_attempts",
    ("limits", "download_stall_timeout"): "download_stall_timeout", ("limits", "chunk_window"): "chunk_window",
    ("limits", "download_attempts"): "download_attempts", ("limits", "download_backoff"): "download_backoff",
    ("api", "socket"): "api_socket", ("api", "control_socket"): "control_socket",
    ("api", "http_port"): "http_port", ("api", "spin_us"): "api_spin_us",
}


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML config file, flattened to setting names; unknown keys are an error."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "labels" and isinstance(value, dict):  # [labels] site = "kitchen": free-form
            flat["labels"] = {str(k): str(v) for k, v in value.items()}
            continue
        tables = value.items() if isinstance(value, dict) else None
        for sub, item in (tables if tables is not None else [(key, value)]):
            name = _FILE_KEYS.get((key, sub) if tables is not None else ("", key))
            if name is None:
                raise ConfigError(f"config file {path}: unknown setting {key + '.' + sub if tables else key!r}")
            flat[name] = item
    return flat


def build_config(settings: dict[str, Any]) -> AgentConfig:
    """An AgentConfig from flat settings (file values already overridden by flags)."""
    s = {k: v for k, v in settings.items() if v is not None and v != ()}
    for required in ("device_id", "state_dir"):
        if required not in s:
            raise ConfigError(f"no {required.replace('_', ' ')} given (flag, environment or config file)")
    try:
        tls = None
        if s.get("tls_ca"):
            tls = TlsFiles(ca=Path(s["tls_ca"]), cert=_path(s.get("tls_cert")), key=_path(s.get("tls_key")))
        runtime = RuntimeOptions(threads=s.get("threads"), onnx_providers=tuple(s.get("onnx_providers", ())))
        plain = {f.name for f in fields(AgentConfig)} - {"broker", "tls", "runtime", "trusted_keys", "state_dir"}
        if isinstance(s.get("labels"), (list, tuple)):  # from --label NAME=VALUE flags
            s["labels"] = dict(_label_flag(item) for item in s["labels"])
        if "sysfs" in s:
            s["sysfs"] = Path(s["sysfs"])
        return AgentConfig(
            device_id=s["device_id"], state_dir=Path(s["state_dir"]),
            trusted_keys=tuple(Path(p) for p in s.get("trusted_keys", ())),
            broker=BrokerAddress.parse(s["broker"]) if "broker" in s else BrokerAddress(),
            tls=tls, runtime=runtime,
            **{k: (Path(v) if k.endswith("socket") else v) for k, v in s.items() if k in plain and k != "device_id"},
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid setting: {exc}") from None


def _label_flag(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--label takes NAME=VALUE, not {item!r}")
    return name.strip(), value.strip()


def _path(value: Any) -> Path | None:
    return Path(value) if value else None
