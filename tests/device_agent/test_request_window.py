"""Which chunks a download asks for and when (``device_agent.request_window``), on times the test
gives: the window, the retry timer that follows how late answers come, and which overdue chunks
are asked for again. ``test_transfer.py`` runs downloads through a real broker."""

import pytest

from device_agent.request_window import RequestWindow


def window(count=16, *, size=4, retry_after=3.0, stall_timeout=30.0, unread=False, held=True):
    link = {"unread": unread, "held": held}
    asks = RequestWindow(count, window=size, retry_after=retry_after, stall_timeout=stall_timeout,
                         unread=lambda: link["unread"], connection_held=lambda: link["held"])
    return asks, link


def ask(asks, now, received=(), last_progress=0.0):
    wanted, again = asks.due(now, last_progress, set(received))
    asks.asked(wanted, now)
    return wanted, again


def test_a_download_keeps_its_window_full_and_skips_what_it_has():
    asks, _ = window(size=4)
    assert ask(asks, 0.0, received={1}) == ([0, 2, 3, 4], 0)  # chunk 1 came from an earlier attempt
    assert asks.free == 0
    asks.arrived(0, 0.1)
    asks.arrived(2, 0.1)
    assert asks.free == 2
    assert ask(asks, 0.1, received={0, 1, 2}, last_progress=0.1) == ([5, 6], 0)
    assert ask(asks, 0.2, received={0, 1, 2}, last_progress=0.1) == ([], 0)  # full again, nothing overdue


@pytest.mark.parametrize("delay, rto", [(0.5, 3.0), (2.0, 6.0), (5.0, 10.0)],
                         ids=["fast: at least retry_after", "srtt + 4 rttvar", "at most a third of the stall timeout"])
def test_the_retry_time_follows_how_late_answers_come(delay, rto):
    asks, _ = window()
    ask(asks, 0.0)
    asks.arrived(0, delay)
    assert asks.rto == pytest.approx(rto)


def test_an_answer_to_a_chunk_asked_for_twice_does_not_set_the_retry_time():
    asks, _ = window(size=1, retry_after=1.0)
    ask(asks, 0.0)
    assert ask(asks, 1.0) == ([0], 1)  # overdue: asked again, and the timer backs off
    assert asks.rto == 2.0
    asks.arrived(0, 1.1)  # the first ask's answer, or the second's: unknown (Karn's rule)
    assert asks.rto == 2.0


def test_of_the_overdue_chunks_those_asked_before_one_that_arrived_are_asked_again_and_only_the_last_of_the_others():
    asks, _ = window(size=6)
    ask(asks, 0.0)  # 0-5
    asks.arrived(3, 0.2)  # 0-2 were asked for before it: lost; 4 and 5 after it: maybe only late
    wanted, again = asks.due(3.3, 0.2, {3})
    assert (wanted, again) == ([0, 1, 2, 5, 6], 4)  # 5 for the late ones, and 6 fills the freed slot
    assert asks.rto == 6.0


def test_after_the_connection_dropped_every_overdue_chunk_is_asked_again():
    asks, link = window(size=4)
    ask(asks, 0.0)
    link["held"] = False  # what was on its way on the old connection is lost
    assert asks.due(3.0, 0.0, set()) == ([0, 1, 2, 3], 4)


def test_while_answers_wait_unread_in_the_socket_nothing_is_asked_again_before_the_cap():
    asks, link = window(size=2, stall_timeout=30.0)
    ask(asks, 0.0)
    link["unread"] = True
    assert asks.due(5.0, 0.0, set()) == ([], 0)
    assert asks.due(10.0, 0.0, set()) == ([1], 1)  # at the cap (a third of the stall timeout): the last late one


def test_chunks_still_arriving_hold_the_retry_of_the_others_back():
    asks, _ = window(size=4)
    ask(asks, 0.0)
    asks.arrived(0, 0.5)
    assert ask(asks, 3.2, {0}, 0.5) == ([4], 0)  # 1-3 asked 3.2 s ago, but a chunk came 2.7 s ago: not overdue
    assert ask(asks, 3.6, {0}, 0.5) == ([3], 1)


def test_a_restart_asks_again_for_all_that_is_missing():
    asks, _ = window(count=4, size=8)
    ask(asks, 0.0)
    for i in range(4):
        asks.arrived(i, 0.1)
    assert asks.due(0.2, 0.1, set(range(4))) == ([], 0)
    asks.restart()  # chunks 1 and 3 turned out damaged
    assert asks.due(0.3, 0.1, {0, 2}) == ([1, 3], 0)
