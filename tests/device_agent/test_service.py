"""`edgefleet-agent install`, the systemd unit it writes, the config file, and the notify protocol."""

import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from device_agent.cli import load_settings
from device_agent.config import build_config, read_config_file
from device_agent.errors import ConfigError
from tests.conftest import wait_until


def agent_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "device_agent", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture
def installed(tmp_path, keys):
    result = agent_cli("install", "--device-id", "pi-07", "--broker", "broker.lan:8883",
                       "--trusted-key", keys["pub"], "--root", tmp_path, "--no-systemctl")
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_install_writes_a_unit_that_systemd_accepts(installed):
    unit = installed / "etc/systemd/system/edgefleet-agent.service"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: run the README's test command (make test)", pytrace=False)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = unit.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=edgefleet", "StateDirectory=edgefleet",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes"):
        assert line in text
    assert "run --config /etc/edgefleet/agent.toml" in text


def test_install_writes_a_config_the_agent_reads(installed, keys):
    settings = read_config_file(installed / "etc/edgefleet/agent.toml")
    config = build_config(settings)
    assert config.device_id == "pi-07" and str(config.broker) == "broker.lan:8883"
    assert [p.name for p in config.trusted_keys] == [keys["pub"].name]
    assert (installed / "etc/edgefleet/keys" / keys["pub"].name).read_bytes() == keys["pub"].read_bytes()
    assert str(config.inference_socket) == "/run/edgefleet/inference.sock"
    assert (installed / "var/lib/edgefleet").is_dir()


def test_install_keeps_an_existing_config(installed, keys):
    config = installed / "etc/edgefleet/agent.toml"
    config.write_text(config.read_text() + "# edited by hand\n")
    result = agent_cli("install", "--device-id", "pi-08", "--broker", "b:1883", "--trusted-key", keys["pub"],
                       "--root", installed, "--no-systemctl")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "--force" in result.stderr
    assert "# edited by hand" in config.read_text()


def test_install_run_again_with_the_same_inputs_finishes_without_force(installed, keys):
    """A first run that stopped after writing the files (systemd not reachable) is finished by the
    same command again: the config it would write is the one there, so it is kept, not refused."""
    config = installed / "etc/edgefleet/agent.toml"
    before = config.read_text()
    result = agent_cli("install", "--device-id", "pi-07", "--broker", "broker.lan:8883", "--trusted-key", keys["pub"],
                       "--root", installed, "--no-systemctl")
    assert result.returncode == 0, result.stderr
    assert f"kept {config} (unchanged)" in result.stdout and config.read_text() == before


def test_install_again_does_not_replace_a_trusted_key_with_another_of_the_same_name(installed, keys, tmp_path):
    """The same config, but a key file of the same name that holds another key: which keys a device
    trusts does not change without --force."""
    other = tmp_path / "other"
    other.mkdir()
    (other / keys["pub"].name).write_bytes(keys["rogue_pub"].read_bytes())
    result = agent_cli("install", "--device-id", "pi-07", "--broker", "broker.lan:8883",
                       "--trusted-key", other / keys["pub"].name, "--root", installed, "--no-systemctl")
    kept = installed / "etc/edgefleet/keys" / keys["pub"].name
    assert result.returncode == 1 and f"{kept} exists and says otherwise" in result.stderr, result.stderr
    assert "--force" in result.stderr and len(result.stderr.splitlines()) == 1
    assert kept.read_bytes() == keys["pub"].read_bytes()


def test_without_systemd_running_install_says_so_before_anything_is_written(monkeypatch, keys, tmp_path):
    """In a container, or a chroot building an image, systemctl is there but systemd is not: starting
    the service cannot work, so install says to write the files only, and writes nothing."""
    from device_agent import install

    monkeypatch.setattr(install, "SYSTEMD_RUNNING", tmp_path / "run/systemd/system")  # (not there)
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(ConfigError, match=r"systemd is not running here .* use --no-systemctl"):
        install.install_service(device_id="pi-07", broker="broker.lan:1883", trusted=(keys["pub"],), tls_ca=None,
                                tls_cert=None, tls_key=None, root=tmp_path / "root", systemctl=True, force=False)
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("args, message", [
    (["--device-id", "pi 1", "--broker", "b:1883"], "device id"),
    (["--device-id", "pi-1", "--broker", "b:99999"], "HOST:PORT"),
])
def test_install_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, keys, args, message):
    result = agent_cli("install", *args, "--trusted-key", keys["pub"], "--root", tmp_path, "--no-systemctl")
    assert result.returncode == 1 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "etc").exists()


def test_a_file_that_is_not_a_key_is_refused_before_anything_is_written(tmp_path):
    not_a_key = tmp_path / "release.pub"
    not_a_key.write_text("hello")
    result = agent_cli("install", "--device-id", "pi-1", "--broker", "b:1883", "--trusted-key", not_a_key,
                       "--root", tmp_path, "--no-systemctl")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "etc").exists()


def test_flags_override_the_config_file(installed):
    settings = load_settings(installed / "etc/edgefleet/agent.toml", device_id="bench-rig", broker=None,
                             keep_versions=5)
    config = build_config(settings)
    assert config.device_id == "bench-rig" and str(config.broker) == "broker.lan:8883"
    assert config.keep_versions == 5


def test_labels_come_from_the_file_and_flags_replace_them(installed, tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text((installed / "etc/edgefleet/agent.toml").read_text() + '\n[labels]\nsite = "kitchen"\n')
    assert build_config(read_config_file(path)).labels == {"site": "kitchen"}
    assert build_config(load_settings(path, labels=("group=canary",))).labels == {"group": "canary"}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        build_config(load_settings(path, labels=("canary",)))


def test_the_api_polling_window_comes_from_the_file_and_is_bounded(installed, tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text((installed / "etc/edgefleet/agent.toml").read_text() + "\n")
    text = path.read_text().replace("[api]\n", "[api]\nspin_us = 0\n")
    path.write_text(text)
    assert build_config(read_config_file(path)).api_spin_us == 0
    assert build_config(load_settings(path, api_spin_us=500)).api_spin_us == 500
    with pytest.raises(ConfigError, match="spin_us"):
        build_config(load_settings(path, api_spin_us=-1))


def test_the_reconnect_back_off_cap_comes_from_the_file_and_is_bounded(installed, tmp_path):
    path = tmp_path / "agent.toml"
    text = (installed / "etc/edgefleet/agent.toml").read_text()
    assert build_config(read_config_file(installed / "etc/edgefleet/agent.toml")).reconnect_max_delay == 30
    path.write_text(text.replace("[broker]\n", "[broker]\nreconnect_max_delay = 10\n"))
    assert build_config(read_config_file(path)).reconnect_max_delay == 10
    assert build_config(load_settings(path, reconnect_max_delay=5.0)).reconnect_max_delay == 5
    for bad in (0.5, 7200.0):
        with pytest.raises(ConfigError, match="reconnect_max_delay must be 1 to 3600"):
            build_config(load_settings(path, reconnect_max_delay=bad))


@pytest.mark.parametrize("setting", ["telemetry_interval", "trial_seconds", "download_stall_timeout",
                                     "download_backoff"])
@pytest.mark.parametrize("value", ["nan", "inf", "1e300", "-1"])
def test_a_time_in_the_config_file_that_is_not_a_sane_number_of_seconds_is_refused(installed, tmp_path, setting,
                                                                                    value):
    """TOML can say nan and inf; NaN passes every comparison, and a telemetry interval of NaN
    would publish in a busy loop (one of inf or 1e300 overflows the wait and stops the reporter)."""
    path = tmp_path / "agent.toml"
    text = re.sub(f"^{setting} = .*\n", "", (installed / "etc/edgefleet/agent.toml").read_text(), flags=re.M)
    path.write_text(text.replace("[limits]\n", f"[limits]\n{setting} = {value}\n"))
    with pytest.raises(ConfigError, match=f"{setting} must be 0 to 86400 seconds"):
        build_config(read_config_file(path))


@pytest.mark.parametrize("threads", ["0", "-1", "4096", "2.5"])
def test_runtime_threads_outside_1_to_1024_are_refused(installed, tmp_path, threads):
    path = tmp_path / "agent.toml"
    text = re.sub("^threads = .*\n", "", (installed / "etc/edgefleet/agent.toml").read_text(), flags=re.M)
    path.write_text(text.replace("[runtime]\n", f"[runtime]\nthreads = {threads}\n"))
    with pytest.raises(ConfigError, match="threads must be 1 to 1024"):
        build_config(read_config_file(path))


def test_settings_from_the_host_must_be_finite_and_none_is_saved_otherwise(tmp_path, keys):
    from device_agent.config import AgentConfig, RemoteSettings

    config = AgentConfig(device_id="d", state_dir=tmp_path, trusted_keys=(keys["pub"],))
    settings = RemoteSettings(config)
    for change in ({"telemetry_interval": math.nan}, {"chunk_window": math.inf}, {"keep_versions": math.nan},
                   {"telemetry_interval": 1e300}, {"trial_seconds": True}):
        with pytest.raises(ConfigError):
            settings.apply(config, change)
    assert not settings.path.exists()
    assert settings.apply(config, {"telemetry_interval": 1.5}).telemetry_interval == 1.5
    # a file from before the check, with NaN in it: the config file's value holds
    settings.path.write_text('{"telemetry_interval": NaN, "keep_versions": 4}')
    reloaded = RemoteSettings(config).apply(config)
    assert reloaded.telemetry_interval == 5.0 and reloaded.keep_versions == 4


@pytest.mark.parametrize("text, message", [("device_id = 'x'\n[limits]\nspeed = 3\n", "unknown setting"),
                                            ("device_id = \n", "not valid TOML"),
                                            (b"device_id = '\xad'\n", "not valid TOML: 'utf-8' codec")])
def test_a_bad_config_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "agent.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=message):
        read_config_file(path)


def test_the_agent_tells_systemd_it_is_ready_and_feeds_the_watchdog(tmp_path, mosquitto, keys):
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(0.5)
    state = tmp_path / "s"
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent", "run", "--device-id", "notify-1", "--state-dir", str(state),
         "--broker", str(mosquitto), "--trusted-key", str(keys["pub"]),
         "--api-socket", f"/tmp/ef-notify-{os.getpid()}.sock",
         "--control-socket", f"/tmp/ef-notify-{os.getpid()}.ctl"],
        stderr=subprocess.DEVNULL, env={**os.environ, "NOTIFY_SOCKET": str(notify_path),
                                        "WATCHDOG_USEC": "400000"})
    messages: list[str] = []

    def received(want: str) -> bool:
        try:
            messages.append(listener.recv(1024).decode())
        except socket.timeout:
            pass
        return want in messages
    try:
        assert wait_until(lambda: received("READY=1"), 30)
        assert wait_until(lambda: received("WATCHDOG=1"), 15)
        proc.terminate()
        assert proc.wait(10) == 0
        assert wait_until(lambda: received("STOPPING=1"), 15)
    finally:
        proc.kill()
        listener.close()


def _log_lines(tmp_path, keys, *, journal: bool) -> list[str]:
    """What `edgefleet-agent run` with no broker writes to stderr in 2 s, as a systemd service
    (*journal*: JOURNAL_STREAM set) or not."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal:
        env["JOURNAL_STREAM"] = "8:1234"
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent", "run", "--device-id", "journal-1", "--state-dir", str(tmp_path / "s"),
         "--broker", "127.0.0.1:1", "--trusted-key", str(keys["pub"]),
         "--api-socket", f"/tmp/ef-journal-{os.getpid()}.sock", "--control-socket", f"/tmp/ef-journal-{os.getpid()}.ctl"],
        stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(2)
    proc.terminate()
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0  # no broker is no reason to stop serving the local API
    return [line for line in err.splitlines() if line]


def test_under_systemd_log_lines_carry_their_syslog_priority_and_no_broker_is_not_fatal(tmp_path, keys):
    # JOURNAL_STREAM tells a service its stderr goes to the journal; a bad broker gives a warning line
    lines = _log_lines(tmp_path, keys, journal=True)
    assert any(line.startswith("<6>device_agent.agent: agent journal-1 up") for line in lines), lines
    assert any(line.startswith("<4>device_agent.mqtt: cannot reach the MQTT broker at 127.0.0.1:1: [Errno 111] "
                               "Connection refused;") for line in lines), lines
    assert all(line[0] == "<" and line[2] == ">" for line in lines), lines


def test_elsewhere_each_log_line_starts_with_its_time(tmp_path, keys):
    # in a terminal or a container's log nothing else stamps the lines (journald does, above)
    lines = _log_lines(tmp_path, keys, journal=False)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
    assert any(re.match(rf"{stamp} INFO device_agent.agent: agent journal-1 up", line) for line in lines), lines
    assert all(re.match(rf"{stamp} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line) for line in lines), lines


def test_an_execution_provider_the_device_lacks_is_reported_when_the_model_loads(tmp_path, keys, make_bundle):
    from device_agent.bundle.signing import trusted_keys
    from device_agent.errors import ModelError
    from device_agent.store import BundleStore
    from device_agent.update.health import health_check

    config = build_config(load_settings(None, device_id="gpu-less", state_dir=tmp_path, trusted_keys=(keys["pub"],),
                                        onnx_providers=("CUDAExecutionProvider",)))
    assert config.runtime.onnx_providers == ("CUDAExecutionProvider",)
    bundle = BundleStore(tmp_path).install(make_bundle(), trusted_keys([keys["pub"]]))
    with pytest.raises(ModelError, match="CUDAExecutionProvider not available"):
        health_check(bundle, config.runtime)


def test_install_with_tls_copies_the_files_and_the_config_points_at_them(tmp_path, keys):
    for name in ("ca.pem", "pi.pem", "pi.key"):
        (tmp_path / name).write_text(name)
    root = tmp_path / "root"
    result = agent_cli("install", "--device-id", "pi-9", "--broker", "b:8883", "--trusted-key", keys["pub"],
                       "--tls-ca", tmp_path / "ca.pem", "--tls-cert", tmp_path / "pi.pem",
                       "--tls-key", tmp_path / "pi.key", "--root", root, "--no-systemctl")
    assert result.returncode == 0, result.stderr
    config = build_config(read_config_file(root / "etc/edgefleet/agent.toml"))
    assert str(config.tls.ca) == "/etc/edgefleet/tls/ca.pem" and str(config.tls.key) == "/etc/edgefleet/tls/pi.key"
    assert (root / "etc/edgefleet/tls/pi.key").stat().st_mode & 0o777 == 0o640


def test_a_client_certificate_without_its_key_is_refused(tmp_path, keys):
    (tmp_path / "pi.pem").write_text("x")
    result = agent_cli("install", "--device-id", "pi-9", "--broker", "b:8883", "--trusted-key", keys["pub"],
                       "--tls-ca", tmp_path / "pi.pem", "--tls-cert", tmp_path / "pi.pem",
                       "--root", tmp_path / "root", "--no-systemctl")
    assert result.returncode == 1 and "--tls-cert and --tls-key go together" in result.stderr
    assert not (tmp_path / "root").exists()


def test_the_unit_runs_the_agent_of_the_installation_that_wrote_it(installed):
    """`sudo /opt/edgefleet/bin/edgefleet-agent install`: sudo leaves the virtual environment off PATH,
    so the unit names the script beside the interpreter, not whatever edgefleet-agent PATH finds."""
    from pathlib import Path

    beside = Path(sys.executable).parent / "edgefleet-agent"
    assert beside.is_file()
    unit = (installed / "etc/systemd/system/edgefleet-agent.service").read_text()
    assert f"ExecStart={beside} run --config /etc/edgefleet/agent.toml" in unit.splitlines()


@pytest.mark.parametrize("program", ["/home/pi/venv/bin/edgefleet-agent", "/root/.local/bin/edgefleet-agent",
                                     "/home/pi/venv/bin/python -m device_agent"])
def test_an_agent_under_home_is_refused_before_anything_is_written(monkeypatch, keys, program):
    """The service runs as its own user with ProtectHome=yes: a unit pointing into /home would fail
    at every start. Said in one line, with where to install instead; nothing written."""
    from pathlib import Path

    from device_agent import install

    def no_writes(*args, **kwargs):
        raise AssertionError("install wrote something")
    monkeypatch.setattr(install, "agent_command", lambda: program)
    for name in ("mkdir", "write_text", "chmod"):
        monkeypatch.setattr(Path, name, no_writes)
    monkeypatch.setattr(install.shutil, "copyfile", no_writes)
    with pytest.raises(ConfigError, match=r"is under /(home|root), which the service cannot read .* "
                                          r"sudo python3 -m venv /opt/edgefleet"):
        install.install_service(device_id="pi-07", broker="broker.lan:1883", trusted=(keys["pub"],), tls_ca=None,
                                tls_cert=None, tls_key=None, root=Path("/"), systemctl=False, force=True)
