"""The bundle format, shared by the host (which builds bundles) and the device (which verifies them)."""

from device_agent.bundle.archive import BUNDLE_SUFFIX, BundleReader, VerifiedBundle, sha256_file, write_bundle
from device_agent.bundle.manifest import FileEntry, Manifest, SampleCheck, TensorSpec

__all__ = [
    "BUNDLE_SUFFIX", "BundleReader", "FileEntry", "Manifest", "SampleCheck", "TensorSpec",
    "VerifiedBundle", "sha256_file", "write_bundle",
]
