"""The MQTT client wrapper against a real Mosquitto."""

import uuid

from device_agent.mqtt import MqttClient
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

    record = tmp_path / "mqtt-session"
    (tmp_path / "mqtt-session.tmp").mkdir()  # its write fails with a real OS error, as on a full disk
    first = session_client_id("edgefleet-agent-pi", record)
    assert first.startswith("edgefleet-agent-pi-") and len(first) == len("edgefleet-agent-pi-") + 16
    assert not record.exists() and "cannot keep the MQTT session's id" in caplog.text
    (tmp_path / "mqtt-session.tmp").rmdir()
    kept = session_client_id("edgefleet-agent-pi", record)
    assert kept == session_client_id("edgefleet-agent-pi", record) == "edgefleet-agent-pi-" + record.read_text().strip()
