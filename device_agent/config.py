"""Agent configuration as one frozen value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from device_agent.errors import ConfigError
from device_agent.mqtt import BrokerAddress
from device_agent.protocol import topics


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    trusted_keys: tuple[Path, ...]
    broker: BrokerAddress = field(default_factory=BrokerAddress)
    telemetry_interval: float = 5.0
    # How often the built-in workload runs the active model on its sample input,
    # standing in for the application until one uses the local inference API.
    inference_interval: float = 0.05
    runtime_threads: int | None = None
    chunk_window: int = 8
    download_stall_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not topics.valid_device_id(self.device_id):
            raise ConfigError(f"device id {self.device_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not self.trusted_keys:
            raise ConfigError("no trusted public key given: the agent would accept no bundle")
        if self.telemetry_interval <= 0 or self.inference_interval < 0:
            raise ConfigError("intervals must be positive")
