"""Benchmark the neighbourhood-attention kernels and write docs/kernels.md (+ a plot).

    python benchmarks/kernels.py                      # auto: CUDA if present, else CPU
    python benchmarks/kernels.py --sizes 4096,16384 --dtypes bfloat16,float16 --heads 4

Per shape (tokens N, neighbours M, head dim D, heads H, batch B), dtype and neighbourhood mode
(per token / per cluster of c = 8) it times forward and forward+backward of

* ``triton``          the Triton kernels, dk/dv by atomics (default),
* ``triton-reverse``  the Triton kernels, dk/dv through the key -> query reverse index,
* ``reference``       the PyTorch gather + softmax reference,
* ``sdpa``            dense ``scaled_dot_product_attention`` over the same N tokens,

and reports achieved GB/s and TFLOP/s against the roofline model below, the speed-up over the
reference and over SDPA, and the peak memory (CUDA only). On a machine without CUDA only the
reference and SDPA run (the Triton kernels would run in the interpreter, which says nothing
about speed) and the page says so.

Neighbourhoods are realistic: tokens on a square lattice in Morton (Z) order, clusters of c
consecutive tokens, each token's (or cluster's) neighbourhood = the members of its M / c
nearest cluster centroids.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "kernels"))  # runnable from a plain checkout, too

from affmae_kernels import reference  # noqa: E402

CLUSTER_SIZE = 8

#: Published peaks used for the roofline (dense, no sparsity): HBM GB/s, bf16/fp16 tensor TFLOP/s,
#: fp32 (non-tensor) TFLOP/s.
PEAKS = {
    "H100 SXM": (3350.0, 989.0, 67.0),
    "H200": (4800.0, 989.0, 67.0),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape."""

    n: int
    m: int
    d: int
    heads: int
    batch: int
    dtype: str
    mode: str  # "token" | "cluster"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def label(self) -> str:
        return f"B{self.batch} H{self.heads} N{self.n} M{self.m} D{self.d}"


@dataclasses.dataclass
class Row:
    """One measured (case, implementation) pair."""

    case: Case
    impl: str
    ms_fwd: float | None
    ms_fwd_bwd: float | None
    peak_mib: float | None = None
    vs_reference: float | None = None
    vs_sdpa: float | None = None

    @property
    def gbps(self) -> float | None:
        if self.ms_fwd_bwd is None:
            return None
        return bytes_moved(self.case, self.impl, backward=True) / (self.ms_fwd_bwd * 1e-3) / 1e9

    @property
    def tflops(self) -> float | None:
        if self.ms_fwd_bwd is None:
            return None
        return flops(self.case, self.impl, backward=True) / (self.ms_fwd_bwd * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------
# roofline model
# ---------------------------------------------------------------------------------------------
def bytes_moved(case: Case, impl: str, backward: bool) -> float:
    """Compulsory DRAM traffic (every tensor read or written once; gathers assumed cache hits).

    e = element size, BH = B*H, G = rows of idx (N per token, N/c per cluster):
      forward : BH*e*(2*N*D [q, out] + 2*N*D [k, v]) + BH*e*N*M [bias] + B*G*M*5 [idx int32 + valid]
                + BH*4*N [lse]
      backward: BH*e*(4*N*D [q, out, dout, dq] + 4*N*D [k, v, dk, dv]) + 2*BH*e*N*M [bias, dbias]
                + B*G*M*5 + BH*4*N
    SDPA: forward BH*e*4*N*D, backward BH*e*8*N*D.
    """
    e = torch.tensor([], dtype=case.torch_dtype).element_size()
    bh = case.batch * case.heads
    n, m, d = case.n, case.m, case.d
    if impl == "sdpa":
        return bh * e * n * d * (4 + (8 if backward else 0))
    rows = n if case.mode == "token" else n // CLUSTER_SIZE
    index_bytes = case.batch * rows * m * 5
    total = bh * e * 4 * n * d + bh * e * n * m + index_bytes + bh * 4 * n
    if backward:
        total += bh * e * 8 * n * d + 2 * bh * e * n * m + index_bytes + bh * 4 * n
    return float(total)


def gathered_bytes(case: Case, backward: bool) -> float:
    """Neighbour rows the kernels fetch through L1/L2: BH*R*M*D*e*(2 forward [k, v], 4 with backward),
    R = N gathering rows per token, R = N/c per cluster (one [M, D] tile serves c queries)."""
    e = torch.tensor([], dtype=case.torch_dtype).element_size()
    rows = case.n if case.mode == "token" else case.n // CLUSTER_SIZE
    return float(case.batch * case.heads * rows * case.m * case.d * e * (4 if backward else 2))


def flops(case: Case, impl: str, backward: bool) -> float:
    """Useful FLOPs: forward 4*BH*N*M*D (QK^T and PV), backward 10*BH*N*M*D (recomputed QK^T,
    dP = dO V^T, dQ, dK, dV); SDPA the same with M replaced by N. Softmax/exp not counted."""
    bh = case.batch * case.heads
    width = case.n if impl == "sdpa" else case.m
    return float(bh * case.n * width * case.d * (14 if backward else 4))


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _morton_key(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    key = torch.zeros_like(y)
    for bit in range(16):
        key |= ((x >> bit) & 1) << (2 * bit)
        key |= ((y >> bit) & 1) << (2 * bit + 1)
    return key


def lattice_neighbourhoods(n: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token idx ``[1, N, M]``, per-cluster idx ``[1, N/c, M]``) for N lattice tokens."""
    if n % CLUSTER_SIZE or m % CLUSTER_SIZE:
        raise ValueError(f"N={n} and M={m} must be multiples of the cluster size {CLUSTER_SIZE}")
    side = math.isqrt(n - 1) + 1
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    order = torch.argsort(_morton_key(ys, xs))[:n]
    pos = torch.stack([ys[order], xs[order]], dim=-1).float()  # [N, 2], Z-order
    centroids = pos.reshape(n // CLUSTER_SIZE, CLUSTER_SIZE, 2).mean(1)  # [N/c, 2]
    k = m // CLUSTER_SIZE
    members = torch.arange(n).reshape(n // CLUSTER_SIZE, CLUSTER_SIZE)  # [N/c, c]
    near_token = reference.knn_centroids(pos[None], centroids[None], k)[0]  # [N, k]
    near_cluster = reference.knn_centroids(centroids[None], centroids[None], k)[0]  # [N/c, k]
    idx_token = members[near_token].reshape(1, n, m)
    idx_cluster = members[near_cluster].reshape(1, n // CLUSTER_SIZE, m)
    return idx_token.to(device=device, dtype=torch.int32), idx_cluster.to(device=device, dtype=torch.int32)


def make_inputs(case: Case, idx: torch.Tensor, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (case.batch, case.heads, case.n, case.d)

    def rand(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=case.torch_dtype).requires_grad_()

    idx = idx.expand(case.batch, -1, -1).contiguous()
    return dict(q=rand(*shape), k=rand(*shape), v=rand(*shape), idx=idx,
                bias=rand(case.batch, case.heads, case.n, case.m),
                valid=torch.ones(idx.shape, dtype=torch.bool, device=device),
                blank_k=rand(case.heads, case.d), blank_v=rand(case.heads, case.d))


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure(op, inputs: dict, device: torch.device, repeats: int, warmup: int) -> tuple[float, float, float | None]:
    """(ms forward, ms forward+backward, peak MiB of forward+backward or None on CPU)."""
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def forward():
        with torch.no_grad():
            op(**inputs)

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = op(**inputs)
        out.backward(torch.ones_like(out))

    ms_fwd = time_ms(forward, device, repeats, warmup)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    ms_fb = time_ms(forward_backward, device, repeats, warmup)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return ms_fwd, ms_fb, peak


def implementations(device: torch.device) -> dict:
    impls = {"reference": lambda **kw: reference.neighborhood_attention(**kw)}
    if device.type == "cuda":
        from affmae_kernels import triton_ops  # noqa: PLC0415

        impls["triton"] = lambda **kw: triton_ops.neighborhood_attention(**kw, dkdv="atomic")
        impls["triton-reverse"] = lambda **kw: triton_ops.neighborhood_attention(**kw, dkdv="reverse")
    return impls


def sdpa_op(q, k, v, **_unused):
    return F.scaled_dot_product_attention(q, k, v)


def run_cases(cases: list[Case], device: torch.device, repeats: int, warmup: int, sdpa_max_n: int,
              log) -> list[Row]:
    rows: list[Row] = []
    impls = implementations(device)
    neighbourhoods: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    sdpa_rows: dict[tuple, Row] = {}
    for case in cases:
        key = (case.n, case.m)
        if key not in neighbourhoods:
            neighbourhoods[key] = lattice_neighbourhoods(case.n, case.m, device)
        idx = neighbourhoods[key][0 if case.mode == "token" else 1]
        inputs = make_inputs(case, idx, device)
        case_rows = []
        for name, op in impls.items():
            try:
                ms_fwd, ms_fb, peak = measure(op, inputs, device, repeats, warmup)
            except torch.OutOfMemoryError:
                ms_fwd = ms_fb = peak = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row = Row(case, name, ms_fwd, ms_fb, peak)
            case_rows.append(row)
            log(f"{case.label} {case.dtype:8s} {case.mode:7s} {name:15s} fwd {ms_fwd} ms, fwd+bwd {ms_fb} ms")
        sdpa_key = (case.n, case.d, case.heads, case.batch, case.dtype)
        if sdpa_key not in sdpa_rows:
            if case.n <= sdpa_max_n:
                ms_fwd, ms_fb, peak = measure(sdpa_op, inputs, device, repeats, warmup)
            else:
                ms_fwd = ms_fb = peak = None
            sdpa_rows[sdpa_key] = Row(dataclasses.replace(case, mode="dense"), "sdpa", ms_fwd, ms_fb, peak)
            case_rows.append(sdpa_rows[sdpa_key])
            log(f"{case.label} {case.dtype:8s} dense   sdpa            fwd {ms_fwd} ms, fwd+bwd {ms_fb} ms")
        ref = next(r for r in case_rows if r.impl == "reference")
        sdpa = sdpa_rows[sdpa_key]
        for row in case_rows:
            if row.ms_fwd_bwd:
                if ref.ms_fwd_bwd:
                    row.vs_reference = ref.ms_fwd_bwd / row.ms_fwd_bwd
                if sdpa.ms_fwd_bwd:
                    row.vs_sdpa = sdpa.ms_fwd_bwd / row.ms_fwd_bwd
        rows.extend(case_rows)
        del inputs
    return rows


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    head = ("| shape | dtype | mode | impl | ms fwd | ms fwd+bwd | GB/s | TFLOP/s | × vs reference "
            "| × vs SDPA | peak MiB |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r.case.label} | {r.case.dtype} | {r.case.mode} | {r.impl} | {_fmt(r.ms_fwd, '.4g')} | "
        f"{_fmt(r.ms_fwd_bwd, '.4g')} | {_fmt(r.gbps, '.3g')} | {_fmt(r.tflops, '.3g')} | "
        f"{_fmt(r.vs_reference, '.2f')} | {_fmt(r.vs_sdpa, '.2f')} | {_fmt(r.peak_mib, '.0f')} |\n"
        for r in rows
    )
    return head + body


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.ms_fwd_bwd is None:
            continue
        name = f"{r.impl} ({r.case.mode}, {r.case.dtype})" if r.impl != "sdpa" else f"sdpa dense ({r.case.dtype})"
        series.setdefault(name, []).append((r.case.batch * r.case.n, r.ms_fwd_bwd))
    for name, points in sorted(series.items()):
        points = sorted(set(points))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens (B × N)")
    ax.set_ylabel("forward + backward [ms]")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import triton  # noqa: PLC0415
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    text = (f"{cpu}, {os.cpu_count()} logical CPUs visible (load average {os.getloadavg()[0]:.1f} when the run "
            f"started), {torch.get_num_threads()} torch threads; Python {platform.python_version()}, "
            f"torch {torch.__version__}, triton {triton_version}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
                f"CUDA {torch.version.cuda}; " + text)
    return text


def roofline_section(target: Case) -> str:
    lines = []
    for impl_mode in ("token", "cluster"):
        case = dataclasses.replace(target, mode=impl_mode)
        b_fwd = bytes_moved(case, "triton", backward=False)
        b_all = bytes_moved(case, "triton", backward=True)
        g_all = gathered_bytes(case, backward=True)
        f_all = flops(case, "triton", backward=True)
        for gpu, (bw, tensor_tf, fp32_tf) in PEAKS.items():
            peak, unit = (tensor_tf, "tensor cores") if impl_mode == "cluster" else (fp32_tf, "fp32 CUDA cores")
            lines.append(
                f"| {case.label} {case.dtype} {impl_mode} | {gpu} | {b_fwd / 1e6:.1f} | {b_all / 1e6:.1f} | "
                f"{b_all / (bw * 1e9) * 1e6:.1f} | {g_all / 1e6:.0f} | {f_all / 1e9:.2f} | "
                f"{f_all / (peak * 1e12) * 1e6:.1f} ({unit}) |")
    return ("| case | GPU | fwd bytes [MB] | fwd+bwd bytes [MB] | DRAM floor fwd+bwd [µs] | gathered via "
            "L1/L2 fwd+bwd [MB] | fwd+bwd GFLOP | compute floor fwd+bwd [µs] |\n"
            "|---|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(lines) + "\n")


def compile_report_section() -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO / "kernels") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "affmae_kernels.compile_report", "--json",
                           "--only", r"bfloat16 D=32|float32 D=32 atomic|merge bfloat16|knn"], capture_output=True, text=True, env=env)
    if proc.returncode:
        return f"(compile report failed: `{proc.stderr.strip().splitlines()[-1] if proc.stderr else 'no output'}`)\n"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = ["| case | kernel | registers | spill bytes | warps | tensor cores (mma) |",
             "|---|---|---:|---:|---:|---|"]
    seen = set()
    for r in report:
        key = (r["case"], r["kernel"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {r['case']} | `{r['kernel']}` | {r['registers']} | {r['local_bytes']} | {r['num_warps']} | "
                     f"{'yes' if r['tensor_cores'] else 'no'} |")
    return "\n".join(lines) + "\n"


PAGE = """# Kernels: neighbourhood attention, merge and KNN

_Generated by `{command}` on {date}. Do not edit by hand; rerun the benchmark._

## What is here

`kernels/affmae_kernels` holds one op family used by the whole model (DESIGN.md §4):

| op | shapes | backends |
|---|---|---|
| `neighborhood_attention(q, k, v, idx, bias, valid, blank_k, blank_v, scale)` | q `[B,H,Nq,D]`, k/v `[B,H,Nk,D]`, idx `[B,Nq,M]` (per token) or `[B,Nq/c,M]` (per cluster), bias `[B,H,Nq,M]`, valid like idx, blank `[H,D]` | Triton fwd+bwd (`triton_attention.py`), PyTorch reference |
| `weighted_merge(weights, feat, idx)` | `[B,N',M,G]`, `[B,N,C]`, `[B,N',M]` -> `[B,N',G,C]` | Triton fwd+bwd (`triton_merge.py`), reference |
| `knn_centroids(query_pos, centroid_pos, k, centroid_valid)` | `[B,Nq,P]`, `[B,Nc,P]` -> int64 `[B,Nq,k]`, k ≤ 16 | Triton (`triton_knn.py`), reference |

The three ops are PyTorch custom ops (`affmae::na_forward`, `affmae::na_backward`,
`affmae::weighted_merge`, `affmae::weighted_merge_backward`, `affmae::knn_centroids`, in `ops.py`)
with shape-only implementations, autograd and FLOP formulas (`flops.py`) registered with
`torch.utils.flop_counter`, so `FlopCounterMode` counts them and `torch.compile` keeps each as one
graph node. `affmae_kernels.neighborhood_attention` etc. dispatch: CUDA tensors -> Triton, anything
else -> the reference. One settings object (`settings.py`, `KernelSettings`) holds the backend, the
debug checks, the dk/dv mode and the launch tiles; precedence: an explicit argument (`backend=`) >
`with kernel_settings(backend="reference"): ...` > the environment, read once at the first call
(`AFFMAE_KERNELS=auto|triton|reference`, `AFFMAE_KERNELS_DEBUG=1` for index range checks and
NaN-poisoned output buffers, `AFFMAE_KERNELS_DKDV=atomic|reverse`, `AFFMAE_KERNELS_TOKEN_TILE` /
`AFFMAE_KERNELS_CLUSTER_TILE` = `rows,neighbours,warps` for tuning sweeps). A backend that cannot
serve a call (Triton missing, CPU tensors without the interpreter, a dtype or shape the kernels do
not take) is refused with its reason, logged once on the `affmae_kernels` logger: `auto` then
falls back to the reference, an explicit `triton` raises. With
`torch.use_deterministic_algorithms(True)` the attention backward takes the atomic-free `reverse`
dk/dv path and the merge backward the reference's dfeat, so two runs give the same bits.

**Attention kernels.** Flash-style online softmax over the M neighbours in steps of a few
neighbours: fp32 logits, running max, running sum and accumulator; masked logits get the finite
sentinel -1e30 and invalid neighbours get probability exactly 0 (`tl.where`), so a row with no
valid neighbour and no blank token returns 0 and never NaN. The blank key/value seeds the running
state (`m = q·blank_k·scale`, `l = 1`, `acc = blank_v`) and carries no bias. The forward stores the
per-row log-sum-exp; the backward recomputes `p = exp(s - lse)`, computes `delta = rowsum(dO·O)`
in the same kernel, and writes dq, ds (= dbias), per-block partial sums of dblank_k/dblank_v.

* *Per-token mode* (`idx [B,Nq,M]`): each program takes a block of queries of one (batch, head)
  and gathers `[rows × neighbours × D]` tiles of k and v; products are broadcast-and-reduce on
  CUDA cores (every query has different keys, so there is no dense block for `tl.dot`).
* *Cluster-tile mode* (`idx [B,Nq/c,M]`, queries of a cluster consecutive and sharing the
  neighbourhood): the `[c × M]` tile is dense, so `S = Q Kᵀ`, `P V`, `dP = dO Vᵀ`, `dQ = dS K`,
  `dV = Pᵀ dO`, `dK = dSᵀ Q` all go through `tl.dot` (tensor cores for fp16/bf16; fp32 inputs use
  exact IEEE fp32 dots). c = 8 is padded to the 16-row minimum of `tl.dot`; clusters larger than
  64 are split over programs.
* *dk/dv*: `atomic` adds fp32 partials with relaxed vectorised atomics (`red.global.add.v4.f32`)
  from the query-side kernel; `reverse` lets the query-side kernel store p and ds per (query,
  slot) and a second kernel walks, per key, a CSR list of the (query, slot) pairs that use it
  (built with a stable argsort, cached per idx tensor so the blocks of a stage share it): no
  atomics, deterministic, but two extra `[B,H,Nq,M]` fp32 buffers. **Default: `atomic`** — chosen
  before any GPU measurement (see "GPU measurements" below); flip the default if the GPU table says `reverse` wins.

**Tests** (`python -m pytest tests/kernels`, about 1–1.5 min on 2 CPU cores): the Triton code itself runs on CPU under
`TRITON_INTERPRET=1` against a float64 reference on small random shapes — forward and every
gradient (q, k, v, bias, blank_k, blank_v), fp32/fp16/bf16, both modes, both dk/dv paths, padded
neighbours, fully padded rows with and without blank, head dims 16/32/64, M = 8…64 including
M not a multiple of 16, cluster sizes 4/5/8/20/80, non-contiguous and zero-stride inputs — with
every kernel-written buffer NaN-poisoned; plus merge, KNN (ties, invalid centroids), bad-input
errors, the tiny AFFMAE model end to end on the kernels vs the reference, and a compile of every
kernel for sm_90 (Triton → PTX → ptxas, no GPU needed) checking for spills and for mma
instructions in the cluster kernels. One interpreter quirk: Triton 3.x's interpreter multiplies raw
bf16 bit patterns in `tl.dot`, so under the interpreter bf16 dot operands are upcast to fp32 after
the same rounding the GPU sees; the compiled path feeds bf16 to the tensor cores.

## Measurements

Machine: {machine}.
Command: `{command}`.

{device_note}

{table}
![forward+backward time]({plot_name})

Columns: `ms` = median wall time ({repeats} repeats after {warmup} warm-up call(s)); `GB/s` and
`TFLOP/s` = the compulsory bytes and useful FLOPs of the roofline model below divided by the
forward+backward time (for SDPA its own N² FLOPs); `× vs reference` / `× vs SDPA` = that
implementation's forward+backward speed-up (> 1 = faster) over the gather reference / dense SDPA
over the same tokens; `peak MiB` = extra CUDA memory of one forward+backward. `—` = not run
(SDPA above N = {sdpa_max_n} on CPU is too slow on this machine) or not applicable.

## Roofline model

* bytes (compulsory DRAM traffic, gathers counted as cache hits), e = bytes per element,
  BH = B·H, G = idx rows (N per token, N/c per cluster):
  forward `BH·e·(4·N·D + N·M) + 5·B·G·M + 4·BH·N`;
  backward `BH·e·(8·N·D + 2·N·M) + 5·B·G·M + 4·BH·N`.
* gathered neighbour rows (through L1/L2): `BH·R·M·D·e·2` forward, `·4` forward+backward, with
  R = N per token and R = N/c per cluster (one `[M, D]` tile serves the c queries of a cluster).
* FLOPs: forward `4·BH·N·M·D`, backward `10·BH·N·M·D` (softmax not counted); dense SDPA the same
  with M → N.
* floors: time ≥ bytes / HBM bandwidth and ≥ FLOPs / peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s;
  989 dense bf16 tensor-core TFLOP/s for the cluster tiles, 67 fp32 CUDA-core TFLOP/s for the
  per-token kernels, whose products cannot use tensor cores).

{roofline}
Reading the table: the DRAM floor is only tens of microseconds, so launch overhead (~5 µs per kernel,
2–3 kernels per pass) already matters. The per-token kernels are in addition bound by CUDA-core
FLOPs of about the same size and by a gather volume through L1/L2 that is ~12× the DRAM floor
(neighbouring queries share most keys, so most of it should hit L1); the cluster tiles cut both
— tensor cores and 8× fewer gathered rows — which is the point of that mode. Targets:
forward+backward ≥ 3× faster than the reference at N = 16k, M = 64, D = 32, bf16, and within 2× of
the DRAM floor.

## Compiled-kernel resources (sm_90, from `python -m affmae_kernels.compile_report`)

Built on this machine without a GPU (Triton's bundled ptxas); registers per thread and spills of
the launch configurations the dispatcher picks (D = 32, M = 64, c = 8; fp16 builds match bf16;
fp32 cluster tiles use exact IEEE fp32 dots, hence no mma):

{compile_report}
## GPU measurements

{owed}
"""

OWED_NO_GPU = """**Not measured on a GPU yet**: this page was produced without a GPU. On a CUDA machine, run

    python -m pytest tests/kernels                    # compiled kernels on CUDA (auto-detected)
    python benchmarks/kernels.py                      # rewrites this page with the GPU table

and then (1) check the targets (≥ 3× over the reference at N = 16k, M = 64, D = 32, bf16, fwd+bwd;
within 2× of the DRAM floor), (2) keep the faster dk/dv path as the default in
`affmae_kernels/triton_ops.py::DEFAULT_DKDV` (currently `atomic`, unmeasured), (3) sweep
`AFFMAE_KERNELS_TOKEN_TILE` / `AFFMAE_KERNELS_CLUSTER_TILE` (current tiles were chosen from
register counts only), (4) record the per-token vs per-cluster speed difference."""

OWED_GPU = """Measured on a GPU; check the targets above against the table and adjust the dk/dv default
(`affmae_kernels/triton_ops.py::DEFAULT_DKDV`) if `triton-reverse` is faster."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sizes", default=None, help="comma-separated token counts N (default: GPU 4096,16384,65536; "
                                                       "CPU 1024,4096,16384)")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes (default: GPU bfloat16,float16,float32; "
                                                        "CPU float32)")
    parser.add_argument("--modes", default="token,cluster")
    parser.add_argument("--m", type=int, default=64, help="neighbours per token")
    parser.add_argument("--d", type=int, default=32, help="head dim")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--sdpa-max-n", type=int, default=None, help="skip dense SDPA above this N")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "kernels.md")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "kernels_benchmark.png")
    parser.add_argument("--no-compile-report", action="store_true", help="skip the sm_90 compile section")
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    gpu = device.type == "cuda"
    sizes = [int(s) for s in (args.sizes or ("4096,16384,65536" if gpu else "1024,4096,16384")).split(",")]
    dtypes = (args.dtypes or ("bfloat16,float16,float32" if gpu else "float32")).split(",")
    modes = args.modes.split(",")
    repeats = args.repeats or (20 if gpu else 5)
    warmup = args.warmup or (5 if gpu else 1)
    sdpa_max_n = args.sdpa_max_n or (1 << 20 if gpu else 4096)
    torch.manual_seed(0)
    machine = machine_description(device)  # before the run: records the load it started under

    cases = [Case(n, args.m, args.d, args.heads, args.batch, dt, mode)
             for dt in dtypes for mode in modes for n in sizes]
    rows = run_cases(cases, device, repeats, warmup, sdpa_max_n, log=lambda msg: print(msg, flush=True))
    print()
    print(table(rows))

    command = "python benchmarks/kernels.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                " " + " ".join(argv if argv is not None else sys.argv[1:]))
    if gpu:
        device_note = "Triton kernels compiled for this GPU."
    else:
        device_note = ("**CPU only — no GPU was available, so the Triton kernels were not timed** (on CPU they run "
                       "only in the Triton interpreter, which says nothing about speed). The table shows the "
                       "PyTorch gather reference and dense SDPA on CPU, as the baseline the GPU run will replace.")
    title = f"neighbourhood attention, M={args.m}, D={args.d}, H={args.heads} — {'GPU' if gpu else 'CPU reference only'}"
    plot(rows, args.plot, title)
    target = Case(16384, 64, 32, args.heads, args.batch, "bfloat16", "token")
    page = PAGE.format(
        command=command, date=datetime.date.today().isoformat(), machine=machine,
        device_note=device_note, table=table(rows), plot_name=os.path.relpath(args.plot, args.out.parent),
        repeats=repeats, warmup=warmup, sdpa_max_n=sdpa_max_n, roofline=roofline_section(target),
        compile_report=("(skipped)\n" if args.no_compile_report else compile_report_section()),
        owed=OWED_GPU if gpu else OWED_NO_GPU,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
