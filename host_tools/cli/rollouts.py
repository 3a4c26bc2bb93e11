"""Staged rollouts."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from device_agent.cli import FiniteRange, fail_cleanly
from device_agent.errors import ConfigError
from host_tools.cli.base import (
    broker_option, chunk_size_option, command_signer, db_option, host_client, json_option, main, signing_options,
    timeout_option,
)
from host_tools.terminal import console


# A rollout in one of these states goes on: `rollout resume` takes it, and `rollout rollback` does not.
GOES_ON = ("running", "paused", "pending")


@main.group(help="Staged rollouts: a bundle to a fleet in stages, halted when a stage goes badly.")
def rollout() -> None:
    pass


def _rollout_store(db: Path):
    from host_tools.fleet.store import FleetStore
    from host_tools.rollout import RolloutStore

    if not db.exists():
        raise ConfigError(f"no fleet database at {db}: run `edgefleet monitor` first (it is the device registry)")
    return RolloutStore(FleetStore(db))


def _print_rollout(doc: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(doc))
        return
    counts: dict[str, int] = {}
    for d in doc["devices"]:
        counts[d["state"]] = counts.get(d["state"], 0) + 1
    plan = doc["plan"]
    click.echo(f"rollout {doc['rollout_id']}: {doc['state']} (stage {doc['stage'] + 1} of {len(plan['stages'])}: "
               f"{', '.join(f'{s:g}%' for s in plan['stages'])}) of {Path(plan['bundle']).name}"
               + (f" — {doc['reason']}" if doc["reason"] else ""))
    click.echo("  " + (", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no device yet"))
    for d in doc["devices"]:
        click.echo(f"  {d['device_id']:<20} stage {d['stage'] + 1 if d['stage'] >= 0 else '-':<3} {d['state']:<17}"
                   + (f" {d['reason']}" if d["reason"] else ""))


class _Progress:
    """Devices per state as a stage goes: one line kept up to date on a terminal, else a line
    at most every few seconds (and whenever the stage changes)."""

    def __init__(self, err) -> None:
        self.err, self.last, self.stage = err, 0.0, None
        self.live = None
        if err.is_terminal:
            from rich.live import Live

            self.live = Live("", console=err, transient=True, refresh_per_second=4)
            self.live.start()

    def log(self, line: str) -> None:
        self.err.print(line, highlight=False)

    def update(self, stage: int, counts) -> None:
        line = f"  stage {stage + 1}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        if self.live is not None:
            self.live.update(line)
        elif stage != self.stage or time.monotonic() - self.last >= 5:
            self.err.print(line, highlight=False)
            self.last, self.stage = time.monotonic(), stage

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def _connect(broker, signing_key, expires_in, chunk_size):
    """The signer and the broker client for a rollout, before the rollout is touched: a bad key,
    a broker that is away or one that cannot pass its chunks changes nothing."""
    from host_tools.packet_limit import check_broker_passes_chunks

    signer = command_signer(signing_key, expires_in)
    client = host_client(broker, "rollout")
    try:
        check_broker_passes_chunks(client, chunk_size)
    except BaseException:
        client.disconnect()
        raise
    return signer, client


def _run_rollout(store, rollout_id, signer, client, as_json) -> None:
    from host_tools.rollout import Rollout

    shown = _Progress(console(stderr=True))
    try:
        doc = Rollout(store, rollout_id, client, signer, log=shown.log, progress=shown.update).run()
    except KeyboardInterrupt:  # Ctrl-C: nothing drives it now; say so in the store too, and what comes next
        shown.close()
        doc = store.get(rollout_id)
        stage = f"stage {doc['stage'] + 1}/{len(doc['plan']['stages'])}"
        if doc["state"] == "running":
            store.set_state(rollout_id, "paused", reason=f"interrupted (Ctrl-C) at {stage}")
        said = f"stopped driving rollout {rollout_id} at {stage}" + (
            " and paused it" if doc["state"] == "running" else f" ({doc['state']})")
        if doc["state"] in GOES_ON:
            said += (f": devices still downloading stall without its chunks; `edgefleet rollout resume {rollout_id}` "
                     f"sends them the bundle again and carries on, `edgefleet rollout abort {rollout_id}` ends it")
        click.echo(said, err=True)
        sys.exit(130)
    finally:
        shown.close()
        client.disconnect()
    _print_rollout(doc, as_json)
    if doc["state"] not in ("done", "paused"):
        sys.exit(1)


@rollout.command("start", help="Roll BUNDLE out to the devices selected (--group, --label or --device) in stages; "
                               "runs until the rollout is done, halted, paused or aborted.")
@click.argument("bundle_path", type=click.Path(path_type=Path))
@click.option("--group", help="Devices whose label group is GROUP.")
@click.option("--label", "selectors", multiple=True, metavar="NAME=VALUE", help="Devices with this label; repeatable.")
@click.option("--device", "devices", multiple=True, help="These devices; repeatable.")
@click.option("--stages", default="10,50,100", show_default=True, help="Cumulative percentages of the devices.")
@click.option("--window", default=60.0, show_default=True, type=FiniteRange(0),
              help="Seconds to watch a stage before the next.")
@click.option("--stage-timeout", default=300.0, show_default=True, type=FiniteRange(1),
              help="Seconds a stage waits for its devices' outcomes; later ones are reported pending.")
@click.option("--max-failure-rate", default=0.1, show_default=True, type=FiniteRange(0, 1),
              help="Halt when more than this share of a stage fails or rolls back.")
@click.option("--max-p99-ratio", default=1.5, show_default=True, type=FiniteRange(1),
              help="Halt when the stage's p99 latency is more than this times the previous version's.")
@click.option("--max-error-rate", default=0.02, show_default=True, type=FiniteRange(0, 1),
              help="Halt when the share of inference calls that fail on the new version exceeds the previous "
                   "version's by more than this.")
@click.option("--rollback-on-halt", is_flag=True, help="When halting, roll back the devices already updated.")
@click.option("--pending-timeout", default=600.0, show_default=True, type=FiniteRange(0),
              help="After the last stage, seconds to wait for devices that were offline in theirs.")
@click.option("--max-in-flight", type=click.IntRange(1), help="At most this many devices updating at once "
              "(a stage goes in waves) [default: a whole stage at once].")
@chunk_size_option
@db_option
@broker_option
@signing_options
@json_option
@fail_cleanly
def rollout_start(bundle_path, group, selectors, devices, stages, window, stage_timeout, max_failure_rate,
                  max_p99_ratio, max_error_rate, rollback_on_halt, pending_timeout, max_in_flight, chunk_size,
                  db, broker, signing_key, expires_in, as_json) -> None:
    from device_agent.bundle import BundleReader
    from host_tools.rollout import RolloutPlan

    with BundleReader(bundle_path):  # one clear line if it is not a bundle
        pass
    if not (group or selectors or devices):
        raise click.UsageError("say which devices: --group, --label or --device")
    try:
        percents = [float(x) for x in stages.split(",")]
    except ValueError:
        raise click.UsageError(f"--stages takes percentages like 10,50,100, not {stages!r}") from None
    plan = RolloutPlan(bundle=str(bundle_path.resolve()), selectors=list(selectors) + ([f"group={group}"] if group else []),
                       stages=percents, window_s=window, stage_timeout_s=stage_timeout,
                       max_failure_rate=max_failure_rate, max_p99_ratio=max_p99_ratio, max_error_rate=max_error_rate,
                       rollback_on_halt=rollback_on_halt, pending_timeout_s=pending_timeout,
                       max_in_flight=max_in_flight, chunk_size=chunk_size, devices=list(devices))
    store = _rollout_store(db)
    signer, client = _connect(broker, signing_key, expires_in, chunk_size)
    rollout_id = store.create(plan)
    console(stderr=True).print(f"rollout {rollout_id} started")
    _run_rollout(store, rollout_id, signer, client, as_json)


@rollout.command("resume", help="Carry on with ROLLOUT_ID (paused, interrupted by a host restart, or waiting "
                                "for devices that were offline: they are sent the bundle again).")
@click.argument("rollout_id")
@click.option("--pending-timeout", type=FiniteRange(0),
              help="Change how long the last stage waits for devices that were offline [default: as started].")
@db_option
@broker_option
@signing_options
@json_option
@fail_cleanly
def rollout_resume(rollout_id, pending_timeout, db, broker, signing_key, expires_in, as_json) -> None:
    from host_tools.rollout import RolloutPlan

    store = _rollout_store(db)
    doc = store.get(rollout_id)
    if doc["state"] not in GOES_ON:
        raise ConfigError(f"rollout {rollout_id} is {doc['state']}; only a running, paused or pending one resumes")
    plan = RolloutPlan(**doc["plan"])
    signer, client = _connect(broker, signing_key, expires_in, plan.chunk_size)
    if pending_timeout is not None:
        store.set_plan(rollout_id, replace(plan, pending_timeout_s=pending_timeout))
    store.set_state(rollout_id, "running")
    _run_rollout(store, rollout_id, signer, client, as_json)


@rollout.command("status", help="Where ROLLOUT_ID is: its stage, and each device's outcome and reason.")
@click.argument("rollout_id")
@db_option
@json_option
@fail_cleanly
def rollout_status(rollout_id, db, as_json) -> None:
    _print_rollout(_rollout_store(db).get(rollout_id), as_json)


@rollout.command("list", help="Every rollout, newest last.")
@db_option
@json_option
@fail_cleanly
def rollout_list(db, as_json) -> None:
    docs = _rollout_store(db).all()
    if as_json:
        click.echo(json.dumps(docs))
        return
    for doc in docs:
        click.echo(f"{doc['rollout_id']}  {doc['state']:<8} stage {doc['stage'] + 1}/{len(doc['plan']['stages'])}  "
                   f"{Path(doc['plan']['bundle']).name}  {len(doc['devices'])} device(s)")


@rollout.command("pause", help="Stop ROLLOUT_ID before its next stage (`rollout resume` carries on).")
@click.argument("rollout_id")
@db_option
@fail_cleanly
def rollout_pause(rollout_id, db) -> None:
    store = _rollout_store(db)
    state = store.get(rollout_id)["state"]
    if state != "running":
        raise ConfigError(f"rollout {rollout_id} is {state}, not running")
    store.set_state(rollout_id, "paused", reason="paused by the operator")
    click.echo(f"rollout {rollout_id} paused")


@rollout.command("abort", help="Stop ROLLOUT_ID for good; devices already updated stay as they are.")
@click.argument("rollout_id")
@db_option
@fail_cleanly
def rollout_abort(rollout_id, db) -> None:
    store = _rollout_store(db)
    store.get(rollout_id)  # one clear line if there is no such rollout
    store.set_state(rollout_id, "aborted", reason="aborted by the operator")
    click.echo(f"rollout {rollout_id} aborted")


@rollout.command("rollback", help="Take the devices ROLLOUT_ID updated back to their previous version (a halted, "
                                  "aborted or finished rollout), and follow each until done.")
@click.argument("rollout_id")
@timeout_option(120.0, "Seconds to wait for every device.")
@db_option
@broker_option
@signing_options
@json_option
@fail_cleanly
def rollout_rollback(rollout_id, timeout, db, broker, signing_key, expires_in, as_json) -> None:
    from host_tools.cli.delivery import roll_back

    store = _rollout_store(db)
    state = store.get(rollout_id)["state"]
    if state in GOES_ON:  # it would send the bundle again
        raise ConfigError(f"rollout {rollout_id} is {state}; `edgefleet rollout abort {rollout_id}` first")
    updated = store.updated(rollout_id)
    if not updated:
        click.echo(f"no device of rollout {rollout_id} is on its version: nothing to roll back", err=True)
        return
    results = roll_back(list(updated), broker, timeout, signing_key, expires_in, as_json)
    store.rolled_back(rollout_id, updated, results, "by the operator")
    if not all(p.succeeded for p in results.values()):
        sys.exit(1)
