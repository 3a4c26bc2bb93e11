"""`edgefleet dashboard`: a local web page of the fleet database.

One card per device: its current version, and time-series plots of latency (p50, p99), agent
memory, power and temperature, with a mark wherever a rollout (or a rollback) happened. The page
is self-contained (no CDN: devices' networks and CI machines are often offline) and reads three
JSON endpoints:

    /api/devices                  the fleet status rows
    /api/series?device=ID&hours=H  that device's samples, flattened to the plotted readings
    /api/events?device=ID         its deployment outcomes (the rollout marks)

A reading a device never sent is plotted as "not reported", never as a line at zero, and a time
it sent nothing (switched off, say) as a break in the line, not a line drawn across it.
"""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from host_tools.fleet.store import FleetStore
from host_tools.fleet.view import readings_summary, summarize

PAGE = Path(__file__).with_name("static") / "dashboard.html"
# plot series -> (the views' reading, scale to the plot's unit)
PLOTTED = {
    "p50_ms": ("latency_p50_ms", 1),
    "p99_ms": ("latency_p99_ms", 1),
    "rss_mib": ("process_rss_bytes", 1 / 2**20),
    "watts": ("power_watts", 1),
    "temp_c": ("temperature_c", 1),
}


def flatten(readings: dict) -> dict[str, float | None]:
    values = readings_summary(readings)
    return {name: values[field] * scale if isinstance(values[field], (int, float)) else None
            for name, (field, scale) in PLOTTED.items()}


class Dashboard:
    def __init__(self, store: FleetStore, port: int, address: str = "127.0.0.1") -> None:
        self.store = store
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                try:
                    if url.path == "/":
                        self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
                    elif url.path == "/api/devices":
                        self._json([summarize(r) for r in dashboard.store.devices()])
                    elif url.path == "/api/series" and "device" in query:
                        since = time.time() - float(query.get("hours", 24)) * 3600
                        self._json([{"t": t, "bundle": b, **flatten(r)}
                                    for t, b, r in dashboard.store.series(query["device"], since)])
                    elif url.path == "/api/events" and "device" in query:
                        self._json(dashboard.store.events(query["device"]))
                    else:
                        self._send(404, b"not found\n", "text/plain")
                except ValueError as exc:
                    self._send(400, f"{exc}\n".encode(), "text/plain")

            def _json(self, doc) -> None:
                self._send(200, json.dumps(doc).encode(), "application/json")

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"
