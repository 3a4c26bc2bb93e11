"""The compression recipes on scikit-learn models, exported as their users export them (skl2onnx).

    pip install skl2onnx            # not an edgefleet dependency; only this script needs it
    python benchmarks/sklearn_models.py

Each model is trained on scikit-learn's own digits data set (8 x 8 images as 64 features; it ships
with the package, nothing is downloaded) on the first 1,200 samples, exported with
``skl2onnx.to_onnx`` at its defaults (a classifier's probabilities as a ZipMap, a sequence of
{class: probability} maps), and given each recipe with the first 200 samples as calibration data
and the other 597 as evaluation data. A cell is the result's size / accuracy / p50 latency, size
and latency as multiples of the original's (100 single-sample runs each, interleaved, 1 thread), or
why no pass applied.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line  # noqa: E402

RECIPES = ("int8-dynamic", "int8-static", "int8-weights", "fp16")


def estimators() -> dict:
    from sklearn.decomposition import PCA
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        "scaler+mlp": make_pipeline(StandardScaler(), MLPClassifier((256, 128), max_iter=300, random_state=0)),
        "scaler+pca+mlp": make_pipeline(StandardScaler(), PCA(32), MLPClassifier((128,), max_iter=300, random_state=0)),
        "scaler+logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "scaler+svc": make_pipeline(StandardScaler(), SVC(probability=True, random_state=0)),
        "forest": RandomForestClassifier(n_estimators=50, max_depth=10, random_state=0),
        "gboost": GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0),
    }


def cell(model, recipe: str, calib, heldout) -> str:
    from host_tools.compress import load_recipe, run_recipe

    report = run_recipe(model, load_recipe(recipe, "onnx"), calib=calib, eval_data=heldout, latency_runs=100)
    if not report.compressed:
        return "— " + next((s.note for s in report.steps if s.status != "ok"), "")
    result, original = report.result, report.original
    return (f"{result.size_bytes / original.size_bytes:.2f}x/{result.fidelity.accuracy * 100:.1f}%/"
            f"{result.latency.p50_ms / original.latency.p50_ms:.2f}x")


def main() -> None:
    try:
        import sklearn
        from skl2onnx import to_onnx
    except ImportError as exc:
        sys.exit(f"this script needs scikit-learn and skl2onnx ({exc.name} is missing): pip install skl2onnx")
    from sklearn.datasets import load_digits

    from host_tools.compress import Dataset, ModelFile

    warnings.filterwarnings("ignore")
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    calib, heldout = Dataset({"X": x[:200]}, None, "calib"), Dataset({"X": x[1200:]}, y[1200:], "heldout")
    print(machine_line())
    print(f"scikit-learn {sklearn.__version__}, skl2onnx {sys.modules['skl2onnx'].__version__}")
    print("cells: size/accuracy/p50 latency, size and latency as multiples of the original's")
    print(f"{'model':<15} {'KiB':>5} {'accuracy':>8}  " + "  ".join(f"{r:>18}" for r in RECIPES))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgefleet-sklearn-") as tmp:
        for name, estimator in estimators().items():
            print(f"  {name}", file=sys.stderr, flush=True)
            estimator.fit(x[:1200], y[:1200])
            path = Path(tmp) / f"{name.replace('+', '_')}.onnx"
            path.write_bytes(to_onnx(estimator, x[:1]).SerializeToString())
            model = ModelFile.open(path)
            cells = [cell(model, recipe, calib, heldout) for recipe in RECIPES]
            accuracy = float((estimator.predict(x[1200:]) == y[1200:]).mean())
            print(f"{name:<15} {path.stat().st_size / 1024:>5.0f} {accuracy * 100:>7.1f}%  "
                  + "  ".join(f"{c:>18}" for c in cells if not c.startswith("—")), flush=True)
            for recipe, c in zip(RECIPES, cells):
                if c.startswith("—"):
                    print(f"{'':<15}   {recipe}: {c[2:][:110]}")
    print(f"\n({time.monotonic() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
