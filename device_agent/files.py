"""Writing a file under its final name only once it is whole; sizes as people read them."""

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


def size_text(n: int) -> str:
    """*n* bytes as people read them: 900 bytes, 512 KiB, 12.3 MiB, 1.50 GiB."""
    if n < 2**10:
        return f"{n} bytes"
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB"
