"""The compression toolkit on the reference models, side by side with plain quantize_dynamic.

    python benchmarks/compression.py           # the four reference models, 400 timed runs per model
    python benchmarks/compression.py --quick   # 100 timed runs per model
    python benchmarks/compression.py --models digits_cnn.tflite digits_transformer.tflite digits_vgg.tflite

For each reference model (models/digits_cnn.onnx, digits_transformer.onnx, digits_vgg.onnx,
digits_resnet.onnx) it makes, in one run: plain ``onnxruntime.quantization.quantize_dynamic`` at
its defaults (the baseline users start from; for a TFLite model, litert-quantizer's
dynamic_wi8_afp32 recipe); edgefleet's named recipes (int8-dynamic, int8-weights, int8-static, int4-weights,
sparse-int8, channels-50, distill; for TFLite int8-dynamic, int8-weights, int8-static, fp16,
sparse-int8, channels-50, distill); and ``--auto --max-drop 1`` for size and for speed. Calibration on
digits_calib.npz, training (distillation, pruning recovery) on digits_train.npz, every number
measured on digits_heldout.npz (360 samples never used for calibration or training). A candidate
``--auto`` tried and that failed (it goes on to the others) is printed under the model's table.

Latency: every model of a reference model, the original included, is timed in the same
interleaved rounds (single-sample calls, ONNX Runtime 1 thread), so the ratios hold on a noisy
machine; and batch-64 throughput in the same way, because a 15 µs model is mostly call overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_line  # noqa: E402

MODELS = REPO / "models"
CALIB, TRAIN, HELDOUT = MODELS / "digits_calib.npz", MODELS / "digits_train.npz", MODELS / "digits_heldout.npz"
RECIPES = {"onnx": ("int8-dynamic", "int8-weights", "int8-static", "int4-weights", "sparse-int8", "channels-50",
                    "distill"),
           "tflite": ("int8-dynamic", "int8-weights", "int8-static", "int8-layers", "fp16", "sparse-int8",
                      "channels-50", "distill")}
# what a user without edgefleet starts from: each format's quantizer at its defaults
PLAIN = {"onnx": "plain quantize_dynamic", "tflite": "plain litert dynamic"}


def plain_quantize(path: Path, out: Path) -> None:
    if path.suffix == ".onnx":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(path), str(out))
        return
    from litert_quantizer import quantizer as lq
    from litert_quantizer import recipe

    # it prints its sizes, and on larger graphs progress bars to stderr
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantized = lq.Quantizer(str(path), recipe.dynamic_wi8_afp32()).quantize().quantized_model
    out.write_bytes(bytes(quantized))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="*",
                        default=["digits_cnn.onnx", "digits_transformer.onnx", "digits_vgg.onnx", "digits_resnet.onnx"])
    args = parser.parse_args()
    runs = 100 if args.quick else 400
    print(machine_line())
    started = time.monotonic()
    summaries = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-compress-") as tmp:
        for name in args.models:
            summaries.append(bench_model(MODELS / name, Path(tmp) / name, runs))
    print()
    print("targets")
    for line in targets(summaries):
        print(line)
    print(f"\n({time.monotonic() - started:.0f} s in all)")


def bench_model(path: Path, workdir: Path, runs: int) -> dict:
    from host_tools.compress import ModelFile, load_recipe, run_recipe
    from host_tools.compress.auto import search
    from host_tools.compress.evaluate import latencies
    from host_tools.compress.torch.distill import teacher_parameters
    from host_tools.compress.workflow import Evaluation, Measured, quality_drop

    model = ModelFile.open(path)
    workdir.mkdir(parents=True)
    say = lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)  # noqa: E731
    print(f"\n{path.name}: {teacher_parameters(model)} parameters", flush=True)
    evaluation = Evaluation(model, HELDOUT, say)
    rows: list[tuple[str, Measured]] = []
    failed: dict[str, str] = {}  # --auto's candidates that failed, by name

    label = PLAIN[model.format]
    say(f"{label}, defaults")
    plain = workdir / f"plain.{path.suffix.lstrip('.')}"
    m = Measured(label, ModelFile(plain, model.format))
    try:
        plain_quantize(path, plain)
        m.size_bytes = plain.stat().st_size
        from device_agent.bundle.archive import stored_size
        m.download_bytes = stored_size(plain)
        evaluation.score(m)
    except Exception as exc:  # that it fails is itself a finding
        m.status, m.note = "failed", f"{type(exc).__name__}: {exc}"
    rows.append((label, m))

    for recipe in RECIPES[model.format]:
        try:
            plan = load_recipe(recipe, model.format)
        except Exception as exc:
            rows.append((recipe, Measured(recipe, model, "skipped", str(exc))))
            continue
        say(f"recipe {recipe}")
        report = run_recipe(model, plan, calib=CALIB, train=TRAIN, eval_data=HELDOUT, workdir=workdir / recipe,
                            latency_runs=10)
        result = report.result if report.compressed else Measured(recipe, model, "skipped", "; ".join(
            s.note for s in report.steps if s.status != "ok"))
        rows.append((recipe, result))
    for goal in ("size", "speed"):
        say(f"--auto --max-drop 1 --goal {goal}")
        report = search(model, eval_data=HELDOUT, calib=CALIB, train=TRAIN, max_drop=1.0, goal=goal,
                        workdir=workdir / f"auto-{goal}", latency_runs=max(runs // 2, 50))
        label = f"--auto {goal}"
        rows.append((label, report.chosen if report.chosen else
                     Measured(label, model, "none", report.auto.why_none)))
        # a candidate that fails is a verdict --auto goes on from; printed, so that it is seen
        failed.update(report.auto.failures())

    timed = [m for _, m in rows if m.status == "ok"]
    say(f"timing {len(timed) + 1} models: {runs} single-sample runs each"
        f"{'' if evaluation.bound.fixed_batch else ', then batch 64'}, interleaved")
    single = latencies([model] + [m.model for m in timed], evaluation.bound, runs=runs)
    # (a TFLite model takes one sample per call: no batch-64 column)
    batch = None if evaluation.bound.fixed_batch else [
        lat.p50_ms for lat in latencies([model] + [m.model for m in timed], evaluation.bound,
                                        runs=max(runs // 10, 20), batch=64)]
    original = evaluation.original
    base_single = single[0].p50_ms

    def batch_ratio(i: int) -> float:
        return batch[i] / batch[0] if batch else float("nan")

    def ratio_cell(value: float) -> str:
        return f"{value:>6.2f}" if value == value else f"{'n/a':>6}"

    print(f"{'model':<24} {'KiB':>7} {'×size':>6} {'dl KiB':>7} {'p50 µs':>8} {'×p50':>6} {'×b64':>6} "
          f"{'acc %':>6} {'drop':>6}  {'params':>7}  how")
    print(f"{'original':<24} {original.size_bytes / 1024:>7.1f} {1:>6.2f} {original.download_bytes / 1024:>7.1f} "
          f"{base_single * 1e3:>8.1f} {1:>6.2f} {ratio_cell(batch_ratio(0))} {original.fidelity.accuracy * 100:>6.2f} "
          f"{'—':>6}  "
          f"{teacher_parameters(model):>7}")
    results = {}
    for label, m in rows:
        if m.status != "ok":
            print(f"{label:<24} {m.status}: {m.note[:150]}")
            continue
        i = timed.index(m) + 1
        drop = quality_drop(original, m)
        params = teacher_parameters(m.model)
        how = m.label if label.startswith("--auto") else ""
        print(f"{label:<24} {m.size_bytes / 1024:>7.1f} {m.size_bytes / original.size_bytes:>6.2f} "
              f"{m.download_bytes / 1024:>7.1f} {single[i].p50_ms * 1e3:>8.1f} {single[i].p50_ms / base_single:>6.2f} "
              f"{ratio_cell(batch_ratio(i))} {m.fidelity.accuracy * 100:>6.2f} {drop:>+6.2f}  {params:>7}  {how}")
        results[label] = {"size": m.size_bytes / original.size_bytes, "drop": drop,
                          "single": single[i].p50_ms / base_single, "batch": batch_ratio(i),
                          "params": params / teacher_parameters(model),
                          "accuracy_kept": m.fidelity.accuracy / original.fidelity.accuracy}
    for name, verdict in failed.items():
        print(f"--auto candidate {name}: {verdict[:200]}")
    shutil.rmtree(workdir, ignore_errors=True)
    return {"model": path.name, "results": results}


def targets(summaries: list[dict]) -> list[str]:
    lines = []
    for summary in summaries:
        r, name = summary["results"], summary["model"]

        def verdict(ok: bool) -> str:
            return "meets" if ok else "MISSES"
        int8 = [k for k in ("int8-dynamic", "int8-static") if k in r]
        if int8:
            best = min(int8, key=lambda k: r[k]["size"])
            plain = next((k for k in PLAIN.values() if k in r), PLAIN["onnx"])
            lines.append(f"{name}: int8 model ≤ 0.27x fp32 size: {best} {r[best]['size']:.3f}x, "
                         f"{plain} {r.get(plain, {}).get('size', float('nan')):.3f}x"
                         f" -> {verdict(r[best]['size'] <= 0.27)}")
        for goal in ("size", "speed"):
            key = f"--auto {goal}"
            if key in r:
                lines.append(f"{name}: --auto --max-drop 1 --goal {goal} within 1 point: drop {r[key]['drop']:+.2f}"
                             f" -> {verdict(r[key]['drop'] <= 1)}")
            else:
                lines.append(f"{name}: --auto --max-drop 1 --goal {goal}: nothing qualified (handed back nothing)")
        if "channels-50" in r:
            c = r["channels-50"]
            batch_timed = not math.isnan(c["batch"])  # a TFLite model takes one sample per call
            at_64 = f"{1 / c['batch']:.2f}x at batch 64" if batch_timed else \
                "batch 64 not timed (the model takes one sample)"
            line = (f"{name}: 50% channels + recovery ≥ 1.5x faster within 1 point: {1 / c['single']:.2f}x "
                    f"faster at batch 1, {at_64}, drop {c['drop']:+.2f} -> "
                    f"batch 1 {verdict(1 / c['single'] >= 1.5 and c['drop'] <= 1)}")
            if batch_timed:
                line += f", batch 64 {verdict(1 / c['batch'] >= 1.5 and c['drop'] <= 1)}"
            lines.append(line)
        else:
            lines.append(f"{name}: 50% channels + recovery: not applicable (see its row)")
        if "distill" in r:
            d = r["distill"]
            lines.append(f"{name}: distilled student ≤ 25% params keeps ≥ 97%: {d['params'] * 100:.1f}% of the "
                         f"parameters keeps {d['accuracy_kept'] * 100:.1f}% of the accuracy -> "
                         f"{verdict(d['params'] <= 0.25 and d['accuracy_kept'] >= 0.97)}")
    return lines


if __name__ == "__main__":
    main()
