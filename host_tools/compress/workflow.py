"""Run a recipe on a model, checking every pass's output against the original."""

from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from device_agent.bundle.archive import stored_size
from device_agent.errors import CompressionError, ConfigError, ModelError, NotApplicable
from host_tools.compress import evaluate, truth, yolo
from host_tools.compress.data import Dataset, load_dataset
from host_tools.compress.isolated import RuntimeCrash, Sandbox
from host_tools.compress.model import ModelFile
from host_tools.compress.passes import (DATA_FIELD, check_requirements, get_pass, make_config, progress,
                                        showing_progress)
from host_tools.compress.recipes import Recipe

Progress = Callable[[str], None]


@dataclass
class Measured:
    """One model as the report shows it: the original or a pass's output."""

    label: str
    model: ModelFile
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    compresses: bool = True  # False for graph preparation
    seconds: float = 0.0
    size_bytes: int = 0
    download_bytes: int = 0
    fidelity: evaluate.Fidelity | None = None
    latency: evaluate.Latency | None = None
    outputs: dict[str, np.ndarray] | None = field(default=None, repr=False)


@dataclass
class CompressionReport:
    original: Measured
    steps: list[Measured]
    recipe: Recipe
    eval_source: str | None
    eval_samples: int
    labels: bool
    latency_threads: int | None
    latency_where: str = "host CPU"
    boxes: bool = False  # the labels are a detector's ground-truth boxes: accuracy is mAP50-95
    # --auto: steps are alternatives, not a chain; the one chosen (None: none qualified) and why
    chosen: Measured | None = None
    auto: Any = None

    @property
    def compressed(self) -> bool:
        """Whether the result is compressed (not only prepared, and not the original)."""
        if self.auto is not None:
            return self.chosen is not None
        return any(s.status == "ok" and s.compresses for s in self.steps)

    @property
    def result(self) -> Measured:
        if self.auto is not None:
            return self.chosen or self.original
        done = [s for s in self.steps if s.status == "ok"]
        return done[-1] if done else self.original

    @property
    def latency_method(self) -> str:
        if self.latency_where != "host CPU":
            return f"median of single-sample runs on {self.latency_where}"
        return (f"median of {self.original.latency.runs} single-sample runs per model in interleaved rounds, "
                f"{self.latency_threads or 'default'} thread(s), host CPU")

    def to_dict(self) -> dict[str, Any]:
        from onnxruntime import __version__ as ort_version

        def row(m: Measured) -> dict[str, Any]:
            out = {"label": m.label, "file": m.model.path.name, "format": m.model.format, "status": m.status,
                   "size_bytes": m.size_bytes, "download_bytes": m.download_bytes}
            if m is not self.original:
                out.update(note=m.note or None, options=m.config, seconds=round(m.seconds, 3))
            if m.latency:
                out["latency"] = m.latency.as_dict()
                if m is not self.original and self.original.latency:
                    out["latency_ratio"] = round(m.latency.p50_ms / self.original.latency.p50_ms, 4)
            if m.fidelity:
                out["fidelity"] = m.fidelity.as_dict()
                drop = quality_drop(self.original, m)
                out["drop_points"] = None if drop is None else round(drop, 3)
            return out

        return {
            **({"auto": self.auto.to_dict()} if self.auto is not None else {}),
            "recipe": self.recipe.to_dict(),
            "original": row(self.original),
            "steps": [row(s) for s in self.steps],
            "result": {"label": self.result.label, "file": self.result.model.path.name},
            "evaluation": {"data": self.eval_source, "samples": self.eval_samples, "labels": self.labels,
                           **({"accuracy": truth.METRIC} if self.boxes else {})},
            "latency_method": None if self.original.latency is None else self.latency_method,
            "host": {"machine": platform.machine(), "processor": _cpu_name(), "onnxruntime": ort_version,
                     "int8_products_saturate": u8s8_saturates()},
        }


def quality_drop(original: Measured, candidate: Measured) -> float | None:
    """Points lost: task accuracy with labels; else top-1 disagreement for classifiers;
    else (1 - cosine similarity) x 100 of the worst output."""
    f = candidate.fidelity
    if f is None:
        return None
    if f.accuracy is not None and original.fidelity is not None and original.fidelity.accuracy is not None:
        return (original.fidelity.accuracy - f.accuracy) * 100
    if f.agreement is not None:
        return (1 - f.agreement) * 100
    return (1 - f.cosine) * 100


def run_recipe(model: ModelFile, recipe: Recipe, *, calib: str | Dataset | None = None,
               train: str | Dataset | None = None, eval_data: str | Dataset | None = None, out: Path | None = None,
               workdir: Path | None = None, latency_runs: int = 200, latency_threads: int | None = 1,
               progress: Progress | None = None, device_bench=None, isolated: bool = True) -> CompressionReport:
    """Apply *recipe*'s passes in order; measure the original and each output on *eval_data*
    (latency on this host, or with *device_bench* on a device). The passes and their outputs run in
    a child process (isolated.py; *isolated* False: in this one, to debug or profile a pass).

    A pass that does not apply to the model (or fails on it) is reported and skipped; the
    next pass takes the last good model. The last good model is copied to *out*.
    """
    say = progress or (lambda _msg: None)
    calib, train = read_data(calib), read_data(train)  # a missing file fails here, before any pass
    plan = plan_steps(recipe.steps, model, calib, train)
    with tempfile.TemporaryDirectory(prefix="edgefleet-compress-") as tmp, showing_progress(say), \
            Evaluation(model, eval_data, say, device_bench, isolated) as evaluation:
        workdir = Path(workdir or tmp)
        steps, current = [], model
        for i, (cls, config) in enumerate(plan, start=1):
            say(f"[{i}/{len(plan)}] {cls.name}")
            step = apply_pass(cls, config, current, workdir / f"{i:02d}-{cls.name}", evaluation.sandbox)
            evaluation.score(step)
            if step.status == "ok":
                current = step.model
            steps.append(step)
        report = evaluation.report(steps, recipe, latency_threads)
        evaluation.time([s for s in steps if s.status == "ok"], latency_runs, latency_threads)
        deliver(report, out, keep=workdir != Path(tmp))
        return report


def read_data(source: str | Path | Dataset | None) -> Dataset | None:
    """Calibration or training data read once, up front (a loader runs once, not per pass)."""
    return None if source is None else load_dataset(source)


def plan_steps(steps, model: ModelFile, calib, train=None) -> list[tuple[type, Any]]:
    """Each step's pass class and typed config, with --calib (or --train, for passes that train)
    filled in; all checked before anything runs."""
    plan = []
    for step in steps:
        cls = get_pass(step.pass_name)
        if model.format in cls.formats:
            check_requirements(cls)
        plan.append((cls, make_config(cls, _with_data(cls, step.options, calib, train))))
    return plan


class Evaluation:
    """The evaluation data bound to the model's inputs, and the original measured on it;
    without data, only sizes are measured, and each result is run once on zeros where the
    original runs so (a pass's output that does not load is never handed back). The passes and
    their outputs run in a child process (isolated.Sandbox), where a library that dies fails only
    that step."""

    def __init__(self, model: ModelFile, eval_data: str | Dataset | None, say: Progress,
                 device_bench=None, isolated: bool = True) -> None:
        self.data = load_dataset(eval_data) if eval_data is not None else None
        self.device_bench = device_bench  # latency on a device (compress.device.DeviceBench), else this host
        self.original = _measured("original", model)
        self.bound, self.on_zeros, self.yolo = None, False, None
        self._say = say
        self.sandbox = Sandbox(None, in_process=not isolated)
        try:
            self._measure_original(model, say)
        except BaseException:
            self.sandbox.close()
            raise

    def _measure_original(self, model: ModelFile, say: Progress) -> None:
        try:  # (a model that kills the runtime as it loads, as some float16 graphs kill ORT 1.32: one line)
            self.sandbox.check_loads(model)
        except RuntimeCrash as exc:
            raise ConfigError(f"{model.path.name}: {str(exc).replace('running it', 'loading it')}; there is "
                              f"nothing to compress it against") from None
        if self.data is None:
            model.load()  # (one that does not load is refused, as with data: each result would be written out)
            self.on_zeros = self.sandbox.runs_on_zeros(model) is None
            return
        runtime = model.load()
        try:
            self.bound = self.sandbox.bind(self.data, model, runtime)
        except ModelError as exc:  # (the same words as score's)
            raise ConfigError(f"the original model does not run on the evaluation data: {exc}") from None
        except RuntimeCrash as exc:
            raise self._crashed(model, exc) from None
        if self.bound.batch_axis_unused:
            say(f"{model.path.name} declares a batch axis, but its graph runs one sample per call: "
                f"one sample at a time here")
        if self.bound.unbatched:
            names = ", ".join(sorted(self.bound.unbatched))
            say(f"{model.path.name} takes one sample with no batch axis ({names}): the data's samples, along "
                f"its first axis, one at a time")
        self.yolo = yolo.head(model, runtime)
        if self.yolo:
            layout = ", YOLOv5's layout" if self.yolo.objectness else ""
            say(f"{model.path.name} is an Ultralytics YOLO model, task {self.yolo.task}{layout} (its metadata says "
                f"so): its output {self.yolo.output!r} is compared by its detections, score > {yolo.CONF}, NMS at "
                f"IoU {self.yolo.iou}")
        say(f"evaluating the original on {len(self.bound)} samples")
        self.score(self.original)

    @staticmethod
    def _crashed(model: ModelFile, exc: RuntimeCrash) -> ConfigError:
        return ConfigError(f"{model.path.name}: {exc} on the evaluation data; there is nothing to compress it "
                           f"against")

    def __enter__(self) -> "Evaluation":
        return self

    def __exit__(self, *exc) -> None:
        self.sandbox.close()

    def score(self, m: Measured) -> None:
        """Fidelity of *m* against the original (a model that no longer runs fails here; the
        original, where it does not run, ends the command in one line). Both run in the child."""
        if m.status != "ok":
            return
        if self.bound is None:
            failure = self.sandbox.runs_on_zeros(m.model) if self.on_zeros and m is not self.original else None
            if failure:
                m.status, m.note = "failed", f"does not run: {failure}"
            return
        try:
            m.outputs = self.sandbox.outputs(m.model)
        except ModelError as exc:
            if m is self.original:
                raise ConfigError(f"the original model does not run on the evaluation data: {exc}") from None
            m.status, m.note = "failed", f"does not run: {exc}"
            return
        except RuntimeCrash as exc:
            if m is self.original:
                raise self._crashed(m.model, exc) from None
            m.status, m.note = "failed", f"{exc} on the evaluation data"
            return
        scored = None
        if self.yolo is not None and self.yolo.output in m.outputs:  # (as the original's are: see yolo.py)
            if truth.is_truth(self.bound.labels):  # (mAP: decoded as `yolo val` decodes them)
                scored = yolo.decoded(m.outputs, yolo.for_validation(self.yolo))
            m.outputs = yolo.decoded(m.outputs, self.yolo)
        try:
            m.fidelity = evaluate.fidelity(self.original.outputs, m.outputs, self.bound.labels,
                                           self.original.model.format, scored)
        except ModelError as exc:  # it runs, but gives other outputs than the original
            m.status, m.note = "failed", str(exc)

    def time(self, models: list[Measured], runs: int, threads: int | None) -> None:
        """Latency of the original and *models*, in the same interleaved rounds."""
        if self.bound is None:
            return
        timed = [self.original] + models
        for m, lat in zip(timed, self._latencies([m.model for m in timed], runs, threads)):
            m.latency = lat

    def ratio_again(self, m: Measured, runs: int, threads: int | None) -> float:
        """*m*'s p50 over the original's in rounds of their own: a second look at a speed-up,
        which leaves the latencies recorded for the report as they were."""
        original, again = self._latencies([self.original.model, m.model], runs, threads)
        return again.p50_ms / original.p50_ms

    def _latencies(self, models: list[ModelFile], runs: int, threads: int | None) -> list:
        if self.device_bench is not None:
            return self.device_bench(models, self.bound, self._say)
        self._say(f"timing {len(models)} models, {runs} runs each")
        return evaluate.latencies(models, self.bound, runs=runs, threads=threads)

    def report(self, steps: list[Measured], recipe: Recipe, threads: int | None) -> CompressionReport:
        return CompressionReport(self.original, steps, recipe, None if self.data is None else self.data.source,
                                 0 if self.bound is None else len(self.bound),
                                 self.bound is not None and self.bound.labels is not None, threads,
                                 latency_where=self.device_bench.where if self.device_bench else "host CPU",
                                 boxes=self.bound is not None and truth.is_truth(self.bound.labels))


# the file name suffix of each model format
SUFFIXES = {"onnx": ".onnx", "tflite": ".tflite"}


def output_path(out: Path, model_format: str) -> Path:
    """*out*, or *out* with the suffix of *model_format* where its own names the other format: a
    student distilled from a TFLite model is an ONNX model, which no runtime reads as a .tflite file."""
    out = Path(out)
    if out.suffix.lower() in SUFFIXES.values() and out.suffix.lower() != SUFFIXES[model_format]:
        return out.with_suffix(SUFFIXES[model_format])
    return out


def deliver(report: CompressionReport, out: Path | None, *, keep: bool) -> None:
    """Copy the result to *out* (output_path: with its format's suffix); unless *keep*, the
    intermediate files are about to go with their temporary directory, so the report names them by
    file name only."""
    if out is not None:
        report.result.model = report.result.model.copy_to(output_path(out, report.result.model.format))
    if not keep:
        for s in report.steps:
            if s is not report.result:
                s.model = ModelFile(Path(s.model.path.name), s.model.format)


def _with_data(cls, options: dict, calib, train=None) -> dict:
    """*options* with --calib filled in where the pass takes data (--train first for passes
    that train); a pass that cannot run without it stops the recipe here, before anything ran."""
    field_ = next((f for f in dataclasses.fields(cls.Config) if f.name == DATA_FIELD), None)
    if field_ is None or options.get(DATA_FIELD) is not None:
        return options
    if field_.metadata.get("trains") and train is not None:
        calib = train
    if calib is None:
        if field_.metadata.get("required"):
            kind = ("training inputs (--train or --calib)" if field_.metadata.get("trains")
                    else "calibration data (--calib)")
            raise ConfigError(f"pass {cls.name} needs {kind}, and will not make it up")
        return options
    return {**options, DATA_FIELD: calib}


def apply_pass(cls, config, model: ModelFile, workdir: Path, sandbox: Sandbox | None = None) -> Measured:
    """The pass's output, measured for size (Evaluation.score measures the rest); with *sandbox*, the
    pass runs in its child process (isolated.py), where a library that dies fails only this step."""
    if model.format not in cls.formats:
        return Measured(cls.name, model, "skipped", f"does not apply to {model.format} models "
                        f"(it takes {', '.join(cls.formats)})", config.to_dict())
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        result = (sandbox or Sandbox(None, in_process=True)).run_pass(cls, config, model, workdir, progress)
    except NotApplicable as exc:
        return Measured(cls.name, model, "skipped", str(exc), config.to_dict())
    except (CompressionError, ModelError, RuntimeCrash) as exc:
        return Measured(cls.name, model, "failed", str(exc), config.to_dict())
    if result.format == "onnx" and result.path != model.path:  # (ran on an image with boxes, failed on one without)
        from host_tools.compress.onnx.boundary import forget_counted_sizes_in

        forget_counted_sizes_in(result.path)
    if result.format == "tflite" and result.path != model.path:
        from host_tools.compress.tflite.flatbuffer import keep_appended

        keep_appended(model.path, result.path)
    step = _measured(cls.name, result)
    step.config, step.seconds, step.compresses = config.to_dict(), time.monotonic() - start, cls.compresses
    return step


def _measured(label: str, model: ModelFile) -> Measured:
    return Measured(label, model, size_bytes=model.size_bytes, download_bytes=sum(map(stored_size, model.files)))


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime multiplies int8 here with x86's vpmaddubsw, whose 16-bit sums of
    u8 x s8 products saturate: an x86-64 CPU without VNNI (docs/compression.md). False where it
    cannot tell."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = _cpuinfo("flags")
    return flags is not None and not {"avx512_vnni", "avx_vnni"} & set(flags.split())


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def _cpuinfo(field: str) -> str | None:
    """The first *field* of /proc/cpuinfo (Linux), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
