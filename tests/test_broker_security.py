"""Broker security with a real Mosquitto running the configuration `edgefleet broker config`
writes: TLS with client certificates from `edgefleet certs`, and a per-device ACL."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from device_agent.errors import BrokerUnreachable
from device_agent.mqtt import BrokerAddress, MqttClient
from device_agent.tls import TlsFiles
from device_agent.protocol import topics
from device_agent.protocol.reports import DeviceStatus
from host_tools.certs import Pki
from tests.conftest import edgefleet, free_port, wait_until


class SecureMosquitto:
    """A CA, client certificates for *clients*, and Mosquitto running the configuration `edgefleet
    broker config` wrote, on a free port."""

    def __init__(self, *clients: str) -> None:
        # Mosquitto started as root drops to its own user before it reads the ACL, as it would
        # from /etc/mosquitto: the broker's directory must be readable to it (pytest's is not).
        self.work = Path(tempfile.mkdtemp(prefix="ef-broker-", dir="/tmp"))
        self.work.chmod(0o755)
        self.pki = Pki(self.work / "pki")
        for args in (("certs", "init", "--dir", self.pki.dir, "--broker-host", "127.0.0.1", "--broker-host",
                      "localhost"), ("certs", "client", *clients, "--dir", self.pki.dir)):
            result = edgefleet(*args)
            assert result.returncode == 0, result.stderr
        self.address = BrokerAddress("127.0.0.1", free_port())
        self.configure()
        self.log = open(self.work / "mosquitto.log", "ab")
        self.start()

    def configure(self) -> None:
        """`edgefleet broker config`, again after the PKI changed."""
        result = edgefleet("broker", "config", "--pki", self.pki.dir, "--out", self.work / "broker", "--port",
                           self.address.port, "--bind", "127.0.0.1", "--no-persistence")
        assert result.returncode == 0, result.stderr

    def start(self) -> None:
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                      str(self.work / "broker" / "mosquitto.conf")], stdout=self.log, stderr=self.log)
        port = self.address.port
        if not wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 10):
            pytest.fail((self.work / "mosquitto.log").read_text())

    def reload(self) -> None:
        said = (self.work / "mosquitto.log").read_text().count("Reloading config")
        self.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: (self.work / "mosquitto.log").read_text().count("Reloading config") > said, 10)
        time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture(scope="module")
def secure_broker():
    """Devices sec-a, sec-b and tls-dev and the host tool host:ops, under one broker for the module."""
    broker = SecureMosquitto("sec-a", "sec-b", "tls-dev", "host:ops")
    yield broker.address, broker.pki, broker.work
    broker.close()


def tls_for(pki: Pki, name: str) -> TlsFiles:
    cert, key = pki.client_files(name)
    return TlsFiles(ca=pki.ca_cert, cert=cert, key=key)


class Listener:
    """An MQTT client as *name* that records what it receives."""

    def __init__(self, address, pki, name, filters, tls=None):
        self.got: list[tuple[str, bytes]] = []
        self.client = MqttClient(client_id=f"test-{name}-{time.time_ns()}", broker=address,
                                 tls=tls or tls_for(pki, name), reconnect_max_delay=1)
        for f in filters:
            self.client.subscribe(f, lambda t, p: self.got.append((t, p)))
        self.client.connect()
        time.sleep(0.3)  # subscriptions reach the broker

    def topics(self):
        return {t for t, _ in self.got}


def test_a_device_reads_only_its_own_commands_and_publishes_only_as_itself(secure_broker):
    address, pki, _ = secure_broker
    a = Listener(address, pki, "sec-a", [topics.command("sec-a"), topics.command("sec-b")])
    b = Listener(address, pki, "sec-b", [topics.command("sec-b")])
    host = Listener(address, pki, "host:ops", [topics.all_devices("telemetry"), topics.all_devices("status")])
    try:
        host.client.publish(topics.command("sec-a"), b"for a", qos=1)
        host.client.publish(topics.command("sec-b"), b"for b", qos=1)
        a.client.publish(topics.telemetry("sec-a"), b"a as a", qos=1)
        a.client.publish(topics.telemetry("sec-b"), b"a as b", qos=1)  # impersonation: dropped
        a.client.publish(topics.status("sec-b"), b"a as b", qos=1)
        assert wait_until(lambda: b.got and a.got and host.got, 15)
        time.sleep(0.5)  # what was going to arrive has arrived
        assert a.got == [(topics.command("sec-a"), b"for a")]  # not B's command
        assert b.got == [(topics.command("sec-b"), b"for b")]
        assert host.got == [(topics.telemetry("sec-a"), b"a as a")]  # nothing under B's name
    finally:
        for c in (a, b, host):
            c.client.disconnect()


def test_a_device_reads_its_own_status_and_no_other_devices(secure_broker):
    """An agent reads its own status topic, to say its status again over a will another connection
    under its id left there (device_agent/presence.StatusGuard)."""
    address, pki, _ = secure_broker
    a = Listener(address, pki, "sec-a", [topics.status("sec-a"), topics.status("sec-b")])
    host = Listener(address, pki, "host:ops", [])
    try:
        host.client.publish(topics.status("sec-b"), b"b's", qos=1, wait=5)
        host.client.publish(topics.status("sec-a"), b"a's", qos=1, wait=5)
        assert wait_until(lambda: a.got, 15)
        time.sleep(0.5)
        assert a.got == [(topics.status("sec-a"), b"a's")]
    finally:
        for c in (a, host):
            c.client.disconnect()


def test_a_device_that_takes_over_another_devices_session_reads_none_of_its_commands(secure_broker):
    """Mosquitto keys a session by client id alone, so a device can connect under another's and take
    its session, subscriptions and all (mosquitto issue #3553); the ACL is checked as each message is
    delivered, so none meant for the other device reaches it."""
    address, pki, _ = secure_broker
    session = f"edgefleet-agent-sec-b-{time.time_ns()}"
    b = MqttClient(client_id=session, broker=address, tls=tls_for(pki, "sec-b"), clean_session=False)
    b.subscribe(topics.command("sec-b"), lambda t, p: None)
    b.connect()
    time.sleep(0.3)
    b.disconnect()
    host = Listener(address, pki, "host:ops", [])
    thief = MqttClient(client_id=session, broker=address, tls=tls_for(pki, "sec-a"), clean_session=False)
    stolen: list[bytes] = []
    thief._client.on_message = lambda client, userdata, message: stolen.append(message.payload)  # whatever comes
    try:
        host.client.publish(topics.command("sec-b"), b"queued for b", qos=1, wait=5)
        thief.connect()
        host.client.publish(topics.command("sec-b"), b"sent to b while taken", qos=1, wait=5)
        time.sleep(1)
        assert stolen == []
    finally:
        thief.disconnect()
        host.client.disconnect()


def test_another_device_cannot_guess_an_agents_session_and_knock_it_off(secure_broker, agents):
    """The agent's client id carries 64 random bits kept in its state directory (0600), so the
    session takeover above needs a secret no other device has."""
    address, pki, _ = secure_broker
    tls = tls_for(pki, "sec-b")
    agent = agents.start("sec-b", broker=address, extra_args=(
        "--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)))
    assert agent.wait_for_api() and agent.wait_for_broker(), agent.log.read_text()
    record = agent.state_dir / "mqtt-session"
    assert len(record.read_text().strip()) == 16 and record.stat().st_mode & 0o777 == 0o600
    for guess in ("edgefleet-agent-sec-b", "sec-b", f"edgefleet-agent-sec-b-{'0' * 16}"):
        thief = MqttClient(client_id=guess, broker=address, tls=tls_for(pki, "sec-a"), clean_session=False)
        thief.connect()
        time.sleep(0.5)
        thief.disconnect()
    assert agent.wait_for_broker(timeout=1) and "lost the connection" not in agent.log.read_text()


def test_a_device_asks_for_its_own_id_on_its_presence_topic_and_not_for_others(secure_broker):
    from device_agent.presence import Presence, holder_of, identity

    address, pki, _ = secure_broker
    holder = MqttClient(client_id=f"test-holder-{time.time_ns()}", broker=address, tls=tls_for(pki, "sec-b"))
    presence = Presence(holder, topics.presence("sec-b"), "device id sec-b")
    holder.connect()
    try:
        assert holder_of(address, topics.presence("sec-b"), me=identity(), tls=tls_for(pki, "sec-b"),
                         wait=10) == presence.me
        # Another device learns nothing of sec-b (the broker refuses it the topic).
        assert holder_of(address, topics.presence("sec-b"), me=identity(), tls=tls_for(pki, "sec-a")) is None
        assert presence.rivals and all(r["pid"] == os.getpid() for r in presence.rivals) and len(presence.rivals) == 1
    finally:
        holder.disconnect()


@pytest.mark.parametrize("how, message", [("no certificate", "it wants a client certificate"),
                                          ("certificate from another CA", "from the broker's CA?"),
                                          ("plain TCP", "does it require TLS")])
def test_a_client_without_a_valid_certificate_is_refused(secure_broker, tmp_path, how, message):
    client = unwelcome_client(how, secure_broker, tmp_path)
    with pytest.raises(BrokerUnreachable) as refused:
        client.connect(timeout=3)
    assert message in str(refused.value)
    client.disconnect()


@pytest.mark.parametrize("how, message", [("no certificate", "it wants a client certificate"),
                                          ("certificate from another CA", "from the broker's CA?"),
                                          ("plain TCP", "does it require TLS")])
def test_an_agent_turned_away_while_it_keeps_trying_says_why_once(secure_broker, tmp_path, caplog, how, message):
    """An agent connects in the background and keeps trying, a second apart here: its log says why
    the broker turns it away, once, not at every attempt."""
    client = unwelcome_client(how, secure_broker, tmp_path, reconnect_max_delay=1)
    caplog.set_level(logging.INFO, logger=MqttClient.__module__)
    client.connect_in_background()
    try:
        assert wait_until(lambda: caplog.records, 10, 0.05)
        time.sleep(2.5)  # (more attempts)
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and said[0].startswith(f"cannot reach the MQTT broker at {secure_broker[0]}: it ") and \
            message in said[0] and not client.connected, said
    finally:
        client.disconnect()


def unwelcome_client(how: str, secure_broker, tmp_path: Path, **settings) -> MqttClient:
    """A client the secure broker turns away: without TLS, without a certificate, or with one from another CA."""
    address, pki, _ = secure_broker
    if how == "plain TCP":
        return MqttClient(client_id="test-plain", broker=address, **settings)
    if how == "no certificate":
        return MqttClient(client_id="test-nocert", broker=address, tls=TlsFiles(ca=pki.ca_cert), **settings)
    other = Pki(tmp_path / "other")
    other.init(["127.0.0.1"])
    cert, key = other.issue_client("sec-a")  # the right name, the wrong CA
    return MqttClient(client_id="test-forged", broker=address, tls=TlsFiles(ca=pki.ca_cert, cert=cert, key=key),
                      **settings)


def test_deploy_and_telemetry_work_over_tls(secure_broker, agents, make_bundle, keys):
    address, pki, work = secure_broker
    tls = tls_for(pki, "tls-dev")
    agent = agents.start("tls-dev", broker=address, extra_args=(
        "--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)))
    assert agent.wait_for_api() and agent.wait_for_broker(), agent.log.read_text()
    host_tls = tls_for(pki, "host:ops")
    result = edgefleet("--tls-ca", host_tls.ca, "--tls-cert", host_tls.cert, "--tls-key", host_tls.key,
                       "deploy", make_bundle("1.0.0"), "--device", "tls-dev", "--broker", address, "--json")
    assert result.returncode == 0, result.stderr + agent.log.read_text()[-2000:]
    assert json.loads(result.stdout)["tls-dev"]["state"] == "active"
    status = edgefleet("--tls-ca", host_tls.ca, "--tls-cert", host_tls.cert, "--tls-key", host_tls.key,
                       "device", "status", "tls-dev", "--broker", address, "--json")
    assert json.loads(status.stdout)["active_bundle"] == "digits-cnn 1.0.0"
    without = edgefleet("device", "status", "tls-dev", "--broker", address)  # no certificate: one line, exit 1
    assert without.returncode == 1 and len(without.stderr.splitlines()) == 1
    assert "does it require TLS or a client certificate?" in without.stderr


def test_a_revoked_device_is_cut_off_at_once_and_refused_when_it_connects_again():
    """`edgefleet certs revoke` a lost device, write the configuration again and reload Mosquitto:
    its open connection carries nothing more either way, a new one is refused, the other devices
    carry on; a certificate issued afterwards for the same id (its replacement) works, and the old
    one stays out."""
    broker = SecureMosquitto("rev-a", "rev-b", "host:ops")
    address, pki = broker.address, broker.pki
    stolen = broker.work / "stolen"  # what the lost device holds
    stolen.mkdir()
    for f in pki.client_files("rev-b"):
        shutil.copy(f, stolen)
    a = Listener(address, pki, "rev-a", [topics.command("rev-a")])
    b = Listener(address, pki, "rev-b", [topics.command("rev-b")], tls=TlsFiles(
        ca=pki.ca_cert, cert=stolen / "rev-b.crt", key=stolen / "rev-b.key"))
    host = Listener(address, pki, "host:ops", [topics.all_devices("telemetry")])
    try:
        revoked = edgefleet("certs", "revoke", "rev-b", "--dir", pki.dir)
        assert revoked.returncode == 0 and "next: `edgefleet broker config" in revoked.stdout, revoked.stderr
        broker.configure()
        broker.reload()
        for device in ("rev-a", "rev-b"):
            host.client.publish(topics.command(device), f"for {device}".encode(), qos=1)
        a.client.publish(topics.telemetry("rev-a"), b"from a", qos=1)
        b.client.publish(topics.telemetry("rev-b"), b"from b", qos=1)
        assert wait_until(lambda: a.got and host.got, 10)
        time.sleep(0.5)  # what was going to arrive has arrived
        assert a.got == [(topics.command("rev-a"), b"for rev-a")] and b.got == []
        assert host.got == [(topics.telemetry("rev-a"), b"from a")]

        again = MqttClient(client_id=f"test-rev-b-{time.time_ns()}", broker=address, reconnect_max_delay=1,
                           tls=TlsFiles(ca=pki.ca_cert, cert=stolen / "rev-b.crt", key=stolen / "rev-b.key"))
        with pytest.raises(BrokerUnreachable, match="closed the TLS connection before accepting it"):
            again.connect(timeout=3)
        again.disconnect()
        listed = json.loads(edgefleet("certs", "list", "--dir", pki.dir, "--json").stdout)
        assert ("rev-b", "revoked") in {(c["name"], c["status"]) for c in listed}

        # The replacement device gets the id back, after a restart (as `certs client` says): a reload
        # would lift the ACL's denial from the old connection too.
        issued = edgefleet("certs", "client", "rev-b", "--dir", pki.dir)
        assert issued.returncode == 0 and "restart Mosquitto" in issued.stdout, issued.stderr
        broker.configure()
        broker.stop()
        broker.start()
        replacement = Listener(address, pki, "rev-b", [topics.command("rev-b")])
        assert wait_until(lambda: a.client.connected and host.client.connected, 10)
        host.client.publish(topics.command("rev-b"), b"for the new rev-b", qos=1, wait=5)
        assert wait_until(lambda: replacement.got, 10)
        time.sleep(1)  # the old one's reconnecting, refused
        assert b.got == [] and not b.client.connected
        replacement.client.disconnect()
    finally:
        for c in (a, b, host):
            c.client.disconnect()
        broker.close()


def presented_serial(address: BrokerAddress, pki: Pki, name: str) -> int:
    """The serial of the certificate the broker presents in a TLS handshake (as device *name*)."""
    import ssl

    from cryptography import x509

    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(*map(str, pki.client_files(name)))
    with socket.create_connection((address.host, address.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=address.host) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_renewed_certificates_work_at_once_and_the_earlier_ones_until_they_expire_or_are_revoked(tmp_path):
    """`edgefleet certs renew` a device's and the broker's certificates: after `broker config` and a
    reload the broker presents its new one, the device connects with its new one over the same key,
    and one still holding the earlier certificate (not given the new file yet) connects too — until
    the name is revoked, which revokes both."""
    from cryptography import x509

    broker = SecureMosquitto("ren-a", "host:ops")
    address, pki = broker.address, broker.pki
    cert, key = pki.client_files("ren-a")
    earlier = tmp_path / "earlier.crt"
    shutil.copy(cert, earlier)
    try:
        broker_before = presented_serial(address, pki, "ren-a")
        renewed = edgefleet("certs", "renew", "ren-a", "--broker", "--days", "400", "--dir", pki.dir)
        assert renewed.returncode == 0, renewed.stderr
        assert "renewed the broker" in renewed.stdout and "renewed ren-a" in renewed.stdout
        assert earlier.read_bytes() != cert.read_bytes()
        broker.configure()
        broker.reload()
        broker_now = x509.load_pem_x509_certificate(pki.broker_cert.read_bytes()).serial_number
        assert broker_now != broker_before
        assert wait_until(lambda: presented_serial(address, pki, "ren-a") == broker_now, 10)

        for held in (cert, earlier):
            device = Listener(address, pki, "ren-a", [topics.command("ren-a")],
                              tls=TlsFiles(ca=pki.ca_cert, cert=held, key=key))
            host = Listener(address, pki, "host:ops", [])
            try:
                host.client.publish(topics.command("ren-a"), held.name.encode(), qos=1, wait=5)
                assert wait_until(lambda: device.got == [(topics.command("ren-a"), held.name.encode())], 10)
            finally:
                device.client.disconnect()
                host.client.disconnect()

        # Revoking the name revokes the certificate it was renewed over too: the earlier one is
        # refused at the handshake, not only left without topics by the ACL.
        for f in (cert, key):  # what the lost device holds (revoke moves the PKI's certificate, deletes its key)
            shutil.copy(f, tmp_path / f"lost{f.suffix}")
        assert edgefleet("certs", "revoke", "ren-a", "--dir", pki.dir).returncode == 0
        broker.configure()
        broker.reload()
        for held in (tmp_path / "lost.crt", earlier):
            with pytest.raises(BrokerUnreachable, match="closed the TLS connection"):
                Listener(address, pki, "ren-a", [], tls=TlsFiles(ca=pki.ca_cert, cert=held, key=tmp_path / "lost.key"))
    finally:
        broker.close()


def host_tool_args(pki: Pki) -> tuple:
    """The TLS options of a host CLI run as host:ops."""
    host = tls_for(pki, "host:ops")
    return "--tls-ca", host.ca, "--tls-cert", host.cert, "--tls-key", host.key


def in_use(agent) -> dict:
    """The certificate the agent says it shows the broker (its local status)."""
    from device_agent.local_api import AgentClient

    with AgentClient(agent.control_socket, timeout=10) as client:
        return client.status()["certificate"]


@pytest.mark.waits  # most of it is waiting for a certificate to expire
def test_a_renewed_ca_pushed_over_mqtt_keeps_a_device_connected_after_the_earlier_ca_certificate_expires(
        agents, keys, tmp_path):
    """The devices' CA certificate runs out in 35 s. `certs renew --ca`, then `certs push --stale`
    (the devices the registry shows with the earlier CA): the agent trusts the renewed one beside its
    configured CA file, and after the earlier one has expired it is back after a broker restart and
    an agent restart, while a client with only the CA file the device was given is refused."""
    from cryptography import x509

    from host_tools.fleet.store import FleetStore

    broker = SecureMosquitto("ca-a", "ca-b", "host:ops")
    address, pki = broker.address, broker.pki
    earlier = pki.renew_ca(days=35 / 86400)  # the CA certificate the devices were given
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(pki.ca_cert, etc / "ca.crt")
    given = (etc / "ca.crt").read_bytes()
    for name in ("ca-a", "ca-b"):
        cert, key = pki.client_files(name)
        shutil.copy(cert, etc / f"{name}.crt")
        shutil.copy(key, etc / f"{name}.key")
    as_host = host_tool_args(pki)
    try:
        agent = agents.start("ca-a", broker=address, extra_args=(
            "--tls-ca", str(etc / "ca.crt"), "--tls-cert", str(etc / "ca-a.crt"), "--tls-key", str(etc / "ca-a.key"),
            "--reconnect-max-delay", "1"))
        assert agent.wait_for_api() and agent.wait_for_broker(), agent.log.read_text()
        assert in_use(agent)["ca_expires"] == earlier.expires.isoformat()

        renewed = edgefleet("certs", "renew", "--ca", "--days", "30", "--dir", pki.dir)
        assert renewed.returncode == 0, renewed.stderr
        ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        registry = FleetStore(tmp_path / "fleet.db")  # as the monitor keeps it: ca-b reports the renewed CA
        registry.record_status(DeviceStatus("ca-a", True, time.time(), certificate=in_use(agent)), time.time())
        serial_b = x509.load_pem_x509_certificate((etc / "ca-b.crt").read_bytes()).serial_number
        registry.record_status(DeviceStatus("ca-b", True, time.time(), certificate={
            **in_use(agent), "serial": f"{serial_b:x}", "ca_expires": ca.not_valid_after_utc.isoformat()}), time.time())
        registry.close()
        pushed = edgefleet(*as_host, "certs", "push", "--stale", "--db", tmp_path / "fleet.db", "--dir", pki.dir,
                           "--broker", address)
        assert pushed.returncode == 0, pushed.stderr + agent.log.read_text()[-3000:]
        client_cert = x509.load_pem_x509_certificate((etc / "ca-a.crt").read_bytes())
        assert pushed.stdout == f"ca-a: uses serial {f'{client_cert.serial_number:x}'[:16]}, valid until " \
                                f"{client_cert.not_valid_after_utc:%Y-%m-%d}, its CA until " \
                                f"{ca.not_valid_after_utc:%Y-%m-%d}\n"
        assert in_use(agent)["ca_expires"] == ca.not_valid_after_utc.isoformat()
        assert (etc / "ca.crt").read_bytes() == given  # the configured file is left alone

        time.sleep(max(0.0, earlier.expires.timestamp() - time.time() + 1))
        broker.stop()
        broker.start()  # every client connects again: now past the earlier CA certificate's end
        assert agent.wait_for_broker(20), agent.log.read_text()[-3000:]
        with pytest.raises(BrokerUnreachable, match="certificate"):  # the device's CA file alone no longer does
            Listener(address, pki, "ca-b", [], tls=TlsFiles(ca=etc / "ca.crt", cert=etc / "ca-b.crt",
                                                            key=etc / "ca-b.key"))
        agent.terminate()
        agent.start()
        assert agent.wait_for_api() and agent.wait_for_broker(20), agent.log.read_text()[-3000:]
        assert in_use(agent)["ca_expires"] == ca.not_valid_after_utc.isoformat()
    finally:
        broker.close()


def test_a_fleet_moved_to_a_new_ca_key_stays_connected_and_the_previous_ca_is_shut_out(agents, keys, tmp_path):
    """`certs rotate-ca`, `broker config` and a restart: the agent, whose CA file names the first CA
    alone, is back at once. `certs push` gives it the new CA (taken on the first one's link) and its
    certificate from it. `certs retire-ca` refuses while the registry shows mv-b without its new
    certificate, then goes ahead with --force; `certs push --stale` (the devices the registry shows
    trusting the first CA) is refused until the broker shows its new certificate; after `broker
    config` and a restart the broker trusts the new CA alone: the agent is back, while mv-b with
    the files it was given is refused; pushed again, the agent stops trusting the first CA: a broker
    with a certificate from its (leaked) key is refused, after the agent's restart too."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from device_agent.certificates import key_id
    from host_tools.issuing import issue
    from host_tools.fleet.store import FleetStore

    broker = SecureMosquitto("mv-a", "mv-b", "host:ops")
    address, pki = broker.address, broker.pki
    pki.renew("mv-a", days=100)  # (so that its certificate from the new CA ends later, as it would in use)
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(pki.ca_cert, etc / "ca.crt")
    for name in ("mv-a", "mv-b"):
        cert, key = pki.client_files(name)
        shutil.copy(cert, etc / f"{name}.crt")
        shutil.copy(key, etc / f"{name}.key")
    db = tmp_path / "fleet.db"

    def registry_shows(device: str, certificate: dict) -> None:  # as the monitor records a status
        registry = FleetStore(db)
        registry.record_status(DeviceStatus(device, True, time.time(), certificate=certificate), time.time())
        registry.close()

    try:
        agent = agents.start("mv-a", broker=address, extra_args=(
            "--tls-ca", str(etc / "ca.crt"), "--tls-cert", str(etc / "mv-a.crt"), "--tls-key", str(etc / "mv-a.key"),
            "--reconnect-max-delay", "1"))
        assert agent.wait_for_api() and agent.wait_for_broker(), agent.log.read_text()

        rotated = edgefleet("certs", "rotate-ca", "--dir", pki.dir)
        assert rotated.returncode == 0, rotated.stderr
        assert "new CA: edgefleet CA 2" in rotated.stdout and "3 client certificates" in rotated.stdout
        new_ca = x509.load_pem_x509_certificates(pki.ca_cert.read_bytes())[0]
        broker.configure()
        broker.stop()
        broker.start()  # it takes either CA's client certificates, and still shows one from the first CA
        assert agent.wait_for_broker(20), agent.log.read_text()[-3000:]

        pushed = edgefleet(*host_tool_args(pki), "certs", "push", "mv-a", "--dir", pki.dir, "--broker", address,
                           "--timeout", 30)
        assert pushed.returncode == 0, pushed.stderr + agent.log.read_text()[-3000:]
        def serial(path: Path) -> str:
            return f"{x509.load_pem_x509_certificate(path.read_bytes()).serial_number:x}"
        shown = in_use(agent)
        assert shown["serial"] == serial(pki.client_files("mv-a")[0])
        assert shown["ca_expires"] == new_ca.not_valid_after_utc.isoformat()
        registry_shows("mv-a", shown)
        registry_shows("mv-b", {**shown, "serial": serial(etc / "mv-b.crt")})  # as it was given

        refused = edgefleet("certs", "retire-ca", "--dir", pki.dir, "--db", db)
        assert refused.returncode == 1 and "1 devices do not show their certificate from the new CA" in refused.stderr \
            and "mv-b" in refused.stderr and "mv-a" not in refused.stderr, refused.stderr
        assert pki.moving()
        leaked = tmp_path / "leaked"  # the first CA's key, as whoever it leaked to keeps it
        shutil.copytree(pki.previous, leaked)
        moving_ca = shutil.copy(pki.ca_cert, tmp_path / "moving-ca.crt")  # both CAs
        retired = edgefleet("certs", "retire-ca", "--dir", pki.dir, "--db", db, "--force")
        assert retired.returncode == 0, retired.stderr
        assert not pki.moving() and not (pki.dir / "previous").exists()
        registry_shows("mv-a", in_use(agent))  # it still trusts the first CA too
        registry_shows("mv-b", {**in_use(agent), "serial": serial(pki.client_files("mv-b")[0]),
                                "ca_keys": key_id(new_ca)})  # (moved, trusting the new CA alone: not stale)
        push = ("certs", "push", "--stale", "--db", db, "--dir", pki.dir, "--broker", address, "--timeout", 30)
        # The broker still shows its certificate from the first CA (which the host's CA file, as it was
        # during the move, names too).
        early = edgefleet("--tls-ca", moving_ca, *host_tool_args(pki)[2:], *push, "--json")
        assert early.returncode == 1 and list(json.loads(early.stdout)) == ["mv-a"], early.stdout + early.stderr
        assert "does not show a certificate from a CA this device keeps" in json.loads(early.stdout)["mv-a"]["error"]
        broker.configure()
        broker.stop()
        broker.start()  # the new CA alone, on both sides
        assert agent.wait_for_broker(20), agent.log.read_text()[-3000:]
        with pytest.raises(BrokerUnreachable, match="certificate"):  # mv-b as it was given its files
            Listener(address, pki, "mv-b", [], tls=TlsFiles(ca=etc / "ca.crt", cert=etc / "mv-b.crt",
                                                            key=etc / "mv-b.key"))
        with pytest.raises(BrokerUnreachable):  # its certificate from the first CA, however it checks the broker
            Listener(address, pki, "mv-b", [], tls=TlsFiles(ca=pki.ca_cert, cert=etc / "mv-b.crt",
                                                            key=etc / "mv-b.key"))
        pushed = edgefleet(*host_tool_args(pki), *push)
        assert pushed.returncode == 0 and "trusts no retired CA" in pushed.stdout and "mv-b" not in pushed.stdout, \
            pushed.stdout + pushed.stderr + agent.log.read_text()[-3000:]
        assert in_use(agent)["ca_keys"] == key_id(new_ca)

        # A broker that shows a certificate from the leaked key: the agent no longer connects to it.
        impostor = issue("127.0.0.1", serialization.load_pem_private_key((broker.work / "broker" / "broker.key")
                                                                          .read_bytes(), None).public_key(),
                          x509.load_pem_x509_certificate((leaked / "ca.crt").read_bytes()).subject,
                          serialization.load_pem_private_key((leaked / "ca.key").read_bytes(), None), days=1,
                          sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                          usage=[ExtendedKeyUsageOID.SERVER_AUTH])
        genuine = (broker.work / "broker" / "broker.crt").read_bytes()
        broker.stop()
        (broker.work / "broker" / "broker.crt").write_bytes(impostor.public_bytes(serialization.Encoding.PEM))
        broker.start()
        assert wait_until(lambda: "certificate verify failed" in (problem(agent) or {}).get("why", ""), 20), \
            agent.log.read_text()[-3000:]
        broker.stop()
        (broker.work / "broker" / "broker.crt").write_bytes(genuine)
        broker.start()
        assert agent.wait_for_broker(20), agent.log.read_text()[-3000:]

        agent.terminate()
        agent.start()
        assert agent.wait_for_api() and agent.wait_for_broker(20), agent.log.read_text()[-3000:]
        assert in_use(agent)["ca_expires"] == new_ca.not_valid_after_utc.isoformat()
        assert in_use(agent)["ca_keys"] == key_id(new_ca)  # retired for good, though its CA file names it
    finally:
        broker.close()


def problem(agent) -> dict | None:
    """Why the agent cannot connect to its broker, as its local status says (None: it is connected)."""
    from device_agent.local_api import AgentClient

    with AgentClient(agent.control_socket, timeout=10) as client:
        return client.status()["broker_problem"]


@pytest.mark.waits  # most of it is waiting for a certificate to expire
def test_a_certificate_pushed_over_mqtt_keeps_a_device_connected_after_its_earlier_one_expires(agents, keys, tmp_path):
    """`certs renew` and `certs push --stale` (the devices the registry shows with an older
    certificate) a device whose certificate runs out in 40 s: it reconnects with the new one, keeps
    it across a restart, and is back after a broker restart once the earlier one has expired (the
    broker refuses that one then). Before that, a certificate the broker does not
    take (from a second CA in the device's CA file) is tried and given up: the earlier one is back."""
    from cryptography import x509

    from device_agent.certificates import key_id
    from host_tools.fleet.store import FleetStore

    broker = SecureMosquitto("cert-a", "host:ops")
    address, pki = broker.address, broker.pki
    lifetime = 40
    earlier = pki.renew("cert-a", days=lifetime / 86400)  # what the device was given
    etc = tmp_path / "etc"
    etc.mkdir()
    cert, key = pki.client_files("cert-a")
    shutil.copy(cert, etc / "device.crt")
    shutil.copy(key, etc / "device.key")
    other = Pki(tmp_path / "other")  # the device's CA file has a second CA, the broker's does not
    other.init(["127.0.0.1"])
    (etc / "ca.pem").write_bytes(pki.ca_cert.read_bytes() + other.ca_cert.read_bytes())
    other.client_files("cert-a")[0].parent.mkdir()
    shutil.copy(cert, other.client_files("cert-a")[0])
    other.renew("cert-a")  # the device's key and name, signed by the second CA
    as_host = host_tool_args(pki)
    try:
        agent = agents.start("cert-a", broker=address, extra_args=(
            "--tls-ca", str(etc / "ca.pem"), "--tls-cert", str(etc / "device.crt"), "--tls-key",
            str(etc / "device.key"), "--reconnect-max-delay", "1"))
        assert agent.wait_for_api() and agent.wait_for_broker(), agent.log.read_text()
        ca_expires = next(c.expires for c in pki.own() if c.kind == "CA")
        assert in_use(agent) == {"serial": f"{earlier.serial:x}", "expires": earlier.expires.isoformat(),
                                 "source": "config", "ca_expires": ca_expires.isoformat(),
                                 "ca_keys": ",".join(sorted(key_id(x509.load_pem_x509_certificate(ca.read_bytes()))
                                                            for ca in (pki.ca_cert, other.ca_cert)))}

        tried = edgefleet(*as_host, "certs", "push", "cert-a", "--dir", other.dir, "--broker", address, "--json")
        assert tried.returncode == 1, tried.stderr + agent.log.read_text()[-3000:]
        assert "the broker did not accept a connection with the renewed certificate" in \
            json.loads(tried.stdout)["cert-a"]["error"]
        assert agent.wait_for_broker(10) and in_use(agent)["serial"] == f"{earlier.serial:x}"

        # The registry as a monitor keeps it: cert-a shows the earlier certificate, cert-b its current one.
        registry = FleetStore(tmp_path / "fleet.db")
        registry.record_status(DeviceStatus("cert-a", True, time.time(), certificate=in_use(agent)), time.time())
        pki.issue_client("cert-b")
        registry.record_status(DeviceStatus("cert-b", True, time.time(), certificate={
            "serial": f"{x509.load_pem_x509_certificate(pki.client_files('cert-b')[0].read_bytes()).serial_number:x}",
            "expires": "2030-01-01T00:00:00+00:00", "source": "config"}), time.time())
        registry.close()
        renewed = pki.renew("cert-a")
        pushed = edgefleet(*as_host, "certs", "push", "--stale", "--db", tmp_path / "fleet.db", "--dir", pki.dir,
                           "--broker", address)
        assert pushed.returncode == 0, pushed.stderr + agent.log.read_text()[-3000:]
        assert pushed.stdout == f"cert-a: uses serial {f'{renewed.serial:x}'[:16]}, valid until " \
                                f"{renewed.expires:%Y-%m-%d}, its CA until {ca_expires:%Y-%m-%d}\n"
        assert in_use(agent)["source"] == "renewed" and agent.wait_for_broker(10)
        watcher = Listener(address, pki, "host:ops", [topics.status("cert-a")])  # what the fleet's monitor reads
        try:
            assert wait_until(lambda: watcher.got and DeviceStatus.from_payload(watcher.got[-1][1]).certificate == {
                "serial": f"{renewed.serial:x}", "expires": renewed.expires.isoformat(), "source": "renewed",
                "ca_expires": ca_expires.isoformat(), "ca_keys": in_use(agent)["ca_keys"]}, 10)
        finally:
            watcher.client.disconnect()
        assert (etc / "device.crt").read_bytes() != cert.read_bytes()  # the configured file is left alone
        registry = FleetStore(tmp_path / "fleet.db")
        registry.record_status(DeviceStatus("cert-a", True, time.time(), certificate=in_use(agent)), time.time())
        registry.close()
        none_left = edgefleet(*as_host, "certs", "push", "--stale", "--db", tmp_path / "fleet.db", "--dir", pki.dir,
                              "--broker", address)
        assert (none_left.returncode, none_left.stdout) == (
            0, f"every device in {tmp_path / 'fleet.db'} that reports a certificate shows its current one\n")
        again = edgefleet(*as_host, "certs", "push", "cert-a", "--dir", pki.dir, "--broker", address)
        assert (again.returncode, again.stdout) == (0, pushed.stdout)  # sent again: it is the one in use
        assert agent.log.read_text().count("trying the renewed client certificate") == 2  # (no reconnection)

        agent.terminate()
        agent.start()
        assert agent.wait_for_api() and agent.wait_for_broker(), agent.log.read_text()[-3000:]
        shown = edgefleet(*as_host, "device", "status", "cert-a", "--broker", address)
        assert f"certificate:   serial {f'{renewed.serial:x}'[:16]}, valid until {renewed.expires:%Y-%m-%d} " \
               f"(renewed over MQTT); its CA until {ca_expires:%Y-%m-%d}\n" in shown.stdout, shown.stderr

        time.sleep(max(0.0, earlier.expires.timestamp() - time.time() + 1))
        broker.stop()
        broker.start()  # every client connects again: now past the earlier certificate's end
        with pytest.raises(BrokerUnreachable, match="closed the TLS connection"):
            Listener(address, pki, "cert-a", [], tls=TlsFiles(ca=pki.ca_cert, cert=etc / "device.crt",
                                                              key=etc / "device.key"))
        assert agent.wait_for_broker(20), agent.log.read_text()[-3000:]
    finally:
        broker.close()
