"""The device's SQLite telemetry queue: numbered once, kept across restarts, bounded and counted."""

from device_agent.telemetry.queue import TelemetryQueue


def sample(i):
    return {"device_id": "pi-01", "timestamp": float(i), "interval_s": 1.0, "bundle": None, "readings": {"i": i}}


def test_samples_are_numbered_kept_across_a_restart_and_removed_only_when_sent(tmp_path):
    q = TelemetryQueue(tmp_path / "t.db")
    assert [q.put(sample(i)) for i in range(3)] == [1, 2, 3]
    q.close()
    q = TelemetryQueue(tmp_path / "t.db")  # a restarted agent
    assert q.put(sample(3)) == 4  # numbers never repeat
    assert [s["seq"] for s in q.oldest(2)] == [1, 2]
    q.remove_through(2)  # the broker acknowledged the batch
    assert [s["seq"] for s in q.oldest(10)] == [3, 4] and q.oldest(10)[0]["readings"] == {"i": 2}
    assert q.stats() == {"pending": 2, "dropped": 0}


def test_past_the_bound_the_oldest_go_and_are_counted(tmp_path):
    q = TelemetryQueue(tmp_path / "t.db", max_samples=5)
    for i in range(8):
        q.put(sample(i))
    assert [s["seq"] for s in q.oldest(10)] == [4, 5, 6, 7, 8]
    assert q.stats() == {"pending": 5, "dropped": 3}


def test_numbering_carries_on_after_an_older_agents_last_sequence_number(tmp_path):
    q = TelemetryQueue(tmp_path / "t.db")
    q.continue_after(41)
    assert q.put(sample(0)) == 42
