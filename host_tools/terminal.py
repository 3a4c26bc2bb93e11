"""The rich console every host command prints through."""

from __future__ import annotations

PIPE_WIDTH = 120


def console(*, stderr: bool = False):
    """A console as wide as the terminal; when output goes to a pipe or file there is no
    terminal width to respect, so tables get PIPE_WIDTH columns instead of rich's 80."""
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)
