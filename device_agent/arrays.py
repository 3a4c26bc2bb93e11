"""Reading NumPy's .npz and .npy files — from a path or from bytes — and giving data a model
input's width.

``np.load`` takes whatever is neither zip nor .npy for a pickle, so a damaged or wrong file
makes it say "This file contains pickled (object) data"; here it says what the file is not.
Every failure is one of ``UNREADABLE_ARRAYS``, for the caller to name in its own error.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

NPZ_MAGIC = b"PK\x03\x04"
NPY_MAGIC = b"\x93NUMPY"


class NotNumpy(ValueError):
    pass


def read_npz(source: Path | str | bytes) -> dict[str, np.ndarray]:
    """{name: array} of an .npz archive."""
    with np.load(_opened(source, NPZ_MAGIC, "a NumPy .npz archive"), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def read_npy(source: Path | str | bytes) -> np.ndarray:
    return np.load(_opened(source, NPY_MAGIC, "a NumPy .npy file"), allow_pickle=False)


def _opened(source, magic: bytes, kind: str):
    if isinstance(source, (bytes, bytearray, memoryview)):
        head, source = bytes(source[:len(magic)]), io.BytesIO(source)
    else:
        with open(source, "rb") as file:
            head = file.read(len(magic))
    if head != magic:
        raise NotNumpy(f"not {kind}")
    return source


def in_width_of(array: np.ndarray, dtype: str) -> np.ndarray | None:
    """*array* as *dtype* (a model input's NumPy type name) where that changes only the width:
    float32 or float64 data for a float16 input, int32 for int64; *array* itself where it is that
    type already or *dtype* is not NumPy's; None where the kinds differ (floats for integers)."""
    try:
        want = np.dtype(dtype)
    except TypeError:
        return array
    if want.kind in "USO":  # text ("str"): any width of it, as it is
        return array.astype(str) if array.dtype.kind in "USO" else None
    if array.dtype == want:
        return array
    if array.dtype.kind != want.kind and not (array.dtype.kind in "iu" and want.kind in "iu"):
        return None
    return array.astype(want)
