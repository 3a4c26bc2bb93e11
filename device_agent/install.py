"""``edgefleet-agent install``: the unit file, the config file, the keys and the state directory;
and ``edgefleet-agent uninstall``, which takes them away again.

Nothing already there is harmed: every input is checked before the first file is written, and
an existing config file is kept unless forced. Run again with the same inputs, install finishes
what an earlier run could not (systemd was not reachable): the files it would write are the ones
there, so nothing is overwritten that says anything else. Uninstall stops the service before it
removes anything, keeps the config and the bundles unless purging (as a package manager's remove
and purge do), and never deletes a state directory from under an agent that still answers.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from device_agent.bundle.signing import trusted_keys
from device_agent.config import build_config, read_config_file
from device_agent.errors import ConfigError, EdgefleetError
from device_agent.files import size_text
from device_agent.mqtt import BrokerAddress

UNIT_NAME = "edgefleet-agent.service"
SERVICE_USER = "edgefleet"
SYSTEMD_RUNNING = Path("/run/systemd/system")  # exists only when systemd is the init system (sd_booted)


def unit_text(exec_start: str) -> str:
    """The packaged unit with ExecStart pointing at this installation's agent."""
    text = resources.files("device_agent").joinpath("service", UNIT_NAME).read_text()
    lines = [f"ExecStart={exec_start}" if line.startswith("ExecStart=") else line for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def agent_command() -> str:
    """This installation's agent: the script beside the running interpreter (a virtual environment's,
    which `sudo` leaves off PATH), else the one on PATH, else this interpreter running the module
    (a checkout)."""
    beside = Path(sys.executable).parent / "edgefleet-agent"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    exe = shutil.which("edgefleet-agent")
    if exe is None:
        return f"{sys.executable} -m device_agent"
    return str(Path(exe).resolve())


def _unreachable_for_the_service(command: str) -> str | None:
    """The home directory *command* lives under, which the service cannot read: it runs as its own
    user with ProtectHome=yes (and a Pi's /home/pi is 0700)."""
    program = Path(command.split()[0])
    for home in (Path("/home"), Path("/root")):
        if program == home or home in program.parents:
            return str(home)
    return None


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(device_id: str, broker: str, keys: list[str], tls: dict[str, str]) -> str:
    lines = ["# edgefleet agent configuration; flags and EDGEFLEET_* variables override it.",
             f"device_id = {_toml_str(device_id)}",
             'state_dir = "/var/lib/edgefleet"',
             "trusted_keys = [" + ", ".join(map(_toml_str, keys)) + "]", "",
             "[broker]", f"address = {_toml_str(broker)}"]
    lines += [f"{k} = {_toml_str(v)}" for k, v in tls.items()]
    lines += ["# reconnect_max_delay = 30.0  # seconds: the longest wait between attempts to reach the broker"]
    lines += ["", "[runtime]", "# threads = 2", "onnx_providers = []  # empty: the best this device has", "",
              "[limits]", "telemetry_interval = 5.0", "keep_versions = 3", "trial_seconds = 2.0",
              "max_start_attempts = 3", "download_stall_timeout = 30.0", "",
              "[api]", 'socket = "/run/edgefleet/inference.sock"',
              'control_socket = "/run/edgefleet/control.sock"', ""]
    return "\n".join(lines)


def install_service(*, device_id: str, broker: str, trusted: tuple[Path, ...], tls_ca: Path | None,
                    tls_cert: Path | None, tls_key: Path | None, root: Path, systemctl: bool,
                    force: bool) -> list[str]:
    """Write everything; returns one line per step for the user."""
    etc, unit_path, state_dir = _paths(Path(root))
    config_path = etc / "agent.toml"

    tls_files = _checked_inputs(device_id, broker, trusted, tls_ca, tls_cert, tls_key)
    key_names = [f"/etc/edgefleet/keys/{Path(k).name}" for k in trusted]
    text = config_text(device_id, broker, key_names,
                       {name: f"/etc/edgefleet/tls/{Path(p).name}" for name, p in tls_files.items()})
    copies = {etc / "keys" / Path(key).name: Path(key) for key in trusted}
    copies.update({etc / "tls" / Path(path).name: Path(path) for path in tls_files.values()})
    again = config_path.exists() and not force
    if again:
        different = _different(config_path, text, copies)
        if different is not None:
            raise ConfigError(f"{different} exists and says otherwise; keeping it (use --force to overwrite)")
    if systemctl:
        _require_systemd("write the files only")
    command = agent_command()
    home = _unreachable_for_the_service(command)
    if home is not None and Path(root) == Path("/"):
        raise ConfigError(f"the agent here ({command.split()[0]}) is under {home}, which the service cannot read "
                          f"(it runs as user {SERVICE_USER} with ProtectHome=yes): install edgefleet outside {home}, "
                          f"e.g. sudo python3 -m venv /opt/edgefleet && sudo /opt/edgefleet/bin/pip install edgefleet, "
                          f"then sudo /opt/edgefleet/bin/edgefleet-agent install ...")

    done = []
    for target, source in copies.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    if tls_key is not None:
        (etc / "tls" / Path(tls_key).name).chmod(0o640)
    done.append(f"copied {len(trusted)} trusted key(s){' and TLS files' if tls_files else ''} to {etc}")
    if again:
        done.append(f"kept {config_path} (unchanged)")
    else:
        config_path.write_text(text)
        config_path.chmod(0o644)
        done.append(f"wrote {config_path}")
    unit_path.parent.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(unit_text(f"{command} run --config /etc/edgefleet/agent.toml"))
    done.append(f"wrote {unit_path}")
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o750)
    done.append(f"created {state_dir}")
    if systemctl:
        try:
            done += _enable(state_dir, etc / "tls")
        except ConfigError as exc:
            raise ConfigError(f"{exc} (the files are in place: once that is fixed, run this again)") from None
    else:
        done.append("next: useradd --system edgefleet; systemctl daemon-reload; "
                    "systemctl enable --now edgefleet-agent")
    return done


def uninstall_service(*, root: Path, systemctl: bool, purge: bool) -> list[str]:
    """Stop and disable the service and remove its unit file; with *purge*, also the config directory
    (config, trusted keys, TLS files), the state directory (bundles, the update record) and the
    service user. Returns one line per step for the user."""
    root = Path(root)
    etc, unit_path, state_dir = _paths(root)
    if not any(path.exists() for path in (etc, unit_path, state_dir)):
        return [f"the agent is not installed under {root}: nothing to remove"]
    if systemctl:
        _require_systemd("remove the files only")
    done = []
    if systemctl and unit_path.exists():
        _run("systemctl", "disable", "--now", UNIT_NAME)
        done.append(f"stopped and disabled {UNIT_NAME}")
    if purge:
        answering = _answering_agent(root, etc / "agent.toml", state_dir)
        if answering is not None:  # one started by hand, or under another name: its bundles stay where it reads them
            raise ConfigError(f"an agent still answers on {answering}: stop it, then run this again "
                              f"({'; '.join(done) or 'nothing was removed'})")
    # With --no-systemctl, what `systemctl enable` linked goes too (pointing at nothing, it would be an error at boot).
    for link in [*(wants / UNIT_NAME for wants in unit_path.parent.glob("*.wants")), unit_path]:
        if link.exists() or link.is_symlink():
            link.unlink()
            done.append(f"removed {link}")
    if systemctl:
        _run("systemctl", "daemon-reload")
    elif Path(root) == Path("/"):
        done.append("next: systemctl daemon-reload" + (f"; userdel {SERVICE_USER}" if purge else ""))
    if not purge:
        kept = [f"{etc} (the config and trusted keys)"] if etc.exists() else []
        if state_dir.exists():
            kept.append(f"{state_dir} (bundles and update state, {size_text(_size(state_dir))})")
        if kept:
            done.append(f"kept {' and '.join(kept)}: --purge removes them too")
        return done
    elsewhere = _configured_state_dir(etc / "agent.toml")
    for directory in (etc, state_dir):
        if directory.exists():
            shutil.rmtree(directory)
            done.append(f"removed {directory}")
    if elsewhere is not None and elsewhere != Path("/var/lib/edgefleet"):
        done.append(f"kept {elsewhere}, the state directory the config named: remove it yourself if it is the agent's")
    if systemctl and _user_exists(SERVICE_USER):
        _run("userdel", SERVICE_USER)
        done.append(f"removed system user {SERVICE_USER}")
    return done


def _answering_agent(root: Path, config_path: Path, state_dir: Path) -> Path | None:
    """The control socket under *root* on which an agent answers, if one does."""
    from device_agent.local_api import AgentClient

    sockets = [state_dir / "control.sock", root / "run/edgefleet/control.sock"]
    configured = Path(_installed_settings(config_path).get("control_socket") or "")
    if configured.is_absolute():  # as the device sees it; under *root* here
        sockets.insert(0, root / configured.relative_to(configured.anchor))
    for path in sockets:
        if not path.exists():
            continue
        try:
            with AgentClient(path, timeout=5.0) as agent:
                agent.status()
        except (OSError, EdgefleetError):  # a socket file left behind: nobody listens on it
            continue
        return path
    return None


def _installed_settings(config_path: Path) -> dict:
    try:
        return read_config_file(config_path)
    except ConfigError:  # missing or edited beyond reading: what install wrote is all there is to go by
        return {}


def _configured_state_dir(config_path: Path) -> Path | None:
    state_dir = _installed_settings(config_path).get("state_dir")
    return Path(state_dir) if state_dir else None


def _size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file() and not path.is_symlink())


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _checked_inputs(device_id: str, broker: str, trusted: tuple[Path, ...], tls_ca: Path | None,
                    tls_cert: Path | None, tls_key: Path | None) -> dict[str, Path]:
    """Check everything before anything is written; returns the TLS files given, by setting name."""
    BrokerAddress.parse(broker)
    trusted_keys(trusted)  # readable Ed25519 public keys
    tls_files = {name: Path(path) for name, path in (("tls_ca", tls_ca), ("tls_cert", tls_cert),
                                                      ("tls_key", tls_key)) if path is not None}
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if tls_files and tls_ca is None:
        raise ConfigError("a client certificate needs --tls-ca too")
    for path in tls_files.values():
        if not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    names = [Path(k).name for k in trusted]
    if len(set(names)) != len(names):
        raise ConfigError("two trusted keys have the same file name")
    build_config({"device_id": device_id, "state_dir": "/var/lib/edgefleet",
                  "trusted_keys": [f"/etc/edgefleet/keys/{n}" for n in names],
                  "broker": broker})  # the same validation the agent does at start
    return tls_files


def _different(config_path: Path, text: str, copies: dict[Path, Path]) -> Path | None:
    """The first file already there that differs from what install would write in its place (the
    config, a trusted key, a TLS file); None when every one is absent or the same."""
    if config_path.read_text() != text:
        return config_path
    for target, source in copies.items():
        if target.exists() and target.read_bytes() != source.read_bytes():
            return target
    return None


def _paths(root: Path) -> tuple[Path, Path, Path]:
    """Where install writes under *root*: the config directory, the unit file, the state directory."""
    return root / "etc/edgefleet", root / "etc/systemd/system" / UNIT_NAME, root / "var/lib/edgefleet"


def _require_systemd(otherwise: str) -> None:
    if shutil.which("systemctl") is None:
        raise ConfigError(f"systemctl not found: use --no-systemctl to {otherwise}")
    if not SYSTEMD_RUNNING.is_dir():
        raise ConfigError(f"systemd is not running here ({SYSTEMD_RUNNING} is missing: a container, or an image "
                          f"being built?): use --no-systemctl to {otherwise}")


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise ConfigError(f"{' '.join(cmd)} failed: {said}")


def _enable(state_dir: Path, tls_dir: Path) -> list[str]:
    done = []
    if not _user_exists(SERVICE_USER):
        _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER)
        done.append(f"created system user {SERVICE_USER}")
    shutil.chown(state_dir, SERVICE_USER, SERVICE_USER)
    if tls_dir.is_dir():  # the client key is 0640: readable by the agent's group, nobody else
        for path in tls_dir.iterdir():
            shutil.chown(path, "root", SERVICE_USER)
    _run("systemctl", "daemon-reload")
    _run("systemctl", "enable", "--now", UNIT_NAME)
    done.append(f"enabled and started {UNIT_NAME}")
    return done
