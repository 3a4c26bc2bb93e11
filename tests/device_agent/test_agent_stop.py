"""Stopping the agent on SIGTERM/SIGINT, whatever the main thread was doing when the signal came."""

import threading
import time

import pytest

from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.mqtt import BrokerAddress
from tests.conftest import free_port


# (an exception in the agent's threads, e.g. its shutdown racing its first connect, fails it too)
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_signal_handler_takes_no_lock_the_code_it_interrupts_may_hold_and_the_agent_then_stops(tmp_path, keys):
    # Python runs a handler in the main thread between two bytecodes of whatever runs there, even
    # inside another handler: a second SIGTERM that came while the first one's handler held the
    # work queue's lock waited for it forever (seen as a hung agent).
    config = AgentConfig(device_id="stop-1", state_dir=tmp_path / "state", trusted_keys=(keys["pub"],),
                         broker=BrokerAddress("127.0.0.1", free_port()))  # nobody there: it need not connect
    agent = Agent(config, local_api=False)
    handled = threading.Thread(target=agent.on_signal, args=(15, None))
    with agent._work.mutex, agent._stop._cond:  # what stop() takes: Queue.put and Event.set
        handled.start()
        handled.join(5)
        assert not handled.is_alive()
    running = threading.Thread(target=agent.run)
    started = time.monotonic()
    running.start()
    running.join(30)
    assert not running.is_alive() and time.monotonic() - started < 10
