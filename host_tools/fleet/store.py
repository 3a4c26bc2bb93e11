"""The fleet database (SQLite): device status, telemetry samples and deployment events.

Telemetry is keyed by (device, seq), so a sample delivered twice is stored once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError
from device_agent.protocol.reports import DEPLOY_FINAL, DeploymentEvent, DeviceStatus, TelemetrySample

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id     TEXT PRIMARY KEY,
    online        INTEGER NOT NULL,
    status_at     REAL NOT NULL,
    agent_version TEXT,
    active_bundle TEXT,
    active_sha256 TEXT,
    last_seen     REAL NOT NULL,
    labels        TEXT,
    hardware      TEXT,
    id_shared_with TEXT,               -- other agents seen with this device id (DeviceStatus)
    certificate   TEXT,                -- the client certificate it shows the broker: serial, expires, source
    clock_lag     REAL,                -- host time a sample arrived - its device timestamp, least lately
    clock_lag_at  REAL                 -- when that was measured
);
CREATE TABLE IF NOT EXISTS host_labels (   -- labels the operator gives devices in the registry
    device_id TEXT NOT NULL,
    name      TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (device_id, name)
);
CREATE TABLE IF NOT EXISTS telemetry (
    device_id TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    timestamp REAL NOT NULL,
    bundle    TEXT,
    readings  TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE IF NOT EXISTS telemetry_hourly (
    device_id TEXT NOT NULL,
    hour      REAL NOT NULL,         -- start of the hour, Unix time
    samples   INTEGER NOT NULL,
    bundle    TEXT,                  -- the last sample's
    summary   TEXT NOT NULL,         -- JSON: {reading: {mean, max}} over the hour
    PRIMARY KEY (device_id, hour)
);
CREATE TABLE IF NOT EXISTS events (
    device_id  TEXT NOT NULL,
    command_id TEXT NOT NULL,
    state      TEXT NOT NULL,
    bundle     TEXT NOT NULL,
    progress   REAL NOT NULL,
    reason     TEXT,
    timestamp  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_command ON events (device_id, command_id);
"""

# An update's outcome is stored once: it comes as the device's final event, and again in every
# status the device sends after it (last_update), which is how it arrives when the event was lost.
_OUTCOME = ("INSERT INTO events SELECT ?,?,?,?,?,?,? WHERE NOT EXISTS "
            "(SELECT 1 FROM events WHERE device_id=? AND command_id=? AND state=?)")


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    online: bool
    since: float
    agent_version: str | None
    active_bundle: str | None
    last_seen: float
    telemetry: dict[str, Any] | None  # readings of the newest sample
    telemetry_bundle: str | None
    telemetry_at: float | None
    samples: int
    labels: dict[str, str] = field(default_factory=dict)  # the device's own, then the operator's over them
    hardware: dict[str, Any] | None = None
    id_shared_with: list[dict[str, Any]] | None = None
    # How far the device's clock is behind the host's (negative: ahead), plus the least delivery delay
    # seen lately: from telemetry, whose samples the device stamps with its own clock.
    clock_lag: float | None = None
    certificate: dict[str, str] | None = None  # DeviceStatus.certificate, as last said online


# The least lag over this long estimates the clock's offset: delays only add to it, and a batch sent
# after an outage (samples queued for hours) does not hold the estimate up for longer than this.
CLOCK_WINDOW = 600.0
# A batch of a device's telemetry arrived: when, and its clock lag — a new estimate when it is lower
# than the one on record, or that one is older than the window.
_NEWER_LAG = "clock_lag IS NULL OR :lag < clock_lag OR clock_lag_at < :stale"
_SEEN = (f"UPDATE devices SET last_seen=MAX(last_seen, :now), "
         f"clock_lag=CASE WHEN {_NEWER_LAG} THEN :lag ELSE clock_lag END, "
         f"clock_lag_at=CASE WHEN {_NEWER_LAG} THEN :now ELSE clock_lag_at END WHERE device_id=:device")


class FleetStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")  # several monitors may share the file
            self._db.executescript(SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(devices)")}
            for column, kind in (("labels", "TEXT"), ("hardware", "TEXT"), ("id_shared_with", "TEXT"),
                                 ("clock_lag", "REAL"), ("clock_lag_at", "REAL"),
                                 ("certificate", "TEXT")):  # a database from before them
                if column not in columns:
                    self._db.execute(f"ALTER TABLE devices ADD COLUMN {column} {kind}")
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open fleet database {self.path}: {exc}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def run(self, sql: str, args: tuple = ()) -> list[tuple]:
        """One statement against the fleet database, for the modules that keep their own tables in it
        (rollouts); returns its rows."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @contextmanager
    def _transaction(self, begin: str = "BEGIN IMMEDIATE"):
        """Under the lock, one transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._db.execute(begin)
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # (SQLite ends it itself on some errors: a full disk)
                    self._db.execute("ROLLBACK")
                raise

    def run_many(self, sql: str, rows: list[tuple]) -> None:
        """One statement for each of *rows*, in one transaction."""
        with self._transaction("BEGIN"):
            self._db.executemany(sql, rows)

    def ensure_schema(self, script: str) -> None:
        with self._lock:
            self._db.executescript(script)

    def record_status(self, status: DeviceStatus, received_at: float) -> None:
        with self._transaction():
            if status.last_update is not None:
                self._record_event(status.last_update)
            self._db.execute(
                "INSERT INTO devices (device_id, online, status_at, agent_version, active_bundle, active_sha256, "
                "last_seen, labels, hardware, id_shared_with, certificate) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(device_id) DO UPDATE SET "
                "online=excluded.online, status_at=excluded.status_at, agent_version=excluded.agent_version, "
                "active_bundle=COALESCE(excluded.active_bundle, devices.active_bundle), "
                "active_sha256=COALESCE(excluded.active_sha256, devices.active_sha256), "
                "last_seen=MAX(devices.last_seen, excluded.last_seen), "
                "labels=COALESCE(excluded.labels, devices.labels), "  # the last will carries none: keep them
                "hardware=COALESCE(excluded.hardware, devices.hardware), "
                "certificate=COALESCE(excluded.certificate, devices.certificate), "
                # what the device last said online: its last will says nothing of it
                "id_shared_with=CASE WHEN excluded.online THEN excluded.id_shared_with ELSE devices.id_shared_with END",
                (status.device_id, int(status.online), status.timestamp or received_at, status.agent_version,
                 status.active_bundle, status.active_sha256, received_at if status.online else 0.0,
                 json.dumps(status.labels) if status.labels is not None else None,
                 json.dumps(status.hardware) if status.hardware is not None else None,
                 json.dumps(status.id_shared_with) if status.id_shared_with else None,
                 json.dumps(status.certificate) if status.certificate is not None else None))

    def record_telemetry(self, sample: TelemetrySample, received_at: float) -> bool:
        """Store *sample*; False when that (device, seq) was stored before."""
        return self.record_telemetry_many([sample], received_at) == 1

    def record_telemetry_many(self, samples: list[TelemetrySample], received_at: float) -> int:
        """Store *samples* in one transaction; returns how many were new (the rest were redelivered)."""
        if not samples:
            return 0
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO telemetry VALUES (?,?,?,?,?)",
                                 [(s.device_id, s.seq, s.timestamp, s.bundle, json.dumps(s.readings))
                                  for s in samples])
            new = self._db.total_changes - before
            for device in {s.device_id for s in samples}:
                lag = received_at - max(s.timestamp for s in samples if s.device_id == device)
                self._db.execute(_SEEN, {"now": received_at, "lag": lag, "stale": received_at - CLOCK_WINDOW,
                                         "device": device})
        return new

    def record_event(self, event: DeploymentEvent) -> None:
        with self._lock:
            self._record_event(event)

    def _record_event(self, event: DeploymentEvent) -> None:
        row = (event.device_id, event.command_id, event.state, event.bundle, event.progress, event.reason,
               event.timestamp)
        if event.state in DEPLOY_FINAL:
            self._db.execute(_OUTCOME, row + (event.device_id, event.command_id, event.state))
        else:
            self._db.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?)", row)

    def devices(self) -> list[DeviceRow]:
        with self._lock:
            rows = self._db.execute("""
                SELECT d.device_id, d.online, d.status_at, d.agent_version, d.active_bundle, d.last_seen,
                       t.readings, t.bundle, t.timestamp,
                       (SELECT COUNT(*) FROM telemetry c WHERE c.device_id = d.device_id), d.labels, d.hardware,
                       d.id_shared_with, d.clock_lag, d.certificate
                FROM devices d
                LEFT JOIN telemetry t ON t.device_id = d.device_id
                     AND t.seq = (SELECT MAX(seq) FROM telemetry m WHERE m.device_id = d.device_id)
                ORDER BY d.device_id""").fetchall()
            given: dict[str, dict[str, str]] = {}
            for device, name, value in self._db.execute("SELECT device_id, name, value FROM host_labels"):
                given.setdefault(device, {})[name] = value
        return [DeviceRow(r[0], bool(r[1]), r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None,
                          r[7], r[8], r[9], {**(json.loads(r[10]) if r[10] else {}), **given.get(r[0], {})},
                          json.loads(r[11]) if r[11] else None, json.loads(r[12]) if r[12] else None, r[13],
                          json.loads(r[14]) if r[14] else None)
                for r in rows]

    def set_labels(self, device_id: str, labels: dict[str, str | None]) -> None:
        """Give *device_id* labels in the registry (a value of None removes one); they win over the
        labels the device reports itself."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM devices WHERE device_id=?", (device_id,)).fetchone() is None:
                raise ConfigError(f"no device {device_id!r} in the registry (it has never connected)")
            for name, value in labels.items():
                if value is None:
                    self._db.execute("DELETE FROM host_labels WHERE device_id=? AND name=?", (device_id, name))
                else:
                    self._db.execute("INSERT OR REPLACE INTO host_labels VALUES (?,?,?)", (device_id, name, value))

    def forget(self, device_id: str) -> dict[str, int]:
        """Delete everything stored of *device_id* (status, labels, telemetry, its hourly summaries,
        deployment events) in one transaction; returns how many rows of each went. Rollouts keep their
        record of it: they are history of the rollout."""
        tables = {"status": "devices", "labels": "host_labels", "samples": "telemetry",
                  "hours": "telemetry_hourly", "events": "events"}
        with self._transaction():
            return {what: self._db.execute(f"DELETE FROM {table} WHERE device_id=?", (device_id,)).rowcount
                    for what, table in tables.items()}

    def retain(self, now: float, *, raw_days: float = 7.0, hourly_days: float = 90.0) -> tuple[int, int]:
        """Keep raw samples for *raw_days*; fold older ones into hourly summaries (mean and max of
        each number the view shows), kept for *hourly_days*. Returns (samples folded, hours dropped)."""
        cutoff, oldest = now - raw_days * 86400, now - hourly_days * 86400
        # The samples are read in the transaction that deletes them: another monitor sharing the
        # file cannot add one in between that would be deleted without being folded.
        with self._transaction():
            rows = self._db.execute("SELECT device_id, timestamp, bundle, readings FROM telemetry "
                                    "WHERE timestamp < ? ORDER BY device_id, timestamp", (cutoff,)).fetchall()
            hours: dict[tuple[str, float], list] = {}
            for device, ts, bundle, readings in rows:
                hours.setdefault((device, ts - ts % 3600), []).append((bundle, json.loads(readings)))
            for (device, hour), samples in hours.items():
                prior = self._db.execute("SELECT samples, summary FROM telemetry_hourly WHERE device_id=? "
                                         "AND hour=?", (device, hour)).fetchone()
                summary = _summarize_hour([r for _, r in samples],
                                          (prior[0], json.loads(prior[1])) if prior else None)
                self._db.execute("INSERT OR REPLACE INTO telemetry_hourly VALUES (?,?,?,?,?)",
                                 (device, hour, len(samples) + (prior[0] if prior else 0), samples[-1][0],
                                  json.dumps(summary)))
            self._db.execute("DELETE FROM telemetry WHERE timestamp < ?", (cutoff,))
            dropped = self._db.execute("DELETE FROM telemetry_hourly WHERE hour < ?", (oldest,)).rowcount
        return len(rows), dropped

    def hourly(self, device_id: str) -> list[tuple[float, int, dict[str, Any]]]:
        with self._lock:
            return [(r[0], r[1], json.loads(r[2])) for r in self._db.execute(
                "SELECT hour, samples, summary FROM telemetry_hourly WHERE device_id=? ORDER BY hour", (device_id,))]

    def series(self, device_id: str, since: float = 0.0, limit: int = 5000) -> list[tuple[float, str | None, dict]]:
        """(device timestamp, bundle, readings) of *device_id*'s samples since *since*, oldest first
        (the newest *limit* of them)."""
        with self._lock:
            rows = self._db.execute("SELECT timestamp, bundle, readings FROM telemetry WHERE device_id=? AND "
                                    "timestamp >= ? ORDER BY seq DESC LIMIT ?", (device_id, since, limit)).fetchall()
        return [(r[0], r[1], json.loads(r[2])) for r in reversed(rows)]

    def events(self, device_id: str, states: tuple[str, ...] = ("active", "rolled_back", "failed")) -> list[dict]:
        """Deployment outcomes of *device_id*, oldest first: where a rollout (or a rollback) happened."""
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT timestamp, state, bundle, reason FROM events WHERE device_id=? AND "
                                    f"state IN ({marks}) ORDER BY timestamp", (device_id, *states)).fetchall()
        return [{"timestamp": r[0], "state": r[1], "bundle": r[2], "reason": r[3]} for r in rows]

    def in_flight(self) -> dict[str, dict]:
        """{device: its update under way} from each device's newest deployment event, for devices
        whose newest event is not an outcome (accepted, downloading, verifying, ...)."""
        with self._lock:
            rows = self._db.execute("SELECT device_id, state, bundle, progress, timestamp, MAX(rowid) FROM events "
                                    "GROUP BY device_id").fetchall()
        return {r[0]: {"bundle": r[2], "state": r[1], "progress": r[3], "since": r[4]}
                for r in rows if r[1] not in DEPLOY_FINAL}

    def sample_index(self, device_id: str) -> list[tuple[int, float]]:
        """(sequence number, device timestamp) of every stored sample of *device_id*, in order;
        a gap in the numbers is a sample never received."""
        with self._lock:
            return [(r[0], r[1]) for r in self._db.execute(
                "SELECT seq, timestamp FROM telemetry WHERE device_id=? ORDER BY seq", (device_id,))]

    def telemetry_count(self, device_id: str, bundle: str | None = None) -> int:
        with self._lock:
            if bundle is None:
                q, args = "SELECT COUNT(*) FROM telemetry WHERE device_id=?", (device_id,)
            else:
                q, args = "SELECT COUNT(*) FROM telemetry WHERE device_id=? AND bundle=?", (device_id, bundle)
            return self._db.execute(q, args).fetchone()[0]


# What an hourly summary keeps: (collector, reading) pairs the views and metrics use.
SUMMARIZED = [("inference", "p50_ms"), ("inference", "p99_ms"), ("inference", "per_s"), ("inference", "energy_mj"),
              ("memory", "process_rss_bytes"), ("cpu", "process_percent"), ("thermal", "max_c"),
              ("power", "total_watts")]


def _summarize_hour(samples: list[dict[str, Any]], prior: tuple[int, dict] | None) -> dict[str, Any]:
    """{"collector.reading": {"mean", "max", "n"}}, merged with an earlier summary of the same hour.
    A reading no sample had stays out: a summary never invents a number."""
    out: dict[str, Any] = dict(prior[1]) if prior else {}
    for collector, reading in SUMMARIZED:
        values = [s[collector][reading] for s in samples
                  if isinstance(s.get(collector), dict) and isinstance(s[collector].get(reading), (int, float))]
        if not values:
            continue
        key = f"{collector}.{reading}"
        old = out.get(key)
        n = len(values) + (old["n"] if old else 0)
        total = sum(values) + (old["mean"] * old["n"] if old else 0.0)
        out[key] = {"mean": total / n, "max": max(values + ([old["max"]] if old else [])), "n": n}
    return out
