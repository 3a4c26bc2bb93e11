"""``edgefleet``: the host command line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from device_agent import __version__
from device_agent.cli import fail_cleanly
from device_agent.errors import ConfigError
from device_agent.mqtt import BrokerAddress, MqttClient
from host_tools.terminal import console

DEFAULT_HOME = Path(os.environ.get("EDGEFLEET_HOME", Path.home() / ".local/share/edgefleet"))

broker_option = click.option("--broker", envvar="EDGEFLEET_BROKER", default="127.0.0.1:1883", show_default=True,
                             help="MQTT broker as HOST:PORT (env EDGEFLEET_BROKER).")
db_option = click.option("--db", type=click.Path(path_type=Path), default=DEFAULT_HOME / "fleet.db",
                         show_default=True, help="Fleet database written by `edgefleet monitor`.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def signing_options(fn):
    """--key and --expires-in for commands that change or load something on devices."""
    fn = click.option("--expires-in", type=click.FloatRange(1, 30 * 86400), default=86400.0, show_default=True,
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


def host_client(broker: str, role: str, *, client_id: str | None = None) -> MqttClient:
    """A connected client; with *client_id*, a persistent session under that id (messages for it
    wait at the broker while it is away), else a throwaway one."""
    from device_agent.mqtt import TlsFiles

    ctx = click.get_current_context(silent=True)
    tls = (ctx.find_root().obj or {}).get("tls") if ctx else None
    client = MqttClient(client_id=client_id or f"edgefleet-{role}-{os.getpid()}", broker=BrokerAddress.parse(broker),
                        tls=TlsFiles(**tls) if tls else None, clean_session=client_id is None)
    client.connect(timeout=5)
    return client


@click.group(help="edgefleet host tools: compress models, build signed bundles, deploy them to devices "
                  "over MQTT, and watch fleet telemetry.")
@click.version_option(__version__, prog_name="edgefleet")
@click.option("--tls-ca", envvar="EDGEFLEET_TLS_CA", type=click.Path(path_type=Path),
              help="CA certificate of the broker: talk TLS to it (env EDGEFLEET_TLS_CA).")
@click.option("--tls-cert", envvar="EDGEFLEET_TLS_CERT", type=click.Path(path_type=Path),
              help="This host tool's client certificate, CN host:NAME (env EDGEFLEET_TLS_CERT).")
@click.option("--tls-key", envvar="EDGEFLEET_TLS_KEY", type=click.Path(path_type=Path),
              help="Its private key (env EDGEFLEET_TLS_KEY).")
@click.pass_context
def main(ctx, tls_ca, tls_cert, tls_key) -> None:
    if (tls_cert or tls_key) and not tls_ca:
        raise click.UsageError("--tls-cert and --tls-key need --tls-ca")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("give --tls-cert and --tls-key together")
    ctx.obj = {"tls": {"ca": tls_ca, "cert": tls_cert, "key": tls_key} if tls_ca else None}


# -- broker security ----------------------------------------------------------------------
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


# -- keys ---------------------------------------------------------------------------------
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

    private, public = generate_key_pair(out, name)
    doc = {"private_key": str(private), "public_key": str(public), "key_id": key_id(load_public_key(public))}
    click.echo(json.dumps(doc) if as_json else f"wrote {private} and {public} (key id {doc['key_id']})")


@keys.command("list", help="The key pairs in the keys directory; with --device, the keys each device trusts.")
@click.option("--dir", "key_dir", type=click.Path(path_type=Path), default=DEFAULT_HOME / "keys", show_default=True)
@click.option("--device", "devices", multiple=True, help="Also ask this device which keys it trusts; repeatable.")
@broker_option
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for each device.")
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
    from host_tools.keys import change_trust

    signer = command_signer(signing_key, expires_in)
    client = host_client(broker, "keys")
    try:
        replies = change_trust(client, devices, signer, add=add, revoke=revoke, timeout=timeout)
    finally:
        client.disconnect()
    if as_json:
        click.echo(json.dumps({d: {"ok": r.ok, "error": r.error, **r.body} for d, r in replies.items()}))
    else:
        for d, r in replies.items():
            click.echo(f"{d}: " + (f"trusts {', '.join(t['key_id'] for t in r.body['trusted'])}" if r.ok
                                   else f"refused ({r.error})"))
    if not all(r.ok for r in replies.values()):
        sys.exit(1)


@keys.command("rotate", help="Make devices trust NEW_PUBLIC_KEY, vouched for by --key (a key they trust now); "
                             "--retire also revokes --key's own key in the same step.")
@click.argument("new_public_key", type=click.Path(path_type=Path))
@click.option("--device", "devices", multiple=True, required=True, help="Target device id; repeatable.")
@click.option("--retire", is_flag=True, help="Revoke the key that signs this command once the new one is in.")
@broker_option
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for each device.")
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
@click.option("--device", "devices", multiple=True, required=True, help="Target device id; repeatable.")
@broker_option
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for each device.")
@signing_options
@json_option
@fail_cleanly
def keys_revoke(revoked_key_id, devices, broker, timeout, signing_key, expires_in, as_json) -> None:
    if len(revoked_key_id) != 16 or any(c not in "0123456789abcdef" for c in revoked_key_id):
        raise ConfigError(f"{revoked_key_id!r} is not a key id (16 hex digits; see `edgefleet keys list`)")
    _change_trust(devices, broker, timeout, signing_key, expires_in, as_json, revoke=(revoked_key_id,))


# -- compress -----------------------------------------------------------------------------
@main.command(help="Quantize an ONNX model to int8 (dynamic) and compare it with the original.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Where to write the result.")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path),
              help="Evaluation data: .npz with 'x' (inputs) and optional 'y' (labels).")
@json_option
@fail_cleanly
def compress(model, out, eval_data, as_json) -> None:
    from host_tools.compress import EvalData, evaluate_model, quantize_dynamic_int8
    from host_tools.compress.report import compression_table

    provenance = quantize_dynamic_int8(model, out)
    if eval_data is None:
        click.echo(json.dumps(provenance) if as_json else f"wrote {out} (no --eval data: nothing measured)")
        return
    data = EvalData.load(eval_data)
    before, after = evaluate_model(model, data), evaluate_model(out, data)
    if as_json:
        click.echo(json.dumps({"compression": provenance, "original": before.as_metrics(),
                               "compressed": after.as_metrics()}))
    else:
        console().print(compression_table(before, after))


# -- bundle -------------------------------------------------------------------------------
@main.group(help="Build, inspect and verify signed model bundles.")
def bundle() -> None:
    pass


@bundle.command("build", help="Package MODEL into a signed, versioned bundle.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Model name, e.g. digits-cnn.")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.2.0.")
@click.option("--key", type=click.Path(path_type=Path), required=True, help="Private signing key (PEM).")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Bundle file (default NAME-VERSION.efb).")
@click.option("--sample", type=click.Path(path_type=Path),
              help=".npz with one array per model input, used as the device's health-check input.")
@click.option("--atol", default=1e-3, show_default=True, help="Absolute tolerance of the sample check.")
@click.option("--latency-budget-ms", type=float, default=None,
              help="Median sample latency a device must meet before it commits the bundle.")
@click.option("--release", type=click.IntRange(0), help="Release counter of this model name; devices refuse "
              "a lower one than they have committed [default: compare versions].")
@click.option("--expires-in-days", type=click.FloatRange(min=0, min_open=True),
              help="Devices refuse the bundle after this many days [default: never].")
@click.option("--arch", multiple=True, help="CPU architecture the bundle runs on (uname -m, e.g. aarch64); repeatable.")
@click.option("--min-ram-mb", type=click.IntRange(1), help="RAM a device needs for this bundle.")
@click.option("--accelerator", type=click.Choice(["cuda", "tensorrt"]), help="Accelerator the bundle needs.")
@json_option
@fail_cleanly
def bundle_build(model, name, version, key, out, sample, atol, latency_budget_ms, release, expires_in_days,
                 arch, min_ram_mb, accelerator, as_json) -> None:
    import numpy as np

    from host_tools.packaging import build_bundle

    out = out or Path(f"{name}-{version}.efb")
    feeds = None
    if sample is not None:
        try:
            with np.load(sample, allow_pickle=False) as data:
                feeds = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read sample file {sample}: {exc}") from None
    target = {k: v for k, v in (("arch", list(arch)), ("min_ram_mb", min_ram_mb), ("accelerator", accelerator)) if v}
    manifest = build_bundle(model, name=name, version=version, key=key, out=out, sample=feeds, atol=atol,
                            latency_budget_ms=latency_budget_ms, release=release, target=target,
                            expires_at=time.time() + expires_in_days * 86400 if expires_in_days else None)
    click.echo(json.dumps({"bundle": str(out), "manifest": manifest.to_dict()}) if as_json
               else f"wrote {out}: {manifest.label} ({out.stat().st_size} bytes)")


@bundle.command("inspect", help="Show a bundle's manifest (without checking its signature).")
@click.argument("bundle_path", type=click.Path(path_type=Path))
@json_option
@fail_cleanly
def bundle_inspect(bundle_path, as_json) -> None:
    from device_agent.bundle import BundleReader

    with BundleReader(bundle_path) as reader:
        m = reader.manifest
    if as_json:
        click.echo(json.dumps(m.to_dict()))
        return
    click.echo(f"{m.label}  runtime={m.runtime}  created={m.created_at}")
    for f in m.files:
        click.echo(f"  {f.path:<24} {f.size:>10} bytes  sha256 {f.sha256[:16]}…")
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for s in specs:
            click.echo(f"  {kind:<6} {s.name}: {s.dtype}{list(s.shape)}")
    if m.compression:
        click.echo(f"  compression: {json.dumps(m.compression)}")
    if m.metrics:
        click.echo(f"  metrics: {json.dumps(m.metrics)}")


@bundle.command("verify", help="Check a bundle's signature and every file's hash against trusted keys.")
@click.argument("bundle_path", type=click.Path(path_type=Path))
@click.option("--key", "keys_", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Trusted public key (PEM); repeatable.")
@json_option
@fail_cleanly
def bundle_verify(bundle_path, keys_, as_json) -> None:
    from device_agent.bundle import BundleReader
    from device_agent.bundle.signing import trusted_keys

    with BundleReader(bundle_path) as reader:
        verified = reader.verify(trusted_keys(keys_))
    doc = {"bundle": str(bundle_path), "valid": True, "model": verified.manifest.label,
           "key_id": verified.key_id, "sha256": verified.sha256}
    click.echo(json.dumps(doc) if as_json else
               f"OK: {verified.manifest.label} signed by key {verified.key_id}, all files match")


# -- deploy -------------------------------------------------------------------------------
@main.command(help="Send BUNDLE to devices over MQTT and follow each until it is active or failed.")
@click.argument("bundle_path", type=click.Path(path_type=Path))
@click.option("--device", "devices", multiple=True, required=True, help="Target device id; repeatable.")
@broker_option
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for every device.")
@click.option("--chunk-size", default=64 * 1024, show_default=True, type=click.IntRange(1024, 1 << 20),
              help="Transfer chunk size in bytes (keep it under the broker's packet limit).")
@click.option("--allow-downgrade", is_flag=True,
              help="Let devices install a lower release than the one they have committed.")
@click.option("--no-serve", is_flag=True, help="Do not answer chunk requests here: `edgefleet serve` does.")
@click.option("--db", type=click.Path(path_type=Path), default=DEFAULT_HOME / "fleet.db", show_default=True,
              help="Device registry: devices it knows cannot run the bundle (its target) are skipped, not sent it.")
@signing_options
@json_option
@fail_cleanly
def deploy(bundle_path, devices, broker, timeout, chunk_size, allow_downgrade, no_serve, db, signing_key, expires_in,
           as_json) -> None:
    from device_agent.bundle import BundleReader
    from host_tools.deploy import DeviceProgress, incompatible, run_deployment

    with BundleReader(bundle_path) as reader:  # one clear line if it is not a bundle
        target = reader.manifest.target
    registry = {r.device_id: r.hardware for r in _fleet_rows(db, (), None)} if db.exists() and target else {}
    skipped = incompatible(devices, target, registry)
    for device, why in skipped.items():
        click.echo(f"{device}: {why}", err=True)
    send = [d for d in devices if d not in skipped]
    signer = command_signer(signing_key, expires_in)
    client = host_client(broker, "deploy")
    try:
        results = run_deployment(client, bundle_path, send, signer=signer, timeout=timeout, chunk_size=chunk_size,
                                 allow_downgrade=allow_downgrade, serve=not no_serve,
                                 show_progress=not as_json) if send else {}
    finally:
        client.disconnect()
    results.update({d: DeviceProgress(d, "skipped", 0.0, why) for d, why in skipped.items()})
    if as_json:
        click.echo(json.dumps({d: vars(p) for d, p in results.items()}))
    if not all(p.succeeded for p in results.values()):
        sys.exit(1)


@main.command(help="Answer devices' chunk requests for BUNDLES and every *.efb in --dir (looked at again every "
                   "few seconds) until Ctrl-C. Many devices fetching one bundle share one copy through the broker.")
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path))
@click.option("--dir", "bundle_dir", type=click.Path(path_type=Path), help="Serve every bundle in this directory.")
@broker_option
@click.option("--stats-every", default=10.0, show_default=True, type=click.FloatRange(0.5),
              help="Seconds between progress lines (only when something was served).")
@fail_cleanly
def serve(bundles, bundle_dir, broker, stats_every) -> None:
    import signal as signals
    import threading

    from host_tools.serve import BundleDirectory, BundleServer

    if not bundles and bundle_dir is None:
        raise click.UsageError("give bundle files, --dir, or both")
    if bundle_dir is not None and not bundle_dir.is_dir():
        raise ConfigError(f"{bundle_dir} is not a directory")
    for b in bundles:
        if not b.is_file():
            raise ConfigError(f"bundle {b} does not exist")
    client = host_client(broker, "serve")
    server = BundleServer(client)
    catalog = BundleDirectory(server, list(bundles), bundle_dir)
    stop = threading.Event()
    signals.signal(signals.SIGTERM, lambda *_: stop.set())
    signals.signal(signals.SIGINT, lambda *_: stop.set())
    err = console(stderr=True)
    for line in catalog.scan():
        err.print(line)
    server.start()
    err.print(f"answering chunk requests on {broker}; Ctrl-C to stop")
    last, shown = time.monotonic(), (0, 0)
    try:
        while not stop.wait(2.0):
            for line in catalog.scan():
                err.print(line)
            s = server.stats
            if time.monotonic() - last >= stats_every and (s.requests, s.chunks_sent) != shown:
                err.print(f"{s.requests} requests from {len(s.devices)} device(s): {s.chunks_sent} chunks, "
                          f"{s.bytes_sent / 2**20:.1f} MiB sent; fan-out spared {s.fanout_saved} chunks")
                last, shown = time.monotonic(), (s.requests, s.chunks_sent)
    finally:
        server.stop()
        client.disconnect()


@main.command(help="Roll devices back to their previous committed version and follow each until done.")
@click.option("--device", "devices", multiple=True, required=True, help="Target device id; repeatable.")
@broker_option
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for every device.")
@signing_options
@json_option
@fail_cleanly
def rollback(devices, broker, timeout, signing_key, expires_in, as_json) -> None:
    from host_tools.deploy import run_rollback

    signer = command_signer(signing_key, expires_in)
    client = host_client(broker, "rollback")
    try:
        results = run_rollback(client, devices, signer=signer, timeout=timeout)
    finally:
        client.disconnect()
    if as_json:
        click.echo(json.dumps({d: vars(p) for d, p in results.items()}))
    else:
        for d, p in results.items():
            click.echo(f"{d}: {p.state}" + (f" ({p.reason})" if p.reason else ""))
    if not all(p.succeeded for p in results.values()):
        sys.exit(1)


# -- device -------------------------------------------------------------------------------
@main.group(help="Ask one device directly, over MQTT.")
def device() -> None:
    pass


@device.command("status", help="The device's own account: active bundle, kept versions, update under way.")
@click.argument("device_id")
@broker_option
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the answer.")
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
    click.echo(f"update:        {doc['update_state']}" + (f" ({doc['update']['kind']} {doc['update']['bundle']})"
                                                           if doc.get("update") else ""))


@device.command("config", help="Show or change a device's settings over MQTT (signed): --set NAME=VALUE, "
                                "--reset NAME (back to its config file's value). Changes apply at once and "
                                "survive restarts.")
@click.argument("device_id")
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE", help="Repeatable.")
@click.option("--reset", "resets", multiple=True, metavar="NAME", help="Repeatable.")
@broker_option
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the answer.")
@signing_options
@json_option
@fail_cleanly
def device_config(device_id, assignments, resets, broker, timeout, signing_key, expires_in, as_json) -> None:
    from device_agent.protocol.messages import ConfigCommand
    from host_tools.ask import ask

    settings: dict = {name: None for name in resets}
    for item in assignments:
        name, _, value = item.partition("=")
        try:
            settings[name.strip() or "?"] = float(value)
        except ValueError:
            raise click.UsageError(f"--set takes NAME=NUMBER, not {item!r}") from None
    body = signed_request(broker, "config", signing_key, expires_in, f"{device_id} refused",
                          lambda client, signer: ask(client, device_id,
                                                     lambda cid: ConfigCommand(cid, time.time(), settings),
                                                     timeout, signer))
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
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for the result.")
@signing_options
@json_option
@fail_cleanly
def bench(bundle_path, device_id, broker, runs, warmup, timeout, signing_key, expires_in, as_json) -> None:
    from host_tools.ask import bench_bundle

    if not bundle_path.is_file():
        raise ConfigError(f"bundle {bundle_path} does not exist")
    if not as_json:
        console(stderr=True).print(f"benchmarking {bundle_path.name} on {device_id} "
                                   f"({warmup} warm-up + {runs} runs)...")
    r = signed_request(broker, "bench", signing_key, expires_in, f"{device_id} could not benchmark the bundle",
                       lambda client, signer: bench_bundle(client, device_id, bundle_path, runs=runs, warmup=warmup,
                                                           timeout=timeout, signer=signer))
    if as_json:
        click.echo(json.dumps(r))
        return
    from rich.table import Table

    table = Table(title=f"{r['bundle']} on {device_id} ({r['runtime']}, {r['runs']} runs after {r['warmup']} warm-up)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for label, key in (("load", "load_ms"), ("first inference", "first_inference_ms"), ("p50", "p50_ms"),
                       ("p90", "p90_ms"), ("p99", "p99_ms"), ("mean", "mean_ms")):
        table.add_row(label, f"{r[key]:.3f} ms")
    table.add_row("peak RSS (agent process)", f"{r['peak_rss_bytes'] / 2**20:.1f} MiB")
    table.add_row("RSS after load and runs", f"{r['rss_after_runs_bytes'] / 2**20:.1f} MiB")
    console().print(table)


# -- fleet --------------------------------------------------------------------------------
@main.group(help="The fleet as the ingest (`edgefleet monitor`) recorded it.")
def fleet() -> None:
    pass


label_filter = click.option("--label", "selectors", multiple=True, metavar="NAME=VALUE",
                            help="Only devices with this label (as their agent config sets it); repeatable.")
group_filter = click.option("--group", help="Only devices whose label group is GROUP (--label group=GROUP).")


def _fleet_rows(db: Path, selectors, group):
    from host_tools.fleet.store import FleetStore
    from host_tools.fleet.view import matching

    if not db.exists():
        raise ConfigError(f"no fleet database at {db}: run `edgefleet monitor` first")
    store = FleetStore(db)
    try:
        rows = store.devices()
    finally:
        store.close()
    try:
        return matching(rows, list(selectors) + ([f"group={group}"] if group else []))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@fleet.command("status", help="One row per device: state, bundle, latency, throughput, memory, CPU, "
                              "temperature, power.")
@db_option
@label_filter
@group_filter
@json_option
@fail_cleanly
def fleet_status(db, selectors, group, as_json) -> None:
    from host_tools.fleet.view import fleet_table, summarize

    rows = _fleet_rows(db, selectors, group)
    if as_json:
        click.echo(json.dumps([summarize(r) for r in rows]))
    else:
        console().print(fleet_table(rows))


@fleet.command("watch", help="The fleet status table, live: redrawn every --every seconds until Ctrl-C.")
@db_option
@label_filter
@group_filter
@click.option("--every", default=2.0, show_default=True, type=click.FloatRange(0.2))
@click.option("--count", type=click.IntRange(1), help="Stop after this many redraws (for scripts and tests).")
@fail_cleanly
def fleet_watch(db, selectors, group, every, count) -> None:
    from rich.live import Live

    from host_tools.fleet.view import fleet_table

    drawn = 0
    out = console()
    with Live(fleet_table(_fleet_rows(db, selectors, group)), console=out, auto_refresh=False) as live:
        try:
            while count is None or drawn < count:
                live.update(fleet_table(_fleet_rows(db, selectors, group)), refresh=True)
                drawn += 1
                if count is None or drawn < count:
                    time.sleep(every)
        except KeyboardInterrupt:
            pass


# -- rollouts ---------------------------------------------------------------------------------
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


def _run_rollout(store, rollout_id, broker, signing_key, expires_in, as_json) -> None:
    from host_tools.rollout import Rollout

    signer = command_signer(signing_key, expires_in)
    client = host_client(broker, "rollout")
    err = console(stderr=True)
    try:
        doc = Rollout(store, rollout_id, client, signer, log=lambda line: err.print(line)).run()
    finally:
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
@click.option("--window", default=60.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to watch a stage before the next.")
@click.option("--stage-timeout", default=300.0, show_default=True, type=click.FloatRange(1),
              help="Seconds a stage waits for its devices' outcomes; later ones are reported pending.")
@click.option("--max-failure-rate", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Halt when more than this share of a stage fails or rolls back.")
@click.option("--max-p99-ratio", default=1.5, show_default=True, type=click.FloatRange(1),
              help="Halt when the stage's p99 latency is more than this times the previous version's.")
@click.option("--rollback-on-halt", is_flag=True, help="When halting, roll back the devices already updated.")
@db_option
@broker_option
@signing_options
@json_option
@fail_cleanly
def rollout_start(bundle_path, group, selectors, devices, stages, window, stage_timeout, max_failure_rate,
                  max_p99_ratio, rollback_on_halt, db, broker, signing_key, expires_in, as_json) -> None:
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
                       max_failure_rate=max_failure_rate, max_p99_ratio=max_p99_ratio,
                       rollback_on_halt=rollback_on_halt, devices=list(devices))
    store = _rollout_store(db)
    rollout_id = store.create(plan)
    console(stderr=True).print(f"rollout {rollout_id} started")
    _run_rollout(store, rollout_id, broker, signing_key, expires_in, as_json)


@rollout.command("resume", help="Carry on with ROLLOUT_ID (paused, or interrupted by a host restart).")
@click.argument("rollout_id")
@db_option
@broker_option
@signing_options
@json_option
@fail_cleanly
def rollout_resume(rollout_id, db, broker, signing_key, expires_in, as_json) -> None:
    store = _rollout_store(db)
    if store.get(rollout_id)["state"] not in ("running", "paused"):
        raise ConfigError(f"rollout {rollout_id} is {store.get(rollout_id)['state']}; only a running or paused one resumes")
    store.set_state(rollout_id, "running")
    _run_rollout(store, rollout_id, broker, signing_key, expires_in, as_json)


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
    if store.get(rollout_id)["state"] != "running":
        raise ConfigError(f"rollout {rollout_id} is {store.get(rollout_id)['state']}, not running")
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


# -- registry ---------------------------------------------------------------------------------
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
    rows = _fleet_rows(db, selectors, group)
    if as_json:
        click.echo(json.dumps([{"device_id": r.device_id, "online": r.online, "hardware": r.hardware,
                                "labels": r.labels, "active_bundle": r.active_bundle} for r in rows]))
        return
    from rich.table import Table

    table = Table(title="devices", header_style="bold")
    for header in ("device", "class", "arch", "RAM MiB", "runtimes", "accelerators", "labels", "bundle", "state"):
        table.add_column(header)
    for r in rows:
        hw = r.hardware or {}
        table.add_row(r.device_id, hw.get("class", "?"), hw.get("arch", "?"), str(hw.get("ram_mb", "?")),
                      ", ".join(hw.get("runtimes", [])) or "?", ", ".join(hw.get("accelerators", [])) or "none",
                      ", ".join(f"{k}={v}" for k, v in sorted(r.labels.items())), r.active_bundle or "none",
                      "online" if r.online else "offline")
    console().print(table)


@devices.command("show", help="Everything the registry knows about DEVICE_ID, and its recent deployments.")
@click.argument("device_id")
@db_option
@json_option
@fail_cleanly
def devices_show(device_id, db, as_json) -> None:
    from host_tools.fleet.store import FleetStore

    rows = [r for r in _fleet_rows(db, (), None) if r.device_id == device_id]
    if not rows:
        raise ConfigError(f"no device {device_id!r} in the registry at {db}")
    store = FleetStore(db)
    try:
        events = store.events(device_id, states=("accepted", "active", "failed", "rolled_back", "already_installed"))
    finally:
        store.close()
    r = rows[0]
    doc = {"device_id": r.device_id, "online": r.online, "since": r.since, "agent_version": r.agent_version,
           "hardware": r.hardware, "labels": r.labels, "active_bundle": r.active_bundle, "last_seen": r.last_seen,
           "deployments": events[-10:]}
    if as_json:
        click.echo(json.dumps(doc))
        return
    hw = r.hardware or {}
    click.echo(f"device:     {r.device_id} ({'online' if r.online else 'offline'}, agent {r.agent_version or '?'})")
    click.echo(f"hardware:   {hw.get('class', '?')} ({hw.get('model') or 'model not reported'}), {hw.get('arch', '?')}, "
               f"{hw.get('ram_mb', '?')} MiB RAM")
    click.echo(f"runtimes:   {', '.join(hw.get('runtimes', [])) or '?'}; accelerators: "
               f"{', '.join(hw.get('accelerators', [])) or 'none'}")
    click.echo(f"labels:     {', '.join(f'{k}={v}' for k, v in sorted(r.labels.items())) or 'none'}")
    click.echo(f"bundle:     {r.active_bundle or 'none'}")
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


@main.command(help="A local web page of the fleet: per-device plots of latency, memory, power and temperature, "
                   "rollout marks, current versions. Reads the database `edgefleet monitor` writes.")
@db_option
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--address", default="127.0.0.1", show_default=True, help="Listen here (0.0.0.0: every interface).")
@fail_cleanly
def dashboard(db, port, address) -> None:
    import signal as signals

    from host_tools.fleet.dashboard import Dashboard
    from host_tools.fleet.store import FleetStore

    if not db.exists():
        raise ConfigError(f"no fleet database at {db}: run `edgefleet monitor` first")
    store = FleetStore(db)
    try:
        page = Dashboard(store, port, address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}:{port}: {exc.strerror}") from None
    signals.signal(signals.SIGTERM, lambda *_: sys.exit(0))
    click.echo(f"dashboard on {page.url}; Ctrl-C to stop", err=True)
    try:
        page.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        page.server.server_close()
        store.close()


@main.command(help="Run the ingest: store every device's status, telemetry and events in the fleet database.")
@broker_option
@db_option
@click.option("--name", default="default", show_default=True,
              help="This monitor's name: its MQTT session, kept while it is away. Give each monitor its own.")
@click.option("--share", metavar="GROUP", help="Split telemetry and events with the other monitors of GROUP "
              "(MQTT shared subscription): how ingest scales past one process.")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="Also serve the fleet as Prometheus metrics on http://ADDRESS:PORT/metrics.")
@click.option("--metrics-address", default="0.0.0.0", show_default=True)
@click.option("--keep-days", default=7.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Keep every sample this long; older ones are folded into hourly summaries.")
@click.option("--keep-hourly-days", default=90.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Keep hourly summaries this long.")
@fail_cleanly
def monitor(broker, db, name, share, metrics_port, metrics_address, keep_days, keep_hourly_days) -> None:
    import signal as signals

    from device_agent.protocol import topics
    from host_tools.fleet.ingest import Ingest
    from host_tools.fleet.store import FleetStore

    for what, value in (("--name", name), ("--share", share)):
        if value is not None and not topics.valid_device_id(value):
            raise click.UsageError(f"{what} takes 1-64 letters, digits, '.', '_' or '-', not {value!r}")
    signals.signal(signals.SIGTERM, lambda *_: sys.exit(0))  # systemd's stop: close the database cleanly
    store = FleetStore(db)
    # A persistent session: what devices report while the monitor restarts waits at the broker.
    client = host_client(broker, "monitor", client_id=f"edgefleet-monitor-{name}")
    ingest = Ingest(client, store, share=share)
    ingest.start()
    if metrics_port is not None:
        from host_tools.fleet.metrics import serve_metrics

        try:
            serve_metrics(store, metrics_port, metrics_address)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {metrics_address}:{metrics_port}: {exc.strerror}") from None
        click.echo(f"Prometheus metrics on http://{metrics_address}:{metrics_port}/metrics", err=True)
    click.echo(f"ingesting from {broker} into {db}" + (f" (sharing the load in group {share!r})" if share else "")
               + "; Ctrl-C to stop", err=True)
    try:
        while True:  # retention: now, then every ten minutes
            folded, dropped = store.retain(time.time(), raw_days=keep_days, hourly_days=keep_hourly_days)
            if folded or dropped:
                click.echo(f"retention: {folded} samples folded into hourly summaries, {dropped} old hours dropped",
                           err=True)
            time.sleep(600)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        store.close()
        click.echo(f"stored {ingest.samples} new telemetry samples", err=True)


@main.command(help="Run the whole path on this machine: broker, compression, signed bundle, "
                   "three device agents, deployment over MQTT, and the fleet table.")
@click.option("--broker", default=None, help="Use this MQTT broker (HOST:PORT) instead of an embedded one.")
@click.option("--devices", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--workdir", type=click.Path(path_type=Path), help="Keep keys, bundles and agent state here "
              "(default: a temporary directory, removed afterwards).")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for the deployment.")
@fail_cleanly
def demo(broker, devices, workdir, timeout) -> None:
    from host_tools.demo import run_demo

    sys.exit(0 if run_demo(broker=broker, device_count=devices, workdir=workdir, timeout=timeout) else 1)


if __name__ == "__main__":
    main()
