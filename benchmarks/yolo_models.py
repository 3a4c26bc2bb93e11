"""The compression recipes on Ultralytics YOLO models, exported as `yolo export format=onnx` (or
``--format tflite``) exports them: the raw head of YOLOv8n and YOLO11n, YOLO26n's end-to-end rows,
and YOLO11n's pose, segmentation and oriented-box (OBB) models.

    pip install ultralytics ultralytics-thop polars matplotlib opencv-python-headless --no-deps
    pip install torchvision==0.28.0 --no-deps           # (the one that goes with torch 2.13)
    pip install litert-torch                            # (--format tflite: Ultralytics' TFLite exporter)
    python benchmarks/yolo_models.py                    # the six below, 320x320
    python benchmarks/yolo_models.py --models yolo11n --size 640 --latency 20

None of these is an edgefleet dependency; ``--no-deps`` keeps pip from replacing the CPU PyTorch
with a CUDA one. Each model is built from its configuration with random weights (nothing is
downloaded) and exported to ONNX (opset 17, batch 1, no simplification). A random network is
degenerate as it comes: with BatchNorm statistics of 0 and 1 the signal dies out in the stack (the
head reads values of 1e-7), and every anchor scores its prior, 0.01 / classes, under Ultralytics'
threshold of 0.25. So before the export (unless ``--keep-prior``) its BatchNorm statistics are taken
from the images, as a first training step would, and each class-score layer is scaled so that its
logits spread by 2 and offset so that 1 % of the anchors' best classes score over 0.25
(``scores_spread``): the detections of a random network that has some.

Images: scikit-learn's two sample photographs (china.jpg, flower.jpg), 16 crops of SIZE x SIZE at
random places and scales, RGB in [0, 1) as Ultralytics feeds them; calibration, channels-50's
recovery (30 epochs) and evaluation on the same 16. A cell is the result's size as a multiple of
the original's, then the share of detections that pair with the original's (IoU >= 0.5, the same
class; edgefleet decodes the head as Ultralytics' predict does: host_tools/compress/yolo.py), then
with ``--latency RUNS`` its p50 as a multiple of the original's (RUNS single-image calls each,
interleaved, 1 thread).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402
from foreign_models import print_results, recipe_cells  # noqa: E402

RECIPES = ("int8-dynamic", "int8-weights", "int8-static", "fp16", "channels-50")
MODELS = ("yolov8n", "yolo11n", "yolo26n", "yolo11n-pose", "yolo11n-seg", "yolo11n-obb")
IMAGES = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--size", type=int, default=320, help="image size (a multiple of 32)")
    parser.add_argument("--latency", type=int, default=0, metavar="RUNS",
                        help="also time every recipe's result against the original, RUNS single-image calls each")
    parser.add_argument("--keep-prior", action="store_true", help="leave the class scores' bias as initialized")
    parser.add_argument("--format", choices=("onnx", "tflite"), default="onnx",
                        help="export to ONNX (opset 17), or to TFLite as Ultralytics does (litert-torch)")
    args = parser.parse_args()
    offline_ultralytics("yolo_models.py")
    import ultralytics

    print(machine_line())
    exported = "ONNX opset 17" if args.format == "onnx" else "TFLite (litert-torch)"
    print(f"ultralytics {ultralytics.__version__}, {exported}, {args.size}x{args.size}, {IMAGES} images"
          + ("" if args.keep_prior else "; BatchNorm statistics from the images, 1 % of anchors over 0.25"))
    images = photographs(args.size)
    started, rows = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="edgefleet-yolo-") as tmp:
        for name in args.models:
            print(f"  {name}", file=sys.stderr, flush=True)
            rows.append((name, run(name, images, Path(tmp) / name, args)))
    print_results(rows, RECIPES, args.latency, max(map(len, args.models)), "detections per image (original)",
                  started, "agreement", "single-image")


def offline_ultralytics(script: str) -> None:
    """Stop where Ultralytics is not installed, pointing at *script*'s install lines; else keep it
    from checking for updates or downloading, and its log off stdout, where the table goes."""
    if importlib.util.find_spec("ultralytics") is None:
        sys.exit(f"this script needs Ultralytics: see the install lines at the top of benchmarks/{script}")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    warnings.filterwarnings("ignore")


def photographs(size: int) -> np.ndarray:
    """IMAGES crops of scikit-learn's sample photographs, resized to *size* (nearest pixel): [n, 3, size, size]."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    crops = []
    for i in range(IMAGES):
        photo = photos[i % len(photos)]
        crops.append(crop(rng, photo, size, min(photo.shape[:2]) // 2).transpose(2, 0, 1))
    return (np.stack(crops) / 255.0).astype(np.float32)


def crop(rng, photo: np.ndarray, size: int, least: int) -> np.ndarray:
    """A square of *photo* (HWC) at a random place, of a random side from *least* to the photo's
    shorter side, resized to *size* (nearest pixel)."""
    side = int(rng.integers(least, min(photo.shape[:2]) + 1))
    top, left = (int(rng.integers(0, photo.shape[k] - side + 1)) for k in (0, 1))
    pick = np.arange(size) * side // size
    return photo[top + pick][:, left + pick]


def run(name: str, images: np.ndarray, work: Path, args) -> dict:
    from host_tools.compress import Dataset, ModelFile
    from host_tools.compress.yolo import decoded, head

    work.mkdir(parents=True)
    try:
        path = export(name, work, images, args.keep_prior, args.format)
    except Exception as exc:  # noqa: BLE001 — reported in the table
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    original = ModelFile.open(path)
    runtime = original.load()
    found = head(original, runtime)
    if found is None:
        return {"error": "its output is not an Ultralytics detection head edgefleet knows"}
    feed = runtime.inputs[0].name
    outputs = {found.output: np.concatenate([runtime.run({feed: image[None]})[found.output] for image in images])}
    counts = [len(b) for b in decoded(outputs, found)[f"{found.output}.boxes"]]
    row: dict = {"kib": original.size_bytes / 1024, "notes": {},
                 "prune": f"{np.mean(counts):.1f} ({min(counts)}-{max(counts)})"
                          + (", end-to-end rows" if found.rows else "")}
    recipe_cells(original, args.format, Dataset({feed: images}, None, "photographs"), work, row, args.latency,
                 RECIPES, lambda f: f"{f.agreement:.0%}")
    return row


def export(name: str, work: Path, images: np.ndarray, keep_prior: bool, model_format: str) -> Path:
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    cwd = Path.cwd()
    os.chdir(work)  # (the exporter writes beside the configuration's name, in the working folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = YOLO(f"{name}.yaml")
            if not keep_prior:
                scores_spread(model.model, torch.from_numpy(images), torch)
            options = {"opset": 17, "simplify": False} if model_format == "onnx" else {}
            return Path(model.export(format=model_format, imgsz=images.shape[-1], **options)).resolve()
    finally:
        os.chdir(cwd)


def scores_spread(net, images, torch, spread: float = 2.0, share: float = 0.01) -> None:
    """Give a random network detections to compare. Its BatchNorm statistics are taken from *images*,
    as a first step of training would (else the signal dies out in the stack: the head reads values
    of 1e-7); then each class-score layer's weights are scaled so that its logits spread by *spread*,
    and its bias set so that *share* of the anchors' best classes score over Ultralytics' 0.25."""
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # (a plain average over what it sees)
    net.train()
    with torch.no_grad():
        net(images)
    net.eval()
    detect = net.model[-1]
    layers = [branch[-1] for branch in [*detect.cv3, *(getattr(detect, "one2one_cv3", None) or [])]]
    seen = {}
    hooks = [layer.register_forward_hook(lambda layer, args, out: seen.__setitem__(layer, args[0])) for layer in layers]
    with torch.no_grad():
        net(images)
        for hook in hooks:
            hook.remove()
        for layer in layers:
            logits = layer(seen[layer])
            layer.weight.mul_(spread / float(logits.std()))
            logits = layer(seen[layer])
            best = logits.max(dim=1).values.flatten()
            threshold = float(torch.quantile(best, 1 - share))
            layer.bias.add_(float(np.log(0.25 / 0.75)) - threshold)


if __name__ == "__main__":
    main()
