"""The bundle server's choice of where each chunk goes (``host_tools.fanout``), on a clock the test
moves: what devices fetching one bundle together, late, alone or again are sent, and where.
``tests/device_agent/test_transfer.py`` runs the same choices through a real broker."""

import pytest

from device_agent.protocol import topics
from device_agent.protocol.chunks import BundleOffer, ChunkRequest
from host_tools import fanout
from host_tools.fanout import FanoutPolicy
from host_tools.serve import ServerStats

CHUNK = 16 * 1024
OFFER = BundleOffer(sha256="ab" * 32, size=8 * CHUNK, chunk_size=CHUNK, name="m", version="1.0.0")
SHARED = topics.bundle_chunks(OFFER.sha256, CHUNK)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fleet():
    """(policy, ask, clock, stats): ask(device, chunks, fanout=True) is the plan for that device's
    request (session "<device>-s") at the clock's time."""
    clock, stats = Clock(), ServerStats()
    policy = FanoutPolicy(stats, lambda sha: OFFER if sha == OFFER.sha256 else None, lambda: False, clock=clock)

    def ask(device, chunks, fanout=True, seen=None):
        return policy.plan(OFFER, ChunkRequest(device, tuple(chunks), CHUNK, fanout, f"{device}-s", seen))
    return policy, ask, clock, stats


def test_devices_listening_together_get_each_chunk_from_one_publish_and_a_lost_one_on_their_own_topic(fleet):
    policy, ask, clock, stats = fleet
    assert ask("b", []) == []  # b listens from here on
    clock.now += 1
    assert ask("a", range(4)) == [(i, SHARED) for i in range(4)]  # once, for both
    clock.now += 0.5
    assert ask("b", range(4)) == []  # on its way to b too
    clock.now += fanout.FANOUT_QUIET + 0.5
    assert ask("b", [2]) == [(2, topics.chunks("b"))]  # asked again after the quiet time: lost
    assert policy.due() == []
    assert (stats.fanout_chunks, stats.fanout_saved) == (4, 4)


def test_late_joiners_starting_together_share_one_more_publish_and_a_lone_one_gets_its_own(fleet):
    policy, ask, clock, _ = fleet
    assert ask("a", range(4)) == [(i, SHARED) for i in range(4)]
    clock.now += 1
    for device in ("c", "d", "e"):  # they began listening after that publish: collected
        assert ask(device, range(2)) == []
    assert policy.due() == []  # not before FANOUT_QUIET after the publish
    clock.now += fanout.FANOUT_QUIET
    assert sorted(policy.due()) == [(OFFER.sha256, CHUNK, [(0, SHARED)]), (OFFER.sha256, CHUNK, [(1, SHARED)])]
    assert ask("f", [2]) == []  # alone, while a still downloads: waits for others to ask too
    assert policy.due() == [(OFFER.sha256, CHUNK, [(2, topics.chunks("f"))])]  # nobody did
    assert policy.due() == []


def test_a_device_fetching_alone_after_a_fan_out_is_answered_at_once_on_its_own_topic(fleet):
    policy, ask, clock, _ = fleet
    ask("a", range(8))  # the whole bundle went out, and a is done asking
    clock.now += 1
    assert ask("g", range(3)) == [(i, topics.chunks("g")) for i in range(3)]
    assert policy.due() == []


def test_a_device_that_says_it_heard_the_publish_is_not_sent_it_again(fleet):
    policy, ask, clock, _ = fleet
    ask("a", range(3))
    policy.published((OFFER.sha256, CHUNK, 0), 7)  # the server numbered the three publishes 7, 8, 9
    policy.published((OFFER.sha256, CHUNK, 1), 8)
    policy.published((OFFER.sha256, CHUNK, 2), 9)
    clock.now += 0.1
    assert ask("h", range(3)) == []  # its first ask came after the publish: collected
    assert ask("h", [], seen=8) == []  # but it received publish 8 and every one after
    clock.now += fanout.FANOUT_QUIET
    assert policy.due() == [(OFFER.sha256, CHUNK, [(0, topics.chunks("h"))])]  # only 7 missed it


def test_an_answer_still_in_the_servers_queue_is_not_queued_again_until_it_is_sent(fleet):
    policy, ask, _, stats = fleet
    plan = ask("p", range(2), fanout=False)
    assert plan == [(0, topics.chunks("p")), (1, topics.chunks("p"))]
    queued = {(topic, OFFER.sha256, CHUNK, index) for index, topic in plan}
    policy.queued(queued)
    assert ask("p", range(3), fanout=False) == [(2, topics.chunks("p"))]
    policy.sent(queued)
    assert ask("p", range(2), fanout=False) == plan  # gone out: asked again, it was lost
    assert stats.fanout_saved == 2


def test_a_withdrawn_bundles_collected_askers_are_not_answered():
    clock, offers = Clock(), {OFFER.sha256: OFFER}
    policy = FanoutPolicy(ServerStats(), offers.get, lambda: False, clock=clock)
    policy.plan(OFFER, ChunkRequest("a", tuple(range(4)), CHUNK, True, "a-s"))
    clock.now += 1
    for device in ("c", "d"):
        assert policy.plan(OFFER, ChunkRequest(device, (0,), CHUNK, True, f"{device}-s")) == []
    del offers[OFFER.sha256]  # BundleServer.withdraw
    clock.now += fanout.FANOUT_QUIET
    assert policy.due() == []
