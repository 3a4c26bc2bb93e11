"""``edgefleet-agent``: the device-side command line."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import click

from device_agent import __version__
from device_agent.errors import ConfigError, EdgefleetError


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: nan passes every range check, and a NaN
    timeout, expiry or interval would then never end (or end at once)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def fail_cleanly(fn):
    """Turn any edgefleet error, and a file the system refuses (a folder given for a file, a path
    through a file, no permission, a full disk), into one line on stderr and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgefleetError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:
            if exc.filename is None:  # not about a path the user gave: a defect, shown as one
                raise
            if isinstance(exc, FileExistsError) and os.path.isfile(exc.filename):  # mkdir on a path through a file
                click.echo(f"error: {exc.filename} is a file, where a folder is needed", err=True)
            else:
                click.echo(f"error: {exc.filename}: {exc.strerror or exc}", err=True)
            sys.exit(1)
    return wrapper


@click.group(help="The edgefleet device agent: verifies, activates and runs model bundles "
                  "pushed over MQTT, serves them to local applications, and reports telemetry.")
@click.version_option(__version__, prog_name="edgefleet-agent")
def main() -> None:
    pass


SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def configure_logging(level: str) -> None:
    """One line per record on stderr. Under systemd (JOURNAL_STREAM is set) each line starts with
    its syslog priority, ``<4>``, which journald turns into the entry's priority, and journald adds
    its own timestamps; anywhere else (a terminal, a container's log) each line starts with its
    local time, to the millisecond."""
    class Priority(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.priority = SYSLOG_PRIORITY.get(record.levelno, 6)
            return True

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Priority())
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("<%(priority)d>%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def config_options(fn):
    """The settings every command that needs the agent's configuration accepts."""
    options = [
        click.option("--config", "config_file", envvar="EDGEFLEET_CONFIG", type=click.Path(path_type=Path),
                     help="TOML config file [default: /etc/edgefleet/agent.toml if it exists]."),
        click.option("--device-id", envvar="EDGEFLEET_DEVICE_ID", help="This device's id in the fleet."),
        click.option("--state-dir", envvar="EDGEFLEET_STATE_DIR", type=click.Path(path_type=Path),
                     help="Where bundles and agent state live."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def load_settings(config_file: Path | None, **flags) -> dict:
    """Config file settings, overridden by every flag or environment variable that is set."""
    from device_agent.config import DEFAULT_CONFIG, read_config_file

    if config_file is None and DEFAULT_CONFIG.is_file():
        config_file = DEFAULT_CONFIG
    settings = read_config_file(config_file) if config_file is not None else {}
    settings.update({k: v for k, v in flags.items() if v is not None and v != ()})
    return settings


@main.command(help="Run the agent in the foreground until SIGTERM or Ctrl-C (systemd runs this).")
@config_options
@click.option("--broker", envvar="EDGEFLEET_BROKER", help="MQTT broker as HOST:PORT [default: 127.0.0.1:1883].")
@click.option("--trusted-key", "trusted_keys", envvar="EDGEFLEET_TRUSTED_KEYS", multiple=True,
              type=click.Path(path_type=Path), help="Public key (PEM) whose bundles this device accepts; repeatable.")
@click.option("--telemetry-interval", type=FiniteRange(0), help="Seconds between telemetry samples [default: 5].")
@click.option("--inference-interval", type=FiniteRange(0),
              help="Run the active model on its sample input every this many seconds, standing in for an "
                   "application [default: 0, off].")
@click.option("--threads", type=click.IntRange(1, 1024), help="Runtime threads [default: the runtime's choice].")
@click.option("--onnx-provider", "onnx_providers", multiple=True,
              help="ONNX Runtime execution provider to use, in order; repeatable [default: the best this "
                   "device has: TensorRT, CUDA, then CPU].")
@click.option("--tls-ca", envvar="EDGEFLEET_TLS_CA", type=click.Path(path_type=Path),
              help="CA certificate of the broker (turns TLS on).")
@click.option("--tls-cert", envvar="EDGEFLEET_TLS_CERT", type=click.Path(path_type=Path),
              help="This device's client certificate.")
@click.option("--tls-key", envvar="EDGEFLEET_TLS_KEY", type=click.Path(path_type=Path),
              help="This device's client key.")
@click.option("--reconnect-max-delay", type=FiniteRange(0), help="Longest wait in seconds between attempts to "
              "reach the broker, doubling from 1 s [default: 30].")
@click.option("--api-socket", type=click.Path(path_type=Path),
              help="Local inference socket [default: STATE_DIR/inference.sock].")
@click.option("--control-socket", type=click.Path(path_type=Path),
              help="Control socket [default: STATE_DIR/control.sock].")
@click.option("--http-port", type=int, help="Also serve the local API over HTTP on 127.0.0.1:PORT [default: off].")
@click.option("--sysfs", type=click.Path(path_type=Path), help="Read sensors under this /sys "
              "(e.g. /host/sys in a container) [default: /sys].")
@click.option("--label", "labels", multiple=True, metavar="NAME=VALUE",
              help="A label the host can filter and target by (site, group, ...); repeatable.")
@click.option("--api-spin-us", type=int, help="Microseconds the local API polls for a client's next request "
              "before sleeping [default: 200, or 0 on a single core].")
@click.option("--trial-seconds", type=FiniteRange(0),
              help="How long a new bundle serves before it is committed [default: 2].")
@click.option("--keep-versions", type=int, help="Committed versions kept for rollback [default: 3].")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@fail_cleanly
def run(config_file, log_level, **flags) -> None:
    from device_agent.agent import Agent
    from device_agent.config import build_config

    configure_logging(log_level)
    config = build_config(load_settings(config_file, **flags))
    agent = Agent(config)
    signal.signal(signal.SIGTERM, agent.on_signal)
    signal.signal(signal.SIGINT, agent.on_signal)
    agent.run()


def _control_client(config_file, device_id, state_dir, control_socket):
    from device_agent.local_api import AgentClient

    settings = load_settings(config_file, device_id=device_id, state_dir=state_dir, control_socket=control_socket)
    path = settings.get("control_socket") or (Path(settings["state_dir"]) / "control.sock"
                                              if settings.get("state_dir") else None)
    if path is None:
        raise click.UsageError("give --state-dir or --control-socket (or a config file)")
    return AgentClient(path), settings


@main.command(help="Show what this device runs, the versions kept for rollback, and any update under way.")
@config_options
@click.option("--control-socket", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@fail_cleanly
def status(config_file, device_id, state_dir, control_socket, as_json) -> None:
    from dataclasses import asdict

    from device_agent.store import BundleStore
    from device_agent.telemetry.disk import room, room_text
    from device_agent.update.record import UpdateJournal

    client, settings = _control_client(config_file, device_id, state_dir, control_socket)
    try:
        with client:
            doc = client.status()
        doc["running"] = True
    except ConnectionError:
        if not settings.get("state_dir") or not Path(settings["state_dir"]).is_dir():
            raise ConfigError("the agent is not running and no state directory was found") from None
        store = BundleStore(Path(settings["state_dir"]))  # not running: read what is on disk
        active, last = store.active(), UpdateJournal(store.root).load_outcome()
        doc = {"running": False, "active_bundle": active.label if active else None,
               "sha256": active.sha256 if active else None,
               "committed": [b.label for b in map(store.by_name, store.committed()) if b is not None],
               "disk": room(store.root), "last_update": asdict(last) if last else None}
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(f"agent:         {'running' if doc['running'] else 'not running'}")
    if doc.get("id_held_by"):
        from device_agent.presence import describe

        click.echo(f"broker:        off: another agent holds device id {doc['device_id']} "
                   f"({describe(doc['id_held_by'])}); give one of them its own id")
    elif doc["running"]:
        problem = doc.get("broker_problem")
        click.echo(f"broker:        {'connected' if doc.get('connected') else 'not connected'}" + (
            f": {problem['why']} (for {problem['for_s']:.0f} s, {problem['attempts']} attempt"
            f"{'s' * (problem['attempts'] != 1)})" if problem else ""))
    for other in doc.get("id_rivals") or ():
        click.echo(f"id shared:     another agent {'asked for' if other['how'] == 'asked' else 'connected with'} this "
                   f"device id and was turned away (host {other['host']}, pid {other['pid']})")
    click.echo(f"active bundle: {doc['active_bundle'] or 'none'}")
    if doc.get("sha256"):
        click.echo(f"sha256:        {doc['sha256']}")
    click.echo(f"kept versions: {', '.join(doc['committed']) or 'none'}")
    if doc.get("disk"):
        click.echo(f"disk:          {room_text(doc['disk'])}")
    if doc.get("certificate"):
        from device_agent.client_cert import certificate_text

        click.echo(f"certificate:   {certificate_text(doc['certificate'])}")
    if doc.get("last_update"):
        last = doc["last_update"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["timestamp"]))
        click.echo(f"last update:   {last['state']} {last['bundle'] or ''}".rstrip()
                   + (f": {last['reason']}" if last["reason"] else "") + f" ({when}, command {last['command_id']})")
    if doc.get("update"):
        u = doc["update"]
        click.echo(f"update:        {u['kind']} {u['bundle']} in state {doc['update_state']}")


@main.command(help="Roll back to the previous committed version (the agent must be running).")
@config_options
@click.option("--control-socket", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@fail_cleanly
def rollback(config_file, device_id, state_dir, control_socket, as_json) -> None:
    client, _ = _control_client(config_file, device_id, state_dir, control_socket)
    try:
        with client:
            result = client.rollback()
    except ConnectionError as exc:
        raise ConfigError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{result.get('state')}: {result.get('reason') or result.get('bundle')}")
    sys.exit(0 if result.get("state") == "rolled_back" else 1)


@main.command(help="Benchmark a bundle's model on this device: load, first inference, warm latency, memory.")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--trusted-key", "trusted", multiple=True, type=click.Path(path_type=Path), required=True,
              help="Public key the bundle must be signed with; repeatable.")
@click.option("--runs", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0, 100_000))
@click.option("--threads", type=click.IntRange(1, 1024), help="Runtime threads [default: the runtime's choice].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@fail_cleanly
def bench(bundle, trusted, runs, warmup, threads, as_json) -> None:
    import tempfile

    from device_agent.bench import benchmark
    from device_agent.bundle.signing import trusted_keys
    from device_agent.runtime import RuntimeOptions
    from device_agent.store import BundleStore

    if not bundle.is_file():
        raise ConfigError(f"bundle {bundle} does not exist")
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        installed = BundleStore(Path(tmp)).install(bundle, trusted_keys(trusted))
        result = benchmark(installed, RuntimeOptions(threads=threads), runs=runs, warmup=warmup)
    if as_json:
        click.echo(json.dumps(result))
        return
    print_bench(result)


def print_bench(r: dict) -> None:
    from device_agent.bench import TIMINGS, duration

    click.echo(f"{r['bundle']} on {r['runtime']} ({r['runs']} runs after {r['warmup']} warm-up)")
    for label, key in TIMINGS:
        click.echo(f"  {label:<16} {duration(r[key]):>13}")
    click.echo(f"  {'peak RSS':<16} {r['peak_rss_bytes'] / 2**20:>9.1f} MiB")


@main.command(help="Install the agent as a systemd service: unit file, config file, user and state directory.")
@click.option("--device-id", required=True, help="This device's id in the fleet.")
@click.option("--broker", required=True, help="MQTT broker as HOST:PORT.")
@click.option("--trusted-key", "trusted", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Public key (PEM) of the release signer; copied to /etc/edgefleet/keys; repeatable.")
@click.option("--tls-ca", type=click.Path(path_type=Path), help="CA certificate of the broker (turns TLS on).")
@click.option("--tls-cert", type=click.Path(path_type=Path), help="This device's client certificate.")
@click.option("--tls-key", type=click.Path(path_type=Path), help="This device's client key.")
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True,
              help="Install under this root (an image being built, or a test).")
@click.option("--no-systemctl", is_flag=True, help="Write the files only; do not create the user or start the service.")
@click.option("--force", is_flag=True, help="Overwrite an existing config file (and keys or TLS files of the same "
              "names) that says otherwise.")
@fail_cleanly
def install(device_id, broker, trusted, tls_ca, tls_cert, tls_key, root, no_systemctl, force) -> None:
    from device_agent.install import install_service

    for line in install_service(device_id=device_id, broker=broker, trusted=trusted, tls_ca=tls_ca,
                                tls_cert=tls_cert, tls_key=tls_key, root=root, systemctl=not no_systemctl,
                                force=force):
        click.echo(line)


@main.command(help="Stop and disable the service and remove its unit file. The config, the trusted keys and the "
                   "bundles stay (installing again picks them up) unless --purge.")
@click.option("--purge", is_flag=True, help="Also remove /etc/edgefleet, /var/lib/edgefleet (every bundle kept for "
              "rollback) and the edgefleet user.")
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True,
              help="Uninstall from under this root (an image being built, or a test).")
@click.option("--no-systemctl", is_flag=True, help="Remove the files only; do not stop the service or remove the user.")
@fail_cleanly
def uninstall(purge, root, no_systemctl) -> None:
    from device_agent.install import uninstall_service

    for line in uninstall_service(root=root, systemctl=not no_systemctl, purge=purge):
        click.echo(line)


if __name__ == "__main__":
    main()
