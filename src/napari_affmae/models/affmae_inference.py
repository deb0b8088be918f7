"""Memory-bounded no-grad forward of `AFFMAESegmentation`: same maths, nothing per pixel or per neighbour whole.

The whole-tensor forward (the training path) holds, at a 1024^2 tile, the head's full-resolution maps
(the fusion head's 48-channel concatenation and 16-channel maps; the patch head's refinement maps), the stem's
half-resolution maps, every decoder layer's query features and the per-neighbour biases and
relative-position features of all tokens at once. In inference nothing needs to stay for a backward, so
every part runs in pieces whose temporaries fit one byte budget (``chunk_bytes``):

* the stem in bands of lattice rows: each conv level computes only the rows the next level reads (a
  one-row halo per stride-2 3x3 conv, zero padding only at the image border), written into the token
  array; its first-level map is not kept but recomputed for each refinement band;
* encoder blocks, merges and decoder sub-layers go through their tokens / queries in chunks
  (``chunk_bytes`` of `AFFMAEEncoder.forward_tokens` and `AFFMAEDecoder.forward`); the decoder keeps
  only its last layer;
* the fusion head (`affmae_fusion`) runs its coarse steps on bands of lattice rows, each with its reach of
  real neighbouring rows and the stem maps it reads recomputed for the band, and its full-resolution
  step on strips of pixel rows;
* the patch head writes its logits band by band of lattice rows into one preallocated map;
* the patch head's refinement runs in bands of image rows (at least `MIN_REFINE_ROWS`) with a two-row
  halo (two 3x3 convs), the bilinear upsampling of the stem map taken from the band's source rows with a one-row margin.

Every output value sees the same inputs as in the whole-tensor computation (tested in float64).
Shapes: x ``[B, 1, H, W]``, lattice ``h = H/p``, ``w = W/p``, K classes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .affmae_fusion import fuse_in_bands
from .common import PATCH_SIZE, lattice_positions, unpatchify
from .layers import INFERENCE_CHUNK_BYTES

#: Fewest image rows per refinement band: each band recomputes two rows of the first conv, at most 6 %.
MIN_REFINE_ROWS = 32
#: Fewest lattice rows per fusion band, in halos: the coarse steps run on at most (2 + 2) / 2 = 2x their rows.
MIN_FUSION_ROWS = 2
#: Fewest pixel rows per full-resolution strip of the fusion head: it runs on at most (16 + 8) / 16 = 1.5x.
MIN_STRIP_ROWS = 16


def band_rows(budget: int, row_bytes: int, multiple: int = 1) -> int:
    """Rows per band so that one band's largest map (``row_bytes`` per row) fits ``budget``; a multiple of
    ``multiple``, at least one multiple."""
    rows = max(1, budget // max(1, row_bytes))
    return max(multiple, rows // multiple * multiple)


def stem_rows(stem: nn.Module, x: torch.Tensor, level: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of level ``level`` (0: the image; 1-3: after conv ``level``, its norm and, for
    levels 1-2, GELU) of an unmasked `MaskedConvStem` on x ``[B, 1, H, W]`` -> ``[B, C_level, stop - start, W_level]``.

    A stride-2 3x3 conv's output row i reads input rows 2i-1 .. 2i+1, so the rows below are computed
    recursively for ``[2 start - 1, 2 stop)``; the zero row above the image is the conv's own padding."""
    if level == 0:
        return x[:, :, start:stop]
    lo = 2 * start - 1
    src = stem_rows(stem, x, level - 1, max(0, lo), 2 * stop)
    if lo < 0:
        src = F.pad(src, (0, 0, 1, 0))  # the top image border: the whole conv's zero padding
    conv = stem.convs[level - 1]
    out = stem.norms[level - 1](F.conv2d(src, conv.weight, conv.bias, stride=2, padding=(0, 1)))
    return F.gelu(out) if level < 3 else out


def embed_in_bands(encoder: nn.Module, x: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``encoder.embed(x, None)[:2]`` band by band: tokens ``[B, h*w, E]`` (row-major), positions ``[B, h*w, 2]``."""
    b, _, height, width = x.shape
    h, w = height // PATCH_SIZE, width // PATCH_SIZE
    first_channels = encoder.stem.convs[0].out_channels  # the widest map: level 1, 4 rows per lattice row
    rows = band_rows(budget, 4 * b * first_channels * (width // 2) * x.element_size())
    tokens = None
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        part = stem_rows(encoder.stem, x, 3, r0, r1).flatten(2).transpose(1, 2)  # [B, (r1 - r0) w, E]
        if tokens is None:
            tokens = part.new_empty(b, h * w, part.shape[-1])
        tokens[:, r0 * w:r1 * w] = part
    return tokens, lattice_positions(h, w, device=x.device).expand(b, -1, -1)


def head_in_bands(head: nn.Module, feats: torch.Tensor, h: int, w: int, patch: int, rows: int) -> torch.Tensor:
    """Per-query head on feats ``[B, h*w, D]`` (row-major cells) -> logits ``[B, K, h*p, w*p]``, ``rows`` lattice
    rows at a time into one preallocated map."""
    out = None
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        part = unpatchify(head(feats[:, r0 * w:r1 * w]), r1 - r0, w, patch)  # [B, K, (r1 - r0) p, W]
        if out is None:
            out = part.new_empty(part.shape[0], part.shape[1], h * patch, w * patch)
        out[:, :, r0 * patch:r1 * patch] = part
    return out


def upsample_rows(first: torch.Tensor, start: int, stop: int, size: tuple[int, int]) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``F.interpolate(first, size, bilinear, align_corners=False)`` for a 2x upsampling.

    first ``[B, C, H/2, W/2]`` -> ``[B, C, stop - start, W]``. Interpolates only the source rows these
    output rows read, plus one row of margin so that no border clamping happens inside the image."""
    s0, s1 = upsample_source(start, stop, first.shape[-2])
    return upsample_band(first[:, :, s0:s1], s0, start, stop, size)


def upsample_source(start: int, stop: int, src_rows: int) -> tuple[int, int]:
    """Source rows ``[s0, s1)`` that `upsample_band` needs for output rows ``[start, stop)``."""
    return max(0, start // 2 - 1), min(src_rows, (stop + 1) // 2 + 1)


def upsample_band(src: torch.Tensor, s0: int, start: int, stop: int, size: tuple[int, int]) -> torch.Tensor:
    """Output rows ``[start, stop)`` of a 2x bilinear upsampling to ``size`` from source rows ``src``
    ``[B, C, s1 - s0, W/2]`` (rows ``[s0, s1)`` of `upsample_source`)."""
    if size[1] != 2 * src.shape[-1]:
        raise ValueError(f"upsample_band needs an exact 2x upsampling; got width {src.shape[-1]} -> {size[1]}")
    up = F.interpolate(src, size=(2 * src.shape[-2], size[1]), mode="bilinear", align_corners=False)
    return up[:, :, start - 2 * s0:stop - 2 * s0]


def refine_in_bands(refine: nn.Module, logits: torch.Tensor, x: torch.Tensor, first, rows: int) -> torch.Tensor:
    """``refine(logits, x, first)`` (`Refinement`) computed ``rows`` image rows at a time -> ``[B, K, H, W]``.

    logits ``[B, K, H, W]``, x ``[B, 1, H, W]``; first: the stem's first-level map ``[B, C, H/2, W/2]``, or a
    callable ``first(s0, s1)`` returning its rows ``[s0, s1)``. A band of output rows ``[r0, r1)`` reads the
    hidden rows ``[r0 - 1, r1 + 1)`` and they the input rows ``[r0 - 2, r1 + 2)``: only the first conv repeats
    two rows per band. Rows outside the image are the whole convolutions' zero padding."""
    height = x.shape[-2]
    rows_of = first if callable(first) else (lambda s0, s1: first[:, :, s0:s1])
    conv1, conv2 = refine.conv1, refine.conv2
    out = torch.empty_like(logits)
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        ha, hb = max(0, r0 - 1), min(height, r1 + 1)  # hidden rows inside the image
        ia, ib = max(0, ha - 1), min(height, hb + 1)  # input rows inside the image
        s0, s1 = upsample_source(ia, ib, height // 2)
        up = upsample_band(rows_of(s0, s1), s0, ia, ib, x.shape[-2:])  # [B, C, ib - ia, W]
        band = F.pad(torch.cat([logits[:, :, ia:ib], up, x[:, :, ia:ib]], dim=1), (0, 0, ia - ha + 1, hb + 1 - ib))
        del up
        hidden = F.gelu(F.conv2d(band, conv1.weight, conv1.bias, padding=(0, 1)))  # rows [ha, hb)
        del band
        hidden = F.pad(hidden, (0, 0, ha - r0 + 1, r1 + 1 - hb))  # zero rows above / below the image
        correction = F.conv2d(hidden, conv2.weight, conv2.bias, padding=(0, 1))  # rows [r0, r1)
        del hidden
        out[:, :, r0:r1] = logits[:, :, r0:r1] + correction
    return out


def segment_in_chunks(model: nn.Module, x: torch.Tensor, chunk_bytes: int = INFERENCE_CHUNK_BYTES) -> torch.Tensor:
    """No-grad forward of an `AFFMAESegmentation` ``model``: x ``[B, 1, H, W]`` -> logits ``[B, K, H, W]``, every
    piece's temporaries within about ``chunk_bytes``."""
    if torch.is_grad_enabled():
        raise ValueError("segment_in_chunks is the inference path: call it under torch.no_grad()")
    patch = model.patch_size
    b, _, height, width = x.shape
    h, w = height // patch, width // patch
    tokens, pos = embed_in_bands(model.encoder, x, chunk_bytes)
    stages = model.encoder.forward_tokens(tokens, pos, chunk_bytes)
    (last,) = model.decoder(pos, stages, (h, w), query_init=tokens, chunk_bytes=chunk_bytes,
                            query_proj=model.stem_to_query)
    del stages, tokens
    if model.fusion is not None:
        fusion = model.fusion
        # coarse steps: per lattice row, 4 stride-2 rows of the s2 step's maps (about 8c channels alive);
        # full-resolution strips: per pixel row, the s1 step's maps (about 8c channels alive)
        channels = 8 * fusion.out.in_channels
        halo = -(-fusion.reach // patch)  # lattice rows above and below each band, computed again
        rows = max(MIN_FUSION_ROWS * halo, band_rows(chunk_bytes, b * 4 * (width // 2) * channels * x.element_size()))
        strip = max(MIN_STRIP_ROWS, band_rows(chunk_bytes, b * width * channels * x.element_size()))

        def level_rows(level: int, start: int, stop: int) -> torch.Tensor:
            return stem_rows(model.encoder.stem, x, level, start, stop)

        return fuse_in_bands(fusion, last.reshape(b, h, w, -1), x, level_rows, rows, strip)
    head_rows = band_rows(chunk_bytes, b * patch * model.head[-1].out_features * x.element_size() * 2)
    logits = head_in_bands(model.head, last, h, w, patch, head_rows)
    del last
    if model.refine is not None:
        row_bytes = b * model.refine.conv1.out_channels * width * x.element_size()  # one row of the hidden map
        rows = max(MIN_REFINE_ROWS, band_rows(chunk_bytes, row_bytes))

        def first(s0: int, s1: int) -> torch.Tensor:
            return stem_rows(model.encoder.stem, x, 1, s0, s1)

        logits = refine_in_bands(model.refine, logits, x, first, rows)
    return logits
