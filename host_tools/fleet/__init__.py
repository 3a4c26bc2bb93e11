"""The host's view of the fleet: what devices report, stored and shown."""
