"""The one exception tree of edgefleet.

Every lower-level library's exceptions (paho, cryptography, onnxruntime,
tarfile, json, OS errors) are mapped into it at the boundary, so a command line
can turn any edgefleet failure into a single clear line::

    EdgefleetError
    ├── ConfigError              bad option, unreadable key or config file
    ├── BundleError              anything wrong with a bundle file
    │   ├── ManifestError        malformed or unsupported manifest
    │   ├── SignatureError       no signature, unknown key, signature does not match
    │   ├── IntegrityError       a file's size or SHA-256 differs from the manifest,
    │   │                        unsafe or unexpected archive members
    │   └── PolicyError          a genuine bundle this device must not run: expired, an older
    │                            release than the one committed, or made for other hardware
    ├── ProtocolError            a malformed MQTT message
    ├── TransferError            a bundle download failed
    │   └── TransferTimeout      no progress before the deadline
    ├── StorageError             the device's disk has no room for an update, or a write failed
    ├── ModelError               a runtime could not load or run a model
    │   └── HealthCheckError     the model ran but its output is not what the bundle promises
    ├── CompressionError         a compression pass failed on a model (host only)
    │   └── NotApplicable        the technique does not apply to this model; other passes go on
    └── MqttError                broker connection or publish failures
        └── BrokerUnreachable    could not connect to the broker at all
"""

from __future__ import annotations

import zipfile

# What np.load raises on a file that is not a readable .npz or .npy: an empty one (EOFError), a
# damaged zip (BadZipFile), a damaged array or a pickle (ValueError), an unreadable path (OSError).
UNREADABLE_ARRAYS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose."""


class ConfigError(EdgefleetError):
    pass


class BundleError(EdgefleetError):
    pass


class ManifestError(BundleError):
    pass


class SignatureError(BundleError):
    pass


class IntegrityError(BundleError):
    pass


class PolicyError(BundleError):
    pass


class ProtocolError(EdgefleetError):
    pass


class TransferError(EdgefleetError):
    pass


class TransferTimeout(TransferError):
    pass


class StorageError(EdgefleetError):
    pass


class ModelError(EdgefleetError):
    pass


class HealthCheckError(ModelError):
    pass


class CompressionError(EdgefleetError):
    pass


class NotApplicable(CompressionError):
    pass


class MqttError(EdgefleetError):
    pass


class BrokerUnreachable(MqttError):
    pass
