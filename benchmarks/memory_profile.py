"""Where the peak memory of a segmentation forward (or a training step) goes, as Markdown tables.

For each model and tile side: the peak memory the call adds (`napari_affmae.bench.memory.measure_peak`, the
number `affmae bench efficiency` reports), with ``--allocator`` the highest total of bytes live in torch's
allocator (`napari_affmae.bench.memory.allocator_peak`: no fragmentation, independent of what ran before),
and the tensors alive at the moment of the highest total of live tensor storages
(`napari_affmae.bench.tensor_profile`), grouped by the module and op that made them.

    .venv/bin/python benchmarks/memory_profile.py --resolutions 512,1024                    # AFFMAE, both paths
    .venv/bin/python benchmarks/memory_profile.py --models vit_mae_tiny --resolutions 512
    .venv/bin/python benchmarks/memory_profile.py --call train --resolutions 512

``--call infer``: AFFMAE-tiny's segmentation forward in inference mode, once with whole tensors
(``inference_chunk_bytes=None``, the path training uses) and once chunked (the default). ``--call train``:
forward + backward of the pretraining model on one masked tile. Random weights: memory does not depend on
them. Peaks are CPU figures; they do not depend on the machine's load, times would.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for folder in ("src", "kernels"):
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

from napari_affmae.bench.memory import allocator_peak, measure_peak  # noqa: E402
from napari_affmae.bench.tensor_profile import profile_live_tensors  # noqa: E402
from napari_affmae.models import create_model  # noqa: E402

MIB = 2**20


def _calls(model_name: str, call: str, resolution: int) -> list[tuple[str, torch.nn.Module, object]]:
    """(label, model, zero-argument call) of one model at one tile side."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, resolution, resolution)
    if call == "train":
        mae = create_model(model_name)
        mask = mae.random_mask(1, resolution // 8, resolution // 8)

        def step():
            mae.zero_grad(set_to_none=True)
            mae(x, mask=mask)["loss"].backward()

        return [(f"{model_name}, training step", mae, step)]
    seg = create_model(model_name, task="segmentation", num_classes=2).eval()
    chunked = getattr(seg, "inference_chunk_bytes", None)
    out = []
    for label, budget in (("whole tensors", None), ("chunked", chunked)):
        if label == "chunked" and budget is None:
            continue

        def infer(budget=budget):
            if hasattr(seg, "inference_chunk_bytes"):
                seg.inference_chunk_bytes = budget
            with torch.inference_mode():
                seg(x)

        out.append((f"{model_name}, segmentation forward, {label}" if chunked else f"{model_name}, segmentation "
                    "forward", seg, infer))
    return out


def profile(model_name: str, call: str, resolution: int, top: int, allocator: bool = False) -> str:
    """Markdown: peak RSS (and with ``allocator`` the allocator's peak) and the largest tensor groups at the
    live-tensor peak of each call."""
    parts = []
    for label, model, fn in _calls(model_name, call, resolution):
        fn()  # warm-up: one-off allocations (kernel caches) are not the call's
        rss = min(measure_peak(fn, torch.device("cpu"))[1].bytes for _ in range(2))
        alloc = f"allocator peak {allocator_peak(fn)[1] / MIB:.1f} MiB; " if allocator else ""
        prof = profile_live_tensors(fn, model)
        rows = [f"| {m} | `{what}` | {n} | {b / MIB:.1f} |" for m, what, n, b in prof.grouped()[:top]]
        phases = ", ".join(f"{m} {b / MIB:.0f}" for m, b in prof.peaks_by_module(1))
        parts += [f"### {label}, {resolution}^2", "",
                  f"Peak memory added (RSS): **{rss / MIB:.0f} MiB**; {alloc}live tensors at their peak: "
                  f"{prof.peak_bytes / MIB:.1f} MiB, reached in `{prof.module_at_peak or '(top level)'}`. "
                  f"Highest live-tensor total per top-level module [MiB]: {phases}.", "",
                  "| made in module | op, shape, dtype | tensors | MiB |", "|---|---|---:|---:|", *rows, ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="affmae_tiny", help="comma-separated registry names (default affmae_tiny)")
    parser.add_argument("--resolutions", default="512,1024", help="square tile sides (default 512,1024)")
    parser.add_argument("--call", choices=("infer", "train"), default="infer")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--top", type=int, default=8, help="tensor groups listed per call (default 8)")
    parser.add_argument("--allocator", action="store_true",
                        help="also the peak of torch's allocator (bench.memory.allocator_peak; slow: minutes at 1024^2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"Machine: {platform.machine()} CPU, torch {torch.__version__}, {args.threads} thread(s); "
          "CPU, memory only.\n")
    for name in args.models.split(","):
        for res in (int(r) for r in args.resolutions.split(",")):
            print(profile(name, args.call, res, args.top, args.allocator), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
