"""The compiled (non-interpreter) path builds for sm_90 on a machine without a GPU.

`affmae_kernels.compile_report` drives the real launchers with a target-only Triton driver,
so every kernel goes through Triton -> PTX -> ptxas. Runs in a fresh process because the
interpreter mode of this test session would otherwise wrap the kernels.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

EXPECTED_KERNELS = {
    "na_fwd_token_kernel", "na_bwd_token_kernel", "na_fwd_cluster_kernel", "na_bwd_cluster_kernel",
    "dkdv_reverse_kernel", "merge_fwd_kernel", "merge_bwd_kernel", "knn_kernel",
}


def _cuda_toolchain_present() -> bool:
    try:
        import triton  # noqa: PLC0415
    except ImportError:
        return False
    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


@pytest.mark.skipif(not _cuda_toolchain_present(), reason="Triton's bundled CUDA tools (ptxas, cuobjdump) are absent")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("AFFMAE_KERNELS")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "affmae_kernels.compile_report", "--arch", "90", "--json",
         "--only", "bfloat16 D=32|merge bfloat16|knn k=8"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {row["kernel"] for row in report} == EXPECTED_KERNELS
    for row in report:
        assert row["local_bytes"] == 0, f"{row['case']}: {row['kernel']} spills registers"
        assert 0 < row["registers"] <= 255
    cluster_rows = [row for row in report if row["kernel"].endswith("cluster_kernel")]
    assert all("BLOCK_C=16" in row["constants"] for row in cluster_rows)  # c = 8 padded to a 16-row tl.dot tile
    assert all(row["tensor_cores"] for row in cluster_rows), "cluster tiles must use mma (tensor cores) in bf16"
    assert not any(row["tensor_cores"] for row in report if "token" in row["kernel"])
