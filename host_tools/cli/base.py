"""The `edgefleet` group and what its commands share: options, the broker client, signing."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from device_agent import __version__
from device_agent.cli import FiniteRange
from device_agent.errors import ConfigError
from device_agent.mqtt import BrokerAddress, MqttClient, session_client_id, throwaway_client_id
from device_agent.protocol import topics
from device_agent.protocol.chunks import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from device_agent.protocol.signed import DEFAULT_EXPIRY, MAX_EXPIRY

DEFAULT_HOME = Path(os.environ.get("EDGEFLEET_HOME", Path.home() / ".local/share/edgefleet"))

broker_option = click.option("--broker", envvar="EDGEFLEET_BROKER", default="127.0.0.1:1883", show_default=True,
                             help="MQTT broker as HOST:PORT (env EDGEFLEET_BROKER).")
db_option = click.option("--db", type=click.Path(path_type=Path), default=DEFAULT_HOME / "fleet.db",
                         show_default=True, help="Fleet database written by `edgefleet monitor`.")
devices_option = click.option("--device", "devices", multiple=True, required=True,
                              help="Target device id; repeatable.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
chunk_size_option = click.option(
    "--chunk-size", default=DEFAULT_CHUNK_SIZE, show_default=True, type=click.IntRange(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE),
    help="Transfer chunk size in bytes: keep a chunk and its ~110-byte header under the broker's packet limit.")


def timeout_option(default: float, help: str):
    return click.option("--timeout", default=default, show_default=True, type=FiniteRange(0, min_open=True), help=help)


def signing_options(fn):
    """--key and --expires-in for commands that change or load something on devices."""
    fn = click.option("--expires-in", type=FiniteRange(1, MAX_EXPIRY), default=DEFAULT_EXPIRY, show_default=True,
                      help="Seconds the signed command stays valid (e.g. for a device that is offline).")(fn)
    return click.option("--key", "signing_key", envvar="EDGEFLEET_SIGNING_KEY", type=click.Path(path_type=Path),
                        default=DEFAULT_HOME / "keys" / "release.key", show_default=True,
                        help="Private key that signs the command; devices must trust its public key "
                             "(env EDGEFLEET_SIGNING_KEY).")(fn)


def command_signer(signing_key: Path, expires_in: float):
    from host_tools.signer import CommandSigner

    if not signing_key.is_file():
        raise ConfigError(f"no signing key at {signing_key}: give --key, or make one with `edgefleet keys gen`")
    return CommandSigner.load(signing_key, expires_in)


def may_still_take(expires_in: float) -> str:
    """What to add when a signed change got no answer but waits in the device's session."""
    return f"it may still take the change if it reconnects within the command's {expires_in:g} s"


def signed_request(broker: str, role: str, signing_key: Path, expires_in: float, refused: str, send) -> dict:
    """Connect, run send(client, signer) for a device's Reply, and return its body; a refusal is
    one line: "<refused>: <the device's reason>"."""
    signer = command_signer(signing_key, expires_in)
    client = host_client(broker, role)
    try:
        reply = send(client, signer)
    finally:
        client.disconnect()
    if not reply.ok:
        raise ConfigError(f"{refused}: {reply.error}")
    return reply.body


def send_to_each(broker: str, role: str, devices, kind: str, make_command, *, timeout: float, signing_key: Path,
                 expires_in: float, as_json: bool, took) -> None:
    """Send every device its signed make_command(device, command_id) (of type *kind*), all at once,
    and say what became of each: a line per device (took(reply body) when it took it, why it
    refused, or that it did not answer within *timeout*), or with *as_json* {device: {"ok",
    "error", ...body}}; exit 1 unless every device took it. Answers are counted on stderr while
    they arrive."""
    from host_tools.ask import ask_each

    signer = command_signer(signing_key, expires_in)
    client = host_client(broker, role)
    try:
        with answers_counted(kind, len(set(devices))) as counted:
            replies = ask_each(client, devices, make_command, timeout, signer, kind, on_answer=counted)
    finally:
        client.disconnect()
    if as_json:
        click.echo(json.dumps({d: {"ok": r.ok, "error": r.error, **r.body} for d, r in replies.items()}))
    else:
        for d, r in replies.items():
            click.echo(f"{d}: {took(r.body) if r.ok else _not_taken(r, expires_in)}")
    if not all(r.ok for r in replies.values()):
        sys.exit(1)


@contextlib.contextmanager
def answers_counted(kind: str, total: int):
    """A bar on stderr counting the answers of several devices; yields what to call on each. Not on
    a pipe or file, where it would leave only an empty line."""
    from host_tools.terminal import console

    err = console(stderr=True)
    if total < 2 or not err.is_terminal:
        yield lambda _device: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"{kind}: answers"), BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(kind, total=total)
        yield lambda _device: progress.advance(task)


def _not_taken(reply, expires_in: float) -> str:
    if reply.command_id:
        return f"refused ({reply.error})"
    # no answer (ask_each): the command may still reach it before it expires
    return f"no answer ({reply.error})" + (f"; {may_still_take(expires_in)}" if reply.body["queued"] else "")


def host_client(broker: str, role: str) -> MqttClient:
    """A connected client with a clean session."""
    client = MqttClient(client_id=throwaway_client_id(f"edgefleet-{role}"), broker=BrokerAddress.parse(broker),
                        tls=_tls())
    client.connect(timeout=5)
    return client


def named_client(broker: str, role: str, name: str, session: Path, on_displaced, *, held_acks: bool = False):
    """A connected client with a persistent session as ROLE NAME (its client id's random part kept
    in *session*), held by one process at a time (device_agent.presence): another live one already
    holding it is one line, not two processes taking the session from each other.
    *on_displaced(holder)* runs if an earlier one comes back; *held_acks* as MqttClient's.
    Returns the client and its Presence."""
    from device_agent.presence import Presence, describe, holder_of

    address, topic = BrokerAddress.parse(broker), topics.host_presence(role, name)
    client = MqttClient(client_id=session_client_id(f"edgefleet-{role}-{name}", session), broker=address, tls=_tls(),
                        clean_session=False, held_acks=held_acks)
    presence = Presence(client, topic, f"{role} {name!r}", on_displaced=on_displaced)
    holder = holder_of(address, topic, me=presence.me, tls=client.tls)
    if holder is not None:
        raise ConfigError(f"a {role} named {name!r} is already connected to {broker} ({describe(holder)}): "
                          f"give this one its own --name")
    client.connect(timeout=5)
    return client, presence


def _tls():
    from device_agent.tls import TlsFiles

    ctx = click.get_current_context(silent=True)
    tls = (ctx.find_root().obj or {}).get("tls") if ctx else None
    return TlsFiles(**tls) if tls else None


# Modules of the optional extras -> the extra that installs them; a device-only install has the
# `edgefleet` command too, and a command that needs more says which extra in one line.
EXTRA_OF_MODULE = {
    "rich": "host", "onnx": "host", "sympy": "host", "onnx_ir": "host", "amqtt": "host",
    "prometheus_client": "host", "torch": "distill", "ai_edge_quantizer": "litert", "litert_quantizer": "litert",
    "ai_edge_litert": "tflite", "tflite_runtime": "tflite",
}


class HostCommands(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as exc:
            extra = EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])
            if extra is None:
                raise
            what = f"`edgefleet {ctx.invoked_subcommand}`" if ctx.invoked_subcommand else "this command"
            click.echo(f"error: {what} needs the {extra} extra (no module {exc.name!r} here): "
                       f"pip install 'edgefleet[{extra}]'", err=True)
            raise SystemExit(1) from None


@click.group(cls=HostCommands, help="edgefleet host tools: compress models, build signed bundles, deploy "
                                    "them to devices over MQTT, and watch fleet telemetry.")
@click.version_option(__version__, prog_name="edgefleet")
@click.option("--tls-ca", envvar="EDGEFLEET_TLS_CA", type=click.Path(path_type=Path),
              help="CA certificate of the broker: talk TLS to it (env EDGEFLEET_TLS_CA).")
@click.option("--tls-cert", envvar="EDGEFLEET_TLS_CERT", type=click.Path(path_type=Path),
              help="This host tool's client certificate, CN host:NAME (env EDGEFLEET_TLS_CERT).")
@click.option("--tls-key", envvar="EDGEFLEET_TLS_KEY", type=click.Path(path_type=Path),
              help="Its private key (env EDGEFLEET_TLS_KEY).")
@click.option("-v", "--verbose", is_flag=True,
              help="Also log what happens on the way: each device's steps, who fetches which bundle, connections.")
@click.pass_context
def main(ctx, tls_ca, tls_cert, tls_key, verbose) -> None:
    from host_tools.terminal import show_log_lines

    show_log_lines(verbose)
    if (tls_cert or tls_key) and not tls_ca:
        raise click.UsageError("--tls-cert and --tls-key need --tls-ca")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("give --tls-cert and --tls-key together")
    ctx.obj = {"tls": {"ca": tls_ca, "cert": tls_cert, "key": tls_key} if tls_ca else None}
