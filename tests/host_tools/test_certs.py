"""`edgefleet certs`: issuing, listing and revoking client certificates, and what `broker config`
makes of a revocation (tests/test_broker_security.py runs it under a real Mosquitto)."""

import datetime as dt
import json

import pytest
from cryptography import x509

from device_agent.certificates import key_id
from host_tools.certs import Pki
from tests.conftest import edgefleet


@pytest.fixture
def pki(tmp_path):
    pki = Pki(tmp_path / "pki")
    pki.init(["127.0.0.1"])
    for name in ("pi-a", "pi-b", "host:ops"):
        pki.issue_client(name)
    pki.issue_client("pi-short", days=10)
    return pki


def listed(pki: Pki) -> dict[tuple[str, str], dict]:
    result = edgefleet("certs", "list", "--dir", pki.dir, "--json")
    assert result.returncode == 0, result.stderr
    return {(c["name"], c["status"]): c for c in json.loads(result.stdout)}


def test_certs_list_shows_each_certificate_the_ca_and_broker_too_its_expiry_and_one_about_to_expire(pki):
    rows = listed(pki)
    assert set(rows) == {("edgefleet CA", "valid, 3649 days left"), ("127.0.0.1", "valid, 3649 days left"),
                         ("host:ops", "valid, 824 days left"), ("pi-a", "valid, 824 days left"),
                         ("pi-b", "valid, 824 days left"), ("pi-short", "valid, 9 days left: renew it soon")}
    assert [rows[key]["kind"] for key in (("edgefleet CA", "valid, 3649 days left"),
                                          ("127.0.0.1", "valid, 3649 days left"), ("host:ops", "valid, 824 days left"),
                                          ("pi-a", "valid, 824 days left"))] == ["CA", "broker", "host tool", "device"]
    table = edgefleet("certs", "list", "--dir", pki.dir)
    assert "pi-short" in table.stdout and "renew it soon" in table.stdout


def test_a_revoked_certificate_is_listed_in_a_crl_the_ca_signed_that_lasts_as_long_as_the_ca(pki):
    serial = x509.load_pem_x509_certificate(pki.client_files("pi-b")[0].read_bytes()).serial_number
    result = edgefleet("certs", "revoke", "pi-b", "--dir", pki.dir)
    assert result.returncode == 0, result.stderr
    assert not any(path.exists() for path in pki.client_files("pi-b"))  # key deleted, certificate kept aside
    assert ("pi-b", "revoked") in listed(pki)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert crl.is_signature_valid(ca.public_key())
    assert [entry.serial_number for entry in crl] == [serial]
    assert abs((crl.next_update_utc - ca.not_valid_after_utc).total_seconds()) < 1  # never lapses while the CA is good
    assert edgefleet("certs", "revoke", "pi-a", "--dir", pki.dir).returncode == 0
    assert len(list(x509.load_pem_x509_crl(pki.crl.read_bytes()))) == 2  # the earlier entry carried over


def test_revoking_a_renewed_name_revokes_the_certificates_it_was_renewed_over_too_and_no_others(pki):
    def serial(path):
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    pki.issue_client("pi-a-beef")  # a name that starts like pi-a's
    pki.renew("pi-a-beef", days=900)
    serials = [serial(pki.client_files("pi-a")[0])]
    for days in (900, 901):
        serials.append(pki.renew("pi-a", days=days).serial)
    result = edgefleet("certs", "revoke", "pi-a", "--dir", pki.dir)
    assert result.returncode == 0, result.stderr
    assert sorted(entry.serial_number for entry in x509.load_pem_x509_crl(pki.crl.read_bytes())) == sorted(serials)
    assert [c["status"] for c in json.loads(edgefleet("certs", "list", "--dir", pki.dir, "--json").stdout)
            if c["name"] == "pi-a"] == ["revoked"] * 3
    (left,) = (pki.dir / "superseded").iterdir()  # pi-a-beef's earlier certificate is not pi-a's
    assert x509.load_pem_x509_certificate(left.read_bytes()).subject.rfc4514_string() == "CN=pi-a-beef"


@pytest.mark.parametrize("name, message", [("pi-b", "pi-b has no current certificate in {dir}/clients "
                                                    "(revoked already)"),
                                           ("pi-zz", "pi-zz has no current certificate in {dir}/clients")])
def test_revoking_a_name_with_no_current_certificate_is_one_line_and_changes_nothing(pki, name, message):
    assert edgefleet("certs", "revoke", "pi-b", "--dir", pki.dir).returncode == 0
    before = pki.crl.read_bytes()
    result = edgefleet("certs", "revoke", name, "--dir", pki.dir)
    assert result.returncode == 1 and result.stderr == f"error: {message.format(dir=pki.dir)}\n"
    assert pki.crl.read_bytes() == before


def test_broker_config_denies_a_revoked_name_everything_until_it_is_issued_again(pki, tmp_path):
    out = tmp_path / "broker"

    def configured() -> tuple[str, str]:
        result = edgefleet("broker", "config", "--pki", pki.dir, "--out", out, "--no-persistence")
        assert result.returncode == 0, result.stderr
        return (out / "acl").read_text(), (out / "mosquitto.conf").read_text()

    acl, conf = configured()
    assert "topic deny" not in acl and f"crlfile {out}/crl.pem" in conf  # from the start: reloads reread it
    assert list(x509.load_pem_x509_crl((out / "crl.pem").read_bytes())) == []
    for name in ("pi-b", "host:ops"):
        assert edgefleet("certs", "revoke", name, "--dir", pki.dir).returncode == 0
    assert edgefleet("certs", "client", "host:ci", "--dir", pki.dir).returncode == 0
    acl, _ = configured()
    assert "user pi-b\ntopic deny #\n" in acl and "user host:ops\ntopic deny #\n" in acl
    assert "user host:ops\ntopic readwrite" not in acl and "user host:ci\ntopic readwrite edgefleet/v1/#" in acl
    assert (out / "crl.pem").read_bytes() == pki.crl.read_bytes()
    again = edgefleet("certs", "client", "pi-b", "--dir", pki.dir)
    assert again.returncode == 0 and "restart Mosquitto rather than reload it" in again.stdout
    acl, _ = configured()
    assert "user pi-b" not in acl


def test_renewing_keeps_the_key_and_names_and_gives_a_new_lifetime_signed_by_the_ca(pki):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    def load(path):
        return x509.load_pem_x509_certificate(path.read_bytes())
    old_client, old_broker = load(pki.client_files("pi-short")[0]), load(pki.broker_cert)
    key_before = pki.client_files("pi-short")[1].read_bytes()
    result = edgefleet("certs", "renew", "pi-short", "--broker", "--days", "400", "--dir", pki.dir)
    assert result.returncode == 0, result.stderr
    ca = load(pki.ca_cert)
    for old, path, usage in ((old_client, pki.client_files("pi-short")[0], ExtendedKeyUsageOID.CLIENT_AUTH),
                             (old_broker, pki.broker_cert, ExtendedKeyUsageOID.SERVER_AUTH)):
        new = load(path)
        assert new.serial_number != old.serial_number and new.subject == old.subject
        assert new.public_key() == old.public_key()  # the device's key stays where it is
        assert list(new.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        new.verify_directly_issued_by(ca)
        assert (new.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).days == 399  # 400 days from a moment ago
    assert pki.client_files("pi-short")[1].read_bytes() == key_before
    broker_names = load(pki.broker_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in broker_names] == ["127.0.0.1"]
    assert ("pi-short", "valid, 399 days left") in listed(pki)  # no longer "renew it soon"
    assert not pki.crl.exists() or list(x509.load_pem_x509_crl(pki.crl.read_bytes())) == []  # nothing revoked
    assert edgefleet("certs", "renew", "pi-a", "--broker", "--dir", pki.dir).returncode == 0  # their own lifetimes
    assert {("pi-a", "valid, 824 days left"), ("127.0.0.1", "valid, 3649 days left")} <= set(listed(pki))


def test_renewing_the_ca_keeps_its_name_and_key_so_that_what_it_signed_stays_valid_and_the_crl_lasts_as_long(pki):
    def load(path):
        return x509.load_pem_x509_certificate(path.read_bytes())
    pki.revoke("pi-b")
    old_ca = load(pki.ca_cert)
    result = edgefleet("certs", "renew", "--ca", "--days", "5000", "--dir", pki.dir)
    assert result.returncode == 0, result.stderr
    ca = load(pki.ca_cert)
    assert result.stdout.startswith(f"renewed the CA: {pki.ca_cert}, serial {f'{ca.serial_number:x}'[:16]}, valid "
                                    f"until {ca.not_valid_after_utc:%Y-%m-%d}\n")
    assert "certs push --stale" in result.stdout
    assert (ca.subject, ca.public_key()) == (old_ca.subject, old_ca.public_key())
    assert ca.serial_number != old_ca.serial_number
    assert (ca.not_valid_after_utc - old_ca.not_valid_after_utc).days > 1000
    ca.verify_directly_issued_by(ca)
    for path in (pki.broker_cert, pki.client_files("pi-a")[0], pki.client_files("host:ops")[0]):
        load(path).verify_directly_issued_by(ca)  # nothing needs issuing again
    assert load(pki.dir / "superseded" / "ca" / f"{old_ca.serial_number:x}.crt") == old_ca
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert crl.is_signature_valid(ca.public_key()) and crl.next_update_utc == ca.not_valid_after_utc
    assert [entry.serial_number for entry in crl] == [c.serial for c in pki.issued() if c.name == "pi-b"]
    assert ("edgefleet CA", "valid, 4999 days left") in listed(pki)
    pki.revoke("pi-a")  # the renewed CA signs revocations as before
    assert len(list(x509.load_pem_x509_crl(pki.crl.read_bytes()))) == 2


def test_rotating_the_ca_key_issues_everything_again_under_a_new_ca_and_retiring_ends_the_previous_one(
        pki, tmp_path):
    def load(path):
        return x509.load_pem_x509_certificate(path.read_bytes())
    pki.revoke("pi-b")
    first, broker, pi_a = load(pki.ca_cert), load(pki.broker_cert), load(pki.client_files("pi-a")[0])
    result = edgefleet("certs", "rotate-ca", "--dir", pki.dir)
    assert result.returncode == 0, result.stderr
    ca = x509.load_pem_x509_certificates(pki.ca_cert.read_bytes())
    assert [c.subject.rfc4514_string() for c in ca] == ["CN=edgefleet CA 2", "CN=edgefleet CA"]  # what to trust
    new = ca[0]
    assert new.public_key() != first.public_key() and load(pki.previous / "ca.crt") == first
    assert "3 client certificates" in result.stdout and "certs retire-ca" in result.stdout
    link = load(pki.ca_link)  # the new CA's name and key, signed by the first, ending with it
    assert (link.subject, link.public_key()) == (new.subject, new.public_key())
    link.verify_directly_issued_by(first)
    assert link.not_valid_after_utc <= first.not_valid_after_utc
    for name in ("pi-a", "pi-short", "host:ops"):  # issued again over the same keys; the earlier ones kept
        cert = load(pki.client_files(name)[0])
        cert.verify_directly_issued_by(new)
        assert len(list((pki.dir / "superseded").glob(pki.client_files(name)[0].stem + "-*.crt"))) == 1
    assert load(pki.client_files("pi-a")[0]).public_key() == pi_a.public_key()
    assert load(pki.broker_cert) == broker  # devices that trust the first CA alone still take it ...
    pki.renew(None)
    load(pki.broker_cert).verify_directly_issued_by(first)  # ... renewed too, until the move ends
    assert ("edgefleet CA", "being retired (`certs retire-ca` once every device has moved)") in listed(pki)
    written = edgefleet("broker", "config", "--pki", pki.dir, "--out", tmp_path / "broker", "--no-persistence")
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "broker" / "ca.crt").read_bytes() == pki.ca_cert.read_bytes()  # either CA's clients
    lists = [x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + part)
             for part in (tmp_path / "broker" / "crl.pem").read_bytes().split(b"-----BEGIN X509 CRL-----")[1:]]
    assert [crl.issuer for crl in lists] == [new.subject, first.subject]  # each CA's own list
    pki.revoke("pi-a")  # a revocation during the move is on both lists
    for crl_path, signer in ((pki.crl, new), (pki.previous / "crl.pem", first)):
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        assert crl.is_signature_valid(signer.public_key())
        assert {c.serial for c in pki.issued() if c.name == "pi-a"} <= {entry.serial_number for entry in crl}
    again = edgefleet("certs", "rotate-ca", "--dir", pki.dir)
    assert again.returncode == 1 and "end that move first" in again.stderr

    unchecked = edgefleet("certs", "retire-ca", "--dir", pki.dir, "--db", tmp_path / "none.db")
    assert unchecked.returncode == 1 and "no registry at" in unchecked.stderr and pki.moving()
    retired = edgefleet("certs", "retire-ca", "--dir", pki.dir, "--force")
    assert retired.returncode == 0, retired.stderr
    assert [c.subject for c in x509.load_pem_x509_certificates(pki.ca_cert.read_bytes())] == [new.subject]
    assert not pki.previous.exists() and not pki.ca_link.exists()  # the first CA's key above all
    load(pki.broker_cert).verify_directly_issued_by(new)
    assert load(pki.dir / "superseded" / "ca" / f"{first.serial_number:x}.crt") == first
    assert {c.kind for c in pki.own()} == {"CA", "broker"}
    assert pki.retired_ca_keys() == (key_id(first),) and "certs push --stale" in retired.stdout  # devices drop it
    pki.renew_ca()  # the current CA's certificate renewed over is kept in superseded/ca/ too: not retired
    assert pki.retired_ca_keys() == (key_id(first),)
    nothing = edgefleet("certs", "retire-ca", "--dir", pki.dir)
    assert nothing.returncode == 1 and "nothing to retire" in nothing.stderr
    pki.rotate_ca()  # the next move: its CA is named after this one
    assert load(pki.ca_cert).subject.rfc4514_string() == "CN=edgefleet CA 3"


def test_renewing_what_expires_within_some_days_picks_those_certificates_and_no_others(pki):
    pki.issue_client("pi-gone", days=5)
    pki.revoke("pi-gone")  # revoked: not renewed, though it is about to expire
    before = {(c["name"], c["serial"]) for c in json.loads(edgefleet("certs", "list", "--dir", pki.dir,
                                                                        "--json").stdout)}
    result = edgefleet("certs", "renew", "--expiring-within", "30", "--dir", pki.dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("renewed pi-short: ") and result.stdout.count("renewed ") == 1
    after = {(c["name"], c["serial"]) for c in json.loads(edgefleet("certs", "list", "--dir", pki.dir,
                                                                       "--json").stdout)}
    assert {name for name, _ in after - before} == {"pi-short"}
    again = edgefleet("certs", "renew", "--expiring-within", "30", "--dir", pki.dir)
    assert (again.returncode, again.stdout) == (0, "no client certificate expires within 30 days\n")
    both = edgefleet("certs", "renew", "pi-a", "--expiring-within", "900", "--dir", pki.dir)  # pi-a named and due
    assert both.returncode == 0 and both.stdout.count("renewed pi-a: ") == 1
    assert {line.split(": ")[0] for line in both.stdout.splitlines() if line.startswith("renewed")} == {
        "renewed pi-a", "renewed pi-b", "renewed host:ops", "renewed pi-short"}
    for command in (("renew", "--expiring-within", "30"), ("push", "pi-a")):  # no PKI there: one line, not "none due"
        result = edgefleet("certs", *command, "--dir", pki.dir.parent / "elsewhere")
        assert (result.returncode, result.stderr) == (1, f"error: no CA in {pki.dir.parent / 'elsewhere'}: run "
                                                         f"`edgefleet certs init` first\n")


@pytest.mark.parametrize("args, message", [(("pi-gone",), "error: pi-gone has no current certificate in {dir}/clients "
                                                          "(revoked: `edgefleet certs client` issues a new one)\n"),
                                           (("pi-zz",), "error: pi-zz has no current certificate in {dir}/clients\n")])
def test_renewing_a_name_with_no_current_certificate_is_one_line_and_changes_nothing(pki, args, message):
    pki.issue_client("pi-gone")
    pki.revoke("pi-gone")
    files = {p: p.read_bytes() for p in pki.dir.rglob("*") if p.is_file()}
    result = edgefleet("certs", "renew", *args, "--dir", pki.dir)
    assert result.returncode == 1 and result.stderr == message.format(dir=pki.dir)
    assert {p: p.read_bytes() for p in pki.dir.rglob("*") if p.is_file()} == files
    assert edgefleet("certs", "renew", "--dir", pki.dir).returncode == 2  # nothing named
