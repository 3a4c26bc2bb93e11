"""The compression recipes on torchvision's models: the CNNs most often put on small devices, two
segmenters, and three detectors with their non-maximum suppression in the graph.

    pip install torchvision pillow      # not edgefleet dependencies; only this script needs them
    python benchmarks/torchvision_models.py                       # every model below
    python benchmarks/torchvision_models.py --models ssdlite shufflenet_v2
    python benchmarks/torchvision_models.py --latency 50          # also time each result

Each model is built with random weights (``weights=None``: nothing is downloaded) and exported with
``torch.onnx.export`` (the TorchScript exporter, opset 17). Classifiers and segmenters take
[batch, 3, 64, 64] with a dynamic batch and get 32 random images as calibration and evaluation
data. Detectors are exported as torchvision exports them: one image [3, 320, 320] with no batch
axis, giving boxes, scores and labels, however many survive NMS (an If around a
NonMaxSuppression); they get 8 random images. A cell is the result's size as a multiple of the
original's and its fidelity: the output cosine for classifiers and segmenters, the share of
detections that pair with the original's (IoU ≥ 0.5, the same label) for detectors; with
``--latency RUNS`` also its p50 as a multiple of the original's (RUNS single-sample calls each,
interleaved, 1 thread). Random weights make the fidelity a smoke test: a detector's random scores
sit close together, so NMS keeps different boxes for small changes. The last column is
structured channel pruning of half the channels without recovery, and then full int8
(``python benchmarks/foreign_models.py`` explains the column).

torchvision's wheel on PyPI is built for CUDA. Where its C++ ops cannot load (a CPU-only PyTorch:
no libc10_cuda), the one op the detectors need, ``nms``, is given a Python implementation before
torchvision is imported, and exported as ONNX's NonMaxSuppression as torchvision exports its own.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402
from foreign_models import print_results, prune_cell, recipe_cells  # noqa: E402

RECIPES = ("int8-dynamic", "int8-weights", "int8-static", "fp16")
CLASSIFIERS = ("mobilenet_v3_small", "mobilenet_v2", "shufflenet_v2_x0_5", "squeezenet1_1", "efficientnet_b0",
               "mnasnet0_5", "densenet121", "googlenet", "resnet18", "regnet_x_400mf", "convnext_tiny")
SEGMENTERS = {"lraspp": "lraspp_mobilenet_v3_large", "deeplabv3": "deeplabv3_mobilenet_v3_large"}
DETECTORS = {"ssdlite": "ssdlite320_mobilenet_v3_large", "retinanet": "retinanet_resnet50_fpn",
             "fcos": "fcos_resnet50_fpn"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="models to run (default: all)")
    parser.add_argument("--latency", type=int, default=0, metavar="RUNS",
                        help="also time every recipe's result against the original, RUNS single-sample calls each")
    args = parser.parse_args()
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        sys.exit("this script needs PyTorch and torchvision: pip install 'edgefleet[distill]' torchvision pillow")
    import torch

    torchvision = _import_torchvision(torch)
    known = [*CLASSIFIERS, *SEGMENTERS, *DETECTORS]
    chosen = args.models or known
    unknown = [m for m in chosen if m not in known]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    warnings.filterwarnings("ignore")
    print(machine_line())
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, TorchScript exporter, opset 17"
          + ("; nms in Python (torchvision's C++ ops did not load)" if _LIBRARY else ""))
    started, rows = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="edgefleet-torchvision-") as tmp:
        for name in chosen:
            print(f"  {name}", file=sys.stderr, flush=True)
            rows.append((name, run(name, torch, torchvision, Path(tmp) / name, args.latency)))
    print_results(rows, RECIPES, args.latency, 19, "channels-50 (no recovery)", started)


def run(name: str, torch, torchvision, work: Path, latency_runs: int) -> dict:
    import onnx

    from host_tools.compress import Dataset, ModelFile
    from host_tools.compress.onnx.prune import prepared_plan

    work.mkdir(parents=True)
    path = work / f"{name}.onnx"
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    detector = name in DETECTORS
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if detector:
                # (not resized to 800; and SSDlite's score threshold, 0.001: at 0.05 a random head scores
                # no box, its prior probability being 0.01, and there would be nothing to compare)
                sized = {} if name == "ssdlite" else {"min_size": 320, "max_size": 320, "score_thresh": 0.001}
                model = getattr(torchvision.models.detection, DETECTORS[name])(
                    weights=None, weights_backbone=None, num_classes=5, **sized).eval()
                images = rng.random((8, 3, 320, 320), dtype=np.float32)
                torch.onnx.export(model, ([torch.from_numpy(images[0])],), str(path), input_names=["image"],
                                  output_names=["boxes", "scores", "labels"], opset_version=17, dynamo=False)
            else:
                build = (getattr(torchvision.models.segmentation, SEGMENTERS[name]) if name in SEGMENTERS
                         else getattr(torchvision.models, name))
                model = _main_output(build(weights=None, **({"weights_backbone": None, "num_classes": 4}
                                                             if name in SEGMENTERS else {})), torch).eval()
                images = rng.standard_normal((32, 3, 64, 64)).astype(np.float32)
                torch.onnx.export(model, (torch.from_numpy(images[:2]),), str(path), input_names=["image"],
                                  output_names=["out"], dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}},
                                  opset_version=17, dynamo=False)
    except Exception as exc:  # noqa: BLE001 — reported in the table
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    original = ModelFile.open(path)
    dataset = Dataset({"image": images}, None, "random")
    row: dict = {"kib": original.size_bytes / 1024, "notes": {}}
    shown = (lambda f: f"{f.agreement:.0%}") if detector else (lambda f: f"{f.cosine:.3f}")  # noqa: E731
    recipe_cells(original, "onnx", dataset, work, row, latency_runs, RECIPES, shown)
    plan = prepared_plan(onnx.load(str(path)))
    layers = sum(len(g.producers) for g in plan.groups)
    prune_cell(original, "onnx-prune-channels", dataset, work, row, layers, layers + len(plan.skipped), 0)
    return row


def _main_output(inner, torch):
    """*inner*, giving its main tensor where it gives a dict (torchvision's segmenters: {"out": …})."""

    class Main(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            return out["out"] if isinstance(out, dict) else out

    return Main()


_LIBRARY = []  # the Python nms's op library, kept: its ops live as long as it does


def _import_torchvision(torch):
    """torchvision, with a Python nms where its C++ ops cannot load (see the module docstring)."""
    location = Path(importlib.util.find_spec("torchvision").origin).parent
    try:
        for library in location.glob("_C*.so"):
            torch.ops.load_library(str(library))
    except OSError:
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.impl("nms", _nms, "CPU")
        _LIBRARY.append(library)
    import torchvision
    import torchvision.ops.boxes

    if _LIBRARY:
        torchvision.ops.boxes._assert_has_ops = _ops_given
    return torchvision


def _ops_given() -> None:
    """(torchvision asks for its C++ ops before nms; the Python one stands in)"""


def _nms(boxes, scores, threshold: float):
    """Greedy non-maximum suppression, as torchvision's: the indices kept, highest score first."""
    import torch

    order = scores.argsort(descending=True)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        low = torch.maximum(boxes[i, :2], boxes[:, :2])
        high = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (high - low).clamp(min=0).prod(dim=1)
        suppressed |= inter / (area[i] + area - inter) > threshold
    return torch.tensor(keep, dtype=torch.long)


if __name__ == "__main__":
    main()
