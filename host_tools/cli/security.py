"""Certificates for the broker, devices and host tools, and the broker's configuration."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from device_agent.cli import FiniteRange, fail_cleanly
from host_tools.cli.base import (
    DEFAULT_HOME, broker_option, db_option, json_option, main, send_to_each, signing_options, timeout_option,
)
from host_tools.terminal import console, listed


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
    revoked = pki.revoked_names()
    for name in names:
        cert, key = pki.issue_client(name, days=days)
        click.echo(f"wrote {cert} and {key}")
        if name in revoked:  # the ACL's denial of the name goes with the next `broker config`
            click.echo(f"note: {name}'s earlier certificate is revoked; after `edgefleet broker config`, restart "
                       f"Mosquitto rather than reload it, so that a connection the revoked one still holds ends")


@certs.command("list", help="The CA's and the broker's certificates and every client certificate issued: name, "
                             "kind, serial, expiry, and whether it is revoked (`certs renew` one before it "
                             "expires).")
@pki_option
@json_option
@fail_cleanly
def certs_list(pki_dir, as_json) -> None:
    import datetime as dt

    from host_tools.certs import Pki

    pki = Pki(pki_dir).require_ca()
    now = dt.datetime.now(dt.timezone.utc)
    rows = [{"name": c.name, "kind": c.kind, "serial": f"{c.serial:x}", "expires": c.expires.isoformat(),
             "days_left": (c.expires - now).days, "status": _status(c, now), "path": str(c.path)}
            for c in pki.own() + pki.issued()]
    if as_json:
        click.echo(json.dumps(rows))
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("name", "kind", "serial", "expires", "status"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["name"], r["kind"], r["serial"][:16], r["expires"][:10], r["status"])
    console().print(table)


def _status(cert, now) -> str:
    if cert.revoked:
        return "revoked"
    if cert.kind == "previous CA":
        return "being retired (`certs retire-ca` once every device has moved)"
    if cert.expires <= now:
        return "EXPIRED"
    from device_agent.client_cert import RENEW_WITHIN_DAYS

    days = (cert.expires - now).days
    return f"valid, {days} days left" + (": renew it soon" if days < RENEW_WITHIN_DAYS else "")


@certs.command("revoke", help="Revoke the certificates of NAMES (a lost or retired device, a host tool's leaked "
                              "key): added to the CA's revocation list, which `broker config` hands to Mosquitto.")
@click.argument("names", nargs=-1, required=True)
@pki_option
@fail_cleanly
def certs_revoke(names, pki_dir) -> None:
    from host_tools.certs import Pki

    pki = Pki(pki_dir)
    for name in names:
        revoked = pki.revoke(name)
        click.echo(f"revoked {name} (serial {f'{revoked.serial:x}'[:16]}); kept as {revoked.path}, its key deleted")
    click.echo("next: `edgefleet broker config --out DIR` again, then reload Mosquitto (systemctl reload mosquitto, "
               "or kill -HUP its pid): a connection it has now is cut off, and it is refused when it connects again")


@certs.command("renew", help="Renew the certificates of NAMES (devices, host:NAME tools), or with --broker the "
                             "broker's, or with --ca the CA's, before they expire: a new certificate over the same "
                             "key and names, written over the current one. The earlier one stays valid until it "
                             "expires, so each device can be given its new .crt when it suits (its key does not "
                             "change); what the CA signed is valid under its renewed certificate as before.")
@click.argument("names", nargs=-1)
@click.option("--broker", "broker_cert", is_flag=True, help="Renew the broker's server certificate too.")
@click.option("--ca", "ca_cert", is_flag=True, help="Renew the CA's certificate too (its key stays; `certs push` "
                                                    "gives it to the devices).")
@click.option("--expiring-within", "within_days", type=FiniteRange(0, 36500), metavar="DAYS",
              help="Also renew every client certificate that expires within DAYS days.")
@pki_option
@click.option("--days", type=click.IntRange(1, 36500),
              help="Lifetime of the new certificates [default: as `certs client` and `certs init` issue them].")
@fail_cleanly
def certs_renew(names, broker_cert, ca_cert, within_days, pki_dir, days) -> None:
    import datetime as dt

    from host_tools.certs import Pki

    if not names and not broker_cert and not ca_cert and within_days is None:
        raise click.UsageError("give the NAMES of the client certificates to renew, --expiring-within DAYS, "
                               "--broker or --ca")
    pki = Pki(pki_dir).require_ca()
    if ca_cert:
        cert = pki.renew_ca(**({"days": days} if days else {}))
        click.echo(f"renewed the CA: {cert.path}, serial {f'{cert.serial:x}'[:16]}, valid until "
                   f"{cert.expires:%Y-%m-%d}")
        click.echo("next, before the earlier one expires: `edgefleet broker config --out DIR` again and reload "
                   "Mosquitto; `edgefleet certs push --stale --broker ADDR` gives the devices the renewed CA with "
                   "their certificates; copy ca.crt to the host tools (--tls-ca) by hand")
    if not names and not broker_cert and within_days is None:
        return
    if within_days is not None:
        soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=within_days)
        due = [c.name for c in pki.issued() if not c.revoked and c.expires <= soon and c.name not in names]
        if not due and not names and not broker_cert:
            click.echo(f"no client certificate expires within {within_days:g} days")
            return
        names = tuple(names) + tuple(due)
    ca_expires = pki.ca_expires()
    for name in ((None,) if broker_cert else ()) + tuple(names):
        cert = pki.renew(name, days=days)
        click.echo(f"renewed {name or 'the broker'}: {cert.path}, serial {f'{cert.serial:x}'[:16]}, valid until "
                   f"{cert.expires:%Y-%m-%d}")
        if cert.expires > ca_expires:
            click.echo(f"note: the CA expires first, on {ca_expires:%Y-%m-%d}; nothing it signed is valid after that")
    if broker_cert:
        click.echo("next: `edgefleet broker config --out DIR` again, then reload Mosquitto: it presents the new "
                   "certificate to the connections that follow")
    if names:
        click.echo("next: `edgefleet certs push NAMES --broker ADDR` (or `--stale`) sends the devices theirs over "
                   "MQTT (or copy each new .crt over the old one and restart the agent); host tools' by hand")


@certs.command("rotate-ca", help="Begin moving the fleet to a new CA key (the CA's key leaked, or is due to be "
                                  "replaced): a new CA, and every client certificate issued again under it over "
                                  "the same key. Until `certs retire-ca` the broker takes client certificates from "
                                  "either CA and keeps its certificate from the previous one; `certs push` gives "
                                  "the devices the new CA (signed by the previous one, so they take it up) and "
                                  "their new certificates.")
@pki_option
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500),
              help="Lifetime of the new CA's certificate.")
@fail_cleanly
def certs_rotate_ca(pki_dir, days) -> None:
    from host_tools.certs import Pki

    pki = Pki(pki_dir).require_ca()
    cert = pki.rotate_ca(days=days)
    clients = [c for c in pki.issued() if not c.revoked]
    click.echo(f"new CA: {cert.name}, {cert.path}, serial {f'{cert.serial:x}'[:16]}, valid until "
               f"{cert.expires:%Y-%m-%d}; the previous one is in {pki.previous}")
    click.echo(f"issued again under it, over the same keys: {len(clients)} client certificates")
    click.echo("next: 1. `edgefleet broker config --out DIR` again and restart Mosquitto (it takes client "
               "certificates from either CA now); 2. `edgefleet certs push --stale --broker ADDR` gives the devices "
               "the new CA and their new certificates; copy the host tools' new .crt files and ca.crt by hand; "
               "3. once every device shows its new certificate, `edgefleet certs retire-ca`")


@certs.command("retire-ca", help="End the move `certs rotate-ca` began: the broker's certificate is issued again "
                                 "under the new CA and the previous CA's key is deleted; after `broker config` and "
                                 "a restart the broker trusts the new CA alone. Refused while the registry (--db) "
                                 "shows devices without their new certificates, unless --force.")
@pki_option
@db_option
@click.option("--force", is_flag=True, help="Retire it even though devices have not moved: they cannot connect "
                                            "afterwards, until they are given new files by hand.")
@fail_cleanly
def certs_retire_ca(pki_dir, db, force) -> None:
    from host_tools.certs import Pki

    pki = Pki(pki_dir).require_ca()
    if pki.moving() and not force:
        behind = _not_moved(pki, db)
        if behind:
            raise click.ClickException(f"{len(behind)} devices do not show their certificate from the new CA in "
                                       f"{db} yet: {listed(behind, 10)}. `edgefleet certs push --stale` them, or "
                                       f"--force")
    cert = pki.retire_ca()
    click.echo(f"retired the previous CA (its key is deleted); the broker's certificate is issued again under the "
               f"new one: {cert.path}, serial {f'{cert.serial:x}'[:16]}, valid until {cert.expires:%Y-%m-%d}")
    click.echo("next: 1. `edgefleet broker config --out DIR` again and restart Mosquitto; copy ca.crt to the host "
               "tools (--tls-ca) by hand; 2. `edgefleet certs push --stale --broker ADDR` has the devices stop "
               "trusting the previous CA")


@certs.command("push", help="Send the devices NAMES (or with --stale, every device the registry shows with an "
                            "older one) their current certificates, after `certs renew`, in signed commands. Each "
                            "checks that it is for its key and device id, from its CA, and lasts longer than the "
                            "one it uses; reconnects with it; keeps it once the broker accepts it, else goes back "
                            "to the one before. After `certs retire-ca`, they also stop trusting the CA retired.")
@click.argument("names", nargs=-1)
@click.option("--stale", is_flag=True, help="Also every device whose certificate in the registry (--db, as it "
                                            "reports it) is not its current one here, or that still trusts a "
                                            "retired CA.")
@db_option
@pki_option
@broker_option
@timeout_option(90.0, "Seconds to wait for the devices' answers.")
@signing_options
@json_option
@fail_cleanly
def certs_push(names, stale, db, pki_dir, broker, timeout, signing_key, expires_in, as_json) -> None:
    from device_agent.protocol.commands import CertificateCommand
    from host_tools.certs import Pki

    if not names and not stale:
        raise click.UsageError("give the NAMES of the devices to send their certificates to, or --stale")
    pki = Pki(pki_dir).require_ca()
    retired = pki.retired_ca_keys()  # after a move: the keys the devices stop trusting
    if stale:
        names = tuple(names) + tuple(d for d in _stale_devices(pki, db, retired) if d not in names)
        if not names:
            click.echo(f"every device in {db} that reports a certificate shows its current one")
            return
    pems = {name: pki.device_certificate(name) for name in names}  # all found before any is sent
    ca = pki.ca_certificate()  # a renewed or new one the devices take up (one they have already, they ignore)
    link = pki.ca_link_certificate()  # during a move to a new CA key: why they may take it
    send_to_each(broker, "certs", names, "certificate",
                 lambda device, cid: CertificateCommand(cid, time.time(), pems[device], ca, link, retired),
                 timeout=timeout, signing_key=signing_key, expires_in=expires_in, as_json=as_json,
                 took=lambda body: f"uses serial {body['serial'][:16]}, valid until {body['expires'][:10]}"
                 + (f", its CA until {body['ca_expires'][:10]}" if body.get("ca_expires") else "")
                 + (", trusts no retired CA" if retired and "ca_keys" in body and not _retired_trusted(body, retired)
                    else ""))


def _retired_trusted(described: dict, retired: tuple[str, ...]) -> set[str]:
    """Which of the *retired* CA keys a device's certificate report (ClientCertificate.describe) says it
    still trusts; none when it does not list them."""
    return set(retired) & set(described.get("ca_keys", "").split(","))


def _stale_devices(pki, db: Path, retired: tuple[str, ...]) -> list[str]:
    """The devices in the registry at *db* that report a certificate other than their current one
    in *pki* (a renewed one not given to them yet), a CA that expires before the CA's current
    certificate (a renewed CA), or trusting a CA key in *retired*; those that report none (no client
    certificate, or an agent from before) are not counted."""
    from device_agent.protocol.reports import expires_at
    from host_tools.cli.fleet import fleet_rows

    current = {c.name: f"{c.serial:x}" for c in pki.issued() if not c.revoked and c.kind == "device"}
    ca_expires = pki.ca_expires().timestamp()
    return [r.device_id for r in fleet_rows(db, (), None) if r.certificate and r.device_id in current
            and (r.certificate["serial"] != current[r.device_id]
                 or (expires_at(r.certificate, "ca_expires") or ca_expires) < ca_expires
                 or _retired_trusted(r.certificate, retired))]


def _not_moved(pki, db: Path) -> list[str]:
    """The devices with a current certificate in *pki* that the registry at *db* does not show using
    it (a certificate from the previous CA, or none reported)."""
    from host_tools.cli.fleet import fleet_rows

    if not db.is_file():
        raise click.ClickException(f"no registry at {db} to check that every device has moved: give --db (as "
                                   f"`edgefleet monitor` keeps it), or --force")
    shown = {r.device_id: r.certificate.get("serial") for r in fleet_rows(db, (), None) if r.certificate}
    return [c.name for c in pki.issued() if not c.revoked and c.kind == "device"
            and shown.get(c.name) != f"{c.serial:x}"]


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
