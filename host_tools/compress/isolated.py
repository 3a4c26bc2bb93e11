"""Running a pass's output on the evaluation data in a child process, so that a runtime that dies
on it takes only that child with it.

ONNX Runtime and LiteRT are C++ libraries: on some graphs a compressed model makes, they do not
raise, they die (ORT 1.32 took a segmentation fault running RetinaNet's int8 model on an image
without boxes). In the compress process that would end the command, and with it every result
already measured. Here each candidate runs in one long-lived child that holds the evaluation data;
a child that dies is reported as the step's failure, in one line with the signal, and the next
candidate gets a new child. The models are timed in the compress process afterwards, only those
that ran here, on samples of the same data.

The child is a new Python that runs `serve`, about half a second of CPU to start: not
multiprocessing's fork, which would copy the compress process's threads (PyTorch's, ONNX Runtime's)
mid-work, nor its spawn, which imports the caller's main script again and fails in one without a
`__main__` guard. They talk over a socket pair, as multiprocessing's Connection does, so what a
library prints does not get in the way. When a command ends, its child forgets the data and waits
for the next command in the same process (a script that compresses many models, the tests), as
loky's reusable executor keeps its workers; it ends when this process does.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from device_agent.errors import ModelError
from device_agent.runtime.base import first_line
from host_tools.compress import evaluate
from host_tools.compress.data import BoundData
from host_tools.compress.model import ModelFile

# How often the compress process looks whether a child that has not answered is still alive.
POLL_SECONDS = 0.2


class RuntimeCrash(Exception):
    """The runtime died running the model: the child process ended without an answer."""


class Sandbox:
    """A child process that runs models on *bound* (None: on zeros, as Evaluation does without
    data): taken on the first request, replaced after a crash, handed on when closed."""

    def __init__(self, bound: BoundData | None) -> None:
        self.bound = bound
        self._child: _Child | None = None

    def outputs(self, model: ModelFile) -> dict[str, Any]:
        """*model*'s outputs on the data (evaluate.outputs_on). ModelError where the runtime refuses
        it; RuntimeCrash where the runtime dies."""
        return self._ask("outputs", model)

    def runs_on_zeros(self, model: ModelFile) -> str | None:
        """None when *model* loads and runs on zeros; else why not, in one line (a crash too)."""
        try:
            return self._ask("zeros", model)
        except RuntimeCrash as exc:
            return str(exc)

    def close(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.ask(("data", None)) is not None:  # (it forgets the data)
            _hand_on(child)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ask(self, kind: str, model: ModelFile):
        if self._child is None:
            self._child = _take(self.bound)
        answer = self._child.ask((kind, model))
        if answer is None:
            code, self._child = self._child.end(), None
            runtime = "ONNX Runtime" if model.format == "onnx" else "LiteRT"
            raise RuntimeCrash(f"{runtime} crashed running it ({_how(code)})")
        status, value = answer
        if status == "model-error":
            raise ModelError(value)
        if status == "error":
            raise RuntimeError(f"evaluating {model.path.name} in a child process failed:\n{value}")
        return value


class _Child:
    """One child Python running `serve`, and the socket to it."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])  # (where host_tools is, installed or not)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        with theirs:
            self.process = subprocess.Popen([sys.executable, "-c", _CHILD, str(theirs.fileno())],
                                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        self.conn = Connection(ours.detach())

    def ask(self, message: tuple):
        """The child's answer to *message*; None where it died first."""
        try:
            self.conn.send(message)
            while not self.conn.poll(POLL_SECONDS):
                if self.process.poll() is not None:
                    break
            return self.conn.recv() if self.conn.poll() else None
        except (EOFError, OSError):  # (it died while we sent, or before it answered)
            return None

    def end(self) -> int | None:
        """Close the socket (the child's recv ends, and so does the child); its exit code, None
        where it had not ended 5 s later and was killed."""
        self.conn.close()
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


_idle: list[_Child] = []  # the child the last Sandbox closed, for the next one
_idle_lock = threading.Lock()


def _take(bound: BoundData | None) -> _Child:
    """The idle child, or a new one, holding *bound*."""
    with _idle_lock:
        idle = _idle.pop() if _idle else None
    for child in (idle, None):
        child = child or _Child()
        if child.ask(("data", bound)) is not None:
            return child
        child.end()  # (an idle child that died since: a new one)
    raise RuntimeCrash("the evaluation's child process ended before it took the data")


def _hand_on(child: _Child) -> None:
    with _idle_lock:
        if not _idle:
            _idle.append(child)
            return
    child.end()


@atexit.register
def _end_idle() -> None:
    with _idle_lock:
        children, _idle[:] = list(_idle), []
    for child in children:
        child.end()


def _how(code: int | None) -> str:
    if code is None:
        return "no answer"
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"{signal.Signals(-code).name}, signal {-code}"
    except ValueError:
        return f"signal {-code}"


_CHILD = ("import sys; from multiprocessing.connection import Connection; "
          f"from {__name__} import serve; serve(Connection(int(sys.argv[1])))")


def serve(conn: Connection) -> None:
    """The child: hold the data it is given, run models on it, until the other end closes."""
    bound = None
    while True:
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "data":
            bound = value
            conn.send(("ok", None))
            continue
        try:
            if kind == "zeros":
                answer = ("ok", _zeros_failure(value))
            else:
                answer = ("ok", evaluate.outputs_on(value.load(), bound))
        except ModelError as exc:
            answer = ("model-error", str(exc))
        except Exception:  # noqa: BLE001 — a fault of ours, not the model's: its traceback goes back
            answer = ("error", traceback.format_exc())
        conn.send(answer)


def _zeros_failure(model: ModelFile) -> str | None:
    try:
        model.outputs_on_zeros()
    except Exception as exc:  # noqa: BLE001 — each runtime raises its own (ModelError, RuntimeError, ValueError)
        return first_line(exc)
    return None
