"""The compression recipes on models nobody here made: Hugging Face architectures, exported as users export them.

    pip install transformers        # not an edgefleet dependency; only this script needs it
    python benchmarks/foreign_models.py                  # every architecture below
    python benchmarks/foreign_models.py --models vit t5  # some of them
    pip install litert-torch        # for --format tflite (Google's PyTorch-to-TFLite converter)
    python benchmarks/foreign_models.py --format tflite  # the same models as TFLite files
    python benchmarks/foreign_models.py --recover 10     # also recover the pruned models (10 epochs)
    python benchmarks/foreign_models.py --latency 300    # also time each result against the original
    python benchmarks/foreign_models.py --auto size      # also --auto --max-drop 1 (size or speed) on each
    pip install onnxscript          # for --exporter dynamo (torch.export, PyTorch's default exporter)
    python benchmarks/foreign_models.py --exporter dynamo
    python benchmarks/foreign_models.py --float16        # each export made float16 first, then compressed

Each architecture is built from a small configuration with random weights (nothing is
downloaded), exported with ``torch.onnx.export`` (opset 17, dynamic batch; text models also
dynamic tokens; by default with the TorchScript exporter, with ``--exporter dynamo`` with
torch.export, which PyTorch uses unless told otherwise since 2.9, at the opset 18 it writes), and
given each ONNX recipe, with 64 random inputs (token ids for text) as calibration and evaluation data. The table shows, per recipe, the result's size against the
original's, or why it did not apply; structured pruning runs without recovery, so its column is
the structure it found ("4/7 layers, 2 heads": layers pruned of all weighted layers, groups by
attention heads), not accuracy, and the size after full int8 of the pruned model (``int8-static``,
as ``--auto``'s pruned candidates quantize it); with ``--recover N`` it runs again with N epochs of
recovery on the same 64 inputs, and the column adds the output cosine and top-1 agreement with the original
without and with it (that recovery runs at all on these graphs, and moves the output back towards
the original's).
With ``--format tflite`` each model is converted with litert-torch instead (batch 1; token ids
become int32) and given each TFLite recipe, and its structured pruning (tflite-prune-channels) in
the last column. Each other cell is "size ratio / output cosine to the original"; with random
weights and inputs the cosine is only a smoke test (80% magnitude pruning of random weights, in
sparse-int8, leaves little of them).

This is not a speed benchmark: it shows that the recipes run, and what they do, on graphs written
by an exporter and a model library this project does not control. With ``--latency RUNS`` each
cell adds the result's median single-sample latency as a multiple of the original's, both timed in
the same interleaved rounds (RUNS calls each, one thread, on this host; random weights run as
fast as trained ones). With ``--auto GOAL`` each model also goes through ``--auto --max-drop 1 --goal
GOAL`` on the same inputs; what it chose says little with random weights (near-tied logits move with
any change), but a candidate that fails is a finding, and each is listed under the table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402

RECIPES = {"onnx": ("int8-dynamic", "int8-weights", "int8-static", "fp16", "int4-weights", "sparse-int8"),
           "tflite": ("int8-dynamic", "int8-weights", "int8-static", "int8-layers", "fp16", "sparse-int8")}
TOKENS, VOCAB, SAMPLES = 16, 200, 64


def architectures(T) -> dict[str, tuple]:
    """name -> (model class, config, input kind): small enough to export and compress in seconds."""
    text = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64)
    vision = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, num_labels=5)
    return {
        "bert": (T.BertForSequenceClassification, T.BertConfig(**text, num_labels=3), "text"),
        "distilbert": (T.DistilBertForSequenceClassification, T.DistilBertConfig(
            vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64), "text"),
        "roberta": (T.RobertaForSequenceClassification, T.RobertaConfig(**{**text, "max_position_embeddings": 80}),
                    "text"),
        "albert": (T.AlbertForSequenceClassification, T.AlbertConfig(**text, embedding_size=32), "text"),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**text, num_key_value_heads=2, use_cache=False), "text"),
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                 use_cache=False), "text"),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**text, num_key_value_heads=2, use_cache=False), "text"),
        "t5": (T.T5EncoderModel, T.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                            num_heads=4), "ids"),
        "vit": (T.ViTForImageClassification, T.ViTConfig(**vision), "image"),
        "dinov2": (T.Dinov2ForImageClassification, T.Dinov2Config(**vision), "image"),  # its position table resized
        "beit": (T.BeitForImageClassification, T.BeitConfig(**vision, use_relative_position_bias=True), "image"),
        "levit": (T.LevitForImageClassification, T.LevitConfig(  # a ViT for CPUs: BatchNorm on flattened tokens
            image_size=32, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
            key_dim=[8, 8, 8], num_labels=5), "image"),
        "yolos": (T.YolosForObjectDetection, T.YolosConfig(**{**vision, "image_size": [32, 32]},
                                                           num_detection_tokens=4), "image"),  # a detector
        "swin": (T.SwinForImageClassification, T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                            num_heads=[2, 4], window_size=4, num_labels=5), "image"),
        "convnext": (T.ConvNextForImageClassification, T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32],
                                                                        depths=[1, 1], num_labels=5), "image"),
        # (the mobile networks' default initialisation, deep and random, makes their outputs ~0: 1e-26
        # for MobileNetV2, exactly 0 for MobileViT; wider initial weights keep a signal to compare)
        "mobilenetv2": (T.MobileNetV2ForImageClassification, T.MobileNetV2Config(
            image_size=32, depth_multiplier=0.25, num_labels=5, initializer_range=0.3), "image"),
        "mobilevit": (T.MobileViTForImageClassification, T.MobileViTConfig(
            image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48],
            num_attention_heads=2, num_labels=5, initializer_range=0.5), "image"),
        "poolformer": (T.PoolFormerForImageClassification, T.PoolFormerConfig(
            hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=5), "image"),
        "resnet": (T.ResNetForImageClassification, T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                                                  depths=[1, 1], num_labels=5), "image"),
        "regnet": (T.RegNetForImageClassification, T.RegNetConfig(embedding_size=16, hidden_sizes=[32, 64],
                                                                  depths=[1, 2], groups_width=8, num_labels=5),
                   "image"),  # grouped 3x3 convolutions, as ResNeXt's
        "segformer": (T.SegformerForSemanticSegmentation, T.SegformerConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, sr_ratios=[2, 1], num_attention_heads=[1, 2],
            decoder_hidden_size=32, num_labels=4, strides=[4, 2], patch_sizes=[7, 3]), "image"),
        "wav2vec2": (T.Wav2Vec2ForSequenceClassification, T.Wav2Vec2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
            num_labels=3), "audio"),
        "whisper": (T.WhisperForAudioClassification, T.WhisperConfig(
            d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=16,
            max_source_positions=30, num_labels=3), "mel"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="architectures to run (default: all)")
    parser.add_argument("--format", choices=("onnx", "tflite"), default="onnx",
                        help="export to ONNX (torch.onnx) or convert to TFLite (litert-torch)")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="torch.onnx.export's exporter: TorchScript (dynamo=False) or torch.export (dynamo=True)")
    parser.add_argument("--float16", action="store_true",
                        help="ONNX: make each export float16 first (ONNX Runtime's float16 converter, float16 inputs "
                             "and outputs too), as models published in float16 only are, and compress that")
    parser.add_argument("--recover", type=int, default=0, metavar="EPOCHS",
                        help="also prune with recovery (this many epochs on the 64 inputs) and show the output "
                             "cosine to the original without and with it")
    parser.add_argument("--latency", type=int, default=0, metavar="RUNS",
                        help="also time every recipe's result against the original, RUNS single-sample calls "
                             "each in interleaved rounds, and add the p50 ratio to its cell")
    parser.add_argument("--auto", choices=("size", "speed"),
                        help="also run --auto --max-drop 1 with this goal on each model, and list what it chose "
                             "and every candidate that failed")
    args = parser.parse_args()
    try:
        # transformers imports torchao where installed (litert-torch brings it), which logs about
        # kernels for other hardware
        with contextlib.redirect_stderr(io.StringIO()):
            import torch
            import transformers
    except ImportError as exc:
        sys.exit(f"this script needs PyTorch and Hugging Face transformers ({exc.name} is missing): "
                 "pip install 'edgefleet[distill]' transformers")
    if args.exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        sys.exit("--exporter dynamo needs onnxscript: pip install onnxscript")
    if args.format == "tflite" and importlib.util.find_spec("litert_torch") is None:
        sys.exit("--format tflite converts with litert-torch: pip install litert-torch")
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    table = architectures(transformers)
    chosen = args.models or list(table)
    unknown = [m for m in chosen if m not in table]
    if unknown:
        sys.exit(f"unknown architecture(s) {', '.join(unknown)}; known: {', '.join(table)}")
    print(machine_line())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, format {args.format}"
          + (f", exporter {args.exporter}" if args.format == "onnx" else "")
          + (", made float16 by onnxruntime.transformers.float16" if args.float16 else ""))
    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-foreign-") as tmp:
        for name in chosen:
            print(f"  {name}", file=sys.stderr, flush=True)
            work = Path(tmp) / name
            rows.append((name, run_onnx(name, *table[name], work, torch, args.recover, args.exporter, args.latency,
                                        args.auto, args.float16)
                         if args.format == "onnx" else
                         run_tflite(name, *table[name], work, torch, args.recover, args.latency, args.auto)))
    recipes = RECIPES[args.format]
    print()
    width = 19 if args.latency else 13
    if args.latency:
        print(f"cells: size/output cosine/p50 latency, each as a multiple of the original's "
              f"({args.latency} single-sample runs each, interleaved, 1 thread)")
    print_table(rows, recipes, width, 11, "channels-50 (no recovery)" if not args.recover else
                f"channels-50 (output cosine, top-1 agreement: without -> with {args.recover} epochs of recovery)")
    if args.auto:
        print(f"\n--auto --max-drop 1 --goal {args.auto} (the 64 inputs as calibration, training and evaluation data):")
        for name, row in rows:
            if "auto" in row:
                print(f"  {name:<11} {row['auto']}")
            for candidate, verdict in row.get("auto_failed", {}).items():
                print(f"      {candidate}: {verdict[:200]}")
    print_notes(rows)
    print(f"\n({time.monotonic() - started:.0f} s in all)")


def print_table(rows: list[tuple[str, dict]], recipes, width: int, name_width: int, last: str) -> None:
    """A line per model: its size, a cell per recipe (*width* wide), and the pruning column (*last*
    heads it)."""
    print(f"{'model':<{name_width}} {'KiB':>7}  " + "  ".join(f"{r:>{width}}" for r in recipes) + f"  {last}")
    for name, row in rows:
        if "error" in row:
            print(f"{name:<{name_width}} export failed: {row['error']}")
            continue
        cells = "  ".join(f"{row[r]:>{width}}" for r in recipes)
        print(f"{name:<{name_width}} {row['kib']:>7.0f}  {cells}  {row.get('prune', '')}".rstrip())


def print_results(rows: list[tuple[str, dict]], recipes, latency_runs: int, name_width: int, last: str,
                  started: float, fidelity: str = "fidelity", call: str = "single-sample") -> None:
    """The table (cells *fidelity*, with *latency_runs* also p50), why any recipe did not apply, and
    the time since *started*."""
    print()
    if latency_runs:
        print(f"cells: size/{fidelity}/p50 latency, size and latency as multiples of the original's "
              f"({latency_runs} {call} runs each, interleaved, 1 thread)")
    print_table(rows, recipes, 17 if latency_runs else 11, name_width, last)
    print_notes(rows)
    print(f"\n({time.monotonic() - started:.0f} s in all)")


def print_notes(rows: list[tuple[str, dict]]) -> None:
    """Why each recipe that did not apply to a model did not."""
    notes = [(name, r, row["notes"][r]) for name, row in rows for r in row.get("notes", {})]
    if notes:
        print("\nwhy not:")
        for name, recipe, note in notes:
            print(f"  {name} {recipe}: {note[:160]}")


def build(cls, config, kind: str, torch):
    """The model with one output (logits where it has them, else the last hidden state), its
    input names, and SAMPLES random inputs (token ids for text)."""
    import numpy as np

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = cls(config).eval()
    if kind in ("text", "ids"):
        names = ["input_ids"] + (["attention_mask"] if kind == "text" else [])
        data = {"input_ids": rng.integers(0, VOCAB, (SAMPLES, TOKENS)).astype(np.int64)}
        if kind == "text":
            data["attention_mask"] = np.ones((SAMPLES, TOKENS), np.int64)
    else:
        shape = {"image": (3, 32, 32), "audio": (1600,), "mel": (16, 60)}[kind]
        names = [{"image": "pixel_values", "audio": "input_values", "mel": "input_features"}[kind]]
        data = {names[0]: rng.standard_normal((SAMPLES, *shape)).astype(np.float32)}

    class Outputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            out = self.inner(**dict(zip(names, inputs)), return_dict=True)
            return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    return Outputs(model), names, data


def recipe_cells(original, model_format: str, dataset, work: Path, row: dict, latency_runs: int = 0,
                 recipes: tuple[str, ...] = (), shown=lambda fidelity: f"{fidelity.cosine:.3f}") -> None:
    """Each of *recipes* (default: RECIPES) on *original*: "size/fidelity" (*shown* writes the latter)."""
    from host_tools.compress import load_recipe, run_recipe
    from host_tools.compress.evaluate import bind, latencies

    results = {}
    for recipe in recipes or RECIPES[model_format]:
        report = run_recipe(original, load_recipe(recipe, model_format), calib=dataset, eval_data=dataset,
                            latency_runs=10, workdir=work / recipe)
        if report.compressed:
            result = results[recipe] = report.result
            row[recipe] = f"{result.size_bytes / report.original.size_bytes:.2f}x/{shown(result.fidelity)}"
        else:
            row[recipe] = "—"
            row["notes"][recipe] = "; ".join(s.note for s in report.steps if s.status != "ok")
    if latency_runs and results:
        base, *timed = latencies([original, *(m.model for m in results.values())],
                                 bind(dataset, original.load(threads=1)), runs=latency_runs)
        for recipe, lat in zip(results, timed):
            row[recipe] += f"/{lat.p50_ms / base.p50_ms:.2f}x"


def run_onnx(name: str, cls, config, kind: str, work: Path, torch, recover: int = 0,
             exporter: str = "torchscript", latency_runs: int = 0, auto: str | None = None,
             float16: bool = False) -> dict:
    import onnx

    from host_tools.compress import Dataset, ModelFile
    from host_tools.compress.onnx.prune import prepared_plan

    work.mkdir(parents=True)
    module, names, data = build(cls, config, kind, torch)
    axes = {n: {0: "batch", 1: "tokens"} if kind in ("text", "ids") else {0: "batch"} for n in names}
    path = work / f"{name}.onnx"
    example = tuple(torch.from_numpy(data[n][:2]) for n in names)
    try:
        # (torch.export prints its progress and the onnxscript optimizer's notes)
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if exporter == "dynamo":  # (its conversion of dynamic_axes fails on these modules' *inputs)
                dynamic = tuple({axis: torch.export.Dim.DYNAMIC for axis in axes[n]} for n in names)
                torch.onnx.export(module, example, str(path), input_names=names, output_names=["out"],
                                  dynamic_shapes=(dynamic,), opset_version=18, dynamo=True)
            else:
                torch.onnx.export(module, example, str(path), input_names=names, output_names=["out"],
                                  dynamic_axes={**axes, "out": {0: "batch"}}, opset_version=17, dynamo=False)
    except Exception as exc:  # noqa: BLE001 — reported in the table
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    if float16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(onnx.load(str(path)), keep_io_types=False)
        for stale in work.glob(f"{name}.onnx*"):  # (torch.export's external weights: now inside)
            stale.unlink()
        onnx.save(half, str(path))
    original = ModelFile.open(path)
    dataset = Dataset(data, None, "random")
    # (torch.export writes the weights to <model>.onnx.data beside the graph: counted with it)
    row: dict = {"kib": original.size_bytes / 1024, "notes": {}}
    recipe_cells(original, "onnx", dataset, work, row, latency_runs)
    plan = prepared_plan(onnx.load(str(path)))
    layers = sum(len(g.producers) for g in plan.groups)
    heads = sum(any(p.block > 1 for p in g.producers) for g in plan.groups)
    prune_cell(original, "onnx-prune-channels", dataset, work, row, layers, layers + len(plan.skipped), heads,
               recover)
    if auto:
        auto_cell(original, dataset, work, row, auto)
    return row


def prune_cell(original, pass_name: str, dataset, work: Path, row: dict, layers: int, of: int, heads: int,
               recover: int = 0) -> None:
    """Structured pruning without recovery: the size it leaves, and how much of the model it could prune;
    with *recover* epochs, the output cosine to the original without and with recovery."""
    from host_tools.compress import run_recipe
    from host_tools.compress.recipes import Recipe, Step

    def pruned(epochs: int):
        # (as the channels-50 recipe: an ONNX result without torch.export's per-node metadata)
        compact = (Step("onnx-compact", {"rename": False}),) if pass_name.startswith("onnx") else ()
        return run_recipe(original, Recipe("channels-50", (Step(pass_name, {"ratio": 0.5, "recover_epochs": epochs}),
                                                           *compact)),
                          calib=dataset, eval_data=dataset, latency_runs=10, workdir=work / f"prune{epochs}")

    report = pruned(0)
    if not report.compressed:
        row["prune"] = "— " + "; ".join(s.note for s in report.steps if s.status != "ok")[:100]
        return
    row["prune"] = (f"{report.result.size_bytes / report.original.size_bytes:.2f}x: {layers}/{of} layers"
                    + (f", {heads} by heads" if heads else ""))
    # then full int8 of the pruned model, as --auto's pruned candidates do
    from host_tools.compress import load_recipe
    int8 = run_recipe(report.result.model, load_recipe("int8-static", original.format), calib=dataset,
                      eval_data=dataset, latency_runs=5, workdir=work / "prune-int8")
    row["prune"] += (f", + int8 {int8.result.size_bytes / report.original.size_bytes:.2f}x" if int8.compressed else
                     ", + int8 failed: " + "; ".join(s.note for s in int8.steps if s.status != "ok")[:80])
    if recover:
        healed = pruned(recover)
        if not healed.compressed:
            row["prune"] += ", not recovered: " + "; ".join(s.note for s in healed.steps if s.status != "ok")[:80]
            return
        before, after = report.result.fidelity, healed.result.fidelity
        row["prune"] += f", cosine {before.cosine:.2f} -> {after.cosine:.2f}"
        if before.agreement is not None:  # (softmax ignores a shift of the logits; the cosine does not)
            row["prune"] += f", top-1 {before.agreement:.0%} -> {after.agreement:.0%}"


def auto_cell(original, dataset, work: Path, row: dict, goal: str) -> None:
    """--auto --max-drop 1 --goal *goal*: what it chose (or why nothing), and the candidates that failed."""
    from host_tools.compress.auto import search
    from host_tools.compress.workflow import quality_drop

    report = search(original, eval_data=dataset, calib=dataset, max_drop=1.0, goal=goal, workdir=work / "auto",
                    latency_runs=20)
    chosen = report.chosen
    row["auto"] = (f"{chosen.label}: {chosen.size_bytes / report.original.size_bytes:.2f}x the file, "
                   f"drop {quality_drop(report.original, chosen):+.2f}" if chosen else
                   f"nothing: {report.auto.why_none}")
    row["auto_failed"] = report.auto.failures()


def run_tflite(name: str, cls, config, kind: str, work: Path, torch, recover: int = 0,
               latency_runs: int = 0, auto: str | None = None) -> dict:
    """Converted with litert-torch at batch 1 (TFLite's shapes are fixed); token ids become int32."""
    from host_tools.compress import Dataset, ModelFile

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import litert_torch  # torchao, which it imports, logs at import about kernels for other CPUs and GPUs

    work.mkdir(parents=True)
    module, names, data = build(cls, config, kind, torch)
    path = work / f"{name}.tflite"
    example = tuple(torch.from_numpy(data[n][:1]) for n in names)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            litert_torch.convert(module, example).export(str(path))
    except Exception as exc:  # noqa: BLE001 — reported in the table
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
    original = ModelFile.open(path)
    # the converter names the inputs args_0, args_1, ... in the module's order
    specs = original.load().inputs
    dataset = Dataset({spec.name: data[n] for spec, n in zip(specs, names)}, None, "random")
    row: dict = {"kib": path.stat().st_size / 1024, "notes": {}}
    recipe_cells(original, "tflite", dataset, work, row, latency_runs)
    from host_tools.compress.tflite import flatbuffer
    from host_tools.compress.tflite.prune import prepared_plan

    plan = prepared_plan(flatbuffer.read(path)[0], path)
    heads = sum(any(r.edits[0][3].shape[1] > 1 for r in group) for group in plan.groups)
    layers = len({r.layer for r in plan.regions})  # (a layer SLICEs split is walked once per part)
    prune_cell(original, "tflite-prune-channels", dataset, work, row, layers, layers + len(plan.skipped), heads,
               recover)
    if auto:
        auto_cell(original, dataset, work, row, auto)
    return row


if __name__ == "__main__":
    main()
