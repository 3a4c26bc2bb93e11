"""Checks on the X.509 certificates the agent's TLS trust rests on: who issued a certificate,
whether a CA certificate renews a trusted CA or is linked from one, whether it is valid now, and
the keys by which the host names a CA it retired (``device_agent.client_cert`` keeps the state)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from device_agent.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)
CLOCK_SKEW = dt.timedelta(minutes=5)  # a certificate issued on a host whose clock is a little ahead


def load(path: Path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def cas_in(path: Path) -> list:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CA file {path}: {exc}") from None


def certificates_in(path: Path) -> list:
    """The certificates in *path*; none if it does not exist, or cannot be read (said)."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(path.read_bytes()) if path.exists() else []
    except (OSError, ValueError) as exc:
        log.warning("not using the CA certificates kept in %s: %s", path, exc)
        return []


def renews(cert, cas: list) -> bool:
    """Whether *cert* is a self-signed CA certificate with the name and key of one of *cas*."""
    return is_ca(cert) and issued_by(cert, cert) and any(same_ca(cert, ca) for ca in cas)


def vouched_for(candidates: list, trusted: list, links: list) -> tuple[list, list]:
    """Those of the self-signed CA certificates *candidates* that the CAs in *trusted* vouch for — a
    renewal of one (the same name and key), or a new CA whose name and key one of *links* gives,
    signed by one or by a link they vouch for (a second move) — and the links that are vouched for."""
    known, vouched = list(trusted), []
    pending = [link for link in links if is_ca(link)]
    while more := [link for link in pending if any(issued_by(link, ca) for ca in known)]:
        known += more
        vouched += more
        pending = [link for link in pending if link not in more]
    return [c for c in candidates if is_ca(c) and issued_by(c, c) and any(same_ca(c, ca) for ca in known)], vouched


def is_ca(cert) -> bool:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def same_ca(cert, ca) -> bool:
    """Whether two certificates have the same subject and key (a CA's, renewed or not)."""
    return cert.subject == ca.subject and key_bytes(cert.public_key()) == key_bytes(ca.public_key())


def key_id(cert) -> str:
    """A CA's key as the host names it when it retires it: the SHA-256 of its public key, hex."""
    import hashlib

    return hashlib.sha256(key_bytes(cert.public_key())).hexdigest()


def pem_of(certs: list) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_bytes(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_times(cert, what: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_before_utc > now + CLOCK_SKEW:
        raise ProtocolError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_after_utc <= now:
        raise ProtocolError(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def issued_by(cert, ca) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):  # another issuer's name, key type or signature
        return False
