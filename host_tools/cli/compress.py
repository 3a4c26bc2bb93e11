"""`edgefleet compress`: run a recipe of compression passes and compare the result with the original."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import click

from device_agent.cli import FiniteRange, fail_cleanly
from device_agent.errors import ConfigError
from host_tools.cli.base import (
    broker_option, chunk_size_option, command_signer, host_client, json_option, main, signing_options,
)
from host_tools.terminal import console

DATA_HELP = ".npz, a folder of .npy/.npz samples, or a loader (file.py defining load(), or module:function)"


@main.command(help="Compress MODEL (ONNX or TFLite) with a recipe of passes and measure every step "
                   "against the original: size, download size, host latency, accuracy/fidelity.\n\n"
                   "  edgefleet compress model.onnx --recipe int8-static --calib calib.npz --eval heldout.npz "
                   "-o model.int8.onnx\n\n"
                   "Without --recipe or --pass: int8-static when --calib is given, else int8-dynamic "
                   "(int8-weights for an ONNX model with convolutions). "
                   "`edgefleet compress --list` shows the passes and named recipes.")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Where to write the compressed model.")
@click.option("--recipe", help="A named recipe (see --list) or a .toml/.yaml/.json recipe file.")
@click.option("--pass", "steps", multiple=True, metavar="'NAME key=value …'",
              help="A pass and its options, instead of a recipe; repeatable, applied in order.")
@click.option("--calib", help=f"Calibration inputs: {DATA_HELP}.")
@click.option("--train", "train_data", help=f"Training inputs for distillation and pruning recovery, labels "
              f"optional (default: --calib): {DATA_HELP}.")
@click.option("--eval", "eval_data", help=f"Evaluation inputs, labels optional (y or labels: class indices; "
              f"label_boxes: a detector's boxes, rows of sample, class, x1, y1, x2, y2, scored by mAP50-95): "
              f"{DATA_HELP}.")
@click.option("--max-drop", type=FiniteRange(min=0), help="Accuracy guard: refuse (exit 1, write nothing) "
              "if the result loses more than this many points against the original.")
@click.option("--auto", is_flag=True, help="Try a ladder of candidates (dynamic, static per-tensor/per-channel, "
              "sensitive nodes left in float, int4, fp16…) and keep the best within --max-drop.")
@click.option("--goal", type=click.Choice(["size", "speed"]), default="size", show_default=True,
              help="With --auto: the smallest model, or the fastest one that is faster than the original.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Also write the report as JSON (for `edgefleet bundle build --compression-report`).")
@click.option("--latency-runs", type=click.IntRange(10), default=200, show_default=True,
              help="Single-sample runs per model for the latency columns.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="Inference threads while timing on this host (a device core or several).")
@click.option("--device", "device_id", help="Time the models on this device instead of the host, through the "
              "agent's benchmark command (needs --broker and a --key the device trusts; nothing is activated).")
@click.option("--device-timeout", type=FiniteRange(1), default=300.0, show_default=True,
              help="Seconds to wait for the device's result for each model.")
@chunk_size_option
@broker_option
@signing_options
@click.option("--list", "list_only", is_flag=True, help="List the passes and the named recipes.")
@json_option
@fail_cleanly
def compress(model, out, recipe, steps, calib, train_data, eval_data, max_drop, auto, goal, report_path, latency_runs,
             threads, device_id, device_timeout, chunk_size, broker, signing_key, expires_in, list_only,
             as_json) -> None:
    if list_only:
        _list(as_json)
        return
    _check_usage(model, out, report_path, recipe, steps, auto, max_drop, eval_data, device_id)
    from host_tools.compress import ModelFile
    from host_tools.compress.report import larger_note, report_table, skipped_lines, slower_note
    from host_tools.compress.workflow import output_path, quality_drop

    model = ModelFile.open(model)
    err = console(stderr=True)
    say = lambda msg: err.print(f"[dim]{msg}[/]", highlight=False)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="edgefleet-compress-") as tmp, contextlib.ExitStack() as stack:
        bench = _device_bench(stack, device_id, broker, signing_key, expires_in, latency_runs,
                              device_timeout, chunk_size, say) if device_id else None
        options = dict(calib=calib, train=train_data, eval_data=eval_data, workdir=Path(tmp), latency_runs=latency_runs,
                       latency_threads=threads, progress=say, device_bench=bench)
        if auto:
            from host_tools.compress.auto import search

            report = search(model, max_drop=max_drop, goal=goal, **options)
            title = f"{model.path.name}: --auto --max-drop {max_drop:g} --goal {goal}"
        else:
            report = _run_recipe(model, recipe, steps, calib, options)
            title = f"{model.path.name}: {report.recipe.name}"
        doc = report.to_dict()
        if not as_json:
            console().print(report_table(report, title=title))
            for line in [*skipped_lines(report), slower_note(report), larger_note(report)]:
                if line:
                    err.print(line)
        refused = _refusal(report, max_drop, out)
        written = output_path(out, report.result.model.format)
        if not refused and written.resolve() == model.path.resolve():
            refused = (f"-o {out} names the result {written} (its format's suffix), which is MODEL itself; "
                       f"give -o another name")
        if not refused:
            report.result.model.copy_to(written)  # (with its external weight files)
            doc["result"]["file"] = written.name
        if report_path:
            report_path.write_text(json.dumps(doc, indent=2) + "\n")
        if as_json:
            click.echo(json.dumps(doc))
    if refused:
        raise ConfigError(refused)
    if not as_json:
        drop = quality_drop(report.original, report.result)
        ratio = report.result.size_bytes / report.original.size_bytes
        renamed = "" if written == out else f"; named {written.suffix} for its format, not {out.name}"
        click.echo(f"wrote {written} ({report.recipe.name}: {ratio:.2f}x size"
                   + ("" if drop is None else f", drop {drop:+.2f} points") + renamed + ")"
                   + (f"; report {report_path}" if report_path else ""))


def _check_usage(model, out, report_path, recipe, steps, auto, max_drop, eval_data, device_id) -> None:
    if model is None:
        raise click.UsageError("MODEL is required (or --list)")
    if out is None:
        raise click.UsageError("-o/--out is required")
    if Path(out).resolve() == Path(model).resolve():
        raise click.UsageError(f"-o {out} is MODEL itself: the original would be overwritten; write the result "
                               f"elsewhere")
    for option, path in (("-o", out), ("--report", report_path)):  # found out only once the work is done
        if path is not None and Path(path).is_dir():
            raise click.UsageError(f"{option} {path} is a folder: give the name of the file to write")
    if sum(map(bool, (recipe, steps, auto))) > 1:
        raise click.UsageError("give one of --recipe, --pass or --auto")
    if (max_drop is not None or auto) and eval_data is None:
        raise click.UsageError("--max-drop and --auto need --eval data to measure the drop on")
    if auto and max_drop is None:
        raise click.UsageError("--auto needs --max-drop: how many accuracy points it may lose")
    if device_id and eval_data is None:
        raise click.UsageError("--device needs --eval data (its first sample is what the device runs)")


def _run_recipe(model, recipe, steps, calib, options):
    from host_tools.compress import all_passes, get_pass, load_recipe
    from host_tools.compress.recipes import Recipe, default_recipe, parse_step
    from host_tools.compress.workflow import run_recipe

    if steps:
        plan = Recipe("command line", tuple(parse_step(s) for s in steps))
        for step in plan.steps:  # asked for by name: refused now, not skipped after the model is loaded
            formats = get_pass(step.pass_name).formats
            if model.format not in formats:
                twin = f"{model.format}-{step.pass_name.partition('-')[2]}"
                hint = f"; for {model.format} models: {twin}" if twin in all_passes() else ""
                raise ConfigError(f"pass {step.pass_name} works on {' and '.join(formats)} models, and "
                                  f"{model.path.name} is {model.format}{hint}")
    else:
        if not recipe:
            recipe, why = default_recipe(model, calib is not None)
            options["progress"](f"recipe {recipe}: {why} (--recipe chooses another)")
        plan = load_recipe(recipe, model.format)
    return run_recipe(model, plan, **options)


def _refusal(report, max_drop: float | None, out: Path) -> str | None:
    """Why the result must not be written, or None."""
    from host_tools.compress.workflow import quality_drop

    drop = quality_drop(report.original, report.result)
    if report.auto is not None and not report.compressed:
        return f"--auto: nothing qualifies ({report.auto.why_none}); nothing written to {out}"
    if not report.compressed:
        return f"no pass of {report.recipe.name} applied to {report.original.model.path.name}; nothing written to {out}"
    if max_drop is not None and drop is not None and drop > max_drop:
        return (f"accuracy guard: {report.result.label} loses {drop:.2f} points, more than "
                f"--max-drop {max_drop:g}; nothing written to {out}")
    return None


def _device_bench(stack, device_id: str, broker: str, signing_key: Path, expires_in: float, runs: int,
                  timeout: float, chunk_size: int, say):
    from host_tools.ask import device_status
    from host_tools.compress.device import DeviceBench
    from host_tools.packet_limit import check_broker_passes_chunks

    signer = command_signer(signing_key, expires_in)
    client = host_client(broker, "compress")
    stack.callback(client.disconnect)
    # Before any compressing: a device that is not there, or a broker that cannot pass the models'
    # chunks, is an error now, not after the whole search.
    say(f"asking {device_id} for its status")
    device_status(client, device_id, min(timeout, 10.0))
    check_broker_passes_chunks(client, chunk_size)
    return DeviceBench(client, device_id, signing_key, signer, runs=runs, timeout=timeout, chunk_size=chunk_size)


def _list(as_json: bool) -> None:
    from host_tools.compress import NAMED_RECIPES, all_passes
    from host_tools.compress.passes import describe_options

    passes = all_passes()
    if as_json:
        click.echo(json.dumps({
            "passes": {n: {"formats": list(c.formats), "summary": c.summary, "options": describe_options(c)}
                       for n, c in passes.items()},
            "recipes": {n: {"description": d, "formats": {f: [s.to_dict() for s in steps]
                                                          for f, steps in by.items()}}
                        for n, (d, by) in NAMED_RECIPES.items()}}))
        return
    from rich.table import Table

    table = Table(title="passes", header_style="bold")
    for header in ("pass", "formats", "what", "options"):
        table.add_column(header)
    for name, cls in passes.items():
        table.add_row(name, ", ".join(cls.formats), cls.summary,
                      ", ".join(o["name"] for o in describe_options(cls)))
    recipes = Table(title="named recipes", header_style="bold")
    for header in ("recipe", "formats", "what"):
        recipes.add_column(header)
    for name, (description, by_format) in NAMED_RECIPES.items():
        recipes.add_row(name, ", ".join(by_format), description)
    console().print(table, recipes)
