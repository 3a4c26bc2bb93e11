"""``edgefleet-agent``: the device-side command line."""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from pathlib import Path

import click

from device_agent import __version__
from device_agent.errors import EdgefleetError


def fail_cleanly(fn):
    """Turn any edgefleet error into one line on stderr and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgefleetError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
    return wrapper


@click.group(help="The edgefleet device agent: verifies, activates and runs model bundles "
                  "pushed over MQTT, and reports telemetry.")
@click.version_option(__version__, prog_name="edgefleet-agent")
def main() -> None:
    pass


@main.command(help="Run the agent in the foreground until SIGTERM or Ctrl-C.")
@click.option("--device-id", envvar="EDGEFLEET_DEVICE_ID", required=True, help="This device's id in the fleet.")
@click.option("--state-dir", envvar="EDGEFLEET_STATE_DIR", type=click.Path(path_type=Path), required=True,
              help="Where bundles and agent state live.")
@click.option("--broker", envvar="EDGEFLEET_BROKER", default="127.0.0.1:1883", show_default=True,
              help="MQTT broker as HOST:PORT.")
@click.option("--trusted-key", "trusted", envvar="EDGEFLEET_TRUSTED_KEYS", multiple=True, required=True,
              type=click.Path(path_type=Path), help="Public key (PEM) whose bundles this device accepts; repeatable.")
@click.option("--telemetry-interval", default=5.0, show_default=True, help="Seconds between telemetry samples.")
@click.option("--inference-interval", default=0.05, show_default=True,
              help="Seconds between runs of the active model on its sample input (0 = as fast as possible).")
@click.option("--threads", type=int, default=None, help="Runtime threads (default: the runtime's choice).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@fail_cleanly
def run(device_id, state_dir, broker, trusted, telemetry_interval, inference_interval, threads, log_level) -> None:
    from device_agent.agent import Agent
    from device_agent.config import AgentConfig
    from device_agent.mqtt import BrokerAddress

    # journald adds its own timestamps; keep lines short and greppable
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    config = AgentConfig(device_id=device_id, state_dir=state_dir, trusted_keys=tuple(trusted),
                         broker=BrokerAddress.parse(broker), telemetry_interval=telemetry_interval,
                         inference_interval=inference_interval, runtime_threads=threads)
    agent = Agent(config)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    agent.run()


@main.command(help="Show the bundle this device runs (read from the state directory).")
@click.option("--state-dir", envvar="EDGEFLEET_STATE_DIR", type=click.Path(path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@fail_cleanly
def status(state_dir, as_json) -> None:
    from device_agent.store import BundleStore

    if not state_dir.is_dir():
        raise click.UsageError(f"state directory {state_dir} does not exist")
    active = BundleStore(state_dir).active()
    doc = {"active_bundle": active.label if active else None, "sha256": active.sha256 if active else None}
    if as_json:
        click.echo(json.dumps(doc))
    else:
        click.echo(f"active bundle: {doc['active_bundle'] or 'none'}")
        if active:
            click.echo(f"sha256:        {active.sha256}")


if __name__ == "__main__":
    main()
