"""Sending bundles to devices: deploy, serve, rollback."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from device_agent.cli import FiniteRange, fail_cleanly
from device_agent.errors import ConfigError
from host_tools.cli.base import (
    DEFAULT_HOME, answers_counted, broker_option, chunk_size_option, command_signer, devices_option, host_client,
    json_option, main, may_still_take, signing_options, timeout_option,
)
from host_tools.cli.fleet import fleet_rows
from host_tools.terminal import console


@main.command(help="Send BUNDLE to devices over MQTT and follow each until it is active or failed.")
@click.argument("bundle_path", type=click.Path(path_type=Path))
@devices_option
@broker_option
@timeout_option(120.0, "Seconds to wait for every device.")
@chunk_size_option
@click.option("--allow-downgrade", is_flag=True,
              help="Let devices install a lower release than the one they have committed.")
@click.option("--no-serve", is_flag=True, help="Do not answer chunk requests here: `edgefleet serve` does.")
@click.option("--db", type=click.Path(path_type=Path), default=DEFAULT_HOME / "fleet.db", show_default=True,
              help="Device registry: devices it knows cannot run the bundle (its target) are skipped, not sent it.")
@signing_options
@json_option
@fail_cleanly
def deploy(bundle_path, devices, broker, timeout, chunk_size, allow_downgrade, no_serve, db, signing_key, expires_in,
           as_json) -> None:
    from device_agent.bundle import BundleReader
    from host_tools.deploy import DeviceProgress, incompatible, run_deployment

    with BundleReader(bundle_path) as reader:  # one clear line if it is not a bundle
        target = reader.manifest.target
    registry = {r.device_id: r.hardware for r in fleet_rows(db, (), None)} if db.exists() and target else {}
    skipped = incompatible(devices, target, registry)
    for device, why in skipped.items():
        click.echo(f"{device}: {why}", err=True)
    send = [d for d in devices if d not in skipped]
    signer = command_signer(signing_key, expires_in)
    client = host_client(broker, "deploy")
    try:
        results = run_deployment(client, bundle_path, send, signer=signer, timeout=timeout, chunk_size=chunk_size,
                                 allow_downgrade=allow_downgrade, serve=not no_serve,
                                 show_progress=not as_json) if send else {}
    except KeyboardInterrupt:  # Ctrl-C: the devices go on with the command; say what becomes of it
        click.echo("stopped following the deployment: the devices carry on with it (`edgefleet device status` "
                   "shows how far one is)" if no_serve else
                   "stopped following the deployment and serving its chunks: devices already downloading keep "
                   "asking for them for a while, then fail; deploy the bundle again (or run `edgefleet serve`) to "
                   "let them finish", err=True)
        sys.exit(130)
    finally:
        client.disconnect()
    if as_json:
        results.update({d: DeviceProgress(d, "skipped", 0.0, why) for d, why in skipped.items()})
        click.echo(json.dumps({d: vars(p) for d, p in results.items()}))
    else:  # in full: the progress bars cut long reasons short (skipped devices were said above)
        for d, p in results.items():
            if not p.succeeded:
                click.echo(f"{d}: {p.state}" + (f" ({p.reason})" if p.reason else ""), err=True)
    if not all(p.succeeded for p in results.values()):
        sys.exit(1)


@main.command(help="Answer devices' chunk requests for BUNDLES and every *.efb in --dir (looked at again every "
                   "few seconds) until Ctrl-C. Many devices fetching one bundle share one copy through the broker.")
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path))
@click.option("--dir", "bundle_dir", type=click.Path(path_type=Path), help="Serve every bundle in this directory.")
@broker_option
@click.option("--stats-every", default=10.0, show_default=True, type=FiniteRange(0.5),
              help="Seconds between progress lines (only when something was served).")
@fail_cleanly
def serve(bundles, bundle_dir, broker, stats_every) -> None:
    import signal as signals

    from host_tools.bundle_directory import BundleDirectory
    from host_tools.serve import BundleServer

    if not bundles and bundle_dir is None:
        raise click.UsageError("give bundle files, --dir, or both")
    if bundle_dir is not None and not bundle_dir.is_dir():
        raise ConfigError(f"{bundle_dir} is not a directory")
    for b in bundles:
        if not b.is_file():
            raise ConfigError(f"bundle {b} does not exist")
    client = host_client(broker, "serve")
    server = BundleServer(client)
    catalog = BundleDirectory(server, list(bundles), bundle_dir)
    signalled: list[int] = []  # a signal handler takes no lock (see Agent.on_signal): the loop looks
    signals.signal(signals.SIGTERM, lambda number, _: signalled.append(number))
    signals.signal(signals.SIGINT, lambda number, _: signalled.append(number))
    err = console(stderr=True)
    for line in catalog.scan():
        err.print(line)
    server.start()
    err.print(f"answering chunk requests on {broker}; Ctrl-C to stop")
    last = scanned = time.monotonic()
    shown = (0, 0)
    try:
        while not signalled:
            time.sleep(0.25)  # (a signal's handler runs within it; the sleep then goes on, so keep it short)
            if signalled or time.monotonic() - scanned < 2.0:
                continue
            scanned = time.monotonic()
            for line in catalog.scan():
                err.print(line)
            s = server.stats
            if time.monotonic() - last >= stats_every and (s.requests, s.chunks_sent) != shown:
                err.print(f"{s.requests} requests from {len(s.devices)} device(s): {s.chunks_sent} chunks, "
                          f"{s.bytes_sent / 2**20:.1f} MiB sent; fan-out spared {s.fanout_saved} chunks")
                last, shown = time.monotonic(), (s.requests, s.chunks_sent)
    finally:
        server.stop()
        client.disconnect()


@main.command(help="Roll devices back to their previous committed version and follow each until done.")
@devices_option
@broker_option
@timeout_option(120.0, "Seconds to wait for every device.")
@signing_options
@json_option
@fail_cleanly
def rollback(devices, broker, timeout, signing_key, expires_in, as_json) -> None:
    results = roll_back(devices, broker, timeout, signing_key, expires_in, as_json)
    if not all(p.succeeded for p in results.values()):
        sys.exit(1)


def roll_back(devices, broker, timeout, signing_key, expires_in, as_json) -> dict:
    """Ask *devices* to go back to their previous committed version, follow them (an offline one
    named on stderr at once), and print each outcome; returns them (DeviceProgress by device)."""
    from host_tools.deploy import run_rollback

    signer = command_signer(signing_key, expires_in)
    client = host_client(broker, "rollback")
    answered: set[str] = set()
    try:
        with answers_counted("rollback", len(set(devices))) as counted:
            results = run_rollback(client, devices, signer=signer, timeout=timeout,
                                   on_update=_followed(answered, counted, timeout))
    finally:
        client.disconnect()
    if as_json:
        click.echo(json.dumps({d: vars(p) for d, p in results.items()}))
    else:
        for d, p in results.items():
            unanswered = p.state == "timed_out" and d not in answered  # the command waits in its session
            click.echo(f"{d}: {p.state}" + (f" ({p.reason})" if p.reason else "")
                       + (f"; {may_still_take(expires_in)}" if unanswered else ""))
    return results


def _followed(answered: set[str], counted, timeout: float):
    """What a rollback calls with each device's progress: it adds the devices that answered to
    *answered*, counts each outcome, and says once on stderr that a device is offline (the wait
    for it can take the whole *timeout*; one never seen is not waited for)."""
    from host_tools.connectivity import SHORT_NEVER_SEEN

    noted: set[str] = set()

    def on_update(p) -> None:
        if p.state != "pending":
            answered.add(p.device_id)
        if p.done:
            counted(p.device_id)
        elif p.state == "pending" and p.reason not in (None, SHORT_NEVER_SEEN) and p.device_id not in noted:
            noted.add(p.device_id)
            print(f"{p.device_id}: {p.reason}; waiting up to {timeout:g} s for it", file=sys.stderr)

    return on_update
