"""A Mosquitto configuration for a fleet: TLS with client certificates, no anonymous clients,
and an ACL under which each device reaches only its own topics.

Identities come from ``host_tools.certs``: the broker takes a client certificate's common name
as the username. A device (CN = its device id) may subscribe to its own command and chunk
topics and publish to its own events, telemetry and reply topics, plus chunk requests (which
name a bundle, not a device), and use its own status and presence topics (device_agent/presence.py).
Host tools (CN = ``host:NAME``) may use everything under the protocol's root; they are listed by
name, so issue a host certificate before writing the configuration (or write it again after).
Revoked certificates are refused by the CRL at connection, and their names denied everything in
the ACL, which also cuts off a connection made before the revocation once the broker reloads.
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

from device_agent.errors import ConfigError
from device_agent.protocol import topics
from host_tools.certs import HOST_PREFIX, Pki

DEVICE_READS = ("cmd", "chunks")
DEVICE_WRITES = ("events", "telemetry", "reply")


def acl_text(host_users: list[str], revoked: list[str] = ()) -> str:
    lines = ["# edgefleet ACL, written by `edgefleet broker config`.",
             "# Devices: a device's certificate CN is its device id, which Mosquitto substitutes for %u.",
             *(f"pattern read {topics.ROOT}/devices/%u/{leaf}" for leaf in DEVICE_READS),
             *(f"pattern write {topics.ROOT}/devices/%u/{leaf}" for leaf in DEVICE_WRITES),
             "# Its status, which it also reads: a will another connection under its id leaves there is said over.",
             f"pattern readwrite {topics.ROOT}/devices/%u/status",
             "# Its presence topic: one live agent per device id (asked before connecting under it).",
             f"pattern readwrite {topics.ROOT}/devices/%u/presence",
             f"pattern write {topics.ALL_CHUNK_REQUESTS}",
             "# Bundle chunks fanned out to every device fetching the bundle (any device may fetch any).",
             f"pattern read {topics.ROOT}/transfer/+/chunks/+",
             "", "# Host tools (certificate CN host:NAME): the whole protocol."]
    for user in host_users:
        lines += [f"user {user}", f"topic readwrite {topics.ROOT}/#"]
    if revoked:
        lines += ["", "# Revoked (edgefleet certs revoke): nothing, from the broker's reload on. A connection made",
                  "# before it stays open, so this cuts it off; crl.pem refuses the certificate at the next."]
        for user in revoked:
            lines += [f"user {user}", "topic deny #"]
    return "\n".join(lines) + "\n"


def mosquitto_conf(out: Path, *, port: int, bind: str, persistence_dir: Path | None) -> str:
    lines = ["# edgefleet broker, written by `edgefleet broker config`.",
             "per_listener_settings false",
             "allow_anonymous false",
             f"acl_file {out / 'acl'}",
             f"listener {port} {bind}".rstrip(),
             f"cafile {out / 'ca.crt'}",
             f"certfile {out / 'broker.crt'}",
             f"keyfile {out / 'broker.key'}",
             "require_certificate true",
             "use_identity_as_username true",
             # Revoked client certificates (edgefleet certs revoke), reread when the broker reloads.
             f"crlfile {out / 'crl.pem'}",
             "tls_version tlsv1.2",
             # Commands for offline devices wait in their persistent sessions.
             "max_queued_messages 10000",
             # ... but not for ever: a session nobody has resumed in a week is dropped (a device whose
             # state directory was wiped comes back under a new client id; signed commands expire
             # after a day by default anyway).
             "persistent_client_expiration 7d",
             # Small messages (chunk requests, acknowledgements) go out at once, not after the
             # peer's delayed ACK: without it a chunk round trip can take 40 ms.
             "set_tcp_nodelay true"]
    if persistence_dir is None:
        lines.append("persistence false")
    else:
        lines += ["persistence true", f"persistence_location {persistence_dir}/"]
    return "\n".join(lines) + "\n"


def host_users(pki: Pki) -> list[str]:
    return [c.name for c in pki.issued() if not c.revoked and c.name.startswith(HOST_PREFIX)]


def _give_to_broker_user(*paths: Path) -> None:
    """Mosquitto started as root drops to its own user before it reads the key and the ACL."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for path in paths:
        os.chown(path, user.pw_uid, user.pw_gid)


def write_broker_config(pki: Pki, out: Path, *, port: int = 8883, bind: str = "",
                        persistence_dir: Path | None = Path("/var/lib/mosquitto")) -> list[Path]:
    """Write mosquitto.conf, acl and the broker's TLS files into *out*; returns what was written."""
    for needed in (pki.ca_cert, pki.broker_cert, pki.broker_key):
        if not needed.is_file():
            raise ConfigError(f"{needed} is missing: run `edgefleet certs init` first")
    users = host_users(pki)
    if not users:
        raise ConfigError("no host certificate (CN host:NAME) in the PKI: host tools could not connect; "
                          "issue one with `edgefleet certs client host:NAME` first")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pki.ca_cert, out / "ca.crt")
    shutil.copyfile(pki.broker_cert, out / "broker.crt")
    shutil.copyfile(pki.broker_key, out / "broker.key")
    (out / "broker.key").chmod(0o600)
    (out / "crl.pem").write_bytes(pki.revocation_lists())
    (out / "acl").write_text(acl_text(users, sorted(pki.revoked_names())))
    (out / "mosquitto.conf").write_text(mosquitto_conf(out, port=port, bind=bind,
                                                       persistence_dir=persistence_dir))
    _give_to_broker_user(out / "broker.key", out / "acl")
    return [out / "mosquitto.conf", out / "acl", out / "ca.crt", out / "broker.crt", out / "broker.key",
            out / "crl.pem"]
