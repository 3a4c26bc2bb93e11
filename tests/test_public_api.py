"""The public names are a promise: changing them is a deliberate act, so they are pinned here."""

import device_agent
import host_tools


def test_device_agent_public_api():
    assert sorted(device_agent.__all__) == sorted([
        "AgentConfig", "BrokerAddress", "BrokerUnreachable", "BundleError", "BundleReader", "ConfigError",
        "EdgefleetError", "HealthCheckError", "IntegrityError", "Manifest", "ManifestError", "ModelError",
        "MqttError", "ProtocolError", "SignatureError", "TransferError", "TransferTimeout", "VerifiedBundle",
        "__version__",
    ])
    for name in device_agent.__all__:
        assert hasattr(device_agent, name)


def test_host_tools_public_api():
    assert sorted(host_tools.__all__) == ["BundleServer", "Deployment", "DeviceProgress", "build_bundle"]


def test_every_error_is_an_edgefleet_error():
    errors = [getattr(device_agent, n) for n in device_agent.__all__ if n.endswith(("Error", "Unreachable",
                                                                                    "Timeout"))]
    assert all(issubclass(e, device_agent.EdgefleetError) for e in errors)


def test_the_device_package_never_imports_the_host_package():
    import pathlib
    root = pathlib.Path(device_agent.__file__).parent
    offenders = [p.name for p in root.rglob("*.py") if "host_tools" in p.read_text()]
    assert offenders == []


def test_the_agent_runs_without_any_host_only_package():
    """A device install has no onnx, rich or amqtt: importing the whole agent must not need them."""
    import subprocess
    import sys
    code = ("import sys\n"
            "for m in ('onnx', 'rich', 'amqtt', 'torch', 'host_tools'): sys.modules[m] = None\n"
            "import device_agent.cli, device_agent.agent, device_agent.runtime.onnx, device_agent.telemetry\n"
            "from device_agent.telemetry import TelemetryCollectors, CollectorContext\n"
            "TelemetryCollectors(CollectorContext())\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
