"""Use the device's active model from an application, through the edgefleet agent.

    python examples/local_inference.py --socket /run/edgefleet/inference.sock

The agent keeps serving while it updates or rolls back the model; this loop never
notices, except that `describe()` names a new bundle afterwards.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from device_agent.local_api import InferenceClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default="/run/edgefleet/inference.sock")
    parser.add_argument("--count", type=int, default=5, help="How many requests to send.")
    args = parser.parse_args()

    with InferenceClient(args.socket) as model:
        info = model.describe()
        print(f"active model: {info['bundle']} on {info['runtime']}")
        (spec,) = info["inputs"]  # this example feeds single-input models
        shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]  # dynamic dims -> 1
        rng = np.random.default_rng(0)
        for i in range(args.count):
            x = rng.random(shape).astype(spec["dtype"])
            start = time.perf_counter()
            outputs = model.infer({spec["name"]: x})
            elapsed_ms = (time.perf_counter() - start) * 1e3
            summary = ", ".join(f"{name}: shape {list(v.shape)} argmax {int(v.argmax())}" for name, v in outputs.items())
            print(f"request {i + 1}: {summary} ({elapsed_ms:.2f} ms)")


if __name__ == "__main__":
    main()
