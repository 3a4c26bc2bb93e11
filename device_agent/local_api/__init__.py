"""The agent's local API (a Unix socket) and the small client applications use with it."""

from device_agent.local_api.client import AgentClient, InferenceClient
from device_agent.local_api.server import LocalApi

__all__ = ["AgentClient", "InferenceClient", "LocalApi"]
