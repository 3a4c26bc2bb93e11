"""`--auto`: try a ladder of candidates and keep the best one within the accuracy tolerance.

Every candidate is a recipe. Each is measured against the original on the evaluation data;
those within ``max_drop`` points are then timed together with the original in interleaved
rounds. The goal decides among them: ``size`` keeps the smallest file (the fastest of those
within 5% of the smallest), ``speed`` the fastest
model that is measurably faster than the original (a candidate slower than the original is
never chosen for speed): faster in those rounds, and again in rounds of its own with the
original, so that one lucky timing of a small model on a shared machine is not a speed-up.
When none qualifies, the search says so and hands nothing back.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError
from host_tools.compress.data import Dataset
from host_tools.compress.model import ModelFile
from host_tools.compress.passes import showing_progress
from host_tools.compress.recipes import (ONNX_CHANNELS_50, ONNX_COMPACT, PREPROCESS, TFLITE_CHANNELS_50,
                                         TFLITE_COMPACT, TFLITE_DYNAMIC, TFLITE_INT8_LAYERS, Recipe, Step)
from host_tools.compress.workflow import (CompressionReport, Evaluation, Measured, Progress, apply_pass, deliver,
                                          plan_steps, quality_drop, read_data)

GOALS = ("size", "speed")
# "Faster" means at most this fraction of the original's p50 in the same interleaved rounds,
# so that run-to-run noise on a shared machine never passes for a speed-up.
SPEED_MARGIN = 0.95
# Passes that add to a candidate (the float parameters left after int8, as 8 bits) without being
# what it is named for: a candidate still stands where one of these does not apply, and falls where
# any other compressing pass of it does not ("50% channels pruned, ..." on a model with nothing to prune).
ADD_ONS = {"onnx-int8-params", "tflite-int8-params"}
# For size, files within this fraction of the smallest count as equally small, and the
# fastest of them wins: a 2% smaller file is not worth a 3x slower model.
SIZE_SLACK = 0.05


@dataclass(frozen=True)
class Candidate:
    name: str
    steps: tuple[Step, ...]
    needs_calibration: bool = False
    # Try only when this candidate missed the tolerance (e.g. leave sensitive nodes in float
    # only if plain static int8 loses too much).
    if_missed: str | None = None


def _and_7_bit(candidate: Candidate) -> tuple[Candidate, Candidate]:
    """*candidate* (static int8 last), then the same with 7-bit weights, tried only if it loses too
    much. ONNX Runtime's u8 x s8 kernels can saturate on x86 CPUs without VNNI (most with per-channel
    scales, docs/compression.md); 7-bit weights cannot. The passes before the quantizing one are the
    same, so --auto runs them once for both."""
    *before, last = candidate.steps
    seven = Step(last.pass_name, {**last.options, "reduce_range": True})
    return candidate, Candidate(f"{candidate.name}, 7-bit weights", (*before, seven), candidate.needs_calibration,
                                if_missed=candidate.name)


ONNX_LADDER = (
    Candidate("dynamic int8", (PREPROCESS, Step("onnx-dynamic"), Step("onnx-int8-params"))),
    Candidate("dynamic int8, MatMul/Gemm only", (PREPROCESS, Step("onnx-dynamic", {"op_types": ["MatMul", "Gemm"]}))),
    Candidate("dynamic int8, 7-bit weights", (PREPROCESS, Step("onnx-dynamic", {"reduce_range": True}),
                                              Step("onnx-int8-params")), if_missed="dynamic int8"),
    # (the size of int8 at float speed, where int8 compute is slower than float: ConvInteger, CPUs
    # without int8 dot products)
    Candidate("int8 weights only", (Step("onnx-preprocess", {"optimize": False}), Step("onnx-weight-only"))),
    Candidate("static int8 per-tensor", (PREPROCESS, Step("onnx-static")), needs_calibration=True),
    *_and_7_bit(Candidate("static int8 per-channel", (PREPROCESS, Step("onnx-static", {"per_channel": True})),
                          needs_calibration=True)),
    Candidate("static int8 per-channel, entropy",
              (PREPROCESS, Step("onnx-static", {"per_channel": True, "method": "entropy"})),
              needs_calibration=True, if_missed="static int8 per-channel"),
    Candidate("static int8, 1 sensitive node in float",
              (PREPROCESS, Step("onnx-static", {"per_channel": True, "auto_exclude": 1})),
              needs_calibration=True, if_missed="static int8 per-channel"),
    Candidate("static int8, 3 sensitive nodes in float",
              (PREPROCESS, Step("onnx-static", {"per_channel": True, "auto_exclude": 3})),
              needs_calibration=True, if_missed="static int8, 1 sensitive node in float"),
    Candidate("int4 MatMul weights", (Step("onnx-preprocess", {"optimize": False, "widen": False}),
                                      Step("onnx-int4"))),
    Candidate("fp16", (Step("onnx-fp16"),)),
    *_and_7_bit(Candidate("50% sparse, static int8", (Step("onnx-prune-magnitude", {"sparsity": 0.5}), PREPROCESS,
                                                      Step("onnx-static", {"per_channel": True})),
                          needs_calibration=True)),
    *_and_7_bit(Candidate("80% sparse, static int8", (Step("onnx-prune-magnitude", {"sparsity": 0.8}), PREPROCESS,
                                                      Step("onnx-static", {"per_channel": True})),
                          needs_calibration=True)),
    Candidate("25% channels pruned, recovered", (Step("onnx-prune-channels", {"ratio": 0.25, "recover_epochs": 30}),),
              needs_calibration=True),
    Candidate("50% channels pruned, recovered", (ONNX_CHANNELS_50,), needs_calibration=True),
    *_and_7_bit(Candidate("50% channels pruned, recovered, static int8",
                          (ONNX_CHANNELS_50, PREPROCESS, Step("onnx-static", {"per_channel": True})),
                          needs_calibration=True)),
    Candidate("distilled student, at most 25% of the parameters", (Step("distill"),), needs_calibration=True),
)
TFLITE_LADDER = (  # the distilled student is an ONNX model
    Candidate("dynamic-range int8", (*TFLITE_DYNAMIC, TFLITE_COMPACT)),
    Candidate("dynamic-range int8, per-channel", (Step("tflite-dynamic", {"weight_only": ["DEPTHWISE_CONV_2D"]}),
                                                  Step("tflite-int8-params"), TFLITE_COMPACT),
              if_missed="dynamic-range int8"),
    # (TFLite's own dynamic-range depthwise kernel, outside XNNPACK, beat XNNPACK's float one on a
    # ConvNeXt's 7x7: 0.53x float's time against 1.03x)
    Candidate("dynamic-range int8, depthwise too", (Step("tflite-dynamic", {"per_channel": False}),
                                                    Step("tflite-int8-params"), TFLITE_COMPACT)),
    Candidate("int8 weights only", (Step("tflite-weight-only"), Step("tflite-int8-params"), TFLITE_COMPACT)),
    Candidate("full int8", (Step("tflite-int8"), TFLITE_COMPACT), needs_calibration=True),
    Candidate("int8 layers, norms and activations float", (TFLITE_INT8_LAYERS, TFLITE_COMPACT),
              needs_calibration=True),
    Candidate("fp16", (Step("tflite-fp16"), TFLITE_COMPACT)),
    Candidate("50% sparse, full int8", (Step("tflite-prune-magnitude", {"sparsity": 0.5}), Step("tflite-int8"),
                                        TFLITE_COMPACT), needs_calibration=True),
    Candidate("80% sparse, full int8", (Step("tflite-prune-magnitude", {"sparsity": 0.8}), Step("tflite-int8"),
                                        TFLITE_COMPACT), needs_calibration=True),
    Candidate("25% channels pruned, recovered",
              (Step("tflite-prune-channels", {"ratio": 0.25, "recover_epochs": 30}), TFLITE_COMPACT),
              needs_calibration=True),
    Candidate("50% channels pruned, recovered", (TFLITE_CHANNELS_50, TFLITE_COMPACT), needs_calibration=True),
    Candidate("50% channels pruned, recovered, dynamic-range int8",
              (TFLITE_CHANNELS_50, *TFLITE_DYNAMIC, TFLITE_COMPACT), needs_calibration=True),
    Candidate("50% channels pruned, recovered, full int8",
              (TFLITE_CHANNELS_50, Step("tflite-int8"), TFLITE_COMPACT), needs_calibration=True),
    Candidate("50% channels pruned, recovered, int8 layers",
              (TFLITE_CHANNELS_50, TFLITE_INT8_LAYERS, TFLITE_COMPACT), needs_calibration=True),
    Candidate("distilled student, at most 25% of the parameters", (Step("distill"), ONNX_COMPACT),
              needs_calibration=True),
)


def ladder(model: ModelFile) -> tuple[Candidate, ...]:
    """The candidates for *model*'s format, each ending by compacting the graph."""
    if model.format != "onnx":
        return TFLITE_LADDER
    return tuple(dataclasses.replace(c, steps=c.steps + (ONNX_COMPACT,)) for c in ONNX_LADDER)


@dataclass
class AutoOutcome:
    max_drop: float
    goal: str
    verdicts: dict[str, str] = field(default_factory=dict)
    chosen: str | None = None
    why_none: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"max_drop_points": self.max_drop, "goal": self.goal, "chosen": self.chosen,
                "verdicts": self.verdicts, "none_qualified": self.why_none}

    def failures(self) -> dict[str, str]:
        """The candidates that failed (a pass raised, or the result did not run), with their verdicts:
        --auto goes on from them, so they show only here."""
        return {name: verdict for name, verdict in self.verdicts.items() if verdict.startswith("failed")}


def search(model: ModelFile, *, eval_data: str | Dataset, max_drop: float, goal: str = "size",
           calib: str | Dataset | None = None, train: str | Dataset | None = None,
           candidates: tuple[Candidate, ...] | None = None, out: Path | None = None,
           workdir: Path | None = None, latency_runs: int = 200, latency_threads: int | None = 1,
           progress: Progress | None = None, device_bench=None, isolated: bool = True) -> CompressionReport:
    """Measure every candidate of the ladder (or *candidates*) and choose by *goal*; the
    report's ``auto`` says what was chosen and why each candidate was or was not. *isolated*: as
    run_recipe's."""
    if goal not in GOALS:
        raise ConfigError(f"--goal must be one of {', '.join(GOALS)}")
    say = progress or (lambda _msg: None)
    calib, train = read_data(calib), read_data(train)
    todo = [c for c in (candidates or ladder(model)) if calib is not None or not c.needs_calibration]
    plans, unavailable = _plans(todo, model, calib, train)
    todo = [c for c in todo if c.name in plans]
    if not todo:
        raise ConfigError(f"no candidate can run on {model.path.name}"
                          + ("" if calib is not None else " without calibration data (--calib)")
                          + "".join(f"; {why}" for why in list(unavailable.values())[:1]))
    outcome = AutoOutcome(max_drop, goal, dict(unavailable))
    with tempfile.TemporaryDirectory(prefix="edgefleet-auto-") as tmp, showing_progress(say), \
            Evaluation(model, eval_data, say, device_bench, isolated) as evaluation:
        workdir = Path(workdir or tmp)
        if evaluation.bound is None:
            raise ConfigError("--auto needs evaluation data (--eval)")
        results = _measure(todo, plans, model, evaluation, workdir, outcome, say)
        within = [m for m in results.values() if m.status == "ok" and _qualifies(m, evaluation, max_drop)]
        evaluation.time(within, latency_runs, latency_threads)
        chosen, not_again = _choose_confirmed(within, evaluation, goal, latency_runs, latency_threads, say)
        for m in results.values():
            outcome.verdicts[m.label] = _verdict(m, evaluation.original, max_drop, goal, chosen,
                                                 not_again.get(m.label))
        if chosen is None:
            outcome.why_none = _why_none(results, within, max_drop, goal)
        else:
            outcome.chosen = chosen.label
        by_name = {c.name: c for c in todo}
        recipe = Recipe(f"auto: {chosen.label}" if chosen else "auto: none",
                        by_name[chosen.label].steps if chosen else (),
                        f"chosen by --auto --max-drop {max_drop:g} --goal {goal}")
        report = evaluation.report(list(results.values()), recipe, latency_threads)
        report.chosen, report.auto = chosen, outcome
        deliver(report, out if chosen else None, keep=workdir != Path(tmp))
        return report


def _measure(todo, plans, model: ModelFile, evaluation, workdir: Path, outcome: AutoOutcome, say
             ) -> dict[str, Measured]:
    """Run and measure each candidate in turn (one tried only if another missed the tolerance, only
    then); {name: its measurement}."""
    chains: dict[str, Measured] = {}  # a recipe prefix's result, shared between candidates
    results: dict[str, Measured] = {}
    for i, candidate in enumerate(todo, start=1):
        if candidate.if_missed and (candidate.if_missed not in results or
                                    _qualifies(results[candidate.if_missed], evaluation, outcome.max_drop)):
            outcome.verdicts[candidate.name] = f"not tried: {candidate.if_missed} did not miss the tolerance"
            say(f"[{i}/{len(todo)}] {candidate.name}: {outcome.verdicts[candidate.name]}")
            continue
        say(f"[{i}/{len(todo)}] {candidate.name}")
        results[candidate.name] = _run_chain(candidate, plans[candidate.name], model, evaluation, chains, workdir)
        say(f"      {_summary(results[candidate.name], evaluation.original)}")
    return results


def _choose_confirmed(within: list[Measured], evaluation, goal: str, runs: int, threads: int | None, say
                      ) -> tuple[Measured | None, dict[str, float]]:
    """The best of *within* for *goal*; for speed, one that is faster again in a second timing.
    Also {label: its ratio in the second timing} of those that were not."""
    chosen = _choose(within, evaluation.original, goal)
    not_again: dict[str, float] = {}
    while goal == "speed" and chosen is not None:
        say(f"timing {chosen.label} against the original again")
        ratio = evaluation.ratio_again(chosen, runs, threads)
        if ratio <= SPEED_MARGIN:
            break
        not_again[chosen.label] = ratio
        chosen = _choose([m for m in within if m.label not in not_again], evaluation.original, goal)
    return chosen, not_again


def _plans(todo, model: ModelFile, calib, train) -> tuple[dict, dict[str, str]]:
    """Each candidate's checked plan, and why the others cannot run (e.g. an extra not installed)."""
    plans, unavailable = {}, {}
    for c in todo:
        try:
            plans[c.name] = plan_steps(c.steps, model, calib, train)
        except ConfigError as exc:
            unavailable[c.name] = f"not tried: {exc}"
    return plans, unavailable


def _run_chain(candidate: Candidate, plan, model: ModelFile, evaluation: Evaluation,
               chains: dict[str, Measured], workdir: Path) -> Measured:
    current, last, skipped, compresses, missing = model, None, None, False, None
    key = ""
    for step, (cls, config) in zip(candidate.steps, plan):
        key += json.dumps(step.to_dict(), sort_keys=True)
        if key not in chains:
            chains[key] = apply_pass(cls, config, current, workdir / f"{len(chains):02d}-{cls.name}",
                                     evaluation.sandbox)
            evaluation.score(chains[key])
        if chains[key].status == "skipped":  # as in a recipe: the next pass takes the last good model
            skipped = skipped or chains[key]
            if cls.compresses and cls.name not in ADD_ONS:
                missing = missing or chains[key]
            continue
        last = chains[key]
        if last.status != "ok":
            break
        current, compresses = last.model, compresses or last.compresses
    if last is None or (last.status == "ok" and not compresses and skipped is not None):
        last = skipped  # what would have compressed does not apply, so neither does the candidate
    elif last.status == "ok" and missing is not None:
        last = missing  # nor when a pass it is named for does not (the rest is another candidate)
    m = Measured(candidate.name, last.model, last.status, last.note,
                 {"passes": [s.to_dict() for s in candidate.steps]},
                 compresses=compresses, seconds=last.seconds, size_bytes=last.size_bytes,
                 download_bytes=last.download_bytes, fidelity=last.fidelity, outputs=last.outputs)
    return m


def _qualifies(m: Measured | None, evaluation: Evaluation, max_drop: float) -> bool:
    if m is None or m.status != "ok" or not m.compresses:
        return False
    drop = quality_drop(evaluation.original, m)
    return drop is not None and drop <= max_drop


def _choose(within: list[Measured], original: Measured, goal: str) -> Measured | None:
    if goal == "speed":
        faster = [m for m in within if m.latency.p50_ms <= SPEED_MARGIN * original.latency.p50_ms]
        return min(faster, key=lambda m: (m.latency.p50_ms, m.size_bytes), default=None)
    smaller = [m for m in within if m.size_bytes < original.size_bytes]
    if not smaller:
        return None
    smallest = min(m.size_bytes for m in smaller)
    return min((m for m in smaller if m.size_bytes <= smallest * (1 + SIZE_SLACK)),
               key=lambda m: (m.latency.p50_ms, m.size_bytes))


def _summary(m: Measured, original: Measured) -> str:
    if m.status != "ok":
        return f"{m.status}: {m.note}"
    drop = quality_drop(original, m)
    return f"{m.size_bytes / original.size_bytes:.2f}x size, drop {drop:+.2f} points"


def _verdict(m: Measured, original: Measured, max_drop: float, goal: str, chosen: Measured | None,
             ratio_again: float | None = None) -> str:
    if m.status != "ok":
        return f"{m.status}: {m.note}"
    drop = quality_drop(original, m)
    if drop > max_drop:
        return f"loses {drop:.2f} points (more than {max_drop:g})"
    ratio = m.latency.p50_ms / original.latency.p50_ms
    if ratio_again is not None:
        return f"faster in one timing ({ratio:.2f}x p50), not in a second ({ratio_again:.2f}x): not chosen"
    if m is chosen:
        return f"chosen: {m.size_bytes / original.size_bytes:.2f}x size, {ratio:.2f}x p50, drop {drop:+.2f}"
    if goal == "speed" and ratio > SPEED_MARGIN:
        return f"within tolerance, but not faster than the original ({ratio:.2f}x p50)"
    return f"within tolerance ({m.size_bytes / original.size_bytes:.2f}x size, {ratio:.2f}x p50)"


def _why_none(results: dict[str, Measured], within: list[Measured], max_drop: float, goal: str) -> str:
    tried = [m for m in results.values() if m is not None]
    if not any(m.status == "ok" and m.compresses for m in tried):  # (a tree ensemble: parameters in attributes)
        first = next((m.note for m in tried if m.note), "")
        return (f"none of {len(results)} candidates applies to this model"
                + (f"; the first says: {first.splitlines()[0][:200]}" if first else ""))
    if not within:
        return f"none of {len(results)} candidates stays within {max_drop:g} points of the original"
    if goal == "speed":
        return (f"{len(within)} candidate(s) stay within {max_drop:g} points, but none is faster than the "
                f"original on this host (needs at most {SPEED_MARGIN:.2f}x its p50)")
    return f"{len(within)} candidate(s) stay within {max_drop:g} points, but none is smaller than the original"
