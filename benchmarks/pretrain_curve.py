"""Pretraining curve of AFFMAE on real EM, and the token-flow picture of the architecture page.

Runs the engine's `pretrain` job on a real EM stack (default: ISBI 2012 test slices, unlabelled),
records the loss of every step, then draws, on a held-out real EM tile, which lattice positions
stay visible and which tokens each stage keeps after adaptive merging.

    python benchmarks/pretrain_curve.py --steps 300            # CPU, ~10-20 min on 2 cores
    python benchmarks/pretrain_curve.py --steps 3000 --model affmae_small --device cuda

Writes docs/images/pretrain_curve.png, docs/images/token_flow.png and docs/pretraining.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_affmae.data.normalize import apply_normalization
from napari_affmae.engine import PretrainConfig, load_package, pretrain
from napari_affmae.io import read_image
from napari_affmae.models import create_model
from napari_affmae.models.masking import blob_mask

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    data = Path(os.environ.get("AFFMAE_DATA", REPO.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=data, help="EM data directory (default: ../shared/data)")
    p.add_argument("--train", default="isbi2012/test_raw.tif", help="stack to pretrain on, relative to --data")
    p.add_argument("--slices", type=int, default=10, help="use the first N slices of the stack")
    p.add_argument("--tile", default="vnc/stack1_raw.tif", help="stack for the token-flow picture")
    p.add_argument("--model", default="affmae_tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "pretrain_curve")
    p.add_argument("--replot", action="store_true",
                   help="skip training: redraw the figures from --run-dir's package and losses.json")
    return p.parse_args(argv)


def smooth(values: list[float], window: int = 20) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < window:
        return v
    kernel = np.ones(window) / window
    return np.convolve(v, kernel, mode="valid")


def plot_curve(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(np.arange(1, len(losses) + 1), losses, color="0.75", lw=0.8, label="per step")
    s = smooth(losses)
    ax.plot(np.arange(len(losses) - len(s) + 1, len(losses) + 1), s, color="C0", lw=2, label="20-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (res2 + 0.12 res4 + 0.05 res5)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def plot_token_flow(model, tile: np.ndarray, path: Path, seed: int = 0) -> list[int]:
    """Draw visible cells and the tokens kept by each stage on one real EM tile; return token counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    x = torch.from_numpy(tile[None, None].astype(np.float32))
    h, w = tile.shape[0] // 8, tile.shape[1] // 8
    # 32-pixel blobs (one of the training scales) read best in a picture
    mask = blob_mask(1, h, w, model.default_mask.ratio, generator=torch.Generator().manual_seed(seed), cells=(4,))
    stages = model.forward_encoder(x, mask)
    counts = [s.tokens.shape[1] for s in stages]
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.8), dpi=100)
    axes[0].imshow(tile, cmap="gray")
    axes[0].imshow(np.kron(mask[0].numpy(), np.ones((8, 8))), cmap="Reds", alpha=0.35, vmin=0, vmax=1)
    axes[0].set_title(f"input + blob mask (red = masked),\n{int((~mask).sum())} of {h * w} patches visible", fontsize=9)
    for i, stage in enumerate(stages):
        ax = axes[i + 1]
        ax.imshow(tile, cmap="gray")
        pos = stage.pos[0].numpy() * 8 + 4  # lattice -> pixel centres
        ax.scatter(pos[:, 1], pos[:, 0], s=9 if i == 0 else 14, c=f"C{i}", edgecolors="k", linewidths=0.3)
        ax.set_title(f"res{i + 2}: {counts[i]} tokens (dim {stage.tokens.shape[-1]})", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)
    return counts


def parameter_table() -> list[tuple[str, float, float, float]]:
    """(name, encoder M, MAE total M, segmentation total M) for every AFFMAE size."""
    rows = []
    for size in ("tiny", "small", "base"):
        with torch.device("meta"):
            mae = create_model(f"affmae_{size}")
            seg = create_model(f"affmae_{size}", task="segmentation", num_classes=3)
        enc = sum(p.numel() for p in mae.encoder.parameters())
        rows.append((f"affmae_{size}", enc / 1e6, sum(p.numel() for p in mae.parameters()) / 1e6,
                     sum(p.numel() for p in seg.parameters()) / 1e6))
    return rows


def run_pretraining(args: argparse.Namespace, train_path: Path) -> tuple[list[float], float, Path]:
    """Pretrain with the engine job; return per-step losses, minutes and the package path."""
    stack = np.asarray(read_image(train_path).array[: args.slices])
    losses: list[float] = []

    def record(event) -> None:
        if event.loss is not None and event.step > len(losses):
            losses.append(float(event.loss))
            if event.step % 25 == 0:
                print(f"step {event.step}/{event.total} loss {event.loss:.4f} ({event.images_per_s or 0:.1f} img/s)",
                      flush=True)

    config = PretrainConfig(model=args.model, crop_size=(args.crop, args.crop), batch_size=args.batch_size,
                            steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 20), device=args.device,
                            output_dir=args.run_dir, checkpoint_every=max(50, args.steps // 4), log_every=1)
    start = time.time()
    result = pretrain([stack], config, progress=record)
    return losses, (time.time() - start) / 60, Path(result.package_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    train_path = args.data / args.train
    if not train_path.exists():
        print(f"EM data not found: {train_path} (set --data or AFFMAE_DATA)", file=sys.stderr)
        return 2
    losses_file = args.run_dir / "losses.json"
    if args.replot:
        losses = json.loads(losses_file.read_text())["losses"]
        minutes = json.loads(losses_file.read_text())["minutes"]
        package_path = args.run_dir / "pretrained.affmae"
    else:
        losses, minutes, package_path = run_pretraining(args, train_path)
        losses_file.write_text(json.dumps({"losses": losses, "minutes": minutes}))
    package = load_package(package_path)
    out_img = args.out / "images"
    out_img.mkdir(parents=True, exist_ok=True)
    plot_curve(losses, out_img / "pretrain_curve.png",
               f"{args.model} on {args.train} ({args.slices} slices), crops {args.crop}^2, batch {args.batch_size}")

    tile_stack = read_image(args.data / args.tile).array
    tile = np.asarray(tile_stack[len(tile_stack) // 2, 256:512, 384:640])
    tile = apply_normalization(tile, package.stats, mode=package.normalization_mode)
    counts = plot_token_flow(package.build_model(), np.asarray(tile, dtype=np.float32), out_img / "token_flow.png")

    first, last = float(np.mean(losses[:20])), float(np.mean(losses[-20:]))
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device {args.device}"
    summary = dict(model=args.model, steps=args.steps, first20=first, last20=last, minutes=minutes, counts=counts)
    print(json.dumps(summary))
    verdict = ("The run reaches that floor within ~50 steps and stays there: in this CPU budget the model has "
               "learned the output statistics, not yet the EM structure; longer (GPU) runs are needed to see the "
               "curve go below the floor.\n\n" if last > 1.14 else
               "The run goes below that floor: the model predicts structure, not only statistics.\n\n")
    page = args.out / "pretraining.md"
    page.write_text(
        "# Pretraining curve on real EM\n\n"
        f"Command: `python benchmarks/pretrain_curve.py --steps {args.steps} --model {args.model}`  \n"
        f"Machine: {machine}. Wall time {minutes:.1f} min.  \n"
        f"Data: `{args.train}` (first {args.slices} slices) from ../shared/data; ISBI 2012 challenge "
        "(Cardona et al. 2010; Arganda-Carreras et al. 2015).\n\n"
        f"Mean loss of the first 20 steps {first:.3f}, of the last 20 steps {last:.3f}. With per-patch "
        "normalised targets, predicting every masked patch as flat (its mean) scores (63/64) x 1.17 = 1.152 "
        "on this weighted sum. "
        + verdict
        + "![loss curve](images/pretrain_curve.png)\n\n"
        f"Token flow on a 256 x 256 tile of `{args.tile}` (VNC, Gerhard et al., figshare "
        f"doi:10.6084/m9.figshare.856713): tokens per stage {counts}.\n\n"
        "![token flow](images/token_flow.png)\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
