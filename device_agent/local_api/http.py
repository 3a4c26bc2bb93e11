"""The local API over HTTP on the loopback interface, for applications that speak HTTP, not our
frames (curl, Node, C++). Off unless a port is configured; binds to 127.0.0.1 only.

    GET  /v1/model     the active bundle and its inputs and outputs (JSON)
    POST /v1/infer     body: application/json {"inputs": {name: nested lists}},
                       application/x-npz (one array per input) or application/x-npy (one input);
                       answer: JSON for JSON, .npz otherwise
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from device_agent.errors import ConfigError, EdgefleetError, ModelError, ProtocolError
from device_agent.local_api import framing
from device_agent.serving import ModelSlot

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024 * 1024
_KINDS = {"application/json": framing.JSON, "application/x-npz": framing.NPZ, "application/x-npy": framing.NPY}


class HttpApi:
    def __init__(self, port: int, slot: ModelSlot, host: str = "127.0.0.1") -> None:
        self.slot, self.host, self.port = slot, host, port
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> int:
        """Listen; returns the port (useful when 0 asked for any free one)."""
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: one connection for many requests

            def log_message(self, fmt, *args) -> None:  # requests are counted, not logged
                pass

            def do_GET(self) -> None:
                if self.path != "/v1/model":
                    return self._send(404, "application/json", b'{"error": "not found"}')
                self._send(200, "application/json", json.dumps(api.slot.describe()).encode())

            def do_POST(self) -> None:
                if self.path != "/v1/infer":
                    return self._send(404, "application/json", b'{"error": "not found"}')
                kind = _KINDS.get(self.headers.get("Content-Type", "").split(";")[0].strip())
                length = int(self.headers.get("Content-Length") or -1)
                if kind is None or not 0 <= length <= MAX_BODY:
                    return self._error(415 if kind is None else 413,
                                       "send application/json, application/x-npz or application/x-npy "
                                       f"with a Content-Length up to {MAX_BODY} bytes")
                body = self.rfile.read(length)
                try:
                    inputs = framing.decode_arrays(kind, body)
                    if kind == framing.JSON:
                        inputs = inputs.get("inputs") if isinstance(inputs.get("inputs"), dict) else inputs
                    outputs = api.slot.infer_request(inputs)
                except (ModelError, ProtocolError) as exc:
                    return self._error(400, str(exc))
                except EdgefleetError as exc:
                    return self._error(500, str(exc))
                if kind == framing.JSON:
                    doc = {"outputs": {k: v.tolist() for k, v in outputs.items()}}
                    return self._send(200, "application/json", json.dumps(doc).encode())
                self._send(200, "application/x-npz", framing.encode_arrays(framing.NPZ, outputs))

            def _error(self, status: int, message: str) -> None:
                self._send(status, "application/json", json.dumps({"error": message}).encode())

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        try:
            self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="api:http", daemon=True).start()
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
