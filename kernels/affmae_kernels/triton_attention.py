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
# shared pieces (inlined by Triton)
# ----------------------------------------------------------------------------------------
@triton.jit
def _batch_head(H):
    """(pid_bh, b, h): the (batch, head) of this program's second grid axis, int64."""
    pid_bh = tl.program_id(1).to(tl.int64)
    return pid_bh, pid_bh // H, pid_bh % H


@triton.jit
def _cluster_rows(pid, n_sub, C, BLOCK_C: tl.constexpr):
    """(cluster g, query rows [BC], row mask) of cluster-tile program ``pid``."""
    g = pid // n_sub
    r = (pid % n_sub) * BLOCK_C + tl.arange(0, BLOCK_C)  # row inside the cluster
    return g, g * C + r, r < C


@triton.jit
def _load_rows(ptr, b, h, rows, row_ok, dd, s0, s1, s2, s3):
    """``[rows, D]`` tile of a strided ``[B, H, N, D]`` tensor in its dtype (zeros where not row_ok)."""
    return tl.load(ptr + b * s0 + h * s1 + rows[:, None] * s2 + dd[None, :] * s3, mask=row_ok[:, None], other=0.0)


@triton.jit
def _load_bias(bias_ptr, b, h, rows, cols, sbb, sbh, sbn, sbm, mask):
    """fp32 ``[rows, cols]`` tile of the strided bias ``[B, H, Nq, M]``."""
    return tl.load(bias_ptr + b * sbb + h * sbh + rows[:, None] * sbn + cols[None, :] * sbm,
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _token_neighbours(idx_ptr, valid_ptr, b, Nq, rows, row_ok, cols, M: tl.constexpr, HAS_VALID: tl.constexpr):
    """Per-token mode: neighbour indices ``[BQ, BM]`` of these rows and columns, and their mask."""
    nb_off = (b * Nq + rows[:, None]) * M + cols[None, :]  # [BQ, BM]
    nb = tl.load(idx_ptr + nb_off, mask=row_ok[:, None], other=0)
    ok = row_ok[:, None] & (cols[None, :] < M)
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + nb_off, mask=row_ok[:, None], other=0) != 0)
    return nb, ok


@triton.jit
def _cluster_neighbours(idx_ptr, valid_ptr, b, G, g, cols, M: tl.constexpr, HAS_VALID: tl.constexpr):
    """Cluster mode: the shared neighbour indices ``[BM]`` of cluster g, in-range and valid masks."""
    col_ok = cols < M
    nb_off = (b * G + g) * M + cols
    nb = tl.load(idx_ptr + nb_off, mask=col_ok, other=0)  # [BM]
    ok_c = col_ok
    if HAS_VALID:
        ok_c = ok_c & (tl.load(valid_ptr + nb_off, mask=col_ok, other=0) != 0)
    return nb, col_ok, ok_c


@triton.jit
def _gather_token(base, nb, dd, sn, sd, ok):
    """Rows ``nb`` ``[BQ, BM]`` of a strided ``[N, D]`` tensor -> fp32 ``[BQ, BM, D]`` (zeros where not ok)."""
    return tl.load(base + nb[:, :, None] * sn + dd[None, None, :] * sd, mask=ok[:, :, None], other=0.0).to(tl.float32)


@triton.jit
def _gather_cluster(base, nb, dd, sn, sd, ok_c):
    """Rows ``nb`` ``[BM]`` of a strided ``[N, D]`` tensor -> ``[BM, D]`` in its dtype (tl.dot operand)."""
    return tl.load(base + nb[:, None] * sn + dd[None, :] * sd, mask=ok_c[:, None], other=0.0)


@triton.jit
def _softmax_start(bk_ptr, bv_ptr, h, dd, qx, post, BLOCK: tl.constexpr, D: tl.constexpr,
                   HAS_BLANK: tl.constexpr):
    """Online-softmax state (max, sum, acc) before the first neighbour; the blank token, whose
    logit is ``sum(qx * blank_k) * post``, is the first candidate."""
    if HAS_BLANK:
        bk = tl.load(bk_ptr + h * D + dd).to(tl.float32)
        bv = tl.load(bv_ptr + h * D + dd).to(tl.float32)
        m_i = tl.sum(qx * bk[None, :], 1) * post
        l_i = tl.full((BLOCK,), 1.0, tl.float32)
        acc = tl.zeros((BLOCK, D), tl.float32) + bv[None, :]
    else:
        m_i = tl.full((BLOCK,), NEG, tl.float32)
        l_i = tl.zeros((BLOCK,), tl.float32)
        acc = tl.zeros((BLOCK, D), tl.float32)
    return m_i, l_i, acc


@triton.jit
def _softmax_step(s, ok, m_i, l_i):
    """One chunk of the online softmax: logits s (masked by ok) -> (p, rescale alpha, max, sum)."""
    s = tl.where(ok, s, NEG)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _store_forward(out_ptr, lse_ptr, acc, m_i, l_i, pid_bh, Nq, rows, row_ok, dd, D: tl.constexpr):
    """Normalise and store out (contiguous ``[B, H, Nq, D]``) and lse (0 for rows without mass)."""
    has_mass = l_i > 0.0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    lse = tl.where(has_mass, m_i + tl.log(tl.where(has_mass, l_i, 1.0)), 0.0)
    o_off = (pid_bh * Nq + rows[:, None]) * D + dd[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + pid_bh * Nq + rows, lse, mask=row_ok)


@triton.jit
def _backward_rows(out_ptr, lse_ptr, do32, pid_bh, Nq, rows, row_ok, dd, D: tl.constexpr):
    """(offsets into the contiguous out/dq ``[B, H, Nq, D]``, delta = rowsum(dout * out), lse)."""
    row_off = (pid_bh * Nq + rows[:, None]) * D + dd[None, :]
    o = tl.load(out_ptr + row_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(do32 * o, 1)  # [rows]
    lse = tl.load(lse_ptr + pid_bh * Nq + rows, mask=row_ok, other=0.0)
    return row_off, delta, lse


@triton.jit
def _blank_backward(bk_ptr, bv_ptr, dbk_ptr, dbv_ptr, part, h, dd, qx, post, do32, lse, delta, row_ok,
                    D: tl.constexpr):
    """Blank-token gradients: store this program's dblank_k/dblank_v partial sums at ``part`` and
    return its dq term (before dq's final scale); the blank logit is ``sum(qx * blank_k) * post``."""
    bk = tl.load(bk_ptr + h * D + dd).to(tl.float32)
    bv = tl.load(bv_ptr + h * D + dd).to(tl.float32)
    pb = tl.where(row_ok, tl.exp(tl.sum(qx * bk[None, :], 1) * post - lse), 0.0)
    dsb = pb * (tl.sum(do32 * bv[None, :], 1) - delta)
    tl.store(dbk_ptr + part, tl.sum(dsb[:, None] * qx, 0) * post)
    tl.store(dbv_ptr + part, tl.sum(pb[:, None] * do32, 0))
    return dsb[:, None] * bk[None, :]


@triton.jit
def _store_p_ds(ds_ptr, p_ptr, ds, p, pid_bh, Nq, rows, cols, mask, M: tl.constexpr,
                STORE_DS: tl.constexpr, STORE_P: tl.constexpr):
    """Store ds (= dbias, and the reverse pass's input) and p into the ``[B, H, Nq, M]`` buffers."""
    pm_off = (pid_bh * Nq + rows[:, None]) * M + cols[None, :]
    if STORE_DS:
        tl.store(ds_ptr + pm_off, ds, mask=mask)
    if STORE_P:
        tl.store(p_ptr + pm_off, p, mask=mask)


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
    pid_bh, b, h = _batch_head(H)
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ]
    row_ok = rows < Nq
    dd = tl.arange(0, D)

    qs = _load_rows(q_ptr, b, h, rows, row_ok, dd, sqb, sqh, sqn, sqd).to(tl.float32) * scale  # [BQ, D]
    m_i, l_i, acc = _softmax_start(bk_ptr, bv_ptr, h, dd, qs, 1.0, BLOCK_Q, D, HAS_BLANK)

    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)  # [BM]
        nb, ok = _token_neighbours(idx_ptr, valid_ptr, b, Nq, rows, row_ok, cols, M, HAS_VALID)
        kn = _gather_token(k_base, nb, dd, skn, skd, ok)  # [BQ, BM, D]
        s = tl.sum(qs[:, None, :] * kn, 2)  # [BQ, BM]
        if HAS_BIAS:
            s += _load_bias(bias_ptr, b, h, rows, cols, sbb, sbh, sbn, sbm, ok)
        p, alpha, m_i, l_i = _softmax_step(s, ok, m_i, l_i)
        vn = _gather_token(v_base, nb, dd, svn, svd, ok)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vn, 1)

    _store_forward(out_ptr, lse_ptr, acc, m_i, l_i, pid_bh, Nq, rows, row_ok, dd, D)


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
    pid_bh, b, h = _batch_head(H)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < Nq
    dd = tl.arange(0, D)

    qs = _load_rows(q_ptr, b, h, rows, row_ok, dd, sqb, sqh, sqn, sqd).to(tl.float32) * scale
    do = _load_rows(dout_ptr, b, h, rows, row_ok, dd, sgb, sgh, sgn, sgd).to(tl.float32)
    row_off, delta, lse = _backward_rows(out_ptr, lse_ptr, do, pid_bh, Nq, rows, row_ok, dd, D)
    dq = tl.zeros((BLOCK_Q, D), tl.float32)
    if HAS_BLANK:
        dq += _blank_backward(bk_ptr, bv_ptr, dbk_ptr, dbv_ptr, (pid_bh * n_qblocks + pid_q) * D + dd,
                              h, dd, qs, 1.0, do, lse, delta, row_ok, D)

    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    acc_base = pid_bh * Nk  # dk/dv accumulators: contiguous fp32 [B, H, Nk, D]
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        nb, ok = _token_neighbours(idx_ptr, valid_ptr, b, Nq, rows, row_ok, cols, M, HAS_VALID)
        kn = _gather_token(k_base, nb, dd, skn, skd, ok)
        s = tl.sum(qs[:, None, :] * kn, 2)
        if HAS_BIAS:
            s += _load_bias(bias_ptr, b, h, rows, cols, sbb, sbh, sbn, sbm, ok)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # [BQ, BM]
        vn = _gather_token(v_base, nb, dd, svn, svd, ok)
        dp = tl.sum(do[:, None, :] * vn, 2)
        ds = p * (dp - delta[:, None])
        dq += tl.sum(ds[:, :, None] * kn, 1)
        _store_p_ds(ds_ptr, p_ptr, ds, p, pid_bh, Nq, rows, cols, row_ok[:, None], M, STORE_DS, STORE_P)
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
    pid_bh, b, h = _batch_head(H)
    g, rows, row_ok = _cluster_rows(tl.program_id(0), n_sub, C, BLOCK_C)  # rows: query index, [BC]
    dd = tl.arange(0, D)

    q = _load_rows(q_ptr, b, h, rows, row_ok, dd, sqb, sqh, sqn, sqd)  # [BC, D], input dtype (tl.dot operand)
    m_i, l_i, acc = _softmax_start(bk_ptr, bv_ptr, h, dd, q.to(tl.float32), scale, BLOCK_C, D, HAS_BLANK)

    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        nb, col_ok, ok_c = _cluster_neighbours(idx_ptr, valid_ptr, b, G, g, cols, M, HAS_VALID)
        kt = tl.load(k_base + nb[None, :] * skn + dd[:, None] * skd, mask=ok_c[None, :], other=0.0)  # [D, BM]
        s = _dot(q, kt, DOT_F32) * scale  # [BC, BM]
        if HAS_BIAS:
            s += _load_bias(bias_ptr, b, h, rows, cols, sbb, sbh, sbn, sbm, row_ok[:, None] & ok_c[None, :])
        p, alpha, m_i, l_i = _softmax_step(s, ok_c[None, :], m_i, l_i)
        vn = _gather_cluster(v_base, nb, dd, svn, svd, ok_c)  # [BM, D]
        acc = acc * alpha[:, None] + _dot(p.to(vn.dtype), vn, DOT_F32)

    _store_forward(out_ptr, lse_ptr, acc, m_i, l_i, pid_bh, Nq, rows, row_ok, dd, D)


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
    pid_bh, b, h = _batch_head(H)
    g, rows, row_ok = _cluster_rows(pid, n_sub, C, BLOCK_C)
    dd = tl.arange(0, D)

    q = _load_rows(q_ptr, b, h, rows, row_ok, dd, sqb, sqh, sqn, sqd)  # [BC, D] input dtype
    do = _load_rows(dout_ptr, b, h, rows, row_ok, dd, sgb, sgh, sgn, sgd).to(q.dtype)  # [BC, D]
    row_off, delta, lse = _backward_rows(out_ptr, lse_ptr, do.to(tl.float32), pid_bh, Nq, rows, row_ok, dd, D)
    dq = tl.zeros((BLOCK_C, D), tl.float32)
    if HAS_BLANK:
        dq += _blank_backward(bk_ptr, bv_ptr, dbk_ptr, dbv_ptr, (pid_bh * (G * n_sub) + pid) * D + dd,
                              h, dd, q.to(tl.float32), scale, do.to(tl.float32), lse, delta, row_ok, D)

    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        nb, col_ok, ok_c = _cluster_neighbours(idx_ptr, valid_ptr, b, G, g, cols, M, HAS_VALID)
        kn = _gather_cluster(k_base, nb, dd, skn, skd, ok_c)  # [BM, D]
        vn = _gather_cluster(v_base, nb, dd, svn, svd, ok_c)
        s = _dot(q, tl.trans(kn), DOT_F32) * scale  # [BC, BM]
        if HAS_BIAS:
            s += _load_bias(bias_ptr, b, h, rows, cols, sbb, sbh, sbn, sbm, row_ok[:, None] & ok_c[None, :])
        p = tl.where(row_ok[:, None] & ok_c[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(vn.to(q.dtype)), DOT_F32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(q.dtype), kn.to(q.dtype), DOT_F32)
        _store_p_ds(ds_ptr, p_ptr, ds, p, pid_bh, Nq, rows, cols, row_ok[:, None] & col_ok[None, :], M,
                    STORE_DS, STORE_P)
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
    pid_bh, b, h = _batch_head(H)
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
        qr = _load_rows(q_ptr, b, h, i, e_ok, dd, sqb, sqh, sqn, sqd).to(tl.float32)
        gr = _load_rows(dout_ptr, b, h, i, e_ok, dd, sgb, sgh, sgn, sgd).to(tl.float32)
        acc_k += dsv[:, None] * qr
        acc_v += pv[:, None] * gr
    out_off = (pid_bh * Nk + j) * D + dd
    tl.store(dk_ptr + out_off, (tl.sum(acc_k, 0) * scale).to(dk_ptr.dtype.element_ty))
    tl.store(dv_ptr + out_off, tl.sum(acc_v, 0).to(dv_ptr.dtype.element_ty))
