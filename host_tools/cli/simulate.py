"""A simulated fleet of real agents, for trying rollouts."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path

import click

from device_agent.cli import FiniteRange, fail_cleanly
from device_agent.errors import ConfigError
from host_tools.cli.base import DEFAULT_HOME, broker_option, host_client, main
from host_tools.terminal import console

# Each device holds about 7 files (its MQTT socket and paho's wake-up pair, its SQLite queue with
# WAL); paho waits on them with select(), which cannot watch a file numbered 1,024 or more.
MAX_PER_WORKER = 125


@main.command(help="Run N simulated devices: real agents (own MQTT session, state directory, update "
                   "lifecycle and telemetry) sharing one loaded model per process, some told to fail. "
                   "Runs until Ctrl-C (or --duration).")
@click.option("--devices", "count", default=100, show_default=True, type=click.IntRange(1, 10_000))
@broker_option
@click.option("--trusted-key", "--trusted", "trusted", multiple=True, type=click.Path(path_type=Path),
              default=[DEFAULT_HOME / "keys" / "release.pub"], show_default=True,
              help="Public key the devices trust, as edgefleet-agent's --trusted-key; repeatable.")
@click.option("--bundle", type=click.Path(path_type=Path),
              help="Install and commit this bundle on every device first (a fleet already running it).")
@click.option("--state-dir", type=click.Path(path_type=Path),
              help="Keep the devices' state here, across runs [default: a temporary directory, removed].")
@click.option("--prefix", default="sim", show_default=True, help="Device ids are PREFIX-0000, PREFIX-0001, ...")
@click.option("--group", default="sim", show_default=True, help="The devices' group label.")
@click.option("--label", "labels", multiple=True, metavar="NAME=VALUE", help="Another label; repeatable.")
@click.option("--reject", default=0.0, type=FiniteRange(0, 1), help="Share of devices whose health check "
              "refuses every new model.")
@click.option("--slow", default=0.0, type=FiniteRange(0, 1), help="Share of devices that run models slower.")
@click.option("--slow-factor", default=5.0, show_default=True, type=FiniteRange(1), help="How much slower.")
@click.option("--errors", default=0.0, type=FiniteRange(0, 1), help="Share of devices on which every fifth "
              "inference of a new model fails.")
@click.option("--offline", default=0.0, type=FiniteRange(0, 1), help="Share of devices that drop off the "
              "network when their first deploy arrives.")
@click.option("--offline-for", default=30.0, show_default=True, type=FiniteRange(0),
              help="Seconds until those come back and carry the deploy out.")
@click.option("--telemetry-interval", default=5.0, show_default=True, type=FiniteRange(0.1))
@click.option("--inference-interval", default=0.5, show_default=True, type=FiniteRange(0),
              help="Seconds between each device's runs of its model on the sample input (0: none).")
@click.option("--trial-seconds", default=1.0, show_default=True, type=FiniteRange(0))
@click.option("--per-worker", default=100, show_default=True, type=click.IntRange(1, MAX_PER_WORKER),
              help="Devices per worker process.")
@click.option("--duration", type=FiniteRange(0), help="Stop after this many seconds [default: run until Ctrl-C].")
@fail_cleanly
def simulate(count, broker, trusted, bundle, state_dir, prefix, group, labels, reject, slow, slow_factor, errors, offline,
             offline_for, telemetry_interval, inference_interval, trial_seconds, per_worker, duration) -> None:
    from device_agent.bundle import BundleReader
    from device_agent.bundle.signing import trusted_keys
    from device_agent.protocol import topics
    from host_tools.simulate import FAULTS, Faults, FleetSpec, SimulatedFleet, summarize

    extra = {}
    for label in labels:
        name, sep, value = label.partition("=")
        if not sep or not name:
            raise click.UsageError(f"a label is NAME=VALUE, not {label!r}")
        extra[name] = value
    trusted_keys(tuple(trusted))  # one line for a missing or bad key file
    if bundle is not None:
        with BundleReader(bundle):  # one line if it is not a bundle
            pass
    if not topics.valid_device_id(f"{prefix}-{count - 1:04d}"):
        raise click.UsageError(f"--prefix {prefix!r} does not make valid device ids")
    host_client(broker, "simulate").disconnect()  # one line if the broker is not there
    faults = Faults(reject=reject, slow=slow, slow_factor=slow_factor, offline=offline, offline_for=offline_for,
                    errors=errors)
    temporary = state_dir is None
    root = Path(tempfile.mkdtemp(prefix="edgefleet-sim-")) if temporary else state_dir.resolve()
    spec = FleetSpec(broker=broker, trusted=[str(Path(k).resolve()) for k in trusted], state_root=str(root), first=0,
                     count=count, total=count, prefix=prefix, labels={**extra, "group": group},
                     bundle=str(bundle.resolve()) if bundle else None, faults=faults,
                     telemetry_interval=telemetry_interval, inference_interval=inference_interval,
                     trial_seconds=trial_seconds)
    err = console(stderr=True)
    fleet = SimulatedFleet(spec, per_worker)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    err.print(f"simulating {count} devices ({spec.device_id(0)} to {spec.device_id(count - 1)}, group {group}) "
              f"on {broker} in {-(-count // per_worker)} process(es); state in {root}"
              + "".join(f"; {getattr(faults, f):.0%} {f}" for f in FAULTS if getattr(faults, f)))
    fleet.start()
    started, last = time.monotonic(), ""
    try:
        while not stopping and (duration is None or time.monotonic() - started < duration):
            time.sleep(1.0)
            failure = fleet.failure()
            if failure:
                raise ConfigError(failure)
            line = summarize(fleet.devices()) if fleet.devices() else "starting"
            if line != last:  # a line when something changed, not one a second
                err.print(f"[{time.monotonic() - started:6.0f}s] {line}", highlight=False)
                last = line
    except KeyboardInterrupt:
        pass
    finally:
        err.print("stopping the simulated devices")
        fleet.stop()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
