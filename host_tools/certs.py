"""A small PKI for the broker: a CA, the broker's server certificate, and one client certificate
per device (and per host tool), made with the ``cryptography`` package.

The broker takes the client certificate's common name as the MQTT username
(``use_identity_as_username``), and the ACL (``host_tools.broker_config``) keys on it: a
device's CN is its device id; a host tool's CN is ``host:NAME``, which no device id can be
(device ids have no colon). Layout of the PKI directory::

    ca.key ca.crt                   the CA (keep ca.key off the broker and the devices)
    broker.key broker.crt           the broker's server certificate (SANs: the names given)
    clients/NAME.key clients/NAME.crt   devices and host tools
    crl.pem                         the revocation list (empty until a certificate is revoked)
    revoked/NAME-SERIAL.crt         revoked certificates (their keys are deleted)
    superseded/NAME-SERIAL.crt      client certificates renewed over: valid until they expire, so
                                    revoking NAME revokes them too
    superseded/ca/SERIAL.crt        the CA's certificates renewed over (`certs renew --ca`), or
                                    retired (`certs retire-ca`)
    previous/ca.key previous/ca.crt previous/crl.pem
                                    while the fleet moves to a new CA key (`certs rotate-ca`): the
                                    CA before, which ca.crt names too (after the current one) and
                                    which still signs the broker's certificate, until `certs
                                    retire-ca`
    ca-link.crt                     meanwhile, the current CA's name and key signed by the previous
                                    CA: what makes a device that trusts only the previous one take
                                    up the current one (`certs push`; device_agent.client_cert)

A revoked name can be issued a new certificate (a replacement device under the same id); until
it is, the broker's ACL denies that name everything (``host_tools.broker_config``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.certificates import key_id
from device_agent.errors import ConfigError
from device_agent.files import replaced_when_written
from device_agent.protocol import topics
from host_tools.issuing import common_name, general_name, issue, key_pem, next_ca_name, write_private

HOST_PREFIX = "host:"
CA_DAYS = 3650  # the CA's and the broker's certificates
CLIENT_DAYS = 825  # devices' and host tools'


def _client_kind(name: str) -> str:
    return "host tool" if name.startswith(HOST_PREFIX) else "device"


@dataclass(frozen=True)
class IssuedCert:
    """A client certificate of the PKI, as `edgefleet certs list` shows it."""
    name: str
    path: Path
    serial: int
    expires: dt.datetime
    revoked: bool
    kind: str  # "device", "host tool", "CA" or "broker"


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    @property
    def crl(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def previous(self) -> Path:
        """The CA before the current one, while the fleet moves off it (rotate_ca)."""
        return self.dir / "previous"

    @property
    def ca_link(self) -> Path:
        return self.dir / "ca-link.crt"

    @property
    def broker_cert(self) -> Path:
        return self.dir / "broker.crt"

    @property
    def broker_key(self) -> Path:
        return self.dir / "broker.key"

    def client_files(self, name: str) -> tuple[Path, Path]:
        """(cert, key) of a device or host tool; *name* is a device id or ``host:NAME``."""
        stem = name.replace(":", "-")  # file names stay portable
        return self.dir / "clients" / f"{stem}.crt", self.dir / "clients" / f"{stem}.key"

    def init(self, broker_names: list[str], *, days: int = CA_DAYS) -> list[Path]:
        """Create the CA and the broker certificate (valid for *broker_names*: DNS names or IPs)."""
        if self.ca_cert.exists() or (self.dir / "ca.key").exists():
            raise ConfigError(f"{self.dir} already holds a CA; refusing to overwrite it")
        if not broker_names:
            raise ConfigError("give at least one --broker-host name or IP the devices will connect to")
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet CA")])
        ca = issue("edgefleet CA", ca_key.public_key(), ca_name, ca_key, days=days, ca=True)
        write_private(self.dir / "ca.key", key_pem(ca_key))
        self.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        broker_key = ec.generate_private_key(ec.SECP256R1())
        broker = issue(broker_names[0], broker_key.public_key(), ca_name, ca_key, days=days,
                       sans=[general_name(n) for n in broker_names], usage=[ExtendedKeyUsageOID.SERVER_AUTH])
        write_private(self.broker_key, key_pem(broker_key))
        self.broker_cert.write_bytes(broker.public_bytes(serialization.Encoding.PEM))
        return [self.dir / "ca.key", self.ca_cert, self.broker_key, self.broker_cert]

    def issue_client(self, name: str, *, days: int = CLIENT_DAYS) -> tuple[Path, Path]:
        """A client certificate whose common name is *name*: a device id, or ``host:NAME``."""
        plain = name[len(HOST_PREFIX):] if name.startswith(HOST_PREFIX) else name
        if not topics.valid_device_id(plain):
            raise ConfigError(f"{name!r} is not a device id (1-64 letters, digits, '.', '_' or '-') "
                              f"or host:NAME")
        cert_path, key_path = self.client_files(name)
        if cert_path.exists() or key_path.exists():
            raise ConfigError(f"{cert_path} already exists; refusing to overwrite it")
        ca_key, ca = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(name, key.public_key(), ca.subject, ca_key, days=days,
                     usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
        write_private(key_path, key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def renew(self, name: str | None, *, days: int | None = None) -> IssuedCert:
        """A new certificate for the client *name* (None: the broker), valid *days* from now (by
        default as long as such certificates are issued for), over the same key, common name and
        host names as its current one, which it replaces in place. The
        earlier one stays valid until it expires (it is no secret that leaked: nothing to revoke), so
        a device can be given the new file whenever it suits, and its key never moves."""
        # The broker's certificate stays under the previous CA while devices that trust only it remain.
        ca_key, ca = self._load_ca(self.previous if name is None and self.moving() else self.dir)
        path, old = self._current(name)
        try:
            sans = list(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            sans = None
        usage = ExtendedKeyUsageOID.SERVER_AUTH if name is None else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = issue(common_name(old) or "", old.public_key(), ca.subject, ca_key,
                     days=days or (CA_DAYS if name is None else CLIENT_DAYS), sans=sans, usage=[usage])
        if name is not None:  # a device may still show it: it is revoked with the name (revoke)
            earlier = self.dir / "superseded" / f"{path.stem}-{old.serial_number:x}.crt"
            earlier.parent.mkdir(exist_ok=True)
            earlier.write_bytes(old.public_bytes(serialization.Encoding.PEM))
        with replaced_when_written(path) as tmp:
            tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return IssuedCert(common_name(cert) or path.name, path, cert.serial_number, cert.not_valid_after_utc, False,
                          "broker" if name is None else _client_kind(name))

    def renew_ca(self, *, days: int = CA_DAYS) -> IssuedCert:
        """A new certificate for the CA, valid *days* from now, over its key and name, written over
        ca.crt. Everything the CA signed verifies under it as under the earlier one (the same name
        and key), so nothing is issued again; the broker, the devices and the host tools need it
        in their CA files before the earlier one expires (`certs push` gives it to the devices).
        The earlier one is kept in superseded/ca/; crl.pem is signed again to last as long."""
        ca_key, old = self._load_ca()
        new = issue(common_name(old) or "", ca_key.public_key(), old.subject, ca_key, days=days, ca=True)
        if new.subject != old.subject:  # (a CA made elsewhere, its name more than a common name)
            raise ConfigError(f"the CA in {self.dir} is named {old.subject.rfc4514_string()}: only a CA that "
                              f"`edgefleet certs init` made can be renewed here")
        self._supersede_ca(old)
        self._write_ca(new)
        if self.crl.exists():  # its next update was the earlier certificate's end
            self._sign_revocation_list()
        return IssuedCert(common_name(new) or "CA", self.ca_cert, new.serial_number, new.not_valid_after_utc, False,
                          "CA")

    def rotate_ca(self, *, days: int = CA_DAYS) -> IssuedCert:
        """Begin moving the fleet to a new CA key (the old one leaked, or is due to be replaced): a
        new CA ("edgefleet CA 2", 3, ...), and every current client certificate issued again under
        it over the same key. The CA before moves to previous/: ca.crt names both, the broker keeps
        a certificate from the previous one (devices that trust only it still connect) and takes
        client certificates from either, and ca-link.crt — the new CA signed by the previous one —
        is what lets a device that trusts only the previous CA take up the new one (`certs push`).
        `retire_ca` ends the move."""
        if self.moving():
            raise ConfigError(f"{self.previous} holds the CA before the current one: end that move first "
                              f"(`edgefleet certs retire-ca`)")
        old_key, old = self._load_ca()
        left = (old.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).total_seconds() / 86400
        if left <= 0:  # no device can take a link from it, nor connect to be given one
            raise ConfigError(f"the CA's certificate expired on {old.not_valid_after_utc:%Y-%m-%d}: renew it first "
                              f"(`edgefleet certs renew --ca`) and give the devices it")
        name = next_ca_name(common_name(old) or "")
        key = ec.generate_private_key(ec.SECP256R1())
        own_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        new = issue(name, key.public_key(), own_name, key, days=days, ca=True)
        link = issue(name, key.public_key(), old.subject, old_key, days=min(days, left), ca=True)
        self.ensure_revocation_list()
        self.previous.mkdir(mode=0o700)
        os.replace(self.crl, self.previous / "crl.pem")
        self.previous.joinpath("ca.crt").write_bytes(old.public_bytes(serialization.Encoding.PEM))
        write_private(self.previous / "ca.key", key_pem(old_key))
        self.ca_link.write_bytes(link.public_bytes(serialization.Encoding.PEM))
        with replaced_when_written(self.dir / "ca.key") as tmp:
            tmp.touch(mode=0o600)
            tmp.write_bytes(key_pem(key))
        self._write_ca(new)
        self._sign_revocation_list()  # the new CA's, empty: a revoked name has no current certificate
        for issued in self.issued():
            if not issued.revoked:
                self.renew(issued.name)
        return IssuedCert(name, self.ca_cert, new.serial_number, new.not_valid_after_utc, False, "CA")

    def retire_ca(self) -> IssuedCert:
        """End the move rotate_ca began: the broker's certificate is issued again under the current
        CA, the previous CA's key is deleted (its certificate is kept in superseded/ca/), and ca.crt
        and the broker trust the current CA alone. Devices still showing a certificate from the
        previous CA cannot connect after that."""
        if not self.moving():
            self._load_ca()  # (no CA at all is the clearer error)
            raise ConfigError(f"no earlier CA in {self.previous}: nothing to retire (`edgefleet certs rotate-ca` "
                              f"begins a move to a new CA key)")
        _, previous = self._load_ca(self.previous)
        _, current = self._load_ca()
        self._supersede_ca(previous)
        self.ca_link.unlink(missing_ok=True)
        shutil.rmtree(self.previous)  # its key above all
        self._write_ca(current)
        return self.renew(None)

    def moving(self) -> bool:
        """Whether the fleet is moving to a new CA key (rotate_ca, not yet retire_ca)."""
        return (self.previous / "ca.crt").is_file()

    def ca_expires(self) -> dt.datetime:
        """When the CA's current certificate expires."""
        return self._read_ca(self.require_ca().dir).not_valid_after_utc

    def ca_certificate(self) -> str:
        """The CA's current certificate (PEM), to send it to the devices with theirs (`certs push`)."""
        return self._read_ca(self.require_ca().dir).public_bytes(serialization.Encoding.PEM).decode()

    def ca_link_certificate(self) -> str | None:
        """While the fleet moves to a new CA key, the link to it from the previous CA (PEM)."""
        return self.ca_link.read_text() if self.moving() and self.ca_link.is_file() else None

    def retired_ca_keys(self) -> tuple[str, ...]:
        """The keys of the CAs retired here (`certs retire-ca`), as devices name them (SHA-256 of the
        public key, hex): `certs push` has the devices stop trusting them."""
        own = {key_id(self._read_ca(home)) for home in (self.dir, self.previous) if (home / "ca.crt").is_file()}
        ended = (x509.load_pem_x509_certificate(p.read_bytes()) for p in (self.dir / "superseded" / "ca").glob("*.crt"))
        return tuple(sorted({key_id(cert) for cert in ended} - own))

    def revocation_lists(self) -> bytes:
        """crl.pem, and the previous CA's during a move: what the broker checks client certificates
        against (each against its issuer's list)."""
        lists = self.ensure_revocation_list().read_bytes()
        return lists + (self.previous / "crl.pem").read_bytes() if self.moving() else lists

    def _supersede_ca(self, cert: x509.Certificate) -> None:
        """Keep a CA certificate renewed over or retired in superseded/ca/ (retired_ca_keys reads them)."""
        kept = self.dir / "superseded" / "ca" / f"{cert.serial_number:x}.crt"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _write_ca(self, current: x509.Certificate) -> None:
        """ca.crt: the current CA's certificate, then during a move the previous CA's."""
        pem = current.public_bytes(serialization.Encoding.PEM)
        if self.moving():
            pem += (self.previous / "ca.crt").read_bytes()
        with replaced_when_written(self.ca_cert) as tmp:
            tmp.write_bytes(pem)

    def device_certificate(self, name: str) -> str:
        """Device *name*'s current certificate (PEM), to send it to the device (`certs push`)."""
        if name.startswith(HOST_PREFIX):
            raise ConfigError(f"{name} is a host tool's certificate: copy it to where the tool runs")
        if not topics.valid_device_id(name):
            raise ConfigError(f"{name!r} is not a device id")
        path, _ = self._current(name)
        return path.read_text()

    def _current(self, name: str | None) -> tuple[Path, x509.Certificate]:
        """The current certificate of the client *name* (None: the broker's), and its file."""
        path = self.broker_cert if name is None else self.client_files(name)[0]
        try:
            return path, x509.load_pem_x509_certificate(path.read_bytes())
        except FileNotFoundError:
            revoked = name in self.revoked_names()
            raise ConfigError(f"{name or 'the broker'} has no current certificate in {path.parent}"
                              + (" (revoked: `edgefleet certs client` issues a new one)" if revoked else "")) from None
        except ValueError as exc:
            raise ConfigError(f"{path} is unreadable: {exc}") from None

    def issued(self) -> list[IssuedCert]:
        """Every client certificate issued here: the current ones, then the revoked ones."""
        found = []
        for folder, revoked in ((self.dir / "clients", False), (self.dir / "revoked", True)):
            for path in sorted(folder.glob("*.crt")):
                try:
                    cert = x509.load_pem_x509_certificate(path.read_bytes())
                except ValueError:
                    continue
                name = common_name(cert)
                if name is not None:
                    found.append(IssuedCert(name, path, cert.serial_number, cert.not_valid_after_utc, revoked,
                                            _client_kind(name)))
        return found

    def own(self) -> list[IssuedCert]:
        """The CA's and the broker's certificates (and the previous CA's during a move): when one
        expires, no device can connect."""
        found = []
        for path, kind in ((self.ca_cert, "CA"), (self.previous / "ca.crt", "previous CA"),
                           (self.broker_cert, "broker")):
            if path.is_file():
                cert = x509.load_pem_x509_certificates(path.read_bytes())[0]  # (ca.crt: the current CA first)
                found.append(IssuedCert(common_name(cert) or path.name, path, cert.serial_number,
                                        cert.not_valid_after_utc, False, kind))
        return found

    def revoke(self, name: str) -> IssuedCert:
        """Revoke *name*'s current certificate and those it was renewed over: their serials go into
        crl.pem (signed by the CA, valid until the CA expires, so the list never lapses and locks
        every device out), the certificates into revoked/, and the key is deleted."""
        cert_path, key_path = self.client_files(name)
        issued = [c for c in self.issued() if c.name == name]
        current = next((c for c in issued if c.path == cert_path), None)
        if current is None:
            self._load_ca()  # (no CA at all is the clearer error)
            raise ConfigError(f"{name} has no current certificate in {self.dir / 'clients'}"
                              + (" (revoked already)" if issued else ""))
        superseded = sorted(p for p in (self.dir / "superseded").glob(f"{cert_path.stem}-*.crt")
                            if re.fullmatch(rf"{re.escape(cert_path.stem)}-[0-9a-f]+\.crt", p.name))  # not pi-a-b's
        earlier = [x509.load_pem_x509_certificate(p.read_bytes()).serial_number for p in superseded]
        self._sign_revocation_list(add=(current.serial, *earlier))
        kept = self.dir / "revoked" / f"{cert_path.stem}-{current.serial:x}.crt"
        kept.parent.mkdir(exist_ok=True)
        for path in superseded:
            os.replace(path, kept.parent / path.name)
        os.replace(cert_path, kept)
        key_path.unlink(missing_ok=True)
        return replace(current, path=kept, revoked=True)

    def ensure_revocation_list(self) -> Path:
        """crl.pem, made empty if nothing was revoked yet: the broker is configured with one from the
        start, as Mosquitto rereads the file on a reload but does not take up a crlfile added then."""
        if not self.crl.exists():
            self._sign_revocation_list()
        return self.crl

    def _sign_revocation_list(self, add: tuple[int, ...] = ()) -> None:
        """Sign crl.pem again, listing *add* too; during a move the previous CA's as well (with the
        same serials: one a CA did not issue matches nothing on its list)."""
        for home in (self.dir, self.previous) if self.moving() else (self.dir,):
            self._sign_crl(home, add)

    def _sign_crl(self, home: Path, add: tuple[int, ...]) -> None:
        ca_key, ca = self._load_ca(home)
        crl = home / "crl.pem"
        now = dt.datetime.now(dt.timezone.utc)
        entries = list(self._revocation_list(ca, crl)) if crl.exists() else []
        listed = {entry.serial_number for entry in entries}
        for serial in add:
            if serial not in listed:  # (again after a failed move)
                entries.append(x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
                listed.add(serial)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(ca.not_valid_after_utc))
        for entry in entries:
            builder = builder.add_revoked_certificate(entry)
        with replaced_when_written(crl) as tmp:
            tmp.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))

    def revoked_names(self) -> set[str]:
        """Names whose last certificate was revoked and that have no current one."""
        issued = self.issued()
        current = {c.name for c in issued if not c.revoked}
        return {c.name for c in issued if c.revoked and c.name not in current}

    @staticmethod
    def _revocation_list(ca: x509.Certificate, path: Path) -> x509.CertificateRevocationList:
        try:
            crl = x509.load_pem_x509_crl(path.read_bytes())
        except ValueError as exc:
            raise ConfigError(f"{path} is unreadable: {exc}") from None
        if crl.issuer != ca.subject:
            raise ConfigError(f"{path} was not issued by the CA in {path.parent}")
        return crl

    def require_ca(self) -> "Pki":
        """This PKI, once it has a CA (else one line saying to make one)."""
        if not self.ca_cert.is_file():
            raise self._no_ca()
        return self

    def _no_ca(self) -> ConfigError:
        return ConfigError(f"no CA in {self.dir}: run `edgefleet certs init` first")

    def _load_ca(self, home: Path | None = None):
        """The key and certificate of the CA in *home*: this PKI's directory (the current CA), or
        previous/ during a move."""
        home = home or self.dir
        try:
            ca_key = serialization.load_pem_private_key((home / "ca.key").read_bytes(), password=None)
            ca = self._read_ca(home)
        except FileNotFoundError:
            raise self._no_ca() from None
        except ValueError as exc:
            raise ConfigError(f"the CA in {home} is unreadable: {exc}") from None
        return ca_key, ca

    @staticmethod
    def _read_ca(home: Path) -> x509.Certificate:
        """The first certificate in *home*/ca.crt: the CA's (during a move, the previous CA's follows)."""
        return x509.load_pem_x509_certificates((home / "ca.crt").read_bytes())[0]
