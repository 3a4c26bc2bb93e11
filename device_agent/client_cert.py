"""The client certificate the agent shows the broker, and taking a renewed one over MQTT.

`edgefleet certs renew` issues a device a new certificate over its existing key; `edgefleet certs
push` sends it in a signed ``certificate`` command. The agent takes it only if it is for this
device's key and name, signed by a CA in the agent's CA file, valid now and for longer than the one
in use. It then reconnects with it and keeps it (``STATE/tls/client.crt``) only once the broker has
accepted a connection with it; if the broker does not, it goes back to the one before, which still
works (renewal does not revoke it) — as an update that does not come up healthy is rolled back. The
key never travels and the configured files are never written: a certificate kept in the state
directory is used over the configured one while it lasts longer.

The same command carries the CA's current certificate. When the host renewed it (`edgefleet certs
renew --ca`: the same name and key, a later end), the agent trusts it beside the configured CA file
(``STATE/tls/ca.crt``: the configured CAs and the renewals of them taken up), so the broker's
certificate still verifies once the earlier CA certificate has expired. When the host moved to a
new CA key (`edgefleet certs rotate-ca`), the command also carries the new CA's link: its name and
key signed by the CA before it. The agent takes the new CA only if that link is signed by a CA it
trusts, and keeps the link (``STATE/tls/ca-links.crt``) to check it again at each start. So a command
cannot bring in a CA that the trusted ones did not sign for: neither a renewal nor a linked CA comes
from anywhere but the configured file's CAs.

Once the move is over (`edgefleet certs retire-ca`), the command names the keys of the CAs the
host retired (``ca_retired``): the agent stops trusting every CA certificate over those keys, the
configured file's included, and records the keys (``STATE/tls/ca-retired``) so that they stay
retired across restarts and no command brings them back. It does so only while the broker it is
connected to shows a certificate from a CA it keeps, so that it cannot shut itself out. The links
it took stay evidence: a retired CA still vouches for the links it signed before, never for more.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError, ProtocolError, StorageError
from device_agent.certificates import (cas_in, certificates_in, check_times, issued_by, key_bytes, key_id, load,
                                       pem_of, renews, same_ca, vouched_for)
from device_agent.files import replaced_when_written
from device_agent.tls import TlsFiles
from device_agent.protocol.reports import MAX_CA_KEYS, expires_at

log = logging.getLogger(__name__)
RENEW_WITHIN_DAYS = 30  # a certificate with fewer days left is said to need renewing


def days_left(described: dict[str, str], which: str = "expires") -> float | None:
    """Days until a certificate as ClientCertificate.describe() gives it expires (negative: since);
    with *which* "ca_expires", until the CA certificates it is signed under do (None: not said)."""
    end = expires_at(described, which)
    return None if end is None else (end - time.time()) / 86400


def certificate_text(described: dict[str, str]) -> str:
    """One line for a certificate as ClientCertificate.describe() gives it: serial, expiry, whether
    it was renewed over MQTT, its CA's expiry, and a warning when either is about to expire or has."""
    def warning(left: float | None) -> str:
        return "" if left is None else ", EXPIRED" if left <= 0 else \
            f", {int(left)} days left: renew it" if left < RENEW_WITHIN_DAYS else ""

    return (f"serial {described['serial'][:16]}, valid until {described['expires'][:10]}"
            + (" (renewed over MQTT)" if described["source"] == "renewed" else "") + warning(days_left(described))
            + (f"; its CA until {described['ca_expires'][:10]}" + warning(days_left(described, "ca_expires"))
               if "ca_expires" in described else ""))


class ClientCertificate:
    """Which client certificate to present (*tls* as configured, or a renewed one kept under
    *state_dir*), and the checks and the keeping of a renewed one."""

    def __init__(self, tls: TlsFiles | None, state_dir: Path, device_id: str) -> None:
        self.configured = tls
        self.device_id = device_id
        self.kept = state_dir / "tls" / "client.crt"
        self.kept_ca = self.kept.with_name("ca.crt")
        self.links = self.kept.with_name("ca-links.crt")
        self.retired = self.kept.with_name("ca-retired")
        self.candidate = self.kept.with_name("client.crt.new")
        self.candidate.unlink(missing_ok=True)  # one the broker never accepted (the agent stopped meanwhile)
        self.tls = tls
        if tls is None:
            return
        self.tls = replace(tls, ca=self._trusted_cas())
        if tls.cert is None or not self.kept.exists():
            return
        try:
            kept = self.check(self.kept.read_text(), newer_than=tls.cert)
        except (OSError, ValueError, ProtocolError, ConfigError) as exc:  # e.g. outlasted by a newer configured one
            log.warning("not using the renewed client certificate %s: %s", self.kept, exc)
            return
        self.tls = replace(self.tls, cert=self.kept)
        log.info("using the renewed client certificate %s (serial %x, valid until %s)", self.kept, kept.serial_number,
                 f"{kept.not_valid_after_utc:%Y-%m-%d}")

    def _trusted_cas(self) -> Path:
        """The configured CA file; or, once CA certificates were taken up or retired, the kept one: the
        configured file's CAs and those taken up that have not expired and that the configured ones
        vouch for — renewals of them, or new CAs a kept link from them signs for — less those over a
        retired key (made again at each start, so that a CA taken out of the configured file takes
        those with it). ConfigError if that leaves none."""
        configured = self.configured.ca
        if not (self.kept_ca.exists() or self.retired.exists()):
            return configured
        try:
            retired = self._retired_keys()
        except OSError as exc:  # not knowing which are retired must not trust them again
            raise ConfigError(f"cannot read the retired CA keys in {self.retired}: {exc}") from None
        try:
            cas = cas_in(configured)
        except ConfigError:
            return configured  # (the connection says it cannot read it)
        kept, links = certificates_in(self.kept_ca), certificates_in(self.links)
        now = dt.datetime.now(dt.timezone.utc)
        taken, links = vouched_for([c for c in kept if c not in cas], cas, links)
        trusted = [c for c in cas + [c for c in taken if c.not_valid_after_utc > now] if key_id(c) not in retired]
        if not trusted:
            raise ConfigError(f"every CA in {configured} was retired on this device by the host (`edgefleet certs "
                              f"retire-ca`; their keys are in {self.retired}): configure the current CA's certificate")
        try:
            if trusted == cas:
                self.kept_ca.unlink(missing_ok=True)
                self.links.unlink(missing_ok=True)
                return configured
            self._keep(self.kept_ca, trusted)
            if links:
                self._keep(self.links, links)
            else:
                self.links.unlink(missing_ok=True)
        except OSError as exc:
            if retired:
                raise ConfigError(f"cannot write the CAs this device trusts to {self.kept_ca}: {exc}") from None
            log.warning("not using the CA certificates taken up in %s: %s", self.kept_ca, exc)
            return configured
        return self.kept_ca

    def take_ca(self, pem: str, link: str | None = None):
        """Trust the CA certificate *pem* from now on if it renews a CA this device trusts (the same
        name and key, valid now, and ending later than every certificate of that CA here), or if
        *link* — its name and key, valid now — is signed by a CA this device trusts: it is then
        added to the kept CA file (and the link kept beside it), and returned. None if there is
        nothing to take (it is trusted already, or outlasted); ProtocolError if no CA this device
        trusts vouches for it."""
        from cryptography import x509

        if self.tls is None:
            raise ConfigError("this agent does not use TLS: it has no CA to renew")
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
            linked = x509.load_pem_x509_certificate(link.encode()) if link is not None else None
        except ValueError:
            raise ProtocolError("the CA or its link is not a PEM certificate") from None
        cas = cas_in(self.tls.ca)
        if cert in cas:
            return None
        if key_id(cert) in self._retired_keys():
            raise ProtocolError(f"the CA certificate {cert.subject.rfc4514_string()} is over a key the host retired")
        renewal = renews(cert, cas)
        if renewal:
            check_times(cert, "the CA certificate")
            if cert.not_valid_after_utc <= max(c.not_valid_after_utc for c in cas if same_ca(cert, c)):
                return None
        elif linked is not None and vouched_for([cert], cas, [linked])[0]:
            check_times(linked, "the CA's link")
            check_times(cert, "the CA certificate")
        else:
            raise ProtocolError(f"the CA certificate neither renews a CA in {self.configured.ca} (the same name and "
                                f"key) nor comes with a link from one: a CA is trusted only from the configured file")
        try:
            self.kept_ca.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not renewal:
                self._keep(self.links, certificates_in(self.links) + [linked])
            self._keep(self.kept_ca, cas + [cert])
        except OSError as exc:
            raise StorageError(f"cannot keep the CA certificate in {self.kept_ca.parent}: {exc}") from None
        self.tls = replace(self.tls, ca=self.kept_ca)
        log.info("trusting the %s CA certificate %s (serial %x, valid until %s)",
                 "renewed" if renewal else "new", cert.subject.rfc4514_string(), cert.serial_number,
                 f"{cert.not_valid_after_utc:%Y-%m-%d}")
        return cert

    def retire_cas(self, keys: tuple[str, ...], broker_certificate: bytes | None) -> list:
        """Stop trusting the CA certificates over the *keys* (SHA-256 of their public keys, hex) the
        host retired, and keep them retired across restarts; the certificates dropped (none: nothing
        here is over those keys). Refused (ProtocolError, nothing changed) unless the broker's
        certificate (*broker_certificate*, DER, from the connection in use) and this device's own
        are signed by a CA that stays: the broker must have moved first, or the agent would shut
        itself out."""
        from cryptography import x509

        if not keys:
            return []
        if self.tls is None:
            raise ConfigError("this agent does not use TLS: it has no CA to retire")
        trusted = cas_in(self.tls.ca)
        retiring = [c for c in trusted if key_id(c) in keys]
        if not retiring:
            return []
        staying = [c for c in trusted if c not in retiring]
        names = ", ".join(sorted({c.subject.rfc4514_string() for c in retiring}))
        try:
            broker = x509.load_der_x509_certificate(broker_certificate) if broker_certificate else None
        except ValueError:
            broker = None
        if broker is None or not any(issued_by(broker, ca) for ca in staying):
            raise ProtocolError(f"the broker does not show a certificate from a CA this device keeps, so it will not "
                                f"stop trusting {names}: after `edgefleet certs retire-ca`, write the broker's "
                                f"configuration again and restart it first")
        try:
            own = load(self.tls.cert) if self.tls.cert is not None else None
        except (OSError, ValueError):
            own = None
        if own is not None and not any(issued_by(own, ca) for ca in staying):
            raise ProtocolError(f"this device's certificate is from {names}: it needs one from the current CA "
                                f"first (`edgefleet certs push`)")
        try:
            self.kept_ca.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with replaced_when_written(self.retired) as tmp:
                tmp.write_text("".join(f"{k}\n" for k in sorted(self._retired_keys() | set(keys))))
            self._keep(self.kept_ca, staying)
        except OSError as exc:
            raise StorageError(f"cannot keep the retired CA keys in {self.kept_ca.parent}: {exc}") from None
        self.tls = replace(self.tls, ca=self.kept_ca)
        log.info("no longer trusting the CA %s, which the host retired", names)
        return retiring

    def _retired_keys(self) -> set[str]:
        return set(self.retired.read_text().split()) if self.retired.exists() else set()

    @staticmethod
    def _keep(path: Path, certs: list) -> None:
        """Write *certs* to *path* (the kept CA file, or the links), replacing it whole."""
        with replaced_when_written(path) as tmp:
            tmp.write_bytes(pem_of(certs))

    def describe(self) -> dict[str, Any] | None:
        """Serial, expiry and source ("config" or "renewed") of the certificate in use, when the last
        of the CA certificates here that it is signed under expires, and the keys of the CAs trusted
        (key_id, comma-separated: the host finds the devices that still trust a retired one; left out
        beyond MAX_CA_KEYS, as with a system CA bundle); None without a client certificate."""
        if self.tls is None or self.tls.cert is None:
            return None
        try:
            cert = load(self.tls.cert)
            trusted = cas_in(self.tls.ca)
            issuers = [ca for ca in trusted if issued_by(cert, ca)]
        except (OSError, ValueError, ConfigError):
            return None
        return {"serial": f"{cert.serial_number:x}", "expires": cert.not_valid_after_utc.isoformat(),
                "source": "renewed" if self.tls.cert == self.kept else "config",
                **({"ca_expires": max(ca.not_valid_after_utc for ca in issuers).isoformat()} if issuers else {}),
                **({"ca_keys": ",".join(sorted(keys))} if len(keys := {key_id(ca) for ca in trusted}) <= MAX_CA_KEYS
                   else {})}

    def shows(self, pem: str) -> bool:
        """Whether *pem* is the certificate in use already (the same one pushed again)."""
        from cryptography import x509

        try:
            return self.tls is not None and self.tls.cert is not None and \
                x509.load_pem_x509_certificate(pem.encode()) == load(self.tls.cert)
        except (OSError, ValueError):
            return False

    def check(self, pem: str, *, newer_than: Path | None = None):
        """The certificate in *pem* if this device may present it instead of the one in *newer_than*
        (default: the one in use); else ProtocolError with the reason."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        tls = self.configured
        if tls is None or tls.cert is None or tls.key is None:
            raise ConfigError("this agent connects without a client certificate (tls_cert and tls_key in its config): "
                              "there is none to renew")
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            raise ProtocolError("not a PEM certificate") from None
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [self.device_id]:
            raise ProtocolError(f"the certificate is for {', '.join(map(str, names)) or 'no name'}, "
                                f"not {self.device_id}")
        try:
            key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read this agent's key {tls.key}: {exc}") from None
        if key_bytes(cert.public_key()) != key_bytes(key.public_key()):
            raise ProtocolError("the certificate is for another key than this device's (a renewal keeps the key: "
                                "`edgefleet certs renew`)")
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
                raise ProtocolError("the certificate is not for TLS clients (its extended key usage)")
        except x509.ExtensionNotFound:
            pass
        if not any(issued_by(cert, ca) for ca in cas_in(self.tls.ca)):
            raise ProtocolError(f"the certificate is not signed by a CA in {tls.ca}")
        check_times(cert, "the certificate")
        current = newer_than or (self.tls.cert if self.tls else None)
        try:
            in_use = load(current) if current is not None else None
        except (OSError, ValueError):
            in_use = None  # unreadable: anything valid is better
        if in_use is not None and cert.not_valid_after_utc <= in_use.not_valid_after_utc:
            raise ProtocolError(f"the certificate expires ({cert.not_valid_after_utc:%Y-%m-%d}) no later than the one "
                                f"in use ({in_use.not_valid_after_utc:%Y-%m-%d}): nothing to renew")
        return cert

    def stage(self, pem: str) -> TlsFiles:
        """Check *pem* and write it beside the kept one; the TLS files that present it."""
        cert = self.check(pem)
        try:
            self.candidate.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with replaced_when_written(self.candidate) as tmp:
                tmp.write_text(pem)
        except OSError as exc:
            raise StorageError(f"cannot keep the renewed certificate in {self.candidate.parent}: {exc}") from None
        log.info("trying the renewed client certificate (serial %x, valid until %s)", cert.serial_number,
                 f"{cert.not_valid_after_utc:%Y-%m-%d}")
        return replace(self.tls, cert=self.candidate)

    def commit(self) -> TlsFiles:
        """The broker accepted the staged certificate: keep it (across restarts) and use it."""
        self.candidate.replace(self.kept)
        self.tls = replace(self.tls, cert=self.kept)
        return self.tls

    def discard(self) -> None:
        self.candidate.unlink(missing_ok=True)
