"""No-grad AFFMAE segmentation in chunks and bands: the maths of the whole-tensor path, in bounded memory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_affmae.bench.memory import measure_peak
from napari_affmae.models import create_model
from napari_affmae.models import affmae_inference as inference
from napari_affmae.models.layers import NeighborhoodAttention


def _seg(dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    seg = create_model("affmae_tiny", task="segmentation", num_classes=3, **overrides).to(dtype).eval()
    if seg.refine is not None:  # conv2 starts at zero: give the refinement something to add
        torch.nn.init.normal_(seg.refine.conv2.weight, std=0.1)
        torch.nn.init.normal_(seg.refine.conv2.bias, std=0.1)
    return seg


def _whole(seg, x: torch.Tensor) -> torch.Tensor:
    """The reference: the whole-tensor forward, which is the training path (autograd on)."""
    with torch.enable_grad():
        return seg(x).detach()


@pytest.mark.parametrize("overrides", [{}, {"neighborhood": "cluster"}, {"locality_prior": True},
                                       {"seg_head": "patch"}, {"fusion_width": 4}, {"fusion_depth": 2},
                                       {"decoder_nearest_clusters": 2, "seg_head": "patch", "refine": False}])
@pytest.mark.parametrize("chunk_bytes", [1, 60_000, 10**9])  # one cluster / a few / everything per chunk
def test_chunked_inference_equals_the_whole_tensor_forward(overrides, chunk_bytes):
    seg = _seg(**overrides)
    x = torch.randn(2, 1, 136, 56, dtype=torch.float64)  # not square, not a power of two; 17 lattice rows
    want = _whole(seg, x)
    seg.inference_chunk_bytes = chunk_bytes
    with torch.no_grad():
        got = seg(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_small_budgets_take_many_chunks(monkeypatch):
    seg = _seg()
    x = torch.randn(1, 1, 48, 64, dtype=torch.float64)
    calls = []
    attend = NeighborhoodAttention.attend

    def counted(self, q, *args):
        calls.append(q.shape[1])  # queries per call
        return attend(self, q, *args)

    monkeypatch.setattr(NeighborhoodAttention, "attend", counted)
    seg.inference_chunk_bytes = 10**9  # one chunk per attention
    with torch.no_grad():
        seg(x)
    whole = len(calls)
    calls.clear()
    seg.inference_chunk_bytes = 1
    with torch.no_grad():
        seg(x)
    assert max(calls) == 8 and len(calls) > 4 * whole  # one cluster of queries per call


def test_inference_mode_takes_the_chunked_path_and_training_does_not(monkeypatch):
    seg = _seg(torch.float32)
    x = torch.randn(1, 1, 32, 32)
    used = []
    chunked = inference.segment_in_chunks
    monkeypatch.setattr("napari_affmae.models.affmae.segment_in_chunks",
                        lambda *a: used.append(True) or chunked(*a))
    with torch.inference_mode():
        seg(x)
    assert used == [True]
    seg(x).sum().backward()  # training: whole tensors, gradients as before
    assert used == [True] and seg.fusion.s1[0].weight.grad is not None
    seg.inference_chunk_bytes = None
    with torch.no_grad():
        seg(x)
    assert used == [True]
    with pytest.raises(ValueError, match="no_grad"):
        inference.segment_in_chunks(seg, x)


@pytest.mark.parametrize("rows", [1, 3, 8, 100])
def test_stem_rows_and_bands_equal_the_whole_stem_and_refinement(rows):
    seg = _seg(seg_head="patch")
    x = torch.randn(2, 1, 40, 24, dtype=torch.float64)
    stem = seg.encoder.stem
    with torch.no_grad():
        tokens, pos, (first, _) = seg.encoder.embed(x, None)
        got_tokens, got_pos = inference.embed_in_bands(seg.encoder, x, rows * 4 * 2 * 24 * 12 * 8)
        torch.testing.assert_close(got_tokens, tokens, rtol=0, atol=1e-12)
        assert torch.equal(got_pos, pos)
        for level, (start, stop) in [(1, (0, 20)), (1, (7, 13)), (2, (3, 10)), (3, (4, 5))]:
            whole = stem_level(stem, x, level)
            torch.testing.assert_close(inference.stem_rows(stem, x, level, start, stop), whole[:, :, start:stop],
                                       rtol=0, atol=1e-12)
        logits = torch.randn(2, 3, 40, 24, dtype=torch.float64)
        want = seg.refine(logits, x, first)
        torch.testing.assert_close(inference.refine_in_bands(seg.refine, logits, x, first, rows), want,
                                   rtol=1e-12, atol=1e-12)
        up = F.interpolate(first, size=(40, 24), mode="bilinear", align_corners=False)
        for start, stop in [(0, 1), (0, 40), (5, 6), (17, 33), (39, 40)]:
            assert torch.equal(inference.upsample_rows(first, start, stop, (40, 24)), up[:, :, start:stop])


def stem_level(stem, x: torch.Tensor, level: int) -> torch.Tensor:
    """Level 1-3 map of the unmasked stem, computed whole (the reference of `stem_rows`)."""
    for i in range(level):
        x = stem.norms[i](stem.convs[i](x))
        x = F.gelu(x) if i < 2 else x
    return x


def test_chunking_bounds_the_peak_memory():
    """Peak memory added by a no-grad 256 x 192 forward (`bench.memory`): the chunked path needs well under half
    of what the whole-tensor path needs (about 25 vs 120 MiB on the CPU of the benchmark page)."""
    seg = _seg(torch.float32)
    x = torch.randn(1, 1, 256, 192)

    def peak(chunk_bytes):
        seg.inference_chunk_bytes = chunk_bytes
        with torch.no_grad():
            seg(x)  # warm-up
            return min(measure_peak(lambda: seg(x), torch.device("cpu"))[1].bytes for _ in range(2))

    whole, chunked = peak(None), peak(2**20)
    assert chunked * 2 < whole, (chunked / 2**20, whole / 2**20)
