"""One AFFMAE pretext variant on the unlabelled real-EM stacks, then the reconstruction probe on held-out crops.

Pretrains affmae_tiny with the engine's `pretrain` job on ``vnc/stack2_raw.tif`` and
``isbi2012/test_raw.tif`` (both unlabelled), then probes the package with
`bench.em_ablation.probe_pretraining` on ``vnc/stack1_raw.tif`` slices 10-19 and
``isbi2012/train_raw.tif`` slices 0-9: model loss / flat-patch loss on the same 16 x 8 crops and masks
for every variant (blob masks of the default scales, and i.i.d. random masks), each against the flat
predictor of the variant's own target. Appends one JSON row to ``<out>/results.jsonl``.

    python benchmarks/pretext_variants.py reference
    python benchmarks/pretext_variants.py pool2 --opts '{"target_pool": 2}'
    python benchmarks/pretext_variants.py random_raw_pool2 --mask-type random --opts '{"target_pool": 2, "norm_pix_loss": false}'

``--locality`` instead prints, for a package, how much of each masked patch's prediction depends on the
pixels of its own neighbourhood (gradient mass within 1.5 lattice cells) and where that dependence is
centred; a decoder that reads its neighbours shows most mass near the query. ``--yardstick`` prints the
probe ratio of a predictor without learning (each masked patch = mean of its visible 4-neighbours).

Data: ../shared/data (or $AFFMAE_DATA); VNC: Gerhard et al., figshare doi:10.6084/m9.figshare.856713
(CC BY-NC-SA 3.0); ISBI 2012: Cardona et al. 2010, Arganda-Carreras et al. 2015.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import tifffile
import torch


def data_dir() -> Path:
    return Path(os.environ.get("AFFMAE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _down(v: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return v
    z, h, w = v.shape
    return v[:, : h // f * f, : w // f * f].reshape(z, h // f, f, w // f, f).mean((2, 4)).astype(np.float32)


def run_variant(args: argparse.Namespace) -> dict:
    from napari_affmae.bench.em_ablation import probe_pretraining
    from napari_affmae.engine import PretrainConfig, pretrain

    d = data_dir()
    train = [_down(tifffile.imread(d / "vnc/stack2_raw.tif"), args.down),
             _down(tifffile.imread(d / "isbi2012/test_raw.tif"), args.down)]
    held = [_down(tifffile.imread(d / "vnc/stack1_raw.tif")[10:20], args.down),
            _down(tifffile.imread(d / "isbi2012/train_raw.tif")[:10], args.down)]
    out = Path(args.out) / args.name
    cfg = PretrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, mask_type=args.mask_type,
                         mask_ratio=args.mask_ratio, model_options=json.loads(args.opts), output_dir=out,
                         overwrite=True, checkpoint_every=10**6, log_every=50, seed=args.seed, device="cpu")
    started = time.time()
    res = pretrain(train, cfg)
    seconds = time.time() - started
    row = dict(name=args.name, opts=args.opts, steps=args.steps, lr=args.lr, warmup=args.warmup,
               mask_type=args.mask_type, down=args.down, seconds=seconds, s_per_step=seconds / args.steps,
               first20=float(np.mean(res.losses[:20])), last20=float(np.mean(res.losses[-20:])))
    row.update(probe_pretraining(res.package_path, held, 128))
    row.update({"random_" + k: v for k, v in probe_pretraining(res.package_path, held, 128, mask_type="random").items()})
    with open(Path(args.out) / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return row


def locality(package: str) -> None:
    from napari_affmae.engine import load_package
    from napari_affmae.models.common import lattice_positions, split_by_mask
    from napari_affmae.models.masking import make_mask

    model = load_package(package).build_model("cpu").eval()
    raw = tifffile.imread(data_dir() / "vnc/stack1_raw.tif")[12, 256:384, 256:384].astype(np.float32)
    x = torch.from_numpy((raw - raw.min()) / (raw.max() - raw.min()))[None, None].requires_grad_(True)
    mask = make_mask("random", 1, 16, 16, 0.5, torch.Generator().manual_seed(0))
    out = model(x, mask=mask)
    _, masked = split_by_mask(mask)
    pos = lattice_positions(16, 16)[masked[0]]
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    for j in (0, 10, 40, 100):
        (g,) = torch.autograd.grad(out["pred"][0, int(masked[0, j])].pow(2).sum(), x, retain_graph=True)
        cells = g[0, 0].abs().reshape(16, 8, 16, 8).sum((1, 3))
        near = ((yy - pos[j, 0]) ** 2 + (xx - pos[j, 1]) ** 2).sqrt() <= 1.5
        centre = [round(float((cells * c).sum() / cells.sum()), 1) for c in (yy, xx)]
        print(f"query {pos[j].tolist()}: dependence centred at {centre}, "
              f"share within 1.5 cells {float(cells[near].sum() / cells.sum()):.3f}")


def yardstick() -> None:
    """Neighbour-mean interpolation on the raw 4 x 4-mean target: each masked patch predicted flat at the mean of
    its visible 4-neighbour patches (the crop's visible mean where it has none), on the probe's crops and masks."""
    import torch.nn.functional as F

    from napari_affmae.data.sampling import PatchSampler
    from napari_affmae.engine.inputs import as_input_image, combined_stats
    from napari_affmae.engine.pretrain import normalised_batch
    from napari_affmae.models.common import patch_targets
    from napari_affmae.models.masking import make_mask

    d = data_dir()
    inputs = [as_input_image(tifffile.imread(d / "vnc/stack1_raw.tif")[10:20]),
              as_input_image(tifffile.imread(d / "isbi2012/train_raw.tif")[:10])]
    _, stats = combined_stats(inputs, seed=0)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    for kind in ("blob", "random"):
        sampler = PatchSampler([i.array for i in inputs], (128, 128), seed=1234, pad=True)
        gen = torch.Generator().manual_seed(1234)
        interp, flat = [], []
        for _ in range(16):  # as probe_pretraining: 16 batches of 8, masks drawn after each batch
            x = torch.from_numpy(normalised_batch(sampler, stats, 8))[:, None]
            mask = make_mask(kind, 8, 16, 16, 0.5, gen)
            t = patch_targets(x, 8, False, pool=2).reshape(8, 16, 16, 16)  # [B, h, w, T]
            vis = (~mask).float()[:, None]  # [B, 1, h, w]
            means = t.mean(-1)[:, None]
            total = F.conv2d(means * vis, kernel, padding=1)
            count = F.conv2d(vis, kernel, padding=1)
            crop_mean = (means * vis).sum((1, 2, 3)) / vis.sum((1, 2, 3))  # [B]
            pred = torch.where(count > 0, total / count.clamp_min(1), crop_mean[:, None, None, None])[:, 0]
            interp.append(float(((pred[..., None] - t) ** 2)[mask].mean()))
            flat.append(float(((crop_mean[:, None, None, None] - t) ** 2)[mask].mean()))
        print(f"{kind} masks: neighbour-mean interpolation / flat = {np.mean(interp) / np.mean(flat):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="variant name (output folder), or a package path with --locality")
    p.add_argument("--opts", default="{}", help="AFFMAE config fields as JSON (model_options)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--mask-type", default="blob", choices=("blob", "random"))
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--down", type=int, default=1, help="downsample the EM by this factor (mean pooling) first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/pretext")
    p.add_argument("--locality", action="store_true", help="probe where a package's predictions look")
    p.add_argument("--yardstick", action="store_true",
                   help="no training: the neighbour-mean interpolation baseline on raw 4 x 4-mean targets (NAME unused)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.locality:
        locality(args.name)
        return
    if args.yardstick:
        yardstick()
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(json.dumps(run_variant(args)))


if __name__ == "__main__":
    main()
