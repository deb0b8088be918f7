"""Triton kernels of neighbourhood attention (forward, backward, dk/dv by reverse index).

Shapes follow `affmae_kernels.reference`: q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]``, idx
``[B, Nq, M]`` (per-token mode) or ``[B, G, M]`` with ``Nq = G * c`` (cluster mode), bias
``[B, H, Nq, M]``, valid like idx, blank k/v ``[H, D]``. The launchers in
`affmae_kernels.triton_ops` make idx int32 contiguous, valid uint8 contiguous and the blank
tensors contiguous; q/k/v/bias/dout are read through their strides.

Numerics: logits, softmax statistics and accumulators are fp32. Masked logits take the finite
sentinel ``NEG`` (never -inf), and probabilities of invalid neighbours are forced to exactly 0
with ``tl.where`` so a row without any valid candidate yields zeros, not NaN. The forward
stores ``lse = max + log(sum)`` per row (0 for an empty row); the backward recomputes
``p = exp(s - lse)``.

Two kernel families:

* per-token (``*_token_kernel``): every query has its own M neighbours; the [queries x
  neighbours x D] products are broadcast-and-reduce on CUDA cores.
* cluster-tile (``*_cluster_kernel``): the c queries of a cluster share one neighbourhood, so
  ``S = Q K^T`` over a [c x M] tile is a dense block and goes through ``tl.dot`` (tensor
  cores for fp16/bf16).

dk/dv are accumulated either with fp32 atomics in the query-side kernel (``ATOMIC=True``) or
without atomics: the query-side kernel stores p and ds per (query, neighbour) and
`dkdv_reverse_kernel` walks, for each key, the list of (query, slot) pairs that use it.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

#: True when this module's kernels were built for the CPU interpreter (TRITON_INTERPRET=1).
INTERPRETED: bool = bool(knobs.runtime.interpret)

#: Finite stand-in for -inf (same value as `affmae_kernels.reference.NEG_SENTINEL`).
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    """``a @ b`` with an fp32 result; DOT_F32 upcasts the operands first (exact fp32 path)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


# ----------------------------------------------------------------------------------------
# per-token mode
# ----------------------------------------------------------------------------------------
@triton.jit
def na_fwd_token_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, bias_ptr, valid_ptr, bk_ptr, bv_ptr, out_ptr, lse_ptr,
    Nq, H, scale,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbn, sbm,
    M: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BLANK: tl.constexpr,
):
    """One program: BLOCK_Q queries of one (batch, head); loops over M in BLOCK_M chunks."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ]
    row_ok = rows < Nq
    dd = tl.arange(0, D)

    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :] * sqd,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    qs = q * scale  # [BQ, D]
    if HAS_BLANK:
        bk = tl.load(bk_ptr + h * D + dd).to(tl.float32)
        bv = tl.load(bv_ptr + h * D + dd).to(tl.float32)
        m_i = tl.sum(qs * bk[None, :], 1)  # blank logit, [BQ]
        l_i = tl.full((BLOCK_Q,), 1.0, tl.float32)
        acc = tl.zeros((BLOCK_Q, D), tl.float32) + bv[None, :]
    else:
        m_i = tl.full((BLOCK_Q,), NEG, tl.float32)
        l_i = tl.zeros((BLOCK_Q,), tl.float32)
        acc = tl.zeros((BLOCK_Q, D), tl.float32)

    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)  # [BM]
        nb_off = (b * Nq + rows[:, None]) * M + cols[None, :]  # [BQ, BM]
        nb = tl.load(idx_ptr + nb_off, mask=row_ok[:, None], other=0)
        ok = row_ok[:, None] & (cols[None, :] < M)
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + nb_off, mask=row_ok[:, None], other=0) != 0)
        kn = tl.load(k_base + nb[:, :, None] * skn + dd[None, None, :] * skd,
                     mask=ok[:, :, None], other=0.0).to(tl.float32)  # [BQ, BM, D]
        s = tl.sum(qs[:, None, :] * kn, 2)  # [BQ, BM]
        if HAS_BIAS:
            s += tl.load(bias_ptr + b * sbb + h * sbh + rows[:, None] * sbn + cols[None, :] * sbm,
                         mask=ok, other=0.0).to(tl.float32)
        s = tl.where(ok, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        vn = tl.load(v_base + nb[:, :, None] * svn + dd[None, None, :] * svd,
                     mask=ok[:, :, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vn, 1)
        m_i = m_new

    has_mass = l_i > 0.0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    lse = tl.where(has_mass, m_i + tl.log(tl.where(has_mass, l_i, 1.0)), 0.0)
    o_off = (pid_bh * Nq + rows[:, None]) * D + dd[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + pid_bh * Nq + rows, lse, mask=row_ok)


@triton.jit
def na_bwd_token_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, bias_ptr, valid_ptr, bk_ptr, bv_ptr, out_ptr, dout_ptr, lse_ptr,
    dq_ptr, ds_ptr, p_ptr, dk_ptr, dv_ptr, dbk_ptr, dbv_ptr,
    Nq, Nk, H, scale, n_qblocks,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbn, sbm,
    sgb, sgh, sgn, sgd,
    M: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BLANK: tl.constexpr,
    ATOMIC: tl.constexpr, STORE_DS: tl.constexpr, STORE_P: tl.constexpr,
):
    """dq, ds (= dbias), blank partials and dk/dv (atomics) or p (for the reverse pass)."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < Nq
    dd = tl.arange(0, D)
    row_off = (pid_bh * Nq + rows[:, None]) * D + dd[None, :]  # contiguous [B, H, Nq, D]

    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :] * sqd,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    qs = q * scale
    do = tl.load(dout_ptr + b * sgb + h * sgh + rows[:, None] * sgn + dd[None, :] * sgd,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    o = tl.load(out_ptr + row_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(do * o, 1)  # [BQ]
    lse = tl.load(lse_ptr + pid_bh * Nq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_Q, D), tl.float32)

    if HAS_BLANK:
        bk = tl.load(bk_ptr + h * D + dd).to(tl.float32)
        bv = tl.load(bv_ptr + h * D + dd).to(tl.float32)
        pb = tl.where(row_ok, tl.exp(tl.sum(qs * bk[None, :], 1) - lse), 0.0)
        dsb = pb * (tl.sum(do * bv[None, :], 1) - delta)
        dq += dsb[:, None] * bk[None, :]
        part = (pid_bh * n_qblocks + pid_q) * D + dd
        tl.store(dbk_ptr + part, tl.sum(dsb[:, None] * qs, 0))
        tl.store(dbv_ptr + part, tl.sum(pb[:, None] * do, 0))

    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    acc_base = pid_bh * Nk  # dk/dv accumulators: contiguous fp32 [B, H, Nk, D]
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        nb_off = (b * Nq + rows[:, None]) * M + cols[None, :]
        nb = tl.load(idx_ptr + nb_off, mask=row_ok[:, None], other=0)
        ok = row_ok[:, None] & (cols[None, :] < M)
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + nb_off, mask=row_ok[:, None], other=0) != 0)
        kn = tl.load(k_base + nb[:, :, None] * skn + dd[None, None, :] * skd,
                     mask=ok[:, :, None], other=0.0).to(tl.float32)
        s = tl.sum(qs[:, None, :] * kn, 2)
        if HAS_BIAS:
            s += tl.load(bias_ptr + b * sbb + h * sbh + rows[:, None] * sbn + cols[None, :] * sbm,
                         mask=ok, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # [BQ, BM]
        vn = tl.load(v_base + nb[:, :, None] * svn + dd[None, None, :] * svd,
                     mask=ok[:, :, None], other=0.0).to(tl.float32)
        dp = tl.sum(do[:, None, :] * vn, 2)
        ds = p * (dp - delta[:, None])
        dq += tl.sum(ds[:, :, None] * kn, 1)
        pm_off = (pid_bh * Nq + rows[:, None]) * M + cols[None, :]  # [B, H, Nq, M] buffers
        if STORE_DS:
            tl.store(ds_ptr + pm_off, ds, mask=row_ok[:, None])
        if STORE_P:
            tl.store(p_ptr + pm_off, p, mask=row_ok[:, None])
        if ATOMIC:
            acc_off = (acc_base + nb[:, :, None]) * D + dd[None, None, :]
            tl.atomic_add(dv_ptr + acc_off, p[:, :, None] * do[:, None, :], mask=ok[:, :, None], sem="relaxed")
            tl.atomic_add(dk_ptr + acc_off, ds[:, :, None] * qs[:, None, :], mask=ok[:, :, None], sem="relaxed")

    tl.store(dq_ptr + row_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------
# cluster-tile mode
# ----------------------------------------------------------------------------------------
@triton.jit
def na_fwd_cluster_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, bias_ptr, valid_ptr, bk_ptr, bv_ptr, out_ptr, lse_ptr,
    Nq, G, C, n_sub, H, scale,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbn, sbm,
    M: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BLANK: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One program: up to BLOCK_C queries of one cluster (shared neighbourhood) x one head."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    g = pid // n_sub
    r = (pid % n_sub) * BLOCK_C + tl.arange(0, BLOCK_C)  # row inside the cluster
    row_ok = r < C
    rows = g * C + r  # query index, [BC]
    dd = tl.arange(0, D)

    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)  # [BC, D], input dtype (tl.dot operand)
    if HAS_BLANK:
        bk = tl.load(bk_ptr + h * D + dd).to(tl.float32)
        bv = tl.load(bv_ptr + h * D + dd).to(tl.float32)
        m_i = tl.sum(q.to(tl.float32) * bk[None, :], 1) * scale
        l_i = tl.full((BLOCK_C,), 1.0, tl.float32)
        acc = tl.zeros((BLOCK_C, D), tl.float32) + bv[None, :]
    else:
        m_i = tl.full((BLOCK_C,), NEG, tl.float32)
        l_i = tl.zeros((BLOCK_C,), tl.float32)
        acc = tl.zeros((BLOCK_C, D), tl.float32)

    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        nb_off = (b * G + g) * M + cols
        nb = tl.load(idx_ptr + nb_off, mask=col_ok, other=0)  # [BM]
        ok_c = col_ok
        if HAS_VALID:
            ok_c = ok_c & (tl.load(valid_ptr + nb_off, mask=col_ok, other=0) != 0)
        kt = tl.load(k_base + nb[None, :] * skn + dd[:, None] * skd, mask=ok_c[None, :], other=0.0)  # [D, BM]
        s = _dot(q, kt, DOT_F32) * scale  # [BC, BM]
        if HAS_BIAS:
            s += tl.load(bias_ptr + b * sbb + h * sbh + rows[:, None] * sbn + cols[None, :] * sbm,
                         mask=row_ok[:, None] & ok_c[None, :], other=0.0).to(tl.float32)
        s = tl.where(ok_c[None, :], s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(ok_c[None, :], tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        vn = tl.load(v_base + nb[:, None] * svn + dd[None, :] * svd, mask=ok_c[:, None], other=0.0)  # [BM, D]
        acc = acc * alpha[:, None] + _dot(p.to(vn.dtype), vn, DOT_F32)
        m_i = m_new

    has_mass = l_i > 0.0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    lse = tl.where(has_mass, m_i + tl.log(tl.where(has_mass, l_i, 1.0)), 0.0)
    o_off = (pid_bh * Nq + rows[:, None]) * D + dd[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + pid_bh * Nq + rows, lse, mask=row_ok)


@triton.jit
def na_bwd_cluster_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, bias_ptr, valid_ptr, bk_ptr, bv_ptr, out_ptr, dout_ptr, lse_ptr,
    dq_ptr, ds_ptr, p_ptr, dk_ptr, dv_ptr, dbk_ptr, dbv_ptr,
    Nq, Nk, G, C, n_sub, H, scale,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbn, sbm,
    sgb, sgh, sgn, sgd,
    M: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BLANK: tl.constexpr, DOT_F32: tl.constexpr,
    ATOMIC: tl.constexpr, STORE_DS: tl.constexpr, STORE_P: tl.constexpr,
):
    """Cluster-tile backward: every product of the [c x M] tile goes through tl.dot."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    g = pid // n_sub
    r = (pid % n_sub) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = r < C
    rows = g * C + r
    dd = tl.arange(0, D)
    row_off = (pid_bh * Nq + rows[:, None]) * D + dd[None, :]

    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + dd[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)  # [BC, D] input dtype
    do = tl.load(dout_ptr + b * sgb + h * sgh + rows[:, None] * sgn + dd[None, :] * sgd,
                 mask=row_ok[:, None], other=0.0)  # [BC, D] dout dtype
    do = do.to(q.dtype)
    o = tl.load(out_ptr + row_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(do.to(tl.float32) * o, 1)
    lse = tl.load(lse_ptr + pid_bh * Nq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_C, D), tl.float32)

    if HAS_BLANK:
        bk = tl.load(bk_ptr + h * D + dd).to(tl.float32)
        bv = tl.load(bv_ptr + h * D + dd).to(tl.float32)
        qf = q.to(tl.float32)
        dof = do.to(tl.float32)
        pb = tl.where(row_ok, tl.exp(tl.sum(qf * bk[None, :], 1) * scale - lse), 0.0)
        dsb = pb * (tl.sum(dof * bv[None, :], 1) - delta)
        dq += dsb[:, None] * bk[None, :]
        part = (pid_bh * (G * n_sub) + pid) * D + dd
        tl.store(dbk_ptr + part, tl.sum(dsb[:, None] * qf, 0) * scale)
        tl.store(dbv_ptr + part, tl.sum(pb[:, None] * dof, 0))

    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        nb_off = (b * G + g) * M + cols
        nb = tl.load(idx_ptr + nb_off, mask=col_ok, other=0)
        ok_c = col_ok
        if HAS_VALID:
            ok_c = ok_c & (tl.load(valid_ptr + nb_off, mask=col_ok, other=0) != 0)
        kn = tl.load(k_base + nb[:, None] * skn + dd[None, :] * skd, mask=ok_c[:, None], other=0.0)  # [BM, D]
        vn = tl.load(v_base + nb[:, None] * svn + dd[None, :] * svd, mask=ok_c[:, None], other=0.0)
        s = _dot(q, tl.trans(kn), DOT_F32) * scale  # [BC, BM]
        if HAS_BIAS:
            s += tl.load(bias_ptr + b * sbb + h * sbh + rows[:, None] * sbn + cols[None, :] * sbm,
                         mask=row_ok[:, None] & ok_c[None, :], other=0.0).to(tl.float32)
        ok = row_ok[:, None] & ok_c[None, :]
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(vn.to(q.dtype)), DOT_F32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(q.dtype), kn.to(q.dtype), DOT_F32)
        pm_off = (pid_bh * Nq + rows[:, None]) * M + cols[None, :]
        pm_mask = row_ok[:, None] & col_ok[None, :]
        if STORE_DS:
            tl.store(ds_ptr + pm_off, ds, mask=pm_mask)
        if STORE_P:
            tl.store(p_ptr + pm_off, p, mask=pm_mask)
        if ATOMIC:
            dv_nb = _dot(tl.trans(p.to(q.dtype)), do, DOT_F32)  # [BM, D]
            dk_nb = _dot(tl.trans(ds.to(q.dtype)), q, DOT_F32) * scale
            acc_off = (pid_bh * Nk + nb[:, None]) * D + dd[None, :]  # fp32 [B, H, Nk, D]
            tl.atomic_add(dv_ptr + acc_off, dv_nb, mask=ok_c[:, None], sem="relaxed")
            tl.atomic_add(dk_ptr + acc_off, dk_nb, mask=ok_c[:, None], sem="relaxed")

    tl.store(dq_ptr + row_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------
# atomic-free dk/dv: key -> (query, slot) reverse index
# ----------------------------------------------------------------------------------------
@triton.jit
def dkdv_reverse_kernel(
    q_ptr, dout_ptr, p_ptr, ds_ptr, offsets_ptr, entries_ptr, dk_ptr, dv_ptr,
    Nq, Nk, H, scale,
    sqb, sqh, sqn, sqd,
    sgb, sgh, sgn, sgd,
    M: tl.constexpr, D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program per (key, batch*head): dk_j = scale * sum ds_im q_i, dv_j = sum p_im dout_i.

    ``entries`` holds, per batch and key (bucket ``b * (Nk + 1) + j``), the flat positions
    ``i * M + m`` of the (query, slot) pairs that use key j, sorted by i; ``offsets`` is the
    CSR start of every bucket. p/ds are contiguous fp32 ``[B, H, Nq, M]``.
    """
    j = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    dd = tl.arange(0, D)
    bucket = b * (Nk + 1) + j
    start = tl.load(offsets_ptr + bucket)
    end = tl.load(offsets_ptr + bucket + 1)
    acc_k = tl.zeros((BLOCK_E, D), tl.float32)
    acc_v = tl.zeros((BLOCK_E, D), tl.float32)
    pm_base = pid_bh * Nq * M
    for e0 in range(start, end, BLOCK_E):
        pos = e0 + tl.arange(0, BLOCK_E)
        e_ok = pos < end
        e = tl.load(entries_ptr + pos, mask=e_ok, other=0).to(tl.int64)  # i * M + m
        i = e // M
        pv = tl.load(p_ptr + pm_base + e, mask=e_ok, other=0.0)
        dsv = tl.load(ds_ptr + pm_base + e, mask=e_ok, other=0.0)
        qr = tl.load(q_ptr + b * sqb + h * sqh + i[:, None] * sqn + dd[None, :] * sqd,
                     mask=e_ok[:, None], other=0.0).to(tl.float32)
        gr = tl.load(dout_ptr + b * sgb + h * sgh + i[:, None] * sgn + dd[None, :] * sgd,
                     mask=e_ok[:, None], other=0.0).to(tl.float32)
        acc_k += dsv[:, None] * qr
        acc_v += pv[:, None] * gr
    out_off = (pid_bh * Nk + j) * D + dd
    tl.store(dk_ptr + out_off, (tl.sum(acc_k, 0) * scale).to(dk_ptr.dtype.element_ty))
    tl.store(dv_ptr + out_off, tl.sum(acc_v, 0).to(dv_ptr.dtype.element_ty))
