"""What an agent accepts as its renewed client certificate, and which one it shows after a restart
(device_agent.client_cert; tests/test_broker_security.py pushes one to a real agent under Mosquitto)."""

import shutil
import time
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from device_agent.certificates import key_id
from device_agent.client_cert import ClientCertificate
from device_agent.errors import ConfigError, ProtocolError
from device_agent.tls import TlsFiles
from device_agent.protocol.commands import CertificateCommand, parse_command
from host_tools.certs import Pki
from host_tools.issuing import issue


@pytest.fixture
def pki(tmp_path):
    pki = Pki(tmp_path / "pki")
    pki.init(["127.0.0.1"])
    pki.issue_client("pi-a")
    pki.issue_client("pi-b")
    return pki


@pytest.fixture
def device(tmp_path, pki):
    """pi-a's TLS files as installed on the device, and its state directory."""
    etc = tmp_path / "etc"
    etc.mkdir()
    cert, key = pki.client_files("pi-a")
    for f in (pki.ca_cert, cert, key):
        shutil.copy(f, etc)
    return TlsFiles(ca=etc / "ca.crt", cert=etc / "pi-a.crt", key=etc / "pi-a.key"), tmp_path / "state"


def serial(pem_or_path) -> int:
    data = pem_or_path.read_bytes() if hasattr(pem_or_path, "read_bytes") else pem_or_path.encode()
    return x509.load_pem_x509_certificate(data).serial_number


def test_a_renewed_certificate_is_staged_kept_once_committed_and_shown_after_a_restart(pki, device):
    tls, state = device
    certificate = ClientCertificate(tls, state, "pi-a")
    assert certificate.tls == tls and certificate.describe()["source"] == "config"
    renewed = pki.renew("pi-a", days=900)
    pem = renewed.path.read_text()

    staged = certificate.stage(pem)
    assert staged == TlsFiles(ca=tls.ca, cert=state / "tls" / "client.crt.new", key=tls.key)
    assert ClientCertificate(tls, state, "pi-a").tls == tls  # an agent that restarts before the broker accepted it
    assert not staged.cert.exists()  # ... drops it: it was never shown to work

    assert not certificate.shows(pem) and certificate.shows(tls.cert.read_text())
    certificate.stage(pem)
    kept = certificate.commit()
    assert certificate.shows(pem)  # pushed again: already in use
    assert kept.cert == state / "tls" / "client.crt" and serial(kept.cert) == renewed.serial
    ca_expires = next(c.expires for c in pki.own() if c.kind == "CA").isoformat()
    assert certificate.describe() == {"serial": f"{renewed.serial:x}", "expires": renewed.expires.isoformat(),
                                      "source": "renewed", "ca_expires": ca_expires,
                                      "ca_keys": key_id(x509.load_pem_x509_certificate(tls.ca.read_bytes()))}
    after_restart = ClientCertificate(tls, state, "pi-a")
    assert after_restart.tls == kept and after_restart.describe()["source"] == "renewed"
    assert serial(tls.cert) != renewed.serial  # the configured file is never written

    # A newer certificate put in place by hand afterwards wins over the kept one.
    newer = pki.renew("pi-a", days=1000)
    shutil.copy(newer.path, tls.cert)
    assert ClientCertificate(tls, state, "pi-a").tls == tls


def test_a_certificate_for_another_device_key_or_ca_expired_or_not_newer_is_refused_and_nothing_is_kept(
        pki, device, tmp_path):
    tls, state = device
    certificate = ClientCertificate(tls, state, "pi-a")
    other = Pki(tmp_path / "other")
    other.init(["127.0.0.1"])
    other.issue_client("pi-a")  # another key, another CA
    shutil.copy(pki.client_files("pi-a")[0], other.client_files("pi-a")[0])
    other_ca = other.renew("pi-a").path.read_text()  # pi-a's own key and name, signed by the other CA
    other_key = other.issue_client("pi-c")[0]
    ca_key, ca = pki._load_ca()
    public = serialization.load_pem_private_key(tls.key.read_bytes(), None).public_key()
    server_only = issue("pi-a", public, ca.subject, ca_key, days=900, usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    pki_b = pki.renew("pi-b").path.read_text()
    expired = pki.renew("pi-a", days=1e-6).path.read_text()  # valid for 0.09 s
    time.sleep(0.1)
    same = tls.cert.read_text()  # the one in use
    foreign_key = ClientCertificate(TlsFiles(ca=tls.ca, cert=tls.cert, key=other.client_files("pi-c")[1]),
                                    state, "pi-a")
    cases = [
        (certificate, "not a PEM", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        (certificate, "the certificate is for pi-b, not pi-a", pki_b),
        (certificate, "the certificate is for pi-c, not pi-a", other_key.read_text()),
        (foreign_key, "for another key than this device's", pki.renew("pi-a", days=900).path.read_text()),
        (certificate, f"not signed by a CA in {tls.ca}", other_ca),
        (certificate, "not for TLS clients", server_only.public_bytes(serialization.Encoding.PEM).decode()),
        (certificate, "the certificate expired on", expired),
        (certificate, "no later than the one in use", same),
    ]
    for who, reason, pem in cases:
        with pytest.raises(ProtocolError, match=reason):
            who.stage(pem)
        assert not (state / "tls" / "client.crt.new").exists() and not (state / "tls" / "client.crt").exists()
    assert certificate.tls == tls

    without = ClientCertificate(TlsFiles(ca=tls.ca), state, "pi-a")
    with pytest.raises(ConfigError, match="connects without a client certificate"):
        without.stage(pki.renew("pi-a").path.read_text())
    assert without.describe() is None


def test_a_renewed_ca_certificate_is_trusted_beside_the_configured_file_and_nothing_else_is(pki, device, tmp_path):
    tls, state = device
    certificate = ClientCertificate(tls, state, "pi-a")
    configured = tls.ca.read_bytes()
    earlier_end = certificate.describe()["ca_expires"]
    assert certificate.take_ca(pki.ca_certificate()) is None  # the one it has: nothing to take

    renewed = pki.renew_ca(days=4000)
    assert certificate.take_ca(pki.ca_certificate()).serial_number == renewed.serial
    assert certificate.tls == TlsFiles(ca=state / "tls" / "ca.crt", cert=tls.cert, key=tls.key)
    trusted = x509.load_pem_x509_certificates(certificate.tls.ca.read_bytes())
    assert [c.serial_number for c in trusted] == [serial(tls.ca), renewed.serial]
    assert certificate.describe()["ca_expires"] == renewed.expires.isoformat() != earlier_end
    assert tls.ca.read_bytes() == configured  # the configured file is never written
    assert certificate.take_ca(pki.ca_certificate()) is None  # pushed again
    # A renewed client certificate is checked against, and shown with, both.
    assert certificate.stage(pki.renew("pi-a", days=900).path.read_text()).ca == state / "tls" / "ca.crt"
    assert ClientCertificate(tls, state, "pi-a").tls.ca == state / "tls" / "ca.crt"  # after a restart

    shorter = pki.renew_ca(days=3000)  # ends before the one taken: nothing to take
    assert certificate.take_ca(shorter.path.read_text()) is None
    other = Pki(tmp_path / "other")
    other.init(["127.0.0.1"])  # another CA, named as ours: a command cannot bring it in
    for pem, reason in ((other.ca_certificate(), "neither renews a CA"),
                        (pki.client_files("pi-b")[0].read_text(), "neither renews a CA"),  # not a CA
                        (pki.renew_ca(days=1e-6).path.read_text(), "not valid|expired")):
        time.sleep(0.1)
        with pytest.raises(ProtocolError, match=reason):
            certificate.take_ca(pem)
    assert [c.serial_number for c in x509.load_pem_x509_certificates(certificate.tls.ca.read_bytes())] == \
        [serial(tls.ca), renewed.serial]

    # The configured file names another CA now (the device was moved to another PKI): the renewals of
    # the one it named before go with it.
    shutil.copy(other.ca_cert, tls.ca)
    assert ClientCertificate(tls, state, "pi-a").tls.ca == tls.ca and not (state / "tls" / "ca.crt").exists()


def test_a_new_ca_key_is_trusted_on_its_link_from_a_trusted_ca_across_restarts_and_moves_and_nothing_else_is(
        pki, device, tmp_path):
    tls, state = device
    pki.renew("pi-a", days=100)  # (its certificate from the new CA ends later)
    shutil.copy(pki.client_files("pi-a")[0], tls.cert)
    certificate = ClientCertificate(tls, state, "pi-a")
    pki.rotate_ca()
    ca, link = pki.ca_certificate(), pki.ca_link_certificate()
    other = Pki(tmp_path / "other")
    other.init(["127.0.0.1"])
    other.rotate_ca()  # a CA 2 and a link of its own: signed by a CA the device does not trust
    expired_link = issue("edgefleet CA 2", x509.load_pem_x509_certificate(ca.encode()).public_key(),
                          x509.load_pem_x509_certificates((pki.previous / "ca.crt").read_bytes())[0].subject,
                          serialization.load_pem_private_key((pki.previous / "ca.key").read_bytes(), None),
                          days=1e-6, ca=True).public_bytes(serialization.Encoding.PEM).decode()
    time.sleep(0.1)
    for pem, given, reason in ((ca, None, "nor comes with a link"),
                               (ca, other.ca_link_certificate(), "nor comes with a link"),  # an untrusted signer
                               (other.ca_certificate(), link, "nor comes with a link"),  # a link for another key
                               (ca, expired_link, "the CA's link expired"),
                               (ca, "not a certificate", "not a PEM certificate")):
        with pytest.raises(ProtocolError, match=reason):
            certificate.take_ca(pem, given)
    assert certificate.tls.ca == tls.ca and not (state / "tls").exists()  # nothing kept

    taken = certificate.take_ca(ca, link)
    assert taken.subject.rfc4514_string() == "CN=edgefleet CA 2"
    assert certificate.take_ca(ca, link) is None  # pushed again
    staged = certificate.stage(pki.device_certificate("pi-a"))  # from the new CA: checked against it
    assert staged.ca == state / "tls" / "ca.crt"
    certificate.commit()
    assert certificate.describe()["ca_expires"] == taken.not_valid_after_utc.isoformat()
    restarted = ClientCertificate(tls, state, "pi-a")
    assert [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(restarted.tls.ca.read_bytes())] == \
        ["CN=edgefleet CA", "CN=edgefleet CA 2"] and restarted.describe() == certificate.describe()

    pki.retire_ca()
    pki.rotate_ca()  # a second move: CA 3, linked from CA 2, which the device took up
    assert restarted.take_ca(pki.ca_certificate(), pki.ca_link_certificate()).subject.rfc4514_string() == \
        "CN=edgefleet CA 3"
    again = ClientCertificate(tls, state, "pi-a")
    assert [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(again.tls.ca.read_bytes())] == \
        ["CN=edgefleet CA", "CN=edgefleet CA 2", "CN=edgefleet CA 3"]

    shutil.copy(other.previous / "ca.crt", tls.ca)  # moved to another PKI by hand: what ours vouched for goes
    assert ClientCertificate(tls, state, "pi-a").tls.ca == tls.ca
    assert not (state / "tls" / "ca.crt").exists() and not (state / "tls" / "ca-links.crt").exists()


def test_a_ca_the_host_retired_is_no_longer_trusted_once_the_broker_moved_and_stays_retired_across_restarts_and_moves(
        pki, device, tmp_path):
    tls, state = device
    pki.renew("pi-a", days=100)
    shutil.copy(pki.client_files("pi-a")[0], tls.cert)
    certificate = ClientCertificate(tls, state, "pi-a")
    first = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    pki.rotate_ca()
    second = x509.load_pem_x509_certificate(pki.ca_certificate().encode())
    certificate.take_ca(pki.ca_certificate(), pki.ca_link_certificate())
    broker_before = der(pki.broker_cert)  # during the move: from the first CA
    assert pki.retired_ca_keys() == ()
    pki.retire_ca()
    retired = pki.retired_ca_keys()
    assert retired == (key_id(first),)
    broker_after = der(pki.broker_cert)

    def trusted(cc: ClientCertificate) -> list[str]:
        return [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(cc.tls.ca.read_bytes())]

    for broker, reason in ((broker_before, "the broker does not show a certificate from a CA this device keeps"),
                           (None, "the broker does not show a certificate"),  # (not connected)
                           (broker_after, "this device's certificate is from CN=edgefleet CA: it needs one")):
        with pytest.raises(ProtocolError, match=reason):
            certificate.retire_cas(retired, broker)
        assert trusted(certificate) == ["CN=edgefleet CA", "CN=edgefleet CA 2"]
        assert not (state / "tls" / "ca-retired").exists()
    certificate.stage(pki.device_certificate("pi-a"))
    certificate.commit()
    assert certificate.describe()["ca_keys"] == ",".join(sorted([key_id(first), key_id(second)]))

    assert certificate.retire_cas(retired, broker_after) == [first]
    assert trusted(certificate) == ["CN=edgefleet CA 2"]
    assert certificate.describe()["ca_keys"] == key_id(second)
    assert certificate.retire_cas(retired, broker_after) == []  # pushed again
    with pytest.raises(ProtocolError, match="over a key the host retired"):
        certificate.take_ca(first.public_bytes(serialization.Encoding.PEM).decode())
    restarted = ClientCertificate(tls, state, "pi-a")  # the configured file still names the first CA
    assert trusted(restarted) == ["CN=edgefleet CA 2"] and restarted.describe() == certificate.describe()

    pki.rotate_ca()  # a second move: CA 3, linked from CA 2
    assert restarted.take_ca(pki.ca_certificate(), pki.ca_link_certificate()) is not None
    pki.renew("pi-a", days=4000)  # (ends later than the one from CA 2, issued perhaps in the same second)
    restarted.stage(pki.device_certificate("pi-a"))
    restarted.commit()
    pki.retire_ca()
    assert len(pki.retired_ca_keys()) == 2
    assert [c.subject.rfc4514_string() for c in restarted.retire_cas(pki.retired_ca_keys(), der(pki.broker_cert))] \
        == ["CN=edgefleet CA 2"]
    again = ClientCertificate(tls, state, "pi-a")  # CA 3 still vouched for: by CA 2's link from the first CA
    assert trusted(again) == ["CN=edgefleet CA 3"]

    many = tls.ca.with_name("many.crt")  # a CA file of 17 (a system bundle): too many to list in a status
    many.write_bytes(pki.ca_cert.read_bytes() + b"".join(
        issue(f"CA {i}", key.public_key(), x509.Name.from_rfc4514_string(f"CN=CA {i}"), key, days=1, ca=True)
        .public_bytes(serialization.Encoding.PEM) for i, key in enumerate(ec.generate_private_key(ec.SECP256R1())
                                                                          for _ in range(16))))
    described = ClientCertificate(replace(tls, ca=many), tmp_path / "other-state", "pi-a").describe()
    assert "ca_keys" not in described and described["serial"] == f"{serial(tls.cert):x}"

    for kept in ("ca.crt", "ca-links.crt"):  # the CAs taken up lost: the configured file's is retired
        (state / "tls" / kept).unlink()
    with pytest.raises(ConfigError, match="every CA in .* was retired on this device"):
        ClientCertificate(tls, state, "pi-a")


def der(path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_the_certificate_command_carries_one_pem_and_perhaps_the_ca_and_nothing_else():
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    command = parse_command(CertificateCommand("c1", 1.5, pem).to_payload())
    assert command == CertificateCommand("c1", 1.5, pem)
    assert parse_command(CertificateCommand("c1", 1.5, pem, pem).to_payload()).ca == pem
    assert parse_command(CertificateCommand("c1", 1.5, pem, pem, pem).to_payload()).ca_link == pem
    keys = ("a" * 64, "0123456789abcdef" * 4)
    assert parse_command(CertificateCommand("c1", 1.5, pem, ca_retired=keys).to_payload()).ca_retired == keys
    for bad in (("A" * 64,), ("a" * 63,), (7,), ("a" * 64,) * 65):
        with pytest.raises(ProtocolError, match="'ca_retired' must list up to 64 SHA-256 digests"):
            parse_command(CertificateCommand("c1", 1.5, pem, ca_retired=bad).to_payload())
    for bad in ("not a certificate", "-----BEGIN CERTIFICATE-----" + "A" * 20_000):
        with pytest.raises(ProtocolError, match="one PEM certificate"):
            parse_command(CertificateCommand("c1", 1.5, bad).to_payload())
        with pytest.raises(ProtocolError, match="'ca' must be one PEM certificate"):
            parse_command(CertificateCommand("c1", 1.5, pem, bad).to_payload())
        with pytest.raises(ProtocolError, match="'ca_link' must be one PEM certificate"):
            parse_command(CertificateCommand("c1", 1.5, pem, pem, bad).to_payload())
