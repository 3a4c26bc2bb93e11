"""A thin client over paho-mqtt: keyword-only settings, handlers per topic filter,
and paho's error codes mapped into MqttError."""

from __future__ import annotations

import array
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.errors import BrokerUnreachable, ConfigError, MqttError
from device_agent.files import replaced_when_written
from device_agent.tls import BrokerTls, TlsFiles

try:
    import fcntl
    import termios
except ImportError:  # not a Unix: MqttClient.unread is not known
    fcntl = termios = None

log = logging.getLogger(__name__)
Handler = Callable[[str, bytes], None]
# While the broker stays unreachable for the same reason, it is said again this often (seconds).
UNREACHABLE_REPEAT_S = 600.0


class _Paho(paho.Client):
    """paho's client, remembering why its last attempt to connect failed: its on_connect_fail does not say."""

    last_error: OSError | None = None

    def reconnect(self):
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise


def session_client_id(prefix: str, record: Path) -> str:
    """PREFIX-<16 random hex digits>: the client id of a persistent session, its random part made
    once and kept in *record*. Mosquitto keys a session by client id alone, so whoever can log in
    and knows the id can take the session over — knock its owner off the broker and drop what was
    queued for it. A guessable id (the device id) would let any device do that to any other; this
    one is known to the broker and to the file's owner only."""
    try:
        suffix = record.read_text().strip()
    except FileNotFoundError:
        suffix = ""
    if not re.fullmatch(r"[0-9a-f]{16}", suffix):
        suffix = secrets.token_hex(8)
        try:
            with replaced_when_written(record) as tmp:
                tmp.write_text(suffix + "\n")
                os.chmod(tmp, 0o600)
        except OSError as exc:  # a full disk: connect all the same, under an id this run alone uses
            log.warning("cannot keep the MQTT session's id in %s (%s): commands sent while this process is "
                        "down will not wait for the next", record, exc.strerror or exc)
    return f"{prefix}-{suffix}"


def throwaway_client_id(prefix: str) -> str:
    """A client id for a clean session, unguessable too (see session_client_id)."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class BrokerAddress:
    host: str = "127.0.0.1"
    port: int = 1883

    @classmethod
    def parse(cls, text: str) -> "BrokerAddress":
        host, sep, port = text.rpartition(":")
        if not sep:
            return cls(host=text)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"broker address {text!r} is not HOST:PORT")
        return cls(host=host.strip("[]"), port=int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _is_pattern(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter or topic_filter.startswith("$share/")


def _unshared(topic_filter: str) -> str:
    """The filter a shared subscription ($share/GROUP/filter) delivers messages for."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else topic_filter
    return topic_filter


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttClient:
    """One connection to a broker. Handlers run on paho's network thread: keep them short."""

    def __init__(self, *, client_id: str, broker: BrokerAddress, will: Will | None = None,
                 clean_session: bool = True, keepalive: int = 30, tls: TlsFiles | None = None,
                 reconnect_max_delay: float = 30.0, held_acks: bool = False) -> None:
        """With *held_acks*, a handler may take a QoS 1 message without acknowledging it yet (hold());
        until it is acknowledged the broker redelivers it after a reconnect, and sends a client at most
        its in-flight limit of such messages (Mosquitto: 20), keeping the rest in the session."""
        self.broker = broker
        self.client_id = client_id
        self.tls = tls
        self._client = _Paho(CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=clean_session, protocol=paho.MQTTv311, manual_ack=held_acks)
        self.held_acks = held_acks
        self._handling = threading.local()  # the message a handler on this thread is handling
        self._client.max_inflight_messages_set(64)
        self._client.max_queued_messages_set(0)
        self._tls = BrokerTls(tls) if tls is not None else None
        if self._tls is not None:
            self._client.tls_set_context(self._tls.context)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._keepalive = keepalive
        self._handlers: dict[str, tuple[int, Handler]] = {}
        # The filters with wildcards (or $share/): a message is matched against these one by one;
        # plain topics are one dictionary lookup (a host following 1,000 devices has 1,000).
        self._patterns: dict[str, Handler] = {}
        self._connected_callbacks: list[Callable[[], None]] = []
        self._client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_delay)
        self._reconnect_max_delay = reconnect_max_delay
        # an outage of the broker as seen from here: (since, failed attempts, the reason last said, when)
        self._unreachable: tuple[float, int, str, float] | None = None
        # The level of what was said about the connection being down: the all-clear is said at the same
        # level, so that whoever saw the one sees the other (a host CLI shows warnings only).
        self._alarm = logging.INFO
        self._turned_away = False  # the broker refused the connection in its CONNACK (said, then it closes)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._refused = threading.Event()  # the broker turned a blocking connect() away
        self._refusal = ""
        self._waiting_to_connect = False
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_socket_open = self._on_socket_open
        self._client.on_connect_fail = self._on_connect_fail
        self.connections = 0  # accepted connections so far: a change means the broker forgot what it held for us
        self._subacks: dict[int, bool] = {}  # mid -> granted, for the last few SUBACKs
        self._suback_arrived = threading.Condition()

    # -- connection -------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=self._keepalive)
        except (OSError, ValueError) as exc:
            raise BrokerUnreachable(f"cannot reach MQTT broker at {self.broker}: {exc}") from None
        self._waiting_to_connect = True
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        try:
            while not self._connected.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                if self._refused.is_set() or time.monotonic() >= deadline:
                    self._client.disconnect()
                    self._client.loop_stop()
                    raise BrokerUnreachable(f"MQTT broker at {self.broker} " + (
                        self._refusal or f"did not accept the connection within {timeout:g}s"))
        finally:
            self._waiting_to_connect = False

    def connect_in_background(self) -> None:
        """Connect now if the broker is there, else keep trying (1-30 s back-off) without blocking."""
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=self._keepalive)
        self._client.loop_start()

    def disconnect(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    def drop(self) -> None:
        """Cut the connection the way a network failure does: no DISCONNECT, so the broker
        publishes our will. Stays offline until connect_in_background() (the simulator's devices
        go offline this way)."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        self._connected.clear()

    def present(self, tls: TlsFiles) -> None:
        """Show the broker *tls*'s client certificate from the next connection on (a renewed one;
        the CAs stay those given at the start, and trust()). Raises ConfigError if it cannot be used."""
        self._tls_in_use().present(tls)
        self.tls = tls

    def trust(self, ca_pem: str) -> None:
        """Also accept a broker certificate signed under the CA certificate *ca_pem* (a renewed one),
        from the next connection on."""
        self._tls_in_use().trust(ca_pem)

    def trust_only(self, tls: TlsFiles) -> None:
        """Trust exactly the CAs in *tls*'s CA file (and show its certificate) from the next
        connection on: a retired CA no longer verifies."""
        self._tls_in_use().restart(tls)
        self.tls = tls

    def peer_certificate(self) -> bytes | None:
        """The certificate the broker showed the connection in use (DER); None without one."""
        sock = self._client.socket()
        try:
            return sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        except (OSError, ValueError):  # (closed meanwhile)
            return None

    def _tls_in_use(self) -> BrokerTls:
        if self._tls is None:
            raise ConfigError("this client does not use TLS")
        return self._tls

    def reconnect(self) -> None:
        """Close the connection (cleanly: no will) and connect again in the background."""
        self.disconnect()
        self.connect_in_background()

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call *callback* on the network thread after every (re)connection, e.g. to re-announce."""
        self._connected_callbacks.append(callback)

    def remove_on_connected(self, callback: Callable[[], None]) -> None:
        if callback in self._connected_callbacks:
            self._connected_callbacks.remove(callback)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def problem(self) -> dict | None:
        """While background attempts to connect fail: why (the last reason said), since how many
        seconds, and how many attempts; None otherwise."""
        outage = self._unreachable
        if outage is None or self.connected:
            return None
        since, attempts, why, _ = outage
        return {"why": why, "for_s": round(time.monotonic() - since, 1), "attempts": attempts}

    @staticmethod
    def _on_socket_open(client, userdata, sock) -> None:
        # Small messages (chunk requests, PUBACKs) must not wait for Nagle's algorithm: with the
        # peer's delayed ACKs that costs up to 40 ms a round trip.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not a TCP socket

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if self._waiting_to_connect:  # connect() reports it
                self._refusal = f"refused the connection: {reason_code}"
                self._refused.set()
                return
            self._turned_away = True
            self._cannot_connect(f"it refused the connection: {reason_code}", logging.ERROR)
            return
        self.connections += 1
        level, self._alarm = self._alarm, logging.INFO
        if self._unreachable is not None:
            since, attempts, _, _ = self._unreachable
            self._unreachable = None
            log.log(level, "connected to the MQTT broker at %s after %d failed attempt%s in %.0f s", self.broker,
                    attempts, "s" * (attempts != 1), time.monotonic() - since)
        elif not self._waiting_to_connect:  # (connect()'s caller knows)
            log.log(level, "connected to the MQTT broker at %s%s", self.broker, " again" * (self.connections > 1))
        with self._lock:
            subs = [(f, qos) for f, (qos, _) in self._handlers.items()]
        for topic_filter, qos in subs:  # resubscribe after every reconnect
            client.subscribe(topic_filter, qos)
        self._connected.set()
        for callback in list(self._connected_callbacks):
            try:
                callback()
            except Exception:
                log.exception("on-connect callback failed")

    def _on_connect_fail(self, client, userdata) -> None:
        self._cannot_connect(str(client.last_error or "no reason given"), logging.WARNING)

    def _cannot_connect(self, why: str, level: int) -> None:
        """A background attempt to connect failed, or the broker turned it away (paho tries again
        after its back-off): said once per outage, again when the reason changes, and every
        UNREACHABLE_REPEAT_S while it lasts."""
        now = time.monotonic()
        since, attempts, said, said_at = self._unreachable or (now, 0, "", now)
        attempts += 1
        if attempts == 1 or why != said or now - said_at >= UNREACHABLE_REPEAT_S:
            log.log(level, "cannot reach the MQTT broker at %s%s: %s; trying again, at least every %g s",
                    self.broker, f" (for {now - since:.0f} s)" if attempts > 1 else "", why, self._reconnect_max_delay)
            said, said_at = why, now
            self._alarm = max(self._alarm, level)
        self._unreachable = (since, attempts, said, said_at)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        if reason_code != 0 and was_connected:  # said before `connected` turns False, which others act on
            log.warning("lost the connection to %s (%s); reconnecting", self.broker, reason_code)
            self._alarm = max(self._alarm, logging.WARNING)
        self._connected.clear()
        turned_away, self._turned_away = self._turned_away, False
        if was_connected or turned_away:  # (a refusal in the CONNACK was said by _on_connect)
            return
        closed = "closed the connection before accepting it (does it require TLS or a client certificate? " \
                 "see --tls-ca, --tls-cert, --tls-key)" if self.tls is None else \
                 "closed the TLS connection before accepting it (it wants a client certificate: --tls-cert, " \
                 "--tls-key)" if self.tls.cert is None else \
                 "closed the TLS connection before accepting it (is the client certificate from the broker's CA?)"
        if self._waiting_to_connect:  # connect() reports it
            self._refusal = self._refusal or closed
            self._refused.set()
        elif reason_code != 0:
            self._cannot_connect(f"it {closed}", logging.WARNING)

    # -- messages ---------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, *, wait: float | None = None) -> bool:
        """Handle messages on *topic_filter* from now on (and after every reconnect). With *wait*,
        block until the broker has granted the subscription; returns whether it did in time."""
        with self._lock:
            self._handlers[topic_filter] = (qos, handler)
            if _is_pattern(topic_filter):
                self._patterns[topic_filter] = handler
        if not self.connected:
            return False
        rc, mid = self._client.subscribe(topic_filter, qos)
        if rc != paho.MQTT_ERR_SUCCESS or wait is None:
            return rc == paho.MQTT_ERR_SUCCESS
        with self._suback_arrived:
            self._suback_arrived.wait_for(lambda: mid in self._subacks, wait)
            return self._subacks.pop(mid, False)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
            self._patterns.pop(topic_filter, None)
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._suback_arrived:
            self._subacks[mid] = not any(getattr(rc, "is_failure", False) for rc in reason_codes)
            while len(self._subacks) > 64:  # nobody waited for the oldest
                del self._subacks[next(iter(self._subacks))]
            self._suback_arrived.notify_all()

    @property
    def unacked(self) -> int:
        """QoS 1 messages published and not yet acknowledged by the broker (queued ones too): how
        far behind the broker we are. paho keeps each in ``_out_messages`` until its PUBACK and
        has no public accessor; a paho without it reads 0 (no back-pressure, nothing breaks)."""
        return len(getattr(self._client, "_out_messages", ()))

    @property
    def unread(self) -> int:
        """Bytes the broker has sent us that the network thread has not read yet (0 when not known):
        more than nothing means messages for us are here, behind our own reading."""
        sock = self._client.socket()
        if sock is None or fcntl is None:
            return 0
        try:
            waiting = array.array("i", [0])
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting)
            return waiting[0] + (sock.pending() if hasattr(sock, "pending") else 0)  # (TLS: decrypted, unread)
        except (OSError, ValueError):  # closed meanwhile
            return 0

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                wait: float | None = None) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        # Not connected, or the connection broke under this very call: paho keeps a QoS 1 message and
        # sends it after the reconnect it makes anyway (a QoS 0 one is gone, as QoS 0 allows).
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN, paho.MQTT_ERR_CONN_LOST):
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if wait is not None:
            try:
                info.wait_for_publish(wait)
            except (RuntimeError, ValueError) as exc:
                raise MqttError(f"publish to {topic} was not acknowledged: {exc}") from None
            if not info.is_published():
                raise MqttError(f"publish to {topic} was not acknowledged within {wait:g}s")

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            exact = self._handlers.get(message.topic)
            matches = [exact[1]] if exact is not None else []
            matches += [h for f, h in self._patterns.items() if paho.topic_matches_sub(_unshared(f), message.topic)]
        self._handling.message, self._handling.held = message, False
        for handler in matches:
            try:
                handler(message.topic, message.payload)
            except Exception:  # a bad handler must not kill the network thread
                log.exception("handler for %s failed", message.topic)
        self._handling.message = None
        if self.held_acks and message.qos and not self._handling.held:
            self._client.ack(message.mid, message.qos)

    def hold(self) -> Callable[[], None]:
        """From a handler, with held_acks: leave the message it handles unacknowledged, and get the
        function that acknowledges it. Called once the connection has gone, that does nothing: the
        broker sends the message again (a persistent session) and the handler gets it again, while
        the id it had may by then be another message's."""
        message = getattr(self._handling, "message", None)
        if not self.held_acks or message is None:
            raise RuntimeError("hold() is for a handler of a client made with held_acks=True")
        self._handling.held = True
        mid, qos, connection = message.mid, message.qos, self.connections

        def acknowledge() -> None:
            if qos and self.connections == connection and self._connected.is_set():
                self._client.ack(mid, qos)
        return acknowledge
