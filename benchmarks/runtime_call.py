"""What edgefleet's runtime layer adds to a single-sample call: `ModelRuntime.run` against the bare
runtime doing the same work (ONNX Runtime's session run; the TFLite interpreter's set_tensor, invoke
and get_tensor), on the reference models, in one process.

    python benchmarks/runtime_call.py            # ~20 s
    python benchmarks/runtime_call.py --rounds 5 # quicker, noisier

Both paths of a model alternate in rounds of 300 calls on the same input (1 thread), so a noisy
neighbour hits both alike; the table gives each path's p50 and p90 and the wrapper's cost as the
difference of the p50s. Every model the compression benchmark measures goes through this layer, and
so does every call on a device; on a model of 10–20 µs a call, a few µs here move its speed-ups.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_line  # noqa: E402

from device_agent.runtime import RuntimeOptions, load_runtime  # noqa: E402

MODELS = ("digits_cnn.onnx", "digits_cnn.tflite", "digits_transformer.onnx", "digits_transformer.tflite")


def bare_call(path: Path, x: np.ndarray):
    """The same call made straight on the runtime, set up as the runtime layer sets it up."""
    if path.suffix == ".onnx":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds, names = {session.get_inputs()[0].name: x}, [o.name for o in session.get_outputs()]
        return lambda: session.run(names, feeds)
    from device_agent.runtime.tflite import find_interpreter
    interpreter = find_interpreter()[0](model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    outputs = [d["index"] for d in interpreter.get_output_details()]

    def call():
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        return [interpreter.get_tensor(i) for i in outputs]
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300, help="calls per path per round")
    args = parser.parse_args()
    print(machine_line())
    print(f"single-sample calls, 1 thread, {args.rounds} interleaved rounds x {args.calls} calls per path")
    print(f"{'model':26} {'path':16} {'p50 µs':>8} {'p90 µs':>8} {'+p50 µs':>8}")
    for name in MODELS:
        path = REPO / "models" / name
        runtime = load_runtime("tflite" if path.suffix == ".tflite" else "onnxruntime", path,
                               RuntimeOptions(threads=1))
        (spec,) = runtime.inputs
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]  # one sample on a free batch axis
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        feeds = {spec.name: x}
        paths = {"bare runtime": bare_call(path, x), "ModelRuntime.run": lambda: runtime.run(feeds)}
        times: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(args.rounds):
            for label, call in paths.items():
                for _ in range(20):
                    call()
                bucket = times[label]
                for _ in range(args.calls):
                    start = time.perf_counter()
                    call()
                    bucket.append((time.perf_counter() - start) * 1e6)
        bare = float(np.percentile(times["bare runtime"], 50))
        for label, bucket in times.items():
            p50, p90 = np.percentile(bucket, 50), np.percentile(bucket, 90)
            print(f"{name:26} {label:16} {p50:8.2f} {p90:8.2f} {p50 - bare:+8.2f}")


if __name__ == "__main__":
    main()
