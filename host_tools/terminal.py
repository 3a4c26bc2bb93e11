"""The rich console every host command prints through, where its log lines go, and how a line
names many devices."""

from __future__ import annotations

import logging
import sys

PIPE_WIDTH = 120


def listed(names: list[str], shown: int) -> str:
    """The first *shown* of *names*, then how many more: "pi-1, pi-2, pi-3 and 12 more"."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def console(*, stderr: bool = False):
    """A console as wide as the terminal; when output goes to a pipe or file there is no
    terminal width to respect, so tables get PIPE_WIDTH columns instead of rich's 80."""
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged: a live progress display swaps it for
    one that prints above itself, and a handler that kept the original would draw through the bars."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_log_lines(verbose: bool) -> None:
    """With --verbose, info lines (each device's steps, who fetches what) go to stderr; without,
    warnings only, bare, as Python prints them when nothing is configured."""
    if not verbose:
        return
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
