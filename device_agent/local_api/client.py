"""A tiny client for the agent's local API; NumPy is its only dependency.

    from device_agent.local_api import InferenceClient

    with InferenceClient("/run/edgefleet/inference.sock") as model:
        print(model.describe()["bundle"])
        logits = model.infer({"image": batch})["logits"]
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from device_agent.errors import ModelError
from device_agent.local_api import framing

DEFAULT_SOCKET = Path("/run/edgefleet/inference.sock")
DEFAULT_CONTROL_SOCKET = Path("/run/edgefleet/control.sock")


class _Connection:
    def __init__(self, path: Path | str, timeout: float | None) -> None:
        self.path = Path(path)
        self._timeout = timeout
        self._sock: socket.socket | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _call(self, kind: bytes, payload: bytes = b"") -> tuple[bytes, bytes]:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                raise ConnectionError(f"cannot reach the edgefleet agent at {self.path}: {exc}") from None
            self._sock = sock
            self._reader = framing.FrameReader(sock)
        try:
            framing.send_frame(self._sock, kind, payload)
            frame = self._reader.read()
        except OSError:
            self.close()
            raise
        if frame is None:
            self.close()
            raise ConnectionError("the agent closed the connection")
        reply_kind, reply = frame
        if reply_kind == framing.ERROR:
            raise ModelError(reply.decode(errors="replace"))
        return reply_kind, reply

    def _json(self, kind: bytes) -> dict[str, Any]:
        return json.loads(self._call(kind)[1])


class InferenceClient(_Connection):
    """Runs the device's active model. One connection, reused across calls; not thread-safe."""

    def __init__(self, path: Path | str = DEFAULT_SOCKET, *, timeout: float | None = 30.0) -> None:
        super().__init__(path, timeout)

    def describe(self) -> dict[str, Any]:
        """The active bundle, its runtime, and its inputs and outputs."""
        return self._json(framing.DESCRIBE)

    def infer(self, inputs: Mapping[str, Any] | np.ndarray, *, format: str = "raw") -> dict[str, np.ndarray]:
        """Outputs by name. *inputs*: {name: array}, or one array for a single-input model.
        *format*: "raw" (default, fastest), "npz", "npy" (one array) or "json" (small inputs)."""
        kind = {"raw": framing.RAW, "npz": framing.NPZ, "npy": framing.NPY, "json": framing.JSON}[format]
        arrays = {"": inputs} if isinstance(inputs, np.ndarray) else dict(inputs)
        if kind == framing.NPZ and "" in arrays:
            kind = framing.NPY  # a bare array has no name to put in an archive
        if kind == framing.JSON:
            payload = json.dumps({k: np.asarray(v).tolist() for k, v in arrays.items()}).encode()
        else:
            payload = framing.encode_arrays(kind, arrays)
        reply_kind, reply = self._call(kind, payload)
        if reply_kind == framing.JSON:
            return {k: np.asarray(v) for k, v in json.loads(reply)["outputs"].items()}
        return framing.decode_arrays(reply_kind, reply)


class AgentClient(_Connection):
    """The control socket: status and rollback (root or the agent's user only)."""

    def __init__(self, path: Path | str = DEFAULT_CONTROL_SOCKET, *, timeout: float | None = 120.0) -> None:
        super().__init__(path, timeout)

    def status(self) -> dict[str, Any]:
        return self._json(framing.STATUS)

    def rollback(self) -> dict[str, Any]:
        """Roll back to the previous committed version; returns the final deployment event."""
        return self._json(framing.ROLLBACK)
