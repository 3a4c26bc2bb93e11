"""The local inference API: applications on the device use the active model through the agent.

Each connection gets a thread; each request runs through the ModelSlot, so a
swap or rollback never fails a request already under way (it finishes on the
model it started with) and every request's latency feeds the telemetry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, Callable, Mapping


from device_agent.errors import ConfigError, EdgefleetError, ProtocolError
from device_agent.local_api import framing
from device_agent.serving import ModelSlot

log = logging.getLogger(__name__)
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class LocalApi:
    """Serves *slot* on a Unix socket. *control* answers the control kinds (status, rollback)."""

    def __init__(self, path: Path, slot: ModelSlot, *, mode: int = 0o660,
                 control: Mapping[bytes, Callable[[], dict[str, Any]]] | None = None, spin_us: int = 0) -> None:
        self.path = Path(path)
        self.spin = spin_us / 1e6  # see framing.FrameReader
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ConfigError(f"socket path {self.path} is longer than {MAX_SOCKET_PATH} bytes")
        self.slot, self.mode, self.control = slot, mode, dict(control or {})
        self._server: _Server | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            _refuse_if_live(self.path)
            self.path.unlink()
        api = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                api._serve_connection(self.request)

        try:
            self._server = _Server(str(self.path), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.path}: {exc}") from None
        os.chmod(self.path, self.mode)
        threading.Thread(target=self._server.serve_forever, name=f"api:{self.path.name}", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self.path.unlink(missing_ok=True)

    # -- one connection ---------------------------------------------------------------
    def _serve_connection(self, sock: socket.socket) -> None:
        reader = framing.FrameReader(sock, spin=self.spin)
        while True:
            try:
                frame = reader.read()
            except (ProtocolError, OSError):
                return
            if frame is None:
                return
            kind, payload = frame
            try:
                reply_kind, reply = self._answer(kind, payload)
            except EdgefleetError as exc:
                reply_kind, reply = framing.ERROR, str(exc).encode()
            except Exception as exc:  # never let one bad request take the server down
                log.exception("local API request failed")
                reply_kind, reply = framing.ERROR, f"internal error: {exc}".encode()
            try:
                framing.send_frame(sock, reply_kind, reply)
            except OSError:
                return

    def _answer(self, kind: bytes, payload: bytes) -> tuple[bytes, bytes]:
        if kind in self.control:
            return framing.JSON, json.dumps(self.control[kind]()).encode()
        if kind == framing.DESCRIBE:
            return framing.JSON, json.dumps(self.slot.describe()).encode()
        if kind not in (framing.RAW, framing.JSON, framing.NPZ, framing.NPY):
            raise ProtocolError(f"request kind {kind.decode(errors='replace')!r} is not served on this socket")
        outputs = self.slot.infer_request(framing.decode_arrays(kind, payload))
        if kind == framing.NPY:
            kind = framing.NPZ  # outputs go back by name, even for a .npy input
        if kind == framing.JSON:
            return kind, json.dumps({"outputs": {k: v.tolist() for k, v in outputs.items()}}).encode()
        return kind, framing.encode_arrays(kind, outputs)


def _refuse_if_live(path: Path) -> None:
    """Another agent already serving on *path* must not lose its socket to us."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return  # a stale socket file left by a killed agent
    finally:
        probe.close()
    raise ConfigError(f"another agent is already serving on {path}")
