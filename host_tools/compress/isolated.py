"""Running the passes, and their outputs on the evaluation data, in a child process, so that a
library that dies on a model takes only that child with it.

ONNX Runtime, LiteRT and PyTorch are C++ libraries: on some graphs they do not raise, they die
(ORT 1.32 took a segmentation fault running RetinaNet's int8 model on an image without boxes, and
creating a session for a CRNN's float16 graph). In the compress process that would end the
command, and with it every result already measured. Here each pass runs, and each result is run
on the data, in one long-lived child that holds the evaluation data; a child that dies is reported
as that step's failure, in one line with the signal, and the next step gets a new child. The models
are timed in the compress process afterwards, only those that ran here, on samples of the same data.
A pass's progress lines come back as it runs. A pass class the child cannot import by name (one
defined in a script's `__main__` or inside a function) runs in the compress process.

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
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from device_agent.errors import EdgefleetError
from device_agent.runtime.base import first_line
from host_tools.compress import evaluate
from host_tools.compress.data import BoundData, Dataset
from host_tools.compress.model import ModelFile

# How often the compress process looks whether a child that has not answered is still alive.
POLL_SECONDS = 0.2


class RuntimeCrash(Exception):
    """The runtime died running the model: the child process ended without an answer."""

    def __init__(self, message: str, how: str = "") -> None:
        super().__init__(message)
        self.how = how  # "SIGSEGV, signal 11"


class Unpicklable(Exception):
    """What was to be sent to the child cannot be pickled (a class defined inside a function)."""


class Sandbox:
    """A child process that runs passes, and models on *bound* (None: on zeros, as Evaluation does
    without data): taken on the first request, replaced after a crash, handed on when closed."""

    def __init__(self, bound: BoundData | None, *, in_process: bool = False) -> None:
        self.bound = bound
        self.in_process = in_process  # (everything here instead: to debug or profile a pass, say)
        self._child: _Child | None = None

    def outputs(self, model: ModelFile) -> dict[str, Any]:
        """*model*'s outputs on the data (evaluate.outputs_on). ModelError where the runtime refuses
        it; RuntimeCrash where the runtime dies."""
        if self.in_process:
            return evaluate.outputs_on(model.load(), self.bound)
        return self._ask("outputs", model, model)

    def runs_on_zeros(self, model: ModelFile) -> str | None:
        """None when *model* loads and runs on zeros; else why not, in one line (a crash too)."""
        if self.in_process:
            return failure_on_zeros(model)
        try:
            return self._ask("zeros", model, model)
        except RuntimeCrash as exc:
            return str(exc)

    def check_loads(self, model: ModelFile) -> None:
        """RuntimeCrash where the runtime dies loading *model* (what it raises, it raises when the
        caller loads the model: not this method's to report)."""
        if not self.in_process:
            self._ask("load", model, model)

    def bind(self, data: Dataset, model: ModelFile, runtime) -> BoundData:
        """evaluate.bind(*data*, *runtime*: *model* loaded here), with the model's runs on the first
        samples in the child, which holds the data from then on. ModelError where the model does not
        run on it; RuntimeCrash where the runtime dies."""
        bound = data.bind(runtime.inputs, runtime.outputs)
        if self.in_process:
            self.bound = evaluate.probed(bound, runtime, data.source)
            return self.bound
        self.hold(bound)
        self.bound = replace(bound, **self._ask("probe", (model, data.source), model))
        return self.bound

    def hold(self, bound: BoundData | None) -> None:
        """Run models on *bound* from now on."""
        self.bound = bound
        if self._child is not None and self._child.ask(("data", bound)) is None:
            self._child.end()  # (it died: the next request starts another, with the data)
            self._child = None

    def run_pass(self, cls, config, model: ModelFile, workdir: Path, say) -> ModelFile:
        """``cls().run(model, config, workdir)`` in the child (here, where the child could not import
        *cls*), its progress lines to *say*; what the pass raises is raised here, RuntimeCrash
        where the child dies."""
        if self.in_process or not _isolable(cls):
            return _run_pass(cls, config, model, workdir)
        try:
            return self._ask("pass", (cls, config, model, workdir), model, say)
        except Unpicklable:  # (a config of the caller's own making, say: it runs here, as before)
            return _run_pass(cls, config, model, workdir)
        except RuntimeCrash as exc:
            raise RuntimeCrash(f"the pass crashed ({exc.how}): a library it runs died on the model") from None

    def close(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if child.ask(("data", None)) is not None:  # (it forgets the data)
            _hand_on(child)
        else:  # (killed, as on Ctrl-C)
            child.end()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ask(self, kind: str, request, model: ModelFile, say=None):
        """The child's answer to (*kind*, *request*), which runs *model* (or a pass on it)."""
        if self._child is None:
            self._child = _take(self.bound)
        answer = self._child.ask((kind, request), say)
        if answer is None:
            code, self._child = self._child.end(), None
            runtime = "ONNX Runtime" if model.format == "onnx" else "LiteRT"
            raise RuntimeCrash(f"{runtime} crashed running it ({_how(code)})", _how(code))
        status, value = answer
        if status == "raise":
            raise value
        if status == "error":
            raise RuntimeError(f"{kind} in the compress child process failed:\n{value}")
        return value


class _Child:
    """One child Python running `serve`, and the socket to it."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])  # (where host_tools is, installed or not)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        with theirs:
            # (what libraries print goes to stderr: stdout may be a report piped from --json)
            self.process = subprocess.Popen([sys.executable, "-c", _CHILD, str(theirs.fileno())],
                                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=2, env=env)
        self.conn = Connection(ours.detach())

    def ask(self, message: tuple, say=None):
        """The child's answer to *message*, its progress lines on the way to *say*; None where it
        died first; Unpicklable, and nothing sent, where *message* cannot be sent. Interrupted
        (Ctrl-C), the child is killed: it may be in the middle of a pass."""
        try:
            payload = ForkingPickler.dumps(message)
        except Exception as exc:  # noqa: BLE001 — pickle raises PicklingError, TypeError, AttributeError
            raise Unpicklable(first_line(exc)) from None
        try:
            self.conn.send_bytes(payload)
            while True:
                while not self.conn.poll(POLL_SECONDS):
                    if self.process.poll() is not None:
                        return None
                answer = self.conn.recv()
                if answer[0] != "progress":
                    return answer
                if say is not None:
                    say(answer[1])
        except (EOFError, OSError):  # (it died while we sent, or before it answered)
            return None
        except BaseException:
            self.process.kill()
            raise

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


_PROBED = ("fixed_batch", "batch_axis_unused", "labels")  # the fields of BoundData evaluate.probed sets

_CHILD = ("import sys; from multiprocessing.connection import Connection; "
          f"from {__name__} import serve; serve(Connection(int(sys.argv[1])))")


def serve(conn: Connection) -> None:
    """The child: hold the data it is given, run passes and models, until the other end closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (Ctrl-C is the compress process's to handle)
    bound, loaded = None, _Loaded()
    while True:
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "data":
            bound = value
            if value is None:  # (the command is over: what it loaded goes too)
                loaded = _Loaded()
            conn.send(("ok", None))
            continue
        try:
            if kind == "load":
                answer = ("ok", _loaded(value, loaded))
            elif kind == "zeros":
                answer = ("ok", failure_on_zeros(value))
            elif kind == "pass":
                answer = ("ok", _run_pass(*value, conn=conn))
            elif kind == "probe":  # (what the runs on the first samples found, kept here and sent back)
                bound = evaluate.probed(bound, loaded(value[0]), value[1])
                answer = ("ok", {name: getattr(bound, name) for name in _PROBED})
            else:
                answer = ("ok", evaluate.outputs_on(loaded(value), bound))
        except EdgefleetError as exc:
            answer = ("raise", exc)
        except Exception:  # noqa: BLE001 — a fault of ours, not the model's: its traceback goes back
            answer = ("error", traceback.format_exc())
        conn.send(answer)


def _run_pass(cls, config, model: ModelFile, workdir: Path, conn: Connection | None = None) -> ModelFile:
    """The pass's result; in the child, its progress lines sent along *conn*."""
    import contextlib
    import io

    from host_tools.compress.passes import showing_progress

    # What libraries print (ONNX Runtime's calibrators report their histograms on stdout) would mix
    # into the report a user pipes from --json; the pass's own progress goes to stderr.
    with contextlib.redirect_stdout(io.StringIO()), \
            showing_progress(lambda line: conn.send(("progress", line))) if conn else contextlib.nullcontext():
        return cls().run(model, config, workdir)


def _isolable(cls) -> bool:
    """Whether the child can import pass class *cls* by its name."""
    return cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__


class _Loaded:
    """The model the child loaded last, kept: the original is loaded to see that it loads, then run
    on the first samples, then on all of them, and each load of a large model takes seconds."""

    def __init__(self) -> None:
        self.key, self.runtime = None, None

    def __call__(self, model: ModelFile):
        try:
            stat = model.path.stat()
        except OSError:
            return model.load()  # (which says what is missing)
        key = (str(model.path), model.format, stat.st_mtime_ns, stat.st_size)
        if key != self.key:
            self.key, self.runtime = None, None  # (the last one freed before the next loads)
            self.runtime, self.key = model.load(), key
        return self.runtime


def _loaded(model: ModelFile, loaded: _Loaded) -> None:
    try:
        loaded(model)
    except Exception:  # noqa: BLE001 — the caller loads it too, and reports what the runtime says
        pass


def failure_on_zeros(model: ModelFile) -> str | None:
    """None when *model* loads and runs on zeros; else why not, in one line."""
    try:
        model.outputs_on_zeros()
    except Exception as exc:  # noqa: BLE001 — each runtime raises its own (ModelError, RuntimeError, ValueError)
        return first_line(exc)
    return None
