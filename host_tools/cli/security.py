"""Certificates for the broker, devices and host tools, and the broker's configuration."""

from __future__ import annotations

from pathlib import Path

import click

from device_agent.cli import fail_cleanly
from host_tools.cli.base import DEFAULT_HOME, main


@main.group(help="Certificates for the broker, devices and host tools (a small CA of your own).")
def certs() -> None:
    pass


pki_option = click.option("--dir", "pki_dir", type=click.Path(path_type=Path), default=DEFAULT_HOME / "pki",
                          show_default=True, help="The PKI directory.")


@certs.command("init", help="Create the CA and the broker's server certificate.")
@pki_option
@click.option("--broker-host", "broker_hosts", multiple=True, required=True,
              help="DNS name or IP address devices use to reach the broker; repeatable.")
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500))
@fail_cleanly
def certs_init(pki_dir, broker_hosts, days) -> None:
    from host_tools.certs import Pki

    for path in Pki(pki_dir).init(list(broker_hosts), days=days):
        click.echo(f"wrote {path}")


@certs.command("client", help="Issue a client certificate: NAME is a device id, or host:NAME for a host tool.")
@click.argument("names", nargs=-1, required=True)
@pki_option
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 36500))
@fail_cleanly
def certs_client(names, pki_dir, days) -> None:
    from host_tools.certs import Pki

    pki = Pki(pki_dir)
    for name in names:
        cert, key = pki.issue_client(name, days=days)
        click.echo(f"wrote {cert} and {key}")


@main.group(help="The MQTT broker: a Mosquitto configuration for the fleet.")
def broker() -> None:
    pass


@broker.command("config", help="Write mosquitto.conf (TLS, client certificates required, no anonymous clients), "
                               "its ACL (each device only its own topics) and the broker's TLS files into OUT.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--pki", "pki_dir", type=click.Path(path_type=Path), default=DEFAULT_HOME / "pki", show_default=True)
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535))
@click.option("--bind", default="", help="Address to listen on [default: all].")
@click.option("--persistence-dir", type=click.Path(path_type=Path), default=Path("/var/lib/mosquitto"),
              show_default=True, help="Where Mosquitto keeps sessions and queued commands.")
@click.option("--no-persistence", is_flag=True, help="Keep sessions in memory only (tests, demos).")
@fail_cleanly
def broker_config(out, pki_dir, port, bind, persistence_dir, no_persistence) -> None:
    from host_tools.broker_config import write_broker_config
    from host_tools.certs import Pki

    for path in write_broker_config(Pki(pki_dir), out, port=port, bind=bind,
                                    persistence_dir=None if no_persistence else persistence_dir):
        click.echo(f"wrote {path}")
    click.echo(f"run it with: mosquitto -c {(out / 'mosquitto.conf').resolve()}")
