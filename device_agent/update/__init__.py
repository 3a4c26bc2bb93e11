"""A bundle's way from a deploy command to the committed, serving version — or back.

``states`` holds the state classes and the transition and recovery tables,
``machine`` runs them with the record saved before every step (``record``),
``health`` is the check a bundle passes before it is committed.
"""

from device_agent.update.machine import UpdateMachine
from device_agent.update.states import RECOVERY, STATES, TRANSITIONS, UpdateContext

__all__ = ["RECOVERY", "STATES", "TRANSITIONS", "UpdateContext", "UpdateMachine"]
