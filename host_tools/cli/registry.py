"""The device registry."""

from __future__ import annotations

import json
import time

import click

from device_agent.cli import fail_cleanly
from device_agent.errors import ConfigError, MqttError
from device_agent.protocol import topics
from device_agent.telemetry.disk import room_text, valid_room
from host_tools.cli.base import broker_option, db_option, host_client, json_option, main
from host_tools.cli.fleet import fleet_rows, group_filter, label_filter
from host_tools.terminal import console


@main.group(help="The device registry: what each device is (reported by its agent at connect) and its labels.")
def devices() -> None:
    pass


@devices.command("list", help="One row per device: hardware class, arch, RAM, runtimes, accelerators, labels.")
@db_option
@label_filter
@group_filter
@json_option
@fail_cleanly
def devices_list(db, selectors, group, as_json) -> None:
    from host_tools.fleet.store import FleetStore

    rows = fleet_rows(db, selectors, group)
    store = FleetStore(db)
    try:
        updating = store.in_flight()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([{"device_id": r.device_id, "online": r.online, "hardware": r.hardware,
                                "labels": r.labels, "active_bundle": r.active_bundle,
                                "in_flight": updating.get(r.device_id), "last_seen": r.last_seen or None,
                                "id_shared_with": r.id_shared_with, "certificate": r.certificate}
                               for r in rows]))
        return
    from rich import box
    from rich.table import Table

    rows_shown = []
    for r in rows:
        hw = r.hardware or {}
        u = updating.get(r.device_id)
        rows_shown.append({
            "device": r.device_id,
            "state": ("online" if r.online else "offline") + (", id shared!" if r.id_shared_with else "")
            + _certificate_alarm(r.certificate),
            "bundle": r.active_bundle or "none", "updating": f"{u['bundle']}: {u['state']}" if u else "",
            "class": hw.get("class", "?"), "arch": hw.get("arch", "?"), "RAM MiB": str(hw.get("ram_mb", "?")),
            "runtimes": ", ".join(hw.get("runtimes", [])) or "?",
            "accelerators": ", ".join(hw.get("accelerators", [])) or "none",
            "labels": ", ".join(f"{k}={v}" for k, v in sorted(r.labels.items()))})
    # What is read first comes first, and is never cut: the state (its alarms too), then the bundle. The
    # other columns wrap, a word longer than its column folded, rather than end in "…" ("onnxruntim…").
    headers = ["device", "state", "bundle", "updating", "class", "arch", "RAM MiB", "runtimes", "accelerators",
               "labels"]
    if not updating:
        headers.remove("updating")  # (a column of blanks)
    table = Table(title="devices", header_style="bold", box=box.SIMPLE_HEAD)  # (no rules between columns: room)
    for header in headers:
        if header in ("device", "state"):
            table.add_column(header, no_wrap=True)
        else:
            table.add_column(header, overflow="fold")
    for row in rows_shown:
        table.add_row(*(row[h] for h in headers))
    console().print(table)


def _certificate_alarm(certificate: dict[str, str] | None) -> str:
    """What `devices list` says of a client certificate, or the CA it is signed under, about to
    expire (nothing otherwise)."""
    from device_agent.client_cert import RENEW_WITHIN_DAYS, days_left

    said = ""
    for which, what in (("expires", "certificate"), ("ca_expires", "CA")):
        left = days_left(certificate, which) if certificate else None
        if left is not None and left < RENEW_WITHIN_DAYS:
            said += f", {what} expired!" if left <= 0 else f", {what}: {int(left)} days left!"
    return said


CLOCK_TOLERANCE = 60.0  # seconds a device's clock may differ from the host's before `show` says so


def _span(seconds: float) -> str:
    s = int(seconds)
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h {s % 3600 // 60} min" \
        if s < 172800 else f"{s // 86400} days"


@devices.command("show", help="Everything the registry knows about DEVICE_ID, and its recent deployments.")
@click.argument("device_id")
@db_option
@json_option
@fail_cleanly
def devices_show(device_id, db, as_json) -> None:
    from host_tools.fleet.store import FleetStore

    rows = [r for r in fleet_rows(db, (), None) if r.device_id == device_id]
    if not rows:
        raise ConfigError(f"no device {device_id!r} in the registry at {db}")
    store = FleetStore(db)
    try:
        events = store.events(device_id, states=("accepted", "active", "failed", "rolled_back", "already_installed"))
        updating = store.in_flight().get(device_id)
    finally:
        store.close()
    r = rows[0]
    disk = valid_room((r.telemetry or {}).get("disk"))  # None: not sent (an older agent, no telemetry yet)
    doc = {"device_id": r.device_id, "online": r.online, "since": r.since, "agent_version": r.agent_version,
           "hardware": r.hardware, "labels": r.labels, "active_bundle": r.active_bundle, "in_flight": updating,
           "last_seen": r.last_seen, "id_shared_with": r.id_shared_with, "clock_lag_s": r.clock_lag,
           "disk": disk, "certificate": r.certificate, "deployments": events[-10:]}
    if as_json:
        click.echo(json.dumps(doc))
        return
    hw = r.hardware or {}
    click.echo(f"device:     {r.device_id} ({'online' if r.online else 'offline'}, agent {r.agent_version or '?'})")
    click.echo(f"hardware:   {hw.get('class', '?')} ({hw.get('model') or 'model not reported'}), "
               f"{hw.get('arch', '?')}, {hw.get('ram_mb', '?')} MiB RAM")
    click.echo(f"runtimes:   {', '.join(hw.get('runtimes', [])) or '?'}; accelerators: "
               f"{', '.join(hw.get('accelerators', [])) or 'none'}")
    click.echo(f"labels:     {', '.join(f'{k}={v}' for k, v in sorted(r.labels.items())) or 'none'}")
    if disk is not None:
        click.echo(f"disk:       {room_text(disk)}")
    if r.certificate:
        from device_agent.client_cert import certificate_text

        click.echo(f"certificate: {certificate_text(r.certificate)}")
    if r.clock_lag is not None and abs(r.clock_lag) > CLOCK_TOLERANCE:
        click.echo(f"clock:      about {_span(abs(r.clock_lag))} {'behind' if r.clock_lag > 0 else 'ahead of'} this "
                   f"host's (its telemetry carries its own times: no RTC and no network time?)")
    for other in r.id_shared_with or ():
        click.echo(f"ID SHARED:  another agent uses this device id: host {other['host']}, pid {other['pid']} "
                   f"({'turned away' if other['how'] == 'asked' else 'stepped back'} "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(other['seen']))}); give it its own id")
    click.echo(f"bundle:     {r.active_bundle or 'none'}"
               + (f"; updating to {updating['bundle']}: {updating['state']} ({updating['progress']:.0%})"
                  if updating else ""))
    for e in events[-10:]:
        click.echo(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['timestamp']))}  {e['state']:<17} "
                   f"{e['bundle']}" + (f"  ({e['reason']})" if e["reason"] else ""))


@devices.command("label", help="Set labels on DEVICE_ID in the registry (NAME=VALUE), or remove them (NAME=). "
                               "They win over the labels the device reports and are used by --label/--group.")
@click.argument("device_id")
@click.argument("assignments", nargs=-1, required=True)
@db_option
@fail_cleanly
def devices_label(device_id, assignments, db) -> None:
    from host_tools.fleet.store import FleetStore

    changes: dict[str, str | None] = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.UsageError(f"a label is NAME=VALUE (or NAME= to remove it), not {item!r}")
        changes[name.strip()] = value.strip() or None
    if not db.exists():
        raise ConfigError(f"no fleet database at {db}: run `edgefleet monitor` first")
    store = FleetStore(db)
    try:
        store.set_labels(device_id, changes)
    finally:
        store.close()
    click.echo(", ".join(f"{k}={v}" if v is not None else f"{k} removed" for k, v in changes.items()))


@devices.command("forget", help="Decommission DEVICE_IDS: clear what the broker keeps for them (their retained "
                                "status and presence claim), so a monitor started later does not bring them back, "
                                "and delete them from the registry with their labels, telemetry and deployment "
                                "history. Online devices are refused: an agent that connects reports itself again, "
                                "so stop it first (`edgefleet-agent uninstall` on the device) or revoke its "
                                "certificate (`edgefleet certs revoke`).")
@click.argument("device_ids", nargs=-1, required=True)
@db_option
@broker_option
@click.option("--registry-only", is_flag=True,
              help="Leave the broker alone (it is gone, or another one now): a retained status it still holds "
                   "brings the device back when a monitor subscribes.")
@click.option("--yes", is_flag=True, help="Do not ask before deleting.")
@fail_cleanly
def devices_forget(device_ids, db, broker, registry_only, yes) -> None:
    from host_tools.fleet.store import FleetStore

    device_ids = list(dict.fromkeys(device_ids))
    known = {r.device_id: r for r in fleet_rows(db, (), None)}
    if unknown := [d for d in device_ids if d not in known]:
        raise ConfigError(f"not in the registry at {db}: {', '.join(unknown)} (nothing was forgotten)")
    try:
        client = None if registry_only else host_client(broker, "forget")
    except MqttError as exc:
        raise MqttError(f"{exc} (nothing was forgotten; --registry-only forgets without the broker)") from None
    try:
        online = _online(client, device_ids) if client else [d for d in device_ids if known[d].online]
        if online:
            raise ConfigError(f"online: {', '.join(online)} (a running agent reports itself again at once): stop "
                              f"it first (`edgefleet-agent uninstall` on the device) or revoke its certificate "
                              f"(`edgefleet certs revoke`); nothing was forgotten")
        if not yes:
            click.confirm(f"Forget {', '.join(device_ids)}: delete {'its' if len(device_ids) == 1 else 'their'} "
                          f"telemetry and deployment history from {db}?", abort=True, err=True)
        if client:
            for device in device_ids:  # an empty retained message deletes the retained one
                for topic in (topics.status(device), topics.presence(device)):
                    client.publish(topic, b"", qos=1, retain=True, wait=5.0)
    finally:
        if client:
            client.disconnect()
    store = FleetStore(db)
    try:
        for device in device_ids:
            gone = store.forget(device)
            click.echo(f"forgot {device}: {gone['samples']} telemetry samples ({gone['hours']} hourly summaries), "
                       f"{gone['events']} deployment events, {gone['labels']} labels"
                       + ("" if registry_only else "; the broker's retained status is cleared"))
    finally:
        store.close()


def _online(client, device_ids: list[str]) -> list[str]:
    """Those of *device_ids* whose retained status on the broker says online (the broker's word,
    fresher than the registry's)."""
    from host_tools.connectivity import Connectivity

    watch = Connectivity(client, device_ids)
    watch.watch()
    try:
        for device in device_ids:
            watch.wait_known(device)
        return [d for d in device_ids if (status := watch.last_status(d)) is not None and status.online]
    finally:
        watch.close()
