"""edgefleet host tools: compress models, build signed bundles, deploy them over MQTT,
and watch the fleet's telemetry. Imports the shared bundle format and protocol
from ``device_agent``."""

from host_tools.deploy import Deployment, DeviceProgress
from host_tools.packaging import build_bundle
from host_tools.serve import BundleServer

__all__ = ["BundleServer", "Deployment", "DeviceProgress", "build_bundle"]
