"""Tiled inference: exact blending (checked against a per-pixel reference), bounded reads, tile-size
invariance of a real model, streaming into zarr, TIFF input."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_affmae.engine import CancelToken, JobCancelled, SegmentConfig, load_package, segment
from napari_affmae.engine.segment import TiledPredictor, cosine_window


def _pointwise(x: torch.Tensor) -> torch.Tensor:
    """A 'model' whose logits depend on each pixel only: [B, 1, H, W] -> [B, 3, H, W]."""
    return torch.cat([x, 1.0 - x, 0.5 * x * x], dim=1)


def _reference(plane: np.ndarray) -> np.ndarray:
    x = plane.astype(np.float32) / 255.0
    return np.stack([x, 1.0 - x, 0.5 * x * x])


class RecordingArray:
    """Array-like that serves reads from a numpy array and records the rows of every read."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype, self.row_reads = data, data.shape, data.dtype, []

    def __getitem__(self, index):
        rows = index[-2]
        self.row_reads.append(rows.stop - rows.start)
        return self.data[index]


def _run(array, tile, overlap, batch=3, row_range=None):
    predictor = TiledPredictor(_pointwise, 3, tile, overlap, batch, lambda c: c.astype(np.float32) / 255.0,
                               torch.device("cpu"))
    height, width = array.shape[-2:]
    depth = array.shape[0] if len(array.shape) == 3 else 1
    out = np.full((depth, 3, height, width), np.nan, np.float32)
    for z in range(depth):
        def write(r0, r1, logits, z=z):
            assert np.isnan(out[z, :, r0:r1]).all(), "rows written twice"
            out[z, :, r0:r1] = logits
        predictor.run_slice(array, z, write, row_range=row_range)
    return out


@pytest.mark.parametrize("shape", [(70, 45), (3, 150, 133), (200, 64)])
@pytest.mark.parametrize("tile,overlap", [((32, 32), 0.0), ((64, 48), 0.25), ((40, 96), 0.5)])
def test_blending_reproduces_a_pointwise_model_exactly(shape, tile, overlap):
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    out = _run(image, tile, overlap)
    planes = image if image.ndim == 3 else image[None]
    for z, plane in enumerate(planes):
        np.testing.assert_allclose(out[z], _reference(plane), rtol=0, atol=2e-6)


def test_row_range_gives_the_same_rows_and_reads_only_strips():
    image = np.random.default_rng(1).integers(0, 256, size=(300, 90), dtype=np.uint8)
    lazy = RecordingArray(image)
    full = _run(lazy, (64, 64), 0.25)
    assert max(lazy.row_reads) <= 64, "the slice must be read strip by strip, never whole"
    part = _run(image, (64, 64), 0.25, row_range=(100, 180))
    np.testing.assert_array_equal(part[:, :, 100:180], full[:, :, 100:180])
    assert np.isnan(part[:, :, :100]).all() and np.isnan(part[:, :, 180:]).all()


@pytest.mark.parametrize("tile,overlap", [((32, 32), 0.0), ((72, 88), 0.5), ((64, 64), 0.25)])
@pytest.mark.parametrize("size", [(20, 30), (100, 257)])
def test_tile_layout_is_patch_aligned_and_covers_the_image(tile, overlap, size):
    predictor = TiledPredictor(_pointwise, 3, tile, overlap, 1, lambda c: c, torch.device("cpu"))
    margin_y, margin_x, ys, xs, canvas_h, canvas_w = predictor.layout(*size)
    assert margin_y % 8 == 0 and margin_x % 8 == 0 and all(v % 8 == 0 for v in ys + xs)
    assert canvas_h >= size[0] + 2 * margin_y and canvas_w >= size[1] + 2 * margin_x
    assert ys[-1] + tile[0] == canvas_h and xs[-1] + tile[1] == canvas_w
    assert all(b - a <= tile[0] for a, b in zip(ys, ys[1:]))  # no gaps between tiles
    window = cosine_window(16, 24)
    assert window.shape == (16, 24) and window.min() > 0
    assert window[8, 12] == window.max()


def test_real_model_is_tile_size_invariant_and_streams_into_zarr(trained, em_stack, tmp_path):
    image, _ = em_stack
    package = load_package(trained["segmentation"])
    small = segment(package, image, SegmentConfig(tile_size=(64, 64), overlap=0.5, output="probabilities"))
    large = segment(package, image, SegmentConfig(tile_size=(96, 112), overlap=0.5, output="probabilities"))
    assert small.shape == (3, *image.shape) and small.dtype == np.float32
    np.testing.assert_allclose(small.sum(0), 1.0, atol=1e-5)
    agreement = (small.argmax(0) == large.argmax(0)).mean()
    assert agreement > 0.9, agreement
    assert np.abs(small - large).mean() < 0.02
    # labels streamed into an on-disk zarr array equal the in-memory result
    store = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=image.shape, chunks=(1, 32, 32),
                            dtype="uint8")
    events = []
    returned = segment(package, image, SegmentConfig(tile_size=(64, 64), batch_size=2), progress=events.append,
                       out=store)
    assert returned is store
    in_memory = segment(package, image, SegmentConfig(tile_size=(64, 64), batch_size=2))
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(tmp_path / "out.zarr"))[...]), in_memory)
    assert set(np.unique(in_memory)) <= {1, 2, 3}  # sparse-label model: classes 1..K
    assert events[-1].step == events[-1].total and all(e.job == "segment" for e in events)


def test_tiff_input_and_cancel(trained, em_stack, tmp_path):
    image, _ = em_stack
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, image, imagej=True, metadata={"axes": "ZYX"})
    from_file = segment(trained["segmentation"], path, SegmentConfig(tile_size=(64, 64), slices=[1, 3]))
    from_array = segment(trained["segmentation"], image, SegmentConfig(tile_size=(64, 64), slices=[1, 3]))
    np.testing.assert_array_equal(from_file, from_array)
    assert not from_file[0].any() and from_file[1].all()
    token = CancelToken()
    token.cancel()
    with pytest.raises(JobCancelled):
        segment(trained["segmentation"], image, SegmentConfig(tile_size=(64, 64)), cancel=token)
    with pytest.raises(ValueError, match="fine-tune it first|segmentation package"):
        segment(trained["pretrained"], image)


def test_slice_normalization_follows_brightness_drift_along_z(trained, em_stack):
    image, _ = em_stack
    drifted = image.astype(np.float32)
    drifted[2] = drifted[2] * 0.6 + 70.0  # one section brighter and flatter, as ssTEM sections can be
    config = SegmentConfig(tile_size=(64, 64), output="probabilities", normalization="slice")
    reference = segment(trained["segmentation"], image, config)
    per_slice = segment(trained["segmentation"], drifted, config)
    np.testing.assert_allclose(per_slice, reference, atol=1e-4)  # each slice by its own percentiles
    package_stats = segment(trained["segmentation"], drifted, SegmentConfig(tile_size=(64, 64),
                                                                            output="probabilities"))
    assert np.abs(package_stats[:, 2] - reference[:, 2]).max() > 0.05  # the package's statistics: drift remains
    np.testing.assert_allclose(package_stats[:, 0], segment(trained["segmentation"], image, SegmentConfig(
        tile_size=(64, 64), output="probabilities"))[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="normalization must be one of"):
        SegmentConfig(normalization="z")
