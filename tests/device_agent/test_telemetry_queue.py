"""The device's SQLite telemetry queue: numbered once, kept across restarts, bounded and counted."""

from device_agent.errors import StorageError
from device_agent.telemetry.queue import TelemetryQueue
from tests.conftest import fill_disk


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


def test_on_a_full_disk_samples_are_lost_and_counted_and_the_queue_takes_them_again_once_there_is_room(
        small_disk):
    disk = small_disk(2)
    q = TelemetryQueue(disk / "t.db")
    q.put(sample(0))
    filler = fill_disk(disk)
    lost = 0
    for i in range(1, 400):  # a big sample: the database needs new pages soon
        try:
            q.put({**sample(i), "readings": {"pad": "x" * 4000}})
        except StorageError as exc:
            assert str(exc) == "cannot queue telemetry: database or disk is full"
            lost += 1
    assert lost > 0 and q.stats()["dropped"] == lost
    pending = q.stats()["pending"]
    filler.unlink()
    seq = q.put(sample(400))
    assert q.stats() == {"pending": pending + 1, "dropped": lost}
    q.close()
    q = TelemetryQueue(disk / "t.db")  # the count was written down once there was room
    assert q.stats() == {"pending": pending + 1, "dropped": lost} and q.put(sample(401)) == seq + 1
