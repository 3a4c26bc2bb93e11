"""`edgefleet-agent uninstall`: what install wrote goes, in an order that harms nothing running."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from device_agent import install
from device_agent.errors import ConfigError
from device_agent.local_api import AgentClient
from tests.conftest import wait_until
from tests.device_agent.test_service import agent_cli

UNIT = "etc/systemd/system/edgefleet-agent.service"
WANTS = "etc/systemd/system/multi-user.target.wants/edgefleet-agent.service"


@pytest.fixture
def root(keys):
    # A short path: the agent's control socket goes under it, and a socket's path has a 108-byte limit.
    root = Path(tempfile.mkdtemp(prefix="ef-root-", dir="/tmp"))
    result = agent_cli("install", "--device-id", "pi-07", "--broker", "broker.lan:1883",
                       "--trusted-key", keys["pub"], "--root", root, "--no-systemctl")
    assert result.returncode == 0, result.stderr
    (root / WANTS).parent.mkdir(parents=True)
    (root / WANTS).symlink_to(f"/{UNIT}")  # as `systemctl enable` links it
    (root / "var/lib/edgefleet/bundles").mkdir()
    (root / "var/lib/edgefleet/bundles/model.onnx").write_bytes(bytes(3 * 2**20))
    (root / "etc/hostname").write_text("pi-07\n")  # not the agent's
    yield root
    shutil.rmtree(root)


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_uninstall_removes_the_service_and_keeps_config_and_bundles_for_installing_again(root, keys):
    result = agent_cli("uninstall", "--root", root, "--no-systemctl")
    assert result.returncode == 0, result.stderr
    assert not (root / UNIT).exists() and not (root / WANTS).is_symlink()
    assert files(root) == {"etc/hostname", "etc/edgefleet/agent.toml", "etc/edgefleet/keys/release.pub",
                           "var/lib/edgefleet/bundles/model.onnx"}
    assert "bundles and update state, 3.0 MiB): --purge removes them too" in result.stdout
    again = agent_cli("install", "--device-id", "pi-07", "--broker", "broker.lan:1883",
                      "--trusted-key", keys["pub"], "--root", root, "--no-systemctl")
    assert again.returncode == 0 and "(unchanged)" in again.stdout, again.stderr
    assert (root / UNIT).is_file()


def test_purge_removes_everything_install_wrote_and_nothing_else(root):
    result = agent_cli("uninstall", "--purge", "--root", root, "--no-systemctl")
    assert result.returncode == 0, result.stderr
    assert files(root) == {"etc/hostname"}
    assert f"removed {root}/var/lib/edgefleet" in result.stdout
    nothing = agent_cli("uninstall", "--purge", "--root", root, "--no-systemctl")
    assert nothing.returncode == 0 and "nothing to remove" in nothing.stdout


def test_purge_leaves_everything_while_an_agent_still_answers_on_its_control_socket(root, keys):
    control = root / "run/edgefleet/control.sock"
    control.parent.mkdir(parents=True)
    agent = subprocess.Popen(
        [sys.executable, "-m", "device_agent", "run", "--device-id", "pi-07", "--broker", "127.0.0.1:1",
         "--state-dir", str(root / "var/lib/edgefleet"), "--trusted-key", str(keys["pub"]),
         "--control-socket", str(control), "--api-socket", str(root / "run/edgefleet/inference.sock")],
        stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(control), timeout=30)
        before = files(root)
        result = agent_cli("uninstall", "--purge", "--root", root, "--no-systemctl")
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
        assert f"an agent still answers on {control}: stop it, then run this again" in result.stderr
        assert files(root) == before and _answers(control)
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    result = agent_cli("uninstall", "--purge", "--root", root, "--no-systemctl")
    assert result.returncode == 0, result.stderr  # its socket file left behind answers nothing
    assert not (root / "var/lib/edgefleet").exists()


def _answers(control: Path) -> bool:
    try:
        with AgentClient(control, timeout=5) as agent:
            return agent.status()["device_id"] == "pi-07"
    except OSError:
        return False


def test_without_systemd_running_uninstall_says_so_before_anything_is_removed(monkeypatch, root, tmp_path):
    monkeypatch.setattr(install, "SYSTEMD_RUNNING", tmp_path / "run/systemd/system")  # (not there)
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")
    before = files(root)
    with pytest.raises(ConfigError, match=r"systemd is not running here .* use --no-systemctl to remove the files"):
        install.uninstall_service(root=root, systemctl=True, purge=True)
    assert files(root) == before


def test_with_systemd_the_service_is_stopped_before_its_files_go_and_the_user_after_them(monkeypatch, root,
                                                                                         tmp_path):
    """systemd cannot run here: systemctl and userdel are scripts that note their arguments and
    whether the unit and the state directory were still there when they ran."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name in ("systemctl", "userdel"):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\necho \"{name} $* unit:$(test -e {root / UNIT} && echo yes || echo no) "
                          f"state:$(test -e {root}/var/lib/edgefleet && echo yes || echo no)\" >> {log}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(install, "SYSTEMD_RUNNING", tmp_path)  # (there)
    monkeypatch.setattr(install, "_user_exists", lambda name: name == "edgefleet")
    done = install.uninstall_service(root=root, systemctl=True, purge=True)
    assert log.read_text().splitlines() == [
        "systemctl disable --now edgefleet-agent.service unit:yes state:yes",
        "systemctl daemon-reload unit:no state:yes",
        "userdel edgefleet unit:no state:no",
    ]
    assert done[0] == "stopped and disabled edgefleet-agent.service" and done[-1] == "removed system user edgefleet"
    assert files(root) == {"etc/hostname"}


def test_a_failing_systemctl_is_one_line_and_removes_nothing(monkeypatch, root, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text("#!/bin/sh\necho 'Failed to disable unit: Access denied' >&2\nexit 1\n")
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(install, "SYSTEMD_RUNNING", tmp_path)
    before = files(root)
    with pytest.raises(ConfigError, match="^systemctl disable --now edgefleet-agent.service failed: Failed to "
                                          "disable unit: Access denied$"):
        install.uninstall_service(root=root, systemctl=True, purge=True)
    assert files(root) == before
