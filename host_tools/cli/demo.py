"""The whole path on one machine."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from device_agent.cli import fail_cleanly
from host_tools.cli.base import main, timeout_option


@main.command(help="Run the whole path on this machine: broker, compression, signed bundle, "
                   "three device agents, deployment over MQTT, and the fleet table.")
@click.option("--broker", default=None, help="Use this MQTT broker (HOST:PORT) instead of an embedded one.")
@click.option("--devices", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--workdir", type=click.Path(path_type=Path), help="Keep keys, bundles and agent state here "
              "(default: a temporary directory, removed afterwards).")
@timeout_option(120.0, "Seconds to wait for the deployment.")
@fail_cleanly
def demo(broker, devices, workdir, timeout) -> None:
    from host_tools.demo import run_demo

    sys.exit(0 if run_demo(broker=broker, device_count=devices, workdir=workdir, timeout=timeout) else 1)
