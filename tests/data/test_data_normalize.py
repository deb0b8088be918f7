"""Robust normalisation statistics against numpy percentiles, lazy subsampling, JSON round trip."""
from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_affmae.data import NormalizationStats, apply_normalization, compute_stats


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_stats_equal_numpy_on_small_arrays(dtype):
    rng = np.random.default_rng(0)
    data = (rng.gamma(2.0, 30.0, size=(5, 60, 90)) * (100 if dtype == np.uint16 else 1)).astype(dtype)
    stats = compute_stats(data, 0.5, 99.5)
    lo, hi = np.percentile(data.astype(np.float64), [0.5, 99.5])
    assert stats.low == pytest.approx(lo) and stats.high == pytest.approx(hi)
    assert stats.mean == pytest.approx(data.astype(np.float64).mean())
    assert stats.std == pytest.approx(data.astype(np.float64).std())
    assert stats.dtype == np.dtype(dtype).name and stats.n_samples == data.size


def test_lazy_subsample_close_to_full_percentiles(tmp_path):
    rng = np.random.default_rng(1)
    full = rng.normal(30000, 4000, size=(24, 300, 400)).clip(0, 65535).astype(np.uint16)
    store = zarr.open_array(tmp_path / "big.zarr", mode="w", shape=full.shape, chunks=(1, 150, 200), dtype="uint16")
    store[...] = full
    lazy = zarr.open_array(tmp_path / "big.zarr", mode="r")
    stats = compute_stats(lazy, 1.0, 99.0, max_samples=200_000, seed=0)
    lo, hi = np.percentile(full, [1.0, 99.0])
    assert 100_000 < stats.n_samples <= 200_000  # bounded: far below the 2.9 M pixels
    assert abs(stats.low - lo) < 0.02 * (hi - lo)
    assert abs(stats.high - hi) < 0.02 * (hi - lo)
    dstats = compute_stats(da.from_zarr(lazy), 1.0, 99.0, max_samples=200_000, seed=0)
    assert dstats == stats  # same positions, same pixels, whatever the array type


def test_dict_json_round_trip():
    stats = compute_stats(np.arange(1000, dtype=np.uint16).reshape(20, 50))
    again = NormalizationStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    with pytest.raises(ValueError, match="unknown keys"):
        NormalizationStats.from_dict({**stats.to_dict(), "evil": 1})
    with pytest.raises(ValueError, match="missing"):
        NormalizationStats.from_dict({"low": 0.0})
    with pytest.raises(ValueError, match="finite"):
        NormalizationStats.from_dict({**stats.to_dict(), "high": float("nan")})


def test_apply_percentile_and_zscore():
    rng = np.random.default_rng(2)
    data = rng.integers(0, 4096, size=(40, 50)).astype(np.uint16)
    stats = compute_stats(data, 2.0, 98.0)
    out = apply_normalization(data, stats)
    assert out.dtype == np.float32
    expected = (data.astype(np.float64) - stats.low) / (stats.high - stats.low)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.mean((out >= 0) & (out <= 1)) >= 0.95
    clipped = stats.apply(data, clip=True)
    assert clipped.min() >= 0 and clipped.max() <= 1
    z = apply_normalization(data, stats, mode="zscore")
    assert abs(float(z.mean())) < 1e-3 and float(z.std()) == pytest.approx(1.0, rel=1e-3)


def test_constant_image_does_not_divide_by_zero():
    data = np.full((10, 10), 7, np.uint8)
    stats = compute_stats(data)
    assert np.isfinite(apply_normalization(data, stats)).all()
    assert np.isfinite(apply_normalization(data, stats, mode="zscore")).all()


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        compute_stats(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="percentile"):
        compute_stats(np.zeros((4, 4), np.uint8), 50, 10)
    with pytest.raises(ValueError, match="2D"):
        compute_stats(np.zeros((2, 2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="mode"):
        apply_normalization(np.zeros((4, 4)), compute_stats(np.zeros((4, 4), np.uint8)), mode="minmax")
