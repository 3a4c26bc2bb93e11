"""The MQTT client wrapper against a real Mosquitto."""

import logging
import time
import uuid

import pytest

from device_agent.errors import ConfigError
from device_agent.mqtt import MqttClient
from device_agent.tls import TlsFiles
from tests.conftest import wait_until


def test_a_qos1_message_published_as_the_connection_breaks_arrives_after_the_reconnect(mosquitto):
    """A link that breaks under a publish is what a device on flaky Wi-Fi meets: the publish must
    not fail the caller (a download asking for chunks, an agent reporting an event); paho keeps the
    message and sends it once it has reconnected."""
    got = []
    reader = MqttClient(client_id=f"reader-{uuid.uuid4().hex[:8]}", broker=mosquitto)
    reader.connect()
    assert reader.subscribe("t/flaky", lambda topic, payload: got.append(payload), wait=5)
    device = MqttClient(client_id=f"device-{uuid.uuid4().hex[:8]}", broker=mosquitto)
    device.connect()
    try:
        device.drop()  # the socket is gone; paho has not noticed yet
        device.publish("t/flaky", b"sent while the link was down", qos=1)
        device.connect_in_background()
        assert wait_until(lambda: got, 10, 0.05), "the message never arrived after the reconnect"
        assert got == [b"sent while the link was down"]
    finally:
        device.disconnect()
        reader.disconnect()


def test_unread_counts_what_the_broker_sent_while_the_network_thread_was_busy(mosquitto):
    import threading

    busy, got = threading.Event(), []
    client = MqttClient(client_id=f"slow-{uuid.uuid4().hex[:8]}", broker=mosquitto)
    client.connect()
    sender = MqttClient(client_id=f"sender-{uuid.uuid4().hex[:8]}", broker=mosquitto)
    sender.connect()
    try:
        assert client.subscribe("t/slow", lambda topic, payload: busy.wait(10) and got.append(payload), wait=5)
        assert client.unread == 0
        for n in range(3):  # the first keeps the network thread in its handler; the others wait in the socket
            sender.publish("t/slow", bytes(10_000), qos=1)
        assert wait_until(lambda: client.unread >= 10_000, 5, 0.02), client.unread
        busy.set()
        assert wait_until(lambda: len(got) == 3, 5, 0.02) and client.unread == 0
    finally:
        busy.set()
        sender.disconnect()
        client.disconnect()


def test_a_session_id_that_cannot_be_kept_is_used_for_this_run_and_made_again_once_it_can(tmp_path, caplog):
    from device_agent.mqtt import session_client_id

    caplog.set_level(logging.WARNING, logger="device_agent.mqtt")
    record = tmp_path / "mqtt-session"
    (tmp_path / "mqtt-session.tmp").mkdir()  # its write fails with a real OS error, as on a full disk
    first = session_client_id("edgefleet-agent-pi", record)
    assert first.startswith("edgefleet-agent-pi-") and len(first) == len("edgefleet-agent-pi-") + 16
    assert not record.exists() and "cannot keep the MQTT session's id" in caplog.text
    (tmp_path / "mqtt-session.tmp").rmdir()
    kept = session_client_id("edgefleet-agent-pi", record)
    assert kept == session_client_id("edgefleet-agent-pi", record) == "edgefleet-agent-pi-" + record.read_text().strip()


def test_a_message_held_unacknowledged_comes_again_after_a_reconnect_and_one_acknowledged_does_not(mosquitto):
    """What `edgefleet monitor` relies on when its disk is full: a message it could not store yet is
    not lost — the broker sends it again — and one it stored is not stored twice."""
    got, acks = [], []
    client = MqttClient(client_id=f"held-{uuid.uuid4().hex[:8]}", broker=mosquitto, clean_session=False,
                        held_acks=True)

    def handler(topic, payload):
        got.append(payload)
        if payload == b"hold":
            acks.append(client.hold())
    client.connect()
    sender = MqttClient(client_id=f"sender-{uuid.uuid4().hex[:8]}", broker=mosquitto)
    sender.connect()
    try:
        assert client.subscribe("t/held", handler, wait=5)
        sender.publish("t/held", b"hold", qos=1, wait=5)
        sender.publish("t/held", b"taken", qos=1, wait=5)
        assert wait_until(lambda: got == [b"hold", b"taken"], 5, 0.02), got

        def reconnected():
            connections = client.connections
            client.drop()
            client.connect_in_background()
            assert wait_until(lambda: client.connections > connections, 10, 0.02)
        reconnected()
        assert wait_until(lambda: len(got) == 3, 5, 0.02) and got[2] == b"hold", got  # not b"taken"
        acks[0]()  # the first connection's: a no-op now, not an acknowledgement of whatever has its id
        reconnected()
        assert wait_until(lambda: len(got) == 4, 5, 0.02) and got[3] == b"hold", got
        acks[2]()
        reconnected()
        sender.publish("t/held", b"after", qos=1, wait=5)
        assert wait_until(lambda: len(got) == 5, 5, 0.02) and got[4] == b"after", got  # "hold" is gone
    finally:
        sender.disconnect()
        client.disconnect()


def test_a_broker_that_is_not_there_yet_is_said_once_with_why_and_then_that_it_is(tmp_path, caplog, monkeypatch):
    """An agent started before its broker (or given a wrong address) keeps trying in the background;
    the log says at once that it cannot reach it and why, not at every attempt, and says when it
    connected in the end, as loudly as it said the broker was away."""
    from device_agent import mqtt
    from tests.conftest import Mosquitto

    broker = Mosquitto(tmp_path)  # its port is free: nothing listens there yet
    client = MqttClient(client_id=f"early-{uuid.uuid4().hex[:8]}", broker=broker.address, reconnect_max_delay=1)
    caplog.set_level(logging.INFO, logger=mqtt.__name__)
    client.connect_in_background()
    try:
        assert wait_until(lambda: "cannot reach" in caplog.text, 10, 0.05), caplog.text
        time.sleep(2.5)  # more attempts, a second apart, for the same reason: not said again
        said = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
        assert said == [f"cannot reach the MQTT broker at {broker.address}: [Errno 111] Connection refused; "
                        "trying again, at least every 1 s"], said
        broker.start()
        assert wait_until(lambda: client.connected, 10, 0.05)
        connected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connected to")]
        assert len(connected) == 1 and f"connected to the MQTT broker at {broker.address} after " in connected[0]
        # said at the warning's level, so that a log showing warnings only (a host CLI's) shows it too
        assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"], caplog.records
        attempts = int(connected[0].split(" after ")[1].split()[0])
        assert attempts >= 2, connected  # (one at once, then others after the back-off: said once)
    finally:
        client.disconnect()
        broker.stop()


def test_a_broker_that_refuses_the_connection_is_said_once_as_an_error(tmp_path, caplog):
    """A broker that turns the client away in its CONNACK (no anonymous clients here): one error
    line with the broker's reason, not one, and a "lost the connection" besides, at every attempt."""
    from tests.conftest import Mosquitto

    broker = Mosquitto(tmp_path, extra_conf="allow_anonymous false\n")
    broker.start()
    client = MqttClient(client_id=f"anon-{uuid.uuid4().hex[:8]}", broker=broker.address, reconnect_max_delay=1)
    caplog.set_level(logging.INFO, logger=MqttClient.__module__)
    client.connect_in_background()
    try:
        assert wait_until(lambda: caplog.records, 10, 0.05)
        time.sleep(2.5)  # more attempts, each refused the same way
        said = [(r.levelname, r.getMessage()) for r in caplog.records]
        assert said == [("ERROR", f"cannot reach the MQTT broker at {broker.address}: it refused the connection: "
                                  "Not authorized; trying again, at least every 1 s")], said
    finally:
        client.disconnect()
        broker.stop()


def test_a_tls_file_that_is_not_there_is_named(tmp_path, mosquitto):
    """Whichever of the three files is missing (a key deleted when its certificate was revoked, a
    typo in the config), the error names that one, not the CA."""
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"")
    with pytest.raises(ConfigError, match=f"^no TLS file {tmp_path}/pi.key$"):
        MqttClient(client_id="t", broker=mosquitto, tls=TlsFiles(ca=ca, cert=ca, key=tmp_path / "pi.key"))
    with pytest.raises(ConfigError, match=f"^cannot use the TLS files {ca}: "):
        MqttClient(client_id="t", broker=mosquitto, tls=TlsFiles(ca=ca))  # there, but not a certificate
