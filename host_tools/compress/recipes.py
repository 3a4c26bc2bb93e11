"""Recipes: an ordered list of passes with their options, named or from a file.

A recipe file (TOML, YAML or JSON) is::

    description = "static int8, entropy calibration"
    [[passes]]
    pass = "onnx-preprocess"
    [[passes]]
    pass = "onnx-static"
    method = "entropy"
    per_channel = true

On the command line a step is ``NAME key=value key=value`` (lists comma-separated).
Named recipes pick the passes for the model's format, so ``int8-static`` means the same
thing for an ONNX and a TFLite model.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError

FILE_SUFFIXES = (".toml", ".json", ".yaml", ".yml")


@dataclass(frozen=True)
class Step:
    pass_name: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, **self.options}


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[Step, ...]
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "passes": [s.to_dict() for s in self.steps]}


# Steps that recipes and --auto's candidates share: preprocessing before ONNX quantization, the
# compaction (short or no internal names) that every ONNX and every TFLite recipe ends with, and pruning.
PREPROCESS = Step("onnx-preprocess")
ONNX_COMPACT = Step("onnx-compact")
TFLITE_COMPACT = Step("tflite-compact")
# Dynamic-range int8 for TFLite as int8-dynamic is for ONNX: one weight scale per dense layer (ONNX
# Runtime's default; convolutions keep one per channel), and the float constants left after it in 8 bits.
# Depthwise convolutions keep int8 weights but compute in float: XNNPACK does not run a dynamic-range
# one, which splits its graph (MobileNetV2 3.1x float's time, 1.3x so; the small CNN's first layer,
# a depthwise convolution as converted, 0.81x -> 0.45x).
TFLITE_DYNAMIC = (Step("tflite-dynamic", {"per_channel": False, "weight_only": ["DEPTHWISE_CONV_2D"]}),
                  Step("tflite-int8-params"))
# int8-layers: int8 for the layers with weights, for the pooling, padding, concatenations and means
# that join onto them, and for the depthwise convolutions between two of them (litert-quantizer's op
# names; its CONV_2D_TRANSPOSE is TRANSPOSE_CONV), the rest float. TFLite's XNNPACK delegate runs all
# of these in int8 in one piece with the float ops; a transformer's ADD, SUB, RSQRT,
# SQUARED_DIFFERENCE, GELU, SOFTMAX or BATCH_MATMUL in int8 split it (tflite/quantize.py). A mean
# alone between float ops (a layer norm's) stays float: in int8 it would only add a QUANTIZE and a
# DEQUANTIZE of its own; a depthwise convolution with float on one side (a ConvNeXt's, before a layer
# norm) too: XNNPACK's int8 7x7 kernel is slower than its float one.
TFLITE_INT8_LAYER_OPS = ("FULLY_CONNECTED", "CONV_2D", "CONV_2D_TRANSPOSE", "EMBEDDING_LOOKUP")
TFLITE_INT8_JOINING_OPS = ("MAX_POOL_2D", "AVERAGE_POOL_2D", "PAD", "CONCATENATION", "MEAN")
TFLITE_INT8_BETWEEN_OPS = ("DEPTHWISE_CONV_2D",)
TFLITE_INT8_LAYERS = Step("tflite-int8", {"ops": list(TFLITE_INT8_LAYER_OPS), "joining": list(TFLITE_INT8_JOINING_OPS),
                                          "between": list(TFLITE_INT8_BETWEEN_OPS)})
# Half of the channels pruned and recovered: channels-50, and --auto's pruned candidates.
ONNX_CHANNELS_50 = Step("onnx-prune-channels", {"ratio": 0.5, "recover_epochs": 30})
TFLITE_CHANNELS_50 = Step("tflite-prune-channels", {"ratio": 0.5, "recover_epochs": 30})
# name -> (description, {model format: steps})
NAMED: dict[str, tuple[str, dict[str, tuple[Step, ...]]]] = {
    "int8-dynamic": ("int8 weights, activations quantized at run time (no calibration data needed)", {
        "onnx": (PREPROCESS, Step("onnx-dynamic"), Step("onnx-int8-params"), ONNX_COMPACT),
        "tflite": (*TFLITE_DYNAMIC, TFLITE_COMPACT)}),
    "int8-static": ("int8 weights and activations, per-channel weights, calibrated on --calib", {
        "onnx": (PREPROCESS, Step("onnx-static", {"per_channel": True}), ONNX_COMPACT),
        "tflite": (Step("tflite-int8"), TFLITE_COMPACT)}),
    "int8-layers": ("int8 layers and the pooling, padding between them; norms, GELU, softmax float; calibrated", {
        "tflite": (TFLITE_INT8_LAYERS, TFLITE_COMPACT)}),
    "int8-static-safe": ("static int8 with the 2 most sensitive nodes computing in float (their weights 8-bit)", {
        "onnx": (PREPROCESS, Step("onnx-static", {"per_channel": True, "auto_exclude": 2}), ONNX_COMPACT)}),
    "int8-weights": ("int8 weights only, float compute (no calibration data needed)", {
        # (without ORT's optimizations saved into the file: at load they would fuse an Add and a LayerNorm the
        # float model keeps apart, and the reference transformer ran 1.05-1.10x the float model's time)
        "onnx": (Step("onnx-preprocess", {"optimize": False}), Step("onnx-weight-only"), ONNX_COMPACT),
        "tflite": (Step("tflite-weight-only"), Step("tflite-int8-params"), TFLITE_COMPACT)}),
    "fp16": ("float16 weights (and compute where the runtime has it)", {
        "onnx": (Step("onnx-fp16"), ONNX_COMPACT),
        "tflite": (Step("tflite-fp16"), TFLITE_COMPACT)}),
    "sparse-int8": ("80% magnitude pruning, then static int8: a much smaller download", {
        "onnx": (Step("onnx-prune-magnitude", {"sparsity": 0.8}), PREPROCESS,
                 Step("onnx-static", {"per_channel": True}), ONNX_COMPACT),
        "tflite": (Step("tflite-prune-magnitude", {"sparsity": 0.8}), Step("tflite-int8"), TFLITE_COMPACT)}),
    # (the pruned layers keep their names, for whoever trains or inspects them further; what a device
    # does not need goes: torch.export's per-node metadata is most of a small model's file)
    "channels-50": ("half of the prunable channels removed, recovered by distillation from the original", {
        "onnx": (ONNX_CHANNELS_50, Step("onnx-compact", {"rename": False})), "tflite": (TFLITE_CHANNELS_50,)}),
    "distill": ("a student with at most 25% of the parameters, trained on the model's outputs", {
        "onnx": (Step("distill"),), "tflite": (Step("distill"),)}),
    "int4-weights": ("int4 blockwise MatMul weights, for transformer-style models", {
        # without ORT's optimizations, which would fuse MatMul+Add into Gemm for gemm=true to take apart again
        # and without widening float16: int4's quantizer takes float16 weights, and what it leaves stays float16
        "onnx": (Step("onnx-preprocess", {"optimize": False, "widen": False}), Step("onnx-int4", {"gemm": True}),
                 ONNX_COMPACT)}),
}


def default_recipe(model, calibrated: bool) -> tuple[str, str]:
    """The named recipe for a ``compress`` without --recipe, and why: static int8 with calibration
    data; without, dynamic int8, except for an ONNX model with convolutions, whose dynamically
    quantized form (ConvInteger) ran 2.3-10x slower than float on every CPU docs/benchmarks.md
    measured: int8 weights only, the same size at the float model's speed."""
    if calibrated:
        return "int8-static", "--calib given"
    if model.format == "onnx":
        from host_tools.compress.onnx.boundary import weighted_nodes

        if weighted_nodes(model.path, ("Conv", "ConvTranspose")):
            return "int8-weights", ("no --calib, and the model has convolutions, which dynamic int8 makes slower "
                                    "than float")
    return "int8-dynamic", "no --calib"


def named_recipe(name: str, model_format: str) -> Recipe:
    description, by_format = NAMED[name]
    if model_format not in by_format:
        raise ConfigError(f"recipe {name} has no {model_format} version "
                          f"(it is for {', '.join(by_format)} models)")
    return Recipe(name, by_format[model_format], description)


def load_recipe(spec: str, model_format: str) -> Recipe:
    """A named recipe, or a recipe file."""
    if spec in NAMED:
        return named_recipe(spec, model_format)
    path = Path(spec)
    if path.suffix in FILE_SUFFIXES:
        return recipe_from_file(path)
    raise ConfigError(f"no recipe named {spec!r} (named recipes: {', '.join(NAMED)}; or give a "
                      f"{'/'.join(FILE_SUFFIXES)} file)")


def recipe_from_file(path: Path) -> Recipe:
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib
            doc = tomllib.loads(text)
        elif path.suffix == ".json":
            doc = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path.name}: YAML recipes need PyYAML (pip install pyyaml), "
                                  f"or use TOML/JSON") from None
            doc = yaml.safe_load(text)
    except ConfigError:
        raise
    except Exception as exc:  # tomllib/json/yaml each have their own decode error
        raise ConfigError(f"cannot parse recipe {path}: {exc}") from None
    return recipe_from_dict(doc, path.stem, str(path))


def recipe_from_dict(doc: Any, default_name: str, where: str) -> Recipe:
    if not isinstance(doc, dict) or not isinstance(doc.get("passes"), list) or not doc["passes"]:
        raise ConfigError(f"{where}: a recipe needs a non-empty list 'passes'")
    steps = []
    for i, entry in enumerate(doc["passes"], start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("pass"), str):
            raise ConfigError(f"{where}: pass {i} needs a 'pass' name")
        options = {k: v for k, v in entry.items() if k != "pass"}
        steps.append(Step(entry["pass"], options))
    return Recipe(str(doc.get("name", default_name)), tuple(steps), str(doc.get("description", "")))


def parse_step(text: str) -> Step:
    """``NAME key=value ...`` as typed after --pass."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--pass {text!r}: {exc}") from None
    if not words:
        raise ConfigError("--pass needs a pass name")
    options = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ConfigError(f"--pass {text!r}: options are key=value, not {word!r}")
        options[key.replace("-", "_")] = value
    return Step(words[0], options)
