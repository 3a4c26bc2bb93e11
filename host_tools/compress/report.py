"""The compression report as the terminal shows it: one row per model, measured, never guessed."""

from __future__ import annotations

from host_tools.compress import detections, truth, workflow
from host_tools.compress.workflow import CompressionReport, Measured, quality_drop

NA = "n/a"


def report_table(report: CompressionReport, title: str = "compression"):
    from rich import box
    from rich.table import Table

    original = report.original
    caption = []
    if original.latency:
        caption.append(f"p50: {report.latency_method}")
    if report.eval_samples:
        ragged = any(detections.is_ragged(v) for v in (original.outputs or {}).values())
        caption.append(f"fidelity over {report.eval_samples} samples of {report.eval_source}"
                       + ("; top-1|cos: the share of detections that match the original's (IoU ≥ 0.5), drop: "
                          + (f"points of acc, its {truth.METRIC}" if report.boxes else "the share that do not")
                          if ragged else
                          "; top-1|cos: top-1 agreement with the original (classifiers), else cosine similarity"
                          + ("" if report.labels else "; no labels: drop = top-1 disagreement or 1 - cosine")))
    else:
        caption.append("no evaluation data: fidelity and latency not measured")
    rows = [original] + [s for s in report.steps if s.status == "ok"]
    if report.eval_samples and workflow.u8s8_saturates() and any(_int8_onnx(m) for m in rows):  # (loads models)
        caption.append("int8 rows: this x86 CPU has no VNNI, where ONNX Runtime's 8-bit products can saturate; "
                       "on ARM (a Pi, a Jetson) the same models score as well or better")
    table = Table(title=title, header_style="bold", caption="; ".join(caption), box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    unit, scale = _latency_unit(original)
    for header in ("model", "KiB", "×size", "dl KiB", f"p50 {unit}", "×p50", "acc", "drop", "top-1|cos"):
        if header == "model":
            table.add_column(header, min_width=12)
        else:
            table.add_column(header, justify="right", no_wrap=True)
    for m in rows:
        cells = _cells(m, original, scale)
        if report.auto is not None and m is report.chosen:
            cells[0] = f"[bold]→ {cells[0]}[/]"
        table.add_row(*cells)
    return table


def _latency_unit(original: Measured) -> tuple[str, float]:
    """The p50 column's unit and its factor from milliseconds, chosen by the original so that every
    row reads alike: µs for a model that runs in under a millisecond (13.2, not 0.0132 ms)."""
    p50 = original.latency.p50_ms if original.latency else None
    return ("µs", 1000.0) if p50 is not None and p50 < 1 else ("ms", 1.0)


def _int8_onnx(m: Measured) -> bool:
    if m.model.format != "onnx":
        return False
    import onnx

    from host_tools.compress.onnx.boundary import computes_in_int8

    try:
        graph = onnx.load(str(m.model.path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - a caption line is not worth an error
        return False
    return computes_in_int8(graph)


def skipped_lines(report: CompressionReport) -> list[str]:
    """What did not run, and for --auto, the verdict on every candidate and the outcome."""
    if report.auto is None:
        return [f"{s.label}: {s.status}: {s.note}" for s in report.steps if s.status != "ok"]
    auto = report.auto
    lines = verdict_lines(auto.verdicts)
    lines.append(f"--auto chose {auto.chosen} (goal {auto.goal}, max drop {auto.max_drop:g} points)" if auto.chosen
                 else f"--auto: nothing qualifies: {auto.why_none}")
    return lines


def verdict_lines(verdicts: dict[str, str]) -> list[str]:
    """"candidate: verdict" for each of --auto's candidates, in order, except that candidates skipped
    for one reason (every sparsity level of a model with no layer to sparsify) share one line."""
    lines: list[tuple[list[str], str]] = []
    skipped: dict[str, list[str]] = {}  # reason -> the names on its line
    for name, verdict in verdicts.items():
        if verdict in skipped:
            skipped[verdict].append(name)
            continue
        lines.append(([name], verdict))
        if verdict.startswith("skipped"):
            skipped[verdict] = lines[-1][0]
    return [f"{'; '.join(names)}: {verdict}" for names, verdict in lines]


# Beyond this, a result's p50 over the original's is read as slower, not as noise between the two.
SLOWER = 1.1


def slower_note(report: CompressionReport) -> str:
    """A line for a result that runs measurably slower than the original where both were timed
    (int8 often does on CPUs and runtimes without fast int8 kernels for its ops), else ""."""
    result, original = report.result, report.original
    if not (report.compressed and result.latency and original.latency and original.latency.p50_ms):
        return ""
    ratio = result.latency.p50_ms / original.latency.p50_ms
    if ratio <= SLOWER:
        return ""
    return (f"note: the result runs {ratio:.2f}x the original's p50 where it was timed (slower, not faster); "
            f"{_slow_part(result.model)}--auto --goal speed hands back only a model faster than the original")


def larger_note(report: CompressionReport) -> str:
    """A line for a compressed result whose file is larger than the original's, else "": a float16
    original's weights that a recipe does not quantize come back float32 (widened to be quantized
    or pruned), and on a small model a format's own tables can outweigh what a pass saved."""
    result, original = report.result, report.original
    if not report.compressed or result.size_bytes <= original.size_bytes:
        return ""
    return (f"note: the result is {result.size_bytes / original.size_bytes:.2f}x the original's size (larger, not "
            f"smaller){_float16_part(original.model)}; --auto --goal size hands back only a smaller model")


def _float16_part(model) -> str:
    """Why a result of a float16 *model* may be larger than it, or ""."""
    if model.format == "onnx":
        import onnx

        from host_tools.compress.onnx.boundary import float16_weights

        half = float16_weights(onnx.load(str(model.path), load_external_data=False).graph)
    else:
        from host_tools.compress.tflite.quantize import quantized_weights

        half = quantized_weights(model.path).startswith("float16")
    return (": the original's weights are float16, and what the recipe left unquantized is float32 now (onnx-fp16 "
            "or tflite-fp16 after it stores that as float16 again)") if half else ""


def _slow_part(model) -> str:
    """What in *model* is known to be slower than float, with the way around it, or "". ONNX
    Runtime's dynamically quantized convolutions (ConvInteger) ran 3.4-8.8x slower than float on
    every CPU docs/benchmarks.md measured (AVX2; AVX-512 with VNNI; AMX), where static int8 ran the
    same convolutions in 0.4x the float time, and int8 weights alone cost nothing at run time: a plain
    "slower" leaves a CNN's user guessing."""
    if model.format != "onnx" or not model.path.is_file():
        return ""
    import onnx

    graph = onnx.load(str(model.path), load_external_data=False).graph
    count = sum(node.op_type == "ConvInteger" for node in graph.node)
    if not count:
        return ""
    return (f"its {count} ConvInteger node{'s' * (count != 1)} (convolutions quantized dynamically) are slow in "
            "ONNX Runtime on most CPUs: int8-static (calibrated on --calib) runs convolutions in int8 without them, "
            "int8-weights gives the same size at float speed; ")


def _cells(m: Measured, original: Measured, scale: float) -> list[str]:
    f = m.fidelity
    drop = quality_drop(original, m)
    ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else NA  # noqa: E731
    p50 = m.latency.p50_ms if m.latency else None
    return [
        m.label,
        f"{m.size_bytes / 1024:.1f}",
        ratio(m.size_bytes, original.size_bytes),
        f"{m.download_bytes / 1024:.1f}",
        NA if p50 is None else _digits(p50 * scale),
        ratio(p50, original.latency.p50_ms if original.latency else None),
        NA if f is None or f.accuracy is None else f"{f.accuracy * 100:.1f}%",
        "—" if m is original else (NA if drop is None else f"{drop:+.2f}"),
        NA if f is None else (f"{f.agreement * 100:.1f}%" if f.agreement is not None else f"{f.cosine:.4f}"),
    ]


def _digits(value: float) -> str:
    """A latency to three or four figures, alike in every row: 13.2, 562.1, 0.93."""
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
