"""Calibration for static int8: ONNX Runtime's data reader and histogram calibrators, with the
entropy threshold search done in NumPy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Beyond this a float value is a stand-in for infinity (torch.export writes a causal mask with float32's
# lowest, -3.4e38), never an activation: no int8 scale can hold it, and a histogram of it overflows.
UNBOUNDED = 1e30

ENTROPY_BINS = 2048  # histogram bins for entropy calibration (TensorRT's, PyTorch's; quantize_static gives 128)


def calibrate_histograms(source: Path, cache: Path, config, feeds) -> None:
    """Entropy or percentile calibration by ONNX Runtime's own calibrator, its ranges written to
    *cache* for quantize_static to read, with our histogram collector (histograms). quantize_static
    would give the entropy calibrator 128 bins, which leaves it one threshold to choose, the whole
    range: it wrote the MinMax file on every reference model."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    entropy = config.method == "entropy"
    calibrator = create_calibrator(
        source, list(config.op_types) or sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),  # (quantize_static's)
        augmented_model_path=str(cache.parent / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy if entropy else CalibrationMethod.Percentile,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128} if entropy
        else {"percentile": config.percentile})
    calibrator.collector = histograms(calibrator)
    calibrator.collect_data(CalibrationReader(feeds))
    save_tensors_data(calibrator.compute_data(), cache)


def histograms(calibrator):
    """ONNX Runtime's histogram collector for *calibrator*, with three changes. Values ±inf, NaN and
    beyond UNBOUNDED are counted as 0: it stops on them otherwise, though the nodes around them stay
    float (quantize.unbounded_nodes) and their ranges are never used. A tensor's values over the batches
    reach it as one flat array: it stacks them, which stops where a tensor's size depends on the
    input (a detector's boxes after NonZero). And its entropy threshold search is entropy_threshold's."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    class Histograms(HistogramCollector):
        def collect(self, name_to_arr):
            flat = {name: np.concatenate([np.ravel(a) for a in arrays]) for name, arrays in name_to_arr.items()
                    if len(arrays)}
            return super().collect({name: [np.where(np.abs(a) < UNBOUNDED, a, np.zeros((), a.dtype))]
                                    for name, a in flat.items()})

        def get_entropy_threshold(self, histogram, num_quantized_bins):
            return entropy_threshold(histogram, num_quantized_bins)

    return Histograms(method=calibrator.method, symmetric=calibrator.symmetric, num_bins=calibrator.num_bins,
                      num_quantized_bins=calibrator.num_quantized_bins, percentile=calibrator.percentile,
                      scenario=calibrator.scenario)


def entropy_threshold(histogram, num_quantized_bins: int) -> tuple:
    """ONNX Runtime's entropy calibration (TensorRT's): of the windows of the histogram symmetric about
    its middle bin and at least *num_quantized_bins* wide, the one whose counts (the outliers clipped
    into its end bins) lose least, by KL divergence, when merged into *num_quantized_bins* bins and
    spread back; its edges, within the values seen. *histogram* is ORT's (counts, edges, lowest,
    highest). ORT's own loops over the merged bins in Python, ~1 s a tensor at 2,048 bins; this
    does them with NumPy and finds the same thresholds."""
    hist, edges, lowest, highest = histogram[0], histogram[1], histogram[2], histogram[3]
    zero = hist.size // 2
    below = np.concatenate([[0], np.cumsum(hist)])  # below[k]: the count in the bins before k
    best, chosen = np.float32(np.inf), num_quantized_bins // 2
    for i in range(num_quantized_bins // 2, zero + 1):  # the window of bins zero - i .. zero + i
        start, end = zero - i, min(zero + i + 1, hist.size)
        window = hist[start:end]
        p = window.astype(np.int64)
        p[0] += below[start]
        p[-1] += below[-1] - below[end]
        merged = window.size // num_quantized_bins
        body = num_quantized_bins * merged
        quantized = window[:body].reshape(num_quantized_bins, merged).sum(axis=1).astype(np.int64)
        quantized[-1] += window[body:].sum()
        nonzero = (p[:body] != 0).reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, np.int64)  # each merged bin spread over its nonzero bins, in whole counts as ORT
        q[:body] = np.repeat(quantized // np.maximum(nonzero, 1) * (nonzero != 0), merged)
        ps, qs = _smoothed(p), _smoothed(q)
        divergence = np.float32(np.inf) if ps is None or qs is None else _divergence(ps, qs)
        if divergence < best:
            best, chosen = divergence, i
    low, high = edges[zero - chosen], edges[min(zero + chosen + 1, hist.size)]
    return (lowest if low < lowest else low, highest if high > highest else high)


def _smoothed(p: np.ndarray, eps: float = 0.0001) -> np.ndarray | None:
    """ORT's smooth_distribution: zeros become eps, taken off the other bins (None: all zero)."""
    zeros = p == 0
    count = int(zeros.sum())
    if count == p.size:
        return None
    return p.astype(np.float32) + np.where(zeros, np.float32(eps), np.float32(-eps * count / (p.size - count)))


def _divergence(p: np.ndarray, q: np.ndarray) -> np.float32:
    """KL(p || q) of the two normalised, as ORT's entropy() (both smoothed: no zeros)."""
    p, q = p / p.sum(), q / q.sum()
    return np.float32((p * np.log(p / q)).sum())


class CalibrationReader:
    """ORT's CalibrationDataReader: one batch of feeds per call, then None. All batches have one
    size (ORT's histogram calibrators stack them), the largest divisor of the count up to 32."""

    def __init__(self, feeds) -> None:
        size = max(d for d in range(1, 33) if len(feeds) % d == 0)
        self._batches = iter(list(feeds.batches(size)))

    def get_next(self):
        return next(self._batches, None)

    def rewind(self) -> None:  # ORT calls this between calibration passes in some versions
        pass
