"""Reading sysfs, procfs and device-tree files: the text, or None where there is none."""

from __future__ import annotations

from pathlib import Path


def read(path: Path) -> str | None:
    """The file's text without surrounding whitespace or device-tree NULs; None if it cannot be
    read or is empty."""
    try:
        return path.read_bytes().strip(b"\x00\n\t ").decode(errors="replace").strip() or None
    except OSError:
        return None


def number(path: Path) -> float | None:
    """The file's first word as a number ("32760 ma" reads 32760); None if there is none."""
    text = read(path)
    try:
        return float(text.split()[0]) if text else None
    except ValueError:
        return None
