"""The fleet as the ingest records it: status, watch, the monitor and the dashboard."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import click

from device_agent.cli import FiniteRange, fail_cleanly
from device_agent.errors import ConfigError
from host_tools.cli.base import broker_option, db_option, json_option, main, named_client
from host_tools.terminal import console


@main.group(help="The fleet as the ingest (`edgefleet monitor`) recorded it.")
def fleet() -> None:
    pass


label_filter = click.option("--label", "selectors", multiple=True, metavar="NAME=VALUE",
                            help="Only devices with this label (as their agent config sets it); repeatable.")
group_filter = click.option("--group", help="Only devices whose label group is GROUP (--label group=GROUP).")


def fleet_rows(db: Path, selectors, group):
    from host_tools.fleet.store import FleetStore
    from host_tools.fleet.view import matching

    if not db.exists():
        raise ConfigError(f"no fleet database at {db}: run `edgefleet monitor` first")
    store = FleetStore(db)
    try:
        rows = store.devices()
    finally:
        store.close()
    try:
        return matching(rows, list(selectors) + ([f"group={group}"] if group else []))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@fleet.command("status", help="One row per device: state, bundle, latency, throughput, memory, CPU, "
                              "temperature, power.")
@db_option
@label_filter
@group_filter
@json_option
@fail_cleanly
def fleet_status(db, selectors, group, as_json) -> None:
    from host_tools.fleet.view import fleet_table, summarize

    rows = fleet_rows(db, selectors, group)
    if as_json:
        click.echo(json.dumps([summarize(r) for r in rows]))
    else:
        console().print(fleet_table(rows))


@fleet.command("watch", help="The fleet status table, live: redrawn every --every seconds until Ctrl-C.")
@db_option
@label_filter
@group_filter
@click.option("--every", default=2.0, show_default=True, type=FiniteRange(0.2))
@click.option("--count", type=click.IntRange(1), help="Stop after this many redraws (for scripts and tests).")
@fail_cleanly
def fleet_watch(db, selectors, group, every, count) -> None:
    from rich.live import Live

    from host_tools.fleet.view import fleet_table

    drawn = 0
    out = console()
    with Live(fleet_table(fleet_rows(db, selectors, group)), console=out, auto_refresh=False) as live:
        try:
            while count is None or drawn < count:
                live.update(fleet_table(fleet_rows(db, selectors, group)), refresh=True)
                drawn += 1
                if count is None or drawn < count:
                    time.sleep(every)
        except KeyboardInterrupt:
            pass


@main.command(help="A local web page of the fleet: per-device plots of latency, memory, power and temperature, "
                   "rollout marks, current versions. Reads the database `edgefleet monitor` writes.")
@db_option
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--address", default="127.0.0.1", show_default=True, help="Listen here (0.0.0.0: every interface).")
@fail_cleanly
def dashboard(db, port, address) -> None:
    import signal as signals

    from host_tools.fleet.dashboard import Dashboard
    from host_tools.fleet.store import FleetStore

    if not db.exists():
        raise ConfigError(f"no fleet database at {db}: run `edgefleet monitor` first")
    store = FleetStore(db)
    try:
        page = Dashboard(store, port, address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}:{port}: {exc.strerror}") from None
    signals.signal(signals.SIGTERM, lambda *_: sys.exit(0))
    click.echo(f"dashboard on {page.url}; Ctrl-C to stop", err=True)
    try:
        page.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        page.server.server_close()
        store.close()


@main.command(help="Run the ingest: store every device's status, telemetry and events in the fleet database.")
@broker_option
@db_option
@click.option("--name", default="default", show_default=True,
              help="This monitor's name: its MQTT session, kept while it is away. Give each monitor its own.")
@click.option("--share", metavar="GROUP", help="Split telemetry and events with the other monitors of GROUP "
              "(MQTT shared subscription): how ingest scales past one process.")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="Also serve the fleet as Prometheus metrics on http://ADDRESS:PORT/metrics.")
@click.option("--metrics-address", default="0.0.0.0", show_default=True)
@click.option("--keep-days", default=7.0, show_default=True, type=FiniteRange(0, min_open=True),
              help="Keep every sample this long; older ones are folded into hourly summaries.")
@click.option("--keep-hourly-days", default=90.0, show_default=True, type=FiniteRange(0, min_open=True),
              help="Keep hourly summaries this long.")
@fail_cleanly
def monitor(broker, db, name, share, metrics_port, metrics_address, keep_days, keep_hourly_days) -> None:
    import signal as signals
    import sqlite3

    from device_agent.presence import describe
    from device_agent.protocol import topics
    from host_tools.fleet.ingest import Ingest
    from host_tools.fleet.store import FleetStore

    for what, value in (("--name", name), ("--share", share)):
        if value is not None and not topics.valid_device_id(value):
            raise click.UsageError(f"{what} takes 1-64 letters, digits, '.', '_' or '-', not {value!r}")
    signals.signal(signals.SIGTERM, lambda *_: sys.exit(0))  # systemd's stop: close the database cleanly
    # A persistent session: what devices report while the monitor restarts waits at the broker.
    displaced: list[dict] = []
    stop = threading.Event()
    store = FleetStore(db)
    # (the session's id is kept beside the database, with which it belongs)
    # Held acknowledgements: what cannot be stored yet (a full disk) stays the broker's to send again.
    client, presence = named_client(broker, "monitor", name, db.with_name(f"{db.name}.monitor-{name}"),
                                    lambda holder: (displaced.append(holder), stop.set()), held_acks=True)
    ingest = Ingest(client, store, share=share)
    ingest.start()
    if metrics_port is not None:
        from host_tools.fleet.metrics import serve_metrics

        try:
            serve_metrics(store, metrics_port, metrics_address)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {metrics_address}:{metrics_port}: {exc.strerror}") from None
        click.echo(f"Prometheus metrics on http://{metrics_address}:{metrics_port}/metrics", err=True)
    click.echo(f"ingesting from {broker} into {db}" + (f" (sharing the load in group {share!r})" if share else "")
               + "; Ctrl-C to stop", err=True)
    try:
        while True:  # retention: now, then every ten minutes
            try:
                folded, dropped = store.retain(time.time(), raw_days=keep_days, hourly_days=keep_hourly_days)
            except sqlite3.Error as exc:  # a full disk: ingest goes on as it can; try again next time
                click.echo(f"retention: cannot change the database now ({exc})", err=True)
                folded = dropped = 0
            if folded or dropped:
                click.echo(f"retention: {folded} samples folded into hourly summaries, {dropped} old hours dropped",
                           err=True)
            if stop.wait(600):
                raise ConfigError(f"a monitor named {name!r} that started earlier ({describe(displaced[0])}) "
                                  f"connected while this one was away; this one stops: give each its own --name")
    except KeyboardInterrupt:
        pass
    finally:
        if not displaced:
            presence.release()
        client.disconnect()
        store.close()
        click.echo(f"stored {ingest.samples} new telemetry samples", err=True)
