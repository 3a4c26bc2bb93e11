"""Fault injection for the tests that kill the agent in every state (never set in production).

``EDGEFLEET_TEST_HOLD_IN=<state>``: after the record in <state> is saved, write
``<state_dir>/held-in-<state>`` and stop there, so a test can SIGKILL the agent at
exactly that point. ``EDGEFLEET_TEST_CRASH_IN=<state>``: SIGKILL itself on every
entry to <state>, as a model that crashes the runtime would (a crash loop).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

HOLD_ENV = "EDGEFLEET_TEST_HOLD_IN"
CRASH_ENV = "EDGEFLEET_TEST_CRASH_IN"


def entered(state: str, state_dir: Path) -> None:
    if os.environ.get(CRASH_ENV) == state:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(HOLD_ENV) == state:
        (Path(state_dir) / f"held-in-{state}").write_text(str(os.getpid()))
        threading.Event().wait()  # until killed
