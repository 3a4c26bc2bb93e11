import numpy as np
import pytest

from device_agent.telemetry.histogram import LatencyHistogram


def test_percentiles_match_exact_ones_within_bucket_resolution():
    rng = np.random.default_rng(1)
    values = rng.lognormal(mean=np.log(2e-3), sigma=0.6, size=20_000)
    hist = LatencyHistogram()
    for v in values:
        hist.record(float(v))
    snap = hist.snapshot_and_reset()
    assert snap.count == len(values)
    for q in (50, 90, 95, 99):
        exact = float(np.percentile(values, q))
        assert snap.percentile(q) == pytest.approx(exact, rel=0.03), q
    assert snap.max_s == pytest.approx(values.max())


def test_snapshot_resets_and_an_empty_interval_reports_nothing():
    hist = LatencyHistogram()
    hist.record(0.01)
    hist.snapshot_and_reset()
    empty = hist.snapshot_and_reset()
    assert empty.count == 0 and empty.percentile(50) is None and empty.mean_s is None


def test_extremes_land_in_the_end_buckets_without_error():
    hist = LatencyHistogram()
    hist.record(0.0)
    hist.record(1e4)
    snap = hist.snapshot_and_reset()
    assert snap.count == 2
    assert snap.percentile(100) == 1e4  # the overflow bucket reports the real max, not its lower bound
    assert snap.percentile(50) == pytest.approx(1e-6, rel=0.03)
