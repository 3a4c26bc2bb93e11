"""edgefleet device agent: verifies, activates and runs model bundles, and reports telemetry.

Also home of what host and device share: the bundle format (``device_agent.bundle``)
and the MQTT protocol (``device_agent.protocol``). The host imports these; this
package never imports the host's.
"""

__version__ = "0.1.0"

from device_agent.bundle import BundleReader, Manifest, VerifiedBundle  # noqa: E402
from device_agent.config import AgentConfig  # noqa: E402
from device_agent.errors import (  # noqa: E402
    BrokerUnreachable, BundleError, ConfigError, EdgefleetError, HealthCheckError, IntegrityError,
    ManifestError, ModelError, MqttError, ProtocolError, SignatureError, TransferError, TransferTimeout,
)
from device_agent.mqtt import BrokerAddress  # noqa: E402

__all__ = [
    "AgentConfig", "BrokerAddress", "BrokerUnreachable", "BundleError", "BundleReader", "ConfigError",
    "EdgefleetError", "HealthCheckError", "IntegrityError", "Manifest", "ManifestError", "ModelError",
    "MqttError", "ProtocolError", "SignatureError", "TransferError", "TransferTimeout", "VerifiedBundle",
    "__version__",
]
