"""The device's telemetry queue: every sample is kept in SQLite until the broker has it.

Samples get the device's sequence number when they are queued (it lives in the same
database, so it survives restarts and never repeats), wait there while the broker is
unreachable, and go out oldest first, in batches, removed only once the broker acknowledged
the batch (QoS 1). The queue is bounded: past ``max_samples`` the oldest are dropped and
counted, and the count travels with every later sample, so the host knows what it missed.
A sample the database cannot take (the device's disk is full) is lost too, and counted among
the dropped once the database takes writes again; until then ``put`` raises StorageError.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from device_agent.errors import StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('next_seq', 1), ('dropped', 0);
"""


class TelemetryQueue:
    def __init__(self, path: Path, max_samples: int = 10_000) -> None:
        self.path = Path(path)
        self.max_samples = max_samples
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._unstored = 0  # samples lost since the database last took a write (not yet in 'dropped')
        try:
            self._open()
        except sqlite3.Error:  # an agent starting on a full disk serves its model all the same
            pass

    @property
    def losing(self) -> bool:
        """The last sample could not be queued (and the database has taken no write since)."""
        return self._unstored > 0

    def _open(self) -> sqlite3.Connection:
        """The database, opened now if it is not yet: an agent that started while the disk was full
        (SQLite could not make its write-ahead log) gets its queue once there is room."""
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            try:
                # WAL with synchronous=NORMAL: one sequential write per sample, durable up to the last
                # checkpoint on power loss (a few samples at worst), and kind to SD cards.
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
        return self._db

    @staticmethod
    def _counter(db: sqlite3.Connection, name: str) -> int:
        return db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]

    def put(self, sample: dict[str, Any]) -> int:
        """Queue *sample* (a TelemetrySample's fields without ``seq``); returns its sequence number.
        StorageError if the database cannot take it: the sample is lost, and counted."""
        with self._lock:
            try:
                db = self._open()
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    seq = self._counter(db, "next_seq")
                    db.execute("UPDATE counters SET value = ? WHERE name = 'next_seq'", (seq + 1,))
                    db.execute("INSERT INTO samples VALUES (?, ?)", (seq, json.dumps({**sample, "seq": seq})))
                    excess = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] - self.max_samples
                    if excess > 0:
                        db.execute("DELETE FROM samples WHERE seq IN (SELECT seq FROM samples ORDER BY seq LIMIT ?)",
                                   (excess,))
                    if excess > 0 or self._unstored:
                        db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'",
                                   (max(0, excess) + self._unstored,))
            except sqlite3.Error as exc:  # "database or disk is full"
                self._unstored += 1
                raise StorageError(f"cannot queue telemetry: {exc}") from None
            self._unstored = 0
        return seq

    def continue_after(self, seq: int) -> None:
        """Number new samples after *seq* (the last one an older agent sent)."""
        with self._lock:
            try:
                self._open().execute("UPDATE counters SET value = MAX(value, ?) WHERE name = 'next_seq'", (seq + 1,))
            except sqlite3.Error as exc:
                raise StorageError(f"cannot update the telemetry queue: {exc}") from None

    def oldest(self, limit: int) -> list[dict[str, Any]]:
        with self._lock:
            if self._db is None:
                return []
            rows = self._db.execute("SELECT body FROM samples ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [json.loads(body) for (body,) in rows]

    def remove_through(self, seq: int) -> None:
        """The broker has every sample up to *seq*."""
        with self._lock:
            try:
                self._open().execute("DELETE FROM samples WHERE seq <= ?", (seq,))
            except sqlite3.Error as exc:  # they stay, and go again (the host keeps each (device, seq) once)
                raise StorageError(f"cannot remove sent telemetry from the queue: {exc}") from None

    def stats(self) -> dict[str, int]:
        with self._lock:
            if self._db is None:
                return {"pending": 0, "dropped": self._unstored}
            return {"pending": self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0],
                    "dropped": self._counter(self._db, "dropped") + self._unstored}

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
