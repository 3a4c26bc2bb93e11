"""``edgefleet``: the host command line. One module per group of commands; importing them
registers their commands on ``main``."""

from host_tools.cli.base import main
from host_tools.cli import (bundles, compress, delivery, demo, device, fleet, keys, registry,  # noqa: F401,E402
                            rollouts, security, simulate)

__all__ = ["main"]
