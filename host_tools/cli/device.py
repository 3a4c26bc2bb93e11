"""Asking one device directly: status, config, bench."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

from device_agent.cli import fail_cleanly
from device_agent.telemetry.disk import room_text, valid_room
from host_tools.cli.base import (
    broker_option, chunk_size_option, host_client, json_option, main, may_still_take, signed_request,
    signing_options, timeout_option,
)
from host_tools.terminal import console


@main.group(help="Ask one device directly, over MQTT.")
def device() -> None:
    pass


@device.command("status", help="The device's own account: active bundle, kept versions, update under way.")
@click.argument("device_id")
@broker_option
@timeout_option(10.0, "Seconds to wait for the answer.")
@json_option
@fail_cleanly
def device_status(device_id, broker, timeout, as_json) -> None:
    from host_tools.ask import device_status as ask_status

    client = host_client(broker, "status")
    try:
        reply = ask_status(client, device_id, timeout)
    finally:
        client.disconnect()
    doc = reply.body
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(f"device:        {doc['device_id']} (agent {doc['agent_version']})")
    click.echo(f"active bundle: {doc['active_bundle'] or 'none'}")
    click.echo(f"kept versions: {', '.join(doc['committed']) or 'none'}")
    if disk := valid_room(doc.get("disk")):  # (agents before it do not say)
        click.echo(f"disk:          {room_text(disk)}")
    if cert := doc.get("certificate"):  # (with a client certificate, from agents that say)
        from device_agent.client_cert import certificate_text

        click.echo(f"certificate:   {certificate_text(cert)}")
    click.echo(f"update:        {doc['update_state']}" + (f" ({doc['update']['kind']} {doc['update']['bundle']})"
                                                           if doc.get("update") else ""))


@device.command("config", help="Show or change a device's settings over MQTT (signed): --set NAME=VALUE, "
                                "--reset NAME (back to its config file's value). Changes apply at once and "
                                "survive restarts.")
@click.argument("device_id")
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE", help="Repeatable.")
@click.option("--reset", "resets", multiple=True, metavar="NAME", help="Repeatable.")
@broker_option
@timeout_option(10.0, "Seconds to wait for the answer.")
@signing_options
@json_option
@fail_cleanly
def device_config(device_id, assignments, resets, broker, timeout, signing_key, expires_in, as_json) -> None:
    from device_agent.protocol.commands import ConfigCommand
    from host_tools.ask import NoAnswer, ask

    settings: dict = {name: None for name in resets}
    for item in assignments:
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise click.UsageError(f"--set takes NAME=NUMBER, not {item!r}")
        settings[name.strip() or "?"] = number
    try:  # (only showing them is a question: an offline device is said to be at once)
        body = signed_request(broker, "config", signing_key, expires_in, f"{device_id} refused",
                              lambda client, signer: ask(client, device_id,
                                                         lambda cid: ConfigCommand(cid, time.time(), settings),
                                                         timeout, signer, wait_if_offline=bool(settings)))
    except NoAnswer as exc:
        if settings and exc.queued:  # the change waits in the device's session until it expires
            raise NoAnswer(f"{exc}; {may_still_take(expires_in)}") from None
        raise
    if as_json:
        click.echo(json.dumps(body))
        return
    changed = set(body["changed_remotely"])
    for name, value in body["settings"].items():
        click.echo(f"{name:<24} {value:<10g} {'(set remotely)' if name in changed else ''}".rstrip())


@main.command(help="Benchmark BUNDLE on a device (like TFLite's benchmark_model): load time, first "
                   "inference, warm latency p50/p90/p99, peak memory.")
@click.argument("bundle_path", type=click.Path(path_type=Path))
@click.option("--device", "device_id", required=True, help="The device to run it on.")
@broker_option
@click.option("--runs", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0, 100_000))
@timeout_option(300.0, "Seconds to wait for the result.")
@chunk_size_option
@signing_options
@json_option
@fail_cleanly
def bench(bundle_path, device_id, broker, runs, warmup, timeout, chunk_size, signing_key, expires_in, as_json) -> None:
    from device_agent.bundle import BundleReader
    from host_tools.ask import bench_bundle
    from host_tools.packet_limit import check_broker_passes_chunks

    with BundleReader(bundle_path):  # one clear line if it is not a bundle, before anything is sent
        pass

    def send(client, signer):  # (the signing key and the broker are there: a mistake in either is one line)
        check_broker_passes_chunks(client, chunk_size)
        if not as_json:
            console(stderr=True).print(f"benchmarking {bundle_path.name} on {device_id} "
                                       f"({warmup} warm-up + {runs} runs)...")
        return bench_bundle(client, device_id, bundle_path, runs=runs, warmup=warmup, timeout=timeout, signer=signer,
                            chunk_size=chunk_size)

    r = signed_request(broker, "bench", signing_key, expires_in, f"{device_id} could not benchmark the bundle", send)
    if as_json:
        click.echo(json.dumps(r))
        return
    from rich.table import Table

    from device_agent.bench import TIMINGS, duration

    table = Table()  # (its title a line of its own: a table's title wraps at the table's narrow width)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for label, key in TIMINGS:
        table.add_row(label, duration(r[key]))
    table.add_row("peak RSS (agent process)", f"{r['peak_rss_bytes'] / 2**20:.1f} MiB")
    table.add_row("RSS after load and runs", f"{r['rss_after_runs_bytes'] / 2**20:.1f} MiB")
    click.echo(f"{r['bundle']} on {device_id} ({r['runtime']}, {r['runs']} runs after {r['warmup']} warm-up)")
    console().print(table)
