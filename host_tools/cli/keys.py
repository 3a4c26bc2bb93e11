"""Signing keys, and the keys devices trust."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from device_agent.cli import fail_cleanly
from device_agent.errors import ConfigError
from host_tools.cli.base import (
    DEFAULT_HOME, broker_option, devices_option, host_client, json_option, main, send_to_each, signing_options,
    timeout_option,
)


@main.group(help="Signing keys for bundles and commands, and the keys devices trust.")
def keys() -> None:
    pass


@keys.command("gen", help="Create an Ed25519 key pair: NAME.key (keep secret) and NAME.pub (give to devices).")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_HOME / "keys", show_default=True)
@click.option("--name", default="release", show_default=True)
@json_option
@fail_cleanly
def keys_gen(out, name, as_json) -> None:
    from device_agent.bundle.signing import generate_key_pair, key_id, load_public_key

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give the folder to write {name}.key and {name}.pub into")
    private, public = generate_key_pair(out, name)
    doc = {"private_key": str(private), "public_key": str(public), "key_id": key_id(load_public_key(public))}
    click.echo(json.dumps(doc) if as_json else f"wrote {private} and {public} (key id {doc['key_id']})")


@keys.command("list", help="The key pairs in the keys directory; with --device, the keys each device trusts.")
@click.option("--dir", "key_dir", type=click.Path(path_type=Path), default=DEFAULT_HOME / "keys", show_default=True)
@click.option("--device", "devices", multiple=True, help="Also ask this device which keys it trusts; repeatable.")
@broker_option
@timeout_option(10.0, "Seconds to wait for each device.")
@json_option
@fail_cleanly
def keys_list(key_dir, devices, broker, timeout, as_json) -> None:
    from host_tools.keys import local_keys

    local = local_keys(key_dir)
    remote = {}
    if devices:
        from host_tools.ask import device_status

        client = host_client(broker, "keys")
        try:
            remote = {d: device_status(client, d, timeout).body.get("keys") for d in devices}
        finally:
            client.disconnect()
    if as_json:
        click.echo(json.dumps({"local": local, "devices": remote}))
        return
    for k in local:
        click.echo(f"{k['key_id']}  {k['name']:<16} {'private+public' if k['private'] else 'public only'}  {k['path']}")
    if not local:
        click.echo(f"no keys in {key_dir} (make one with `edgefleet keys gen`)")
    for device, trust in remote.items():
        trusted = ", ".join(f"{t['key_id']} ({t['source']})" for t in trust["trusted"]) if trust else "?"
        click.echo(f"{device}: trusts {trusted}" + (f"; revoked {', '.join(trust['revoked'])}"
                                                     if trust and trust["revoked"] else ""))


def _change_trust(devices, broker, timeout, signing_key, expires_in, as_json, *, add=(), revoke=()) -> None:
    from device_agent.protocol.commands import TrustCommand

    send_to_each(broker, "keys", devices, "trust", lambda device, cid: TrustCommand(cid, time.time(), add, revoke),
                 timeout=timeout, signing_key=signing_key, expires_in=expires_in, as_json=as_json,
                 took=lambda body: f"trusts {', '.join(t['key_id'] for t in body['trusted'])}")


@keys.command("rotate", help="Make devices trust NEW_PUBLIC_KEY, vouched for by --key (a key they trust now); "
                             "--retire also revokes --key's own key in the same step.")
@click.argument("new_public_key", type=click.Path(path_type=Path))
@devices_option
@click.option("--retire", is_flag=True, help="Revoke the key that signs this command once the new one is in.")
@broker_option
@timeout_option(30.0, "Seconds to wait for the devices' answers.")
@signing_options
@json_option
@fail_cleanly
def keys_rotate(new_public_key, devices, retire, broker, timeout, signing_key, expires_in, as_json) -> None:
    from device_agent.bundle.signing import key_id, load_private_key, load_public_key

    load_public_key(new_public_key)  # one clear line if it is not an Ed25519 public key
    pem = new_public_key.read_text()
    revoke = (key_id(load_private_key(signing_key).public_key()),) if retire and signing_key.is_file() else ()
    _change_trust(devices, broker, timeout, signing_key, expires_in, as_json, add=(pem,), revoke=revoke)


@keys.command("revoke", help="Make devices stop trusting KEY_ID (as `keys list` shows it), for good.")
@click.argument("revoked_key_id")
@devices_option
@broker_option
@timeout_option(30.0, "Seconds to wait for the devices' answers.")
@signing_options
@json_option
@fail_cleanly
def keys_revoke(revoked_key_id, devices, broker, timeout, signing_key, expires_in, as_json) -> None:
    if len(revoked_key_id) != 16 or any(c not in "0123456789abcdef" for c in revoked_key_id):
        raise ConfigError(f"{revoked_key_id!r} is not a key id (16 hex digits; see `edgefleet keys list`)")
    _change_trust(devices, broker, timeout, signing_key, expires_in, as_json, revoke=(revoked_key_id,))
