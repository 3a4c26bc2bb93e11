"""The compression recipes on a YOLO11n trained here, scored by its mAP against ground-truth boxes.

yolo_models.py's networks have random weights: a compressed one can only be compared with its
original, detection by detection. This script trains one, so that what each recipe costs is
measured as a detector's users measure it. It draws a data set (SHAPES: 1 to 4 circles, squares
and triangles of random colours and sizes over crops of scikit-learn's two sample photographs,
darkened, with noise; SIZE x SIZE), trains Ultralytics' YOLO11n (or --model) on it from its
configuration (nothing is downloaded; 17-27 s an epoch on 2 cores), exports it as `yolo export format=onnx` does
(opset 17, no simplification), and runs each recipe: calibration on 64 training images,
channels-50's recovery on 256 of them (unlabelled: distilled from the original), evaluation on the
held-out images with their boxes (``label_boxes``). The data set and the trained model are kept in
--work, so a later run skips both.

    pip install ultralytics ultralytics-thop polars matplotlib opencv-python-headless --no-deps
    pip install torchvision==0.28.0 --no-deps           # (the one that goes with torch 2.13)
    pip install litert-torch                            # (--format tflite: Ultralytics' TFLite exporter)
    python benchmarks/yolo_trained.py                   # 60 epochs on 600 images, 160 x 160
    python benchmarks/yolo_trained.py --format tflite --latency 100

Per recipe: the result's size as a multiple of the original's; its mAP50-95 and mAP50 (COCO's,
host_tools/compress/truth.py; detections decoded as `yolo val` decodes them); the drop in points
of mAP50-95, which --max-drop guards; the share of its detections that pair with the original's
(predict's thresholds); and its p50 latency as a multiple of the original's (RUNS single-image
calls each, interleaved, 1 thread). Then `--auto --max-drop 1`'s choice. The first line after the
machine's is Ultralytics' own `yolo val` of the trained PyTorch model, as a check on edgefleet's
mAP of its export.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402
from yolo_models import crop, offline_ultralytics  # noqa: E402

RECIPES = ("int8-dynamic", "int8-weights", "int8-static", "fp16", "channels-50")
CLASSES = ("circle", "square", "triangle")
CALIBRATION, RECOVERY = 64, 256  # training images for calibration, and for channels-50's recovery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgefleet-benchmarks" / "yolo-shapes",
                        help="where the data set and the trained model are kept between runs")
    parser.add_argument("--size", type=int, default=160, help="image size (a multiple of 32)")
    parser.add_argument("--model", choices=("yolo11n", "yolov8n", "yolo26n"), default="yolo11n")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--images", type=int, nargs=2, default=(600, 100), metavar=("TRAIN", "HELDOUT"))
    parser.add_argument("--latency", type=int, default=200, metavar="RUNS", help="single-image calls per model")
    parser.add_argument("--format", choices=("onnx", "tflite"), default="onnx")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--no-auto", action="store_true", help="skip --auto --max-drop 1")
    args = parser.parse_args()
    offline_ultralytics("yolo_trained.py")
    import torch
    from torchvision_models import _import_torchvision

    _import_torchvision(torch)  # (before Ultralytics imports it: see torchvision_models.py)
    started = time.monotonic()
    print(machine_line())
    folder = args.work / f"{args.size}px-{args.images[0]}-{args.images[1]}"
    data = shapes(folder / "shapes", args.size, *args.images)
    weights = trained(data, folder / f"{args.model}-{args.epochs}", args.model, args.size, args.epochs)
    exported = export(weights, args.size, args.format)
    print(f"{args.model} trained {args.epochs} epochs on {args.images[0]} images of SHAPES, {args.size}x{args.size}; "
          f"Ultralytics' val of it: {validate(weights, data, args.size)}")
    measure(exported, data, args)
    print(f"\n({time.monotonic() - started:.0f} s in all)")


def shapes(root: Path, size: int, train: int, heldout: int) -> Path:
    """The data set in Ultralytics' layout under *root* (made once): its data.yaml."""
    import cv2
    from sklearn.datasets import load_sample_images

    config = root / "data.yaml"
    if config.is_file():
        return config
    rng, photos = np.random.default_rng(0), load_sample_images().images
    for split, count in (("train", train), ("val", heldout)):
        print(f"  drawing {count} {split} images", file=sys.stderr, flush=True)
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            image, boxes = drawn(rng, photos, size)
            cv2.imwrite(str(root / "images" / split / f"{i:04d}.png"), image[:, :, ::-1])
            (root / "labels" / split / f"{i:04d}.txt").write_text("".join(
                f"{c} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} "
                f"{(y2 - y1) / size:.6f}\n" for c, x1, y1, x2, y2 in boxes))
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASSES))
    config.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return config


def drawn(rng, photos, size: int) -> tuple[np.ndarray, list[tuple]]:
    """One image (RGB, uint8) and its boxes (class, x1, y1, x2, y2 in pixels)."""
    image = crop(rng, photos[int(rng.integers(len(photos)))], size, size).astype(np.float32) * 0.6
    y, x = np.mgrid[0:size, 0:size] + 0.5
    boxes = []
    for _ in range(int(rng.integers(1, 5))):
        kind, side = int(rng.integers(len(CLASSES))), float(rng.uniform(14, 56))
        cx, cy = rng.uniform(side / 2, size - side / 2, 2)
        if kind == 0:
            mask = (x - cx) ** 2 + (y - cy) ** 2 <= (side / 2) ** 2
        elif kind == 1:
            mask = (np.abs(x - cx) <= side / 2) & (np.abs(y - cy) <= side / 2)
        else:
            down = (y - (cy - side / 2)) / side  # (0 at the apex, 1 at the base)
            mask = (down >= 0) & (down <= 1) & (np.abs(x - cx) <= down * side / 2)
        image[mask] = rng.uniform(0, 255, 3)
        boxes.append((kind, cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8), boxes


def trained(data: Path, folder: Path, name: str, size: int, epochs: int) -> Path:
    """*name* (YOLO11n) trained on *data* from its configuration (once): its best weights."""
    import torch
    from ultralytics import YOLO

    weights = folder / "weights" / "best.pt"
    if weights.is_file():
        return weights

    print(f"  training {name} for {epochs} epochs", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    model, begun = YOLO(f"{name}.yaml"), time.monotonic()

    def said(trainer) -> None:
        done = trainer.epoch + 1
        if done > epochs:  # (the best weights' validation at the end calls it once more)
            return
        print(f"  epoch {done}/{epochs}: mAP50-95 {trainer.metrics.get('metrics/mAP50-95(B)', 0):.3f} "
              f"({(time.monotonic() - begun) / done:.0f} s an epoch)", file=sys.stderr, flush=True)

    model.add_callback("on_fit_epoch_end", said)
    model.train(data=str(data), epochs=epochs, imgsz=size, batch=32, workers=0, device="cpu", plots=False,
                amp=False, pretrained=False, project=str(folder.parent), name=folder.name, exist_ok=True, seed=0,
                deterministic=True)
    return weights


def export(weights: Path, size: int, model_format: str) -> Path:
    from ultralytics import YOLO

    options = {"opset": 17, "simplify": False} if model_format == "onnx" else {}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return Path(YOLO(str(weights)).export(format=model_format, imgsz=size, **options))


def validate(weights: Path, data: Path, size: int) -> str:
    from ultralytics import YOLO

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        box = YOLO(str(weights)).val(data=str(data), imgsz=size, batch=16, device="cpu", plots=False).box
    return f"mAP50-95 {box.map:.3f}, mAP50 {box.map50:.3f}"


def arrays(data: Path, split: str, count: int | None = None, channels_last: bool = False):
    """A split's images as the export takes them ([n, 3, H, W], or [n, H, W, 3]; RGB in [0, 1]) and
    their boxes as label_boxes rows (sample, class, x1, y1, x2, y2 in pixels)."""
    import cv2

    files = sorted((data.parent / "images" / split).glob("*.png"))[:count]
    images = np.stack([cv2.imread(str(f))[:, :, ::-1] for f in files]) / np.float32(255)
    images = images if channels_last else images.transpose(0, 3, 1, 2)
    size, rows = images.shape[2], []
    for i, f in enumerate(files):
        for line in (data.parent / "labels" / split / f"{f.stem}.txt").read_text().split("\n"):
            if line:
                c, cx, cy, w, h = map(float, line.split())
                rows.append((i, c, (cx - w / 2) * size, (cy - h / 2) * size, (cx + w / 2) * size, (cy + h / 2) * size))
    return np.ascontiguousarray(images, np.float32), np.array(rows)


def measure(exported: Path, data: Path, args) -> None:
    from host_tools.compress import Dataset, ModelFile, load_recipe, run_recipe
    from host_tools.compress.auto import search
    from host_tools.compress.truth import from_table

    model = ModelFile.open(exported)
    spec = model.load().inputs[0]
    feed, last = spec.name, spec.shape[-1] == 3  # (channels last: a TFLite export's [1, H, W, 3])
    images, rows = arrays(data, "val", channels_last=last)
    heldout = Dataset({feed: images}, from_table(rows, len(images), "held-out"), "held-out images")
    train_images, _ = arrays(data, "train", RECOVERY, channels_last=last)
    calib = Dataset({feed: train_images[:CALIBRATION]}, None, "training images")
    train = Dataset({feed: train_images}, None, "training images")
    print(f"{args.format}: {model.size_bytes / 1024:.0f} KiB; evaluation: {len(images)} held-out images, "
          f"{len(rows)} boxes; latency: {args.latency} single-image calls per model, interleaved, 1 thread")
    print(f"\n{'recipe':<24}{'×size':>7}{'mAP50-95':>10}{'mAP50':>8}{'drop':>7}{'paired':>8}{'×p50':>7}"
          f"{'seconds':>9}")
    for recipe in args.recipes:
        print(f"  {recipe}", file=sys.stderr, flush=True)
        begun = time.monotonic()
        report = run_recipe(model, load_recipe(recipe, args.format), calib=calib, train=train, eval_data=heldout,
                            latency_runs=args.latency)
        if recipe == args.recipes[0]:
            line(report, report.original, "original", 0.0)
        line(report, report.result if report.compressed else None, recipe, time.monotonic() - begun)
    if not args.no_auto:
        print("  --auto --max-drop 1", file=sys.stderr, flush=True)
        begun = time.monotonic()
        report = search(model, eval_data=heldout, max_drop=1, calib=calib, train=train, latency_runs=args.latency,
                        progress=lambda said: print(f"    {said}", file=sys.stderr, flush=True))
        line(report, report.chosen, f"--auto: {report.chosen.label if report.chosen else 'none'}",
             time.monotonic() - begun)


def line(report, m, label: str, seconds: float) -> None:
    from host_tools.compress.workflow import quality_drop

    if m is None:
        print(f"{label:<24}{'did not apply: ' + '; '.join(s.note for s in report.steps if s.note)[:90]}")
        return
    original, f = report.original, m.fidelity
    drop = quality_drop(original, m)
    print(f"{label:<24}{m.size_bytes / original.size_bytes:>7.2f}{f.accuracy:>10.3f}"
          f"{f.map50:>8.3f}{drop:>+7.1f}{f.agreement:>8.0%}"
          f"{m.latency.p50_ms / original.latency.p50_ms:>7.2f}{seconds:>9.0f}")


if __name__ == "__main__":
    main()
