"""Two CPU jobs side by side: do they slow each other down more than sharing the cores costs?

Runs two identical ``affmae pretrain`` jobs (real subprocesses of the CLI, synthetic EM stack)
one after the other, then both at once, in two modes:

* ``fixed``: every job asks for all cores (``--threads <cores>``, what PyTorch does by itself);
* ``shared``: the default, where each job holds a `CpuShare` and sizes its thread pool to its share
  of the free cores, re-measured while it runs.

The figure of merit is (wall time of both together) / (wall time one after the other): 1.0 means
sharing costs nothing beyond running in turn, 2.0 means each job took twice as long as in turn.

    python benchmarks/cpu_sharing.py                # table on stdout + docs/cpu-sharing.md
    python benchmarks/cpu_sharing.py --steps 10     # quicker

Run it on an otherwise idle machine: the load average at the start is written on the page.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / "src"), str(REPO / "kernels"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _job(image: Path, out: Path, steps: int, crop: int, threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "napari_affmae.cli", "pretrain", str(image), "-o", str(out), "--steps", str(steps),
           "--crop-size", str(crop), "--batch-size", "8", "--device", "cpu", "--quiet", "--checkpoint-every",
           str(steps), "--warmup-steps", "1", "--overwrite"]
    return cmd + (["--threads", str(threads)] if threads else [])


def _run(commands: list[list[str]], together: bool) -> float:
    """Wall seconds to run ``commands`` (all at once, or one after the other); raises if one fails."""
    started = time.perf_counter()
    if together:
        procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
        errors = [p.communicate()[1] for p in procs]
        codes = [p.returncode for p in procs]
    else:
        done = [subprocess.run(c, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
        errors, codes = [d.stderr for d in done], [d.returncode for d in done]
    if any(codes):
        raise RuntimeError(f"a job failed: {[e.decode()[-400:] for e in errors]}")
    return time.perf_counter() - started


def measure(steps: int, crop: int) -> list[dict]:
    import numpy as np  # noqa: PLC0415
    import tifffile  # noqa: PLC0415

    sys.path[:0] = [str(REPO / "src")]
    from napari_affmae.data.synthetic import synthetic_em  # noqa: PLC0415
    from napari_affmae.engine.cpu_share import available_cores  # noqa: PLC0415

    cores = available_cores()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image, _ = synthetic_em((4, 256, 256), seed=0)
        tifffile.imwrite(root / "em.tif", np.asarray(image), imagej=True, metadata={"axes": "ZYX"})
        for mode, threads in (("fixed", cores), ("shared", None)):
            jobs = [_job(root / "em.tif", root / f"{mode}{i}", steps, crop, threads) for i in range(2)]
            alone = _run(jobs, together=False)
            together = _run(jobs, together=True)
            rows.append({"mode": mode, "in_turn_s": alone, "together_s": together, "ratio": together / alone})
            print(f"{mode:7s} in turn {alone:6.1f} s  together {together:6.1f} s  ratio {together / alone:.2f}",
                  flush=True)
    return rows


def render(rows: list[dict], steps: int, crop: int, load: float, seconds: float, load_end: float) -> str:
    from napari_affmae.engine.cpu_share import available_cores  # noqa: PLC0415

    lines = ["# Two CPU jobs side by side", "",
             f"- Machine: {platform.machine()}, {available_cores()} cores, no GPU; load average {load:.2f} when the "
             f"run started and {load_end:.2f} when it ended (other programs add to it); {seconds / 60:.1f} min in "
             "all.",
             f"- Command: `python benchmarks/cpu_sharing.py --steps {steps} --crop {crop}`",
             f"- Each job: `affmae pretrain` on a synthetic 4 x 256 x 256 stack, {steps} steps of 8 crops of "
             f"{crop} x {crop} px, AFFMAE-tiny, CPU.", "",
             "Ratio = wall time of both jobs started together / wall time of the two run one after the other "
             "(1.0: sharing costs nothing; the target is at most 1.3).", "",
             "| threads per job | in turn (s) | together (s) | ratio |", "| --- | ---: | ---: | ---: |"]
    names = {"fixed": f"fixed: all {available_cores()} cores each (`--threads {available_cores()}`, PyTorch's own "
                      "default)",
             "shared": "shared: each job's share of the free cores (the default)"}
    for r in rows:
        lines.append(f"| {names[r['mode']]} | {r['in_turn_s']:.1f} | {r['together_s']:.1f} | {r['ratio']:.2f} |")
    lines += ["", "Every `affmae` command and every widget job holds such a share (`engine/cpu_share.py`): it "
              "counts the jobs of its own process, measures the cores other processes keep busy "
              "(`/proc/stat`), and re-sizes PyTorch's thread pool before each step. `--threads N` fixes the "
              "count instead.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="pretraining steps per job (default: 20)")
    parser.add_argument("--crop", type=int, default=128, help="crop side in px, multiple of 8 (default: 128)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "cpu-sharing.md")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    rows = measure(args.steps, args.crop)
    args.out.write_text(render(rows, args.steps, args.crop, load, time.perf_counter() - started, os.getloadavg()[0]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
