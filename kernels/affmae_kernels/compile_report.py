"""Compile the Triton kernels for a CUDA architecture without a GPU and report their resources.

``python -m affmae_kernels.compile_report [--arch 90] [--json]`` runs the real launchers of
`affmae_kernels.triton_ops` (forward and backward, every mode and dtype) on CPU tensors with
a stand-in Triton driver that reports the target architecture; each launch compiles the kernel
(Triton -> PTX -> cubin with the ptxas bundled in the Triton wheel) instead of running it.
The cubins' register, spill (local memory) and shared-memory use is read with ``cuobjdump``.

This checks that the compiled (non-interpreter) path builds, and gives a first occupancy
estimate, on machines without a GPU. It must run in a fresh process without
``TRITON_INTERPRET`` (the CLI clears it before importing Triton).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass


@dataclass
class KernelResources:
    """Resources of one compiled kernel variant."""

    kernel: str
    case: str
    constants: str
    registers: int
    local_bytes: int  # > 0 means register spills
    shared_bytes: int
    num_warps: int
    tensor_cores: bool  # the PTX holds mma / wgmma instructions


class _TargetOnlyDriver:
    """Stand-in for Triton's CUDA driver: knows the target, cannot launch."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    import triton  # noqa: PLC0415

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", handle.name], capture_output=True,
                              text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{text}")
    regs, shared, local = (int(x) for x in found.groups())
    return regs, local, shared


def _cases():
    """(name, callable) pairs that drive the launchers with CPU tensors."""
    import torch  # noqa: PLC0415

    from . import triton_ops  # noqa: PLC0415

    def attention(dtype, cluster, dkdv, d=32, m=64, nq=64, nk=64, h=2):
        def run():
            groups = nq // cluster
            q, k, v = (torch.zeros(1, h, n, d, dtype=dtype, requires_grad=True) for n in (nq, nk, nk))
            bias = torch.zeros(1, h, nq, m, dtype=dtype, requires_grad=True)
            blank = [torch.zeros(h, d, dtype=dtype, requires_grad=True) for _ in range(2)]
            idx = torch.zeros(1, groups, m, dtype=torch.int32)
            valid = torch.ones(1, groups, m, dtype=torch.bool)
            out = triton_ops.neighborhood_attention(q, k, v, idx, bias=bias, valid=valid, blank_k=blank[0],
                                                    blank_v=blank[1], dkdv=dkdv)
            out.backward(torch.zeros_like(out))
        return run

    def merge(dtype, c=192, m=64, g=4):
        def run():
            weights = torch.zeros(1, 16, m, g, dtype=dtype, requires_grad=True)
            feat = torch.zeros(1, 40, c, dtype=dtype, requires_grad=True)
            out = triton_ops.weighted_merge(weights, feat, torch.zeros(1, 16, m, dtype=torch.int32))
            out.backward(torch.zeros_like(out))
        return run

    def knn(k):
        def run():
            triton_ops.knn_centroids(torch.zeros(1, 64, 2), torch.zeros(1, 100, 2), k, torch.ones(1, 100, dtype=torch.bool))
        return run

    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).split(".")[-1]
        for d in (16, 32, 64, 128):
            cases.append((f"attention token {name} D={d} atomic", attention(dtype, 1, "atomic", d=d)))
            cases.append((f"attention cluster c=8 {name} D={d} atomic", attention(dtype, 8, "atomic", d=d)))
        cases.append((f"attention token {name} D=32 reverse", attention(dtype, 1, "reverse")))
        cases.append((f"attention cluster c=8 {name} D=32 reverse", attention(dtype, 8, "reverse")))
        cases.append((f"merge {name} C=192", merge(dtype)))
    cases.append(("knn k=8", knn(8)))
    cases.append(("knn k=16", knn(16)))
    return cases


def compile_all(arch: int = 90, only: str | None = None) -> list[KernelResources]:
    """Compile every kernel variant the launchers use for sm_<arch> (cases matching the regular
    expression `only`, default all); returns their resources."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset (run it in a fresh process)")
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.runtime import driver  # noqa: PLC0415
    from triton.runtime.jit import KernelInterface  # noqa: PLC0415

    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    compiled: list[tuple[str, object, dict]] = []
    current_case = [""]

    def compile_instead_of_launch(self, grid):
        def launch(*args, **kwargs):
            kernel = self.warmup(*args, grid=grid, **kwargs)
            constants = {k: v for k, v in kwargs.items() if k.isupper()}
            compiled.append((current_case[0], kernel, constants))
        return launch

    from .settings import kernel_settings  # noqa: PLC0415

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = compile_instead_of_launch
    try:
        with kernel_settings(compile_only=True):
            for name, run in _cases():
                if only and re.search(only, name) is None:
                    continue
                current_case[0] = name
                run()
    finally:
        KernelInterface.__getitem__ = original

    report = []
    for case, kernel, constants in compiled:
        regs, local, shared = _resource_usage(kernel.asm["cubin"])
        report.append(KernelResources(kernel=kernel.name, case=case,
                                      constants=" ".join(f"{k}={v}" for k, v in constants.items()),
                                      registers=regs, local_bytes=local, shared_bytes=shared,
                                      num_warps=kernel.metadata.num_warps,
                                      tensor_cores=bool(re.search(r"\b(wgmma|mma)\.", kernel.asm["ptx"]))))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    parser.add_argument("--only", default=None, help="only cases whose name matches this regular expression")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    report = compile_all(args.arch, args.only)
    if args.json:
        sys.stdout.write(json.dumps([asdict(r) for r in report]) + "\n")
        return 0
    sys.stdout.write(f"{'case':44s} {'kernel':22s} {'regs':>5s} {'spill B':>8s} {'smem B':>7s} {'warps':>5s} mma\n")
    for r in report:
        sys.stdout.write(f"{r.case:44s} {r.kernel:22s} {r.registers:5d} {r.local_bytes:8d} {r.shared_bytes:7d} "
                         f"{r.num_warps:5d} {'yes' if r.tensor_cores else 'no'}\n")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    raise SystemExit(main())
