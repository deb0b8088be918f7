"""Triton kernels of the weighted neighbourhood merge (forward and backward).

``out[b, n, g, :] = sum_m weights[b, n, m, g] * feat[b, idx[b, n, m], :]`` with weights
``[B, N', M, G]``, feat ``[B, N, C]``, idx ``[B, N', M]`` (int32, contiguous) -> out
``[B, N', G, C]`` (contiguous). Accumulation is fp32; dfeat is scattered with fp32 atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def merge_fwd_kernel(
    w_ptr, f_ptr, idx_ptr, out_ptr,
    Nout, C,
    swb, swn, swm, swg,
    sfb, sfn, sfc,
    M: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: one output token n, one block of BLOCK_C channels, one batch element."""
    n = tl.program_id(0).to(tl.int64)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    c_ok = cc < C
    gg = tl.arange(0, BLOCK_G)
    g_ok = gg < G
    acc = tl.zeros((BLOCK_G, BLOCK_C), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        mm = m0 + tl.arange(0, BLOCK_M)
        m_ok = mm < M
        nb = tl.load(idx_ptr + (b * Nout + n) * M + mm, mask=m_ok, other=0)  # [BM]
        w = tl.load(w_ptr + b * swb + n * swn + mm[:, None] * swm + gg[None, :] * swg,
                    mask=m_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)  # [BM, BG]
        f = tl.load(f_ptr + b * sfb + nb[:, None] * sfn + cc[None, :] * sfc,
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # [BM, BC]
        acc += tl.sum(w[:, :, None] * f[:, None, :], 0)
    out_off = ((b * Nout + n) * G + gg[:, None]) * C + cc[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & c_ok[None, :])


@triton.jit
def merge_bwd_kernel(
    w_ptr, f_ptr, idx_ptr, dout_ptr, dw_ptr, dfeat_ptr,
    Nout, N, C,
    swb, swn, swm, swg,
    sfb, sfn, sfc,
    sgb, sgn, sgg, sgc,
    M: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DFEAT: tl.constexpr,
):
    """One program per (output token, batch): dweights fully reduced over C, dfeat by atomics.

    dweights[b, n, m, g] = dout[b, n, g, :] . feat[b, idx[b, n, m], :] (contiguous, fp32 out);
    dfeat[b, idx[b, n, m], :] += sum_g weights[b, n, m, g] * dout[b, n, g, :] (fp32 [B, N, C]).
    """
    n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    gg = tl.arange(0, BLOCK_G)
    g_ok = gg < G
    for m0 in range(0, M, BLOCK_M):
        mm = m0 + tl.arange(0, BLOCK_M)
        m_ok = mm < M
        nb = tl.load(idx_ptr + (b * Nout + n) * M + mm, mask=m_ok, other=0)
        w = tl.load(w_ptr + b * swb + n * swn + mm[:, None] * swm + gg[None, :] * swg,
                    mask=m_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)  # [BM, BG]
        dw = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_ok = cc < C
            do = tl.load(dout_ptr + b * sgb + n * sgn + gg[:, None] * sgg + cc[None, :] * sgc,
                         mask=g_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # [BG, BC]
            if NEED_DW:
                f = tl.load(f_ptr + b * sfb + nb[:, None] * sfn + cc[None, :] * sfc,
                            mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # [BM, BC]
                dw += tl.sum(f[:, None, :] * do[None, :, :], 2)
            if NEED_DFEAT:
                contrib = tl.sum(w[:, :, None] * do[None, :, :], 1)  # [BM, BC]
                tl.atomic_add(dfeat_ptr + (b * N + nb[:, None]) * C + cc[None, :], contrib,
                              mask=m_ok[:, None] & c_ok[None, :], sem="relaxed")
        if NEED_DW:
            dw_off = ((b * Nout + n) * M + mm[:, None]) * G + gg[None, :]
            tl.store(dw_ptr + dw_off, dw.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & g_ok[None, :])
