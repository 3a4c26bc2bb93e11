"""Writing a file under its final name only once it is whole."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replaced_when_written(path: Path) -> Iterator[Path]:
    """Yield ``PATH.tmp`` to write; when the block ends, it replaces *path* in one rename. On any
    failure (a full disk, a folder with the name, Ctrl-C) it is removed: never a half-written file
    under either name."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
