"""The full-resolution fusion head of AFFMAE segmentation: locality (its reach), banded inference, learning
thin structure the per-cell logit patches cannot draw, and the head of packages written before it."""
from __future__ import annotations

import pytest
import torch

from napari_affmae.engine import ModelPackage, load_package, save_package
from napari_affmae.models import create_model
from napari_affmae.models.affmae_fusion import FusionHead, fuse_in_bands


def _inputs(h: int, w: int, dtype=torch.float64, grad: bool = False):
    """Random head inputs for an image of ``[8h, 8w]`` px: lattice, level-2, level-1 maps and the image."""
    g = torch.Generator().manual_seed(1)
    shapes = [(1, h, w, 12), (1, 6, 2 * h, 2 * w), (1, 6, 4 * h, 4 * w), (1, 1, 8 * h, 8 * w)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(grad) for s in shapes]


def _head(depth: int = 1) -> FusionHead:
    torch.manual_seed(0)
    return FusionHead(decoder_dim=12, stem_channels=6, num_classes=2, width=4, depth=depth).double()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_an_output_row_depends_only_on_inputs_within_the_reach(depth):
    head = _head(depth)
    lattice, level2, level1, x = _inputs(12, 3, grad=True)
    row = 47  # pixel row of the output
    head(lattice, level2, level1, x)[:, :, row].sum().backward()
    for stride, tensor, axis in [(8, lattice, 1), (4, level2, 2), (2, level1, 2), (1, x, 2)]:
        touched = tensor.grad.abs().sum(dim=[d for d in range(tensor.dim()) if d != axis]).nonzero().flatten()
        # pixel rows covered by the touched rows of this map
        lo, hi = int(touched.min()) * stride, (int(touched.max()) + 1) * stride - 1
        assert row - head.reach <= lo and hi <= row + head.reach, (stride, lo, hi)
        assert lo < row < hi  # and it does read its neighbourhood


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("rows, strip_rows", [(1, None), (2, 1), (5, 3), (5, 16), (100, None), (100, 7)])
def test_bands_and_strips_equal_the_whole_head(rows, strip_rows, depth):
    """Bands of lattice rows for the coarse steps, strips of pixel rows (any number, even one) for the
    full-resolution step: the same values as the whole head, for any number of convs per step."""
    head = _head(depth)
    lattice, level2, level1, x = _inputs(13, 4)
    want = head(lattice, level2, level1, x)
    maps = {2: level2, 1: level1}
    got = fuse_in_bands(head, lattice, x, lambda level, a, b: maps[level][:, :, a:b], rows, strip_rows)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _thin_lines(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 64 x 64 image of dark 2-px lines at random offsets on noise, and their mask (class 1)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(64, 64, dtype=torch.long)
    for _ in range(3):
        y, x = torch.randint(4, 60, (2,), generator=g).tolist()
        label[y:y + 2] = 1
        label[:, x:x + 2] = 1
    image = 0.6 - 0.4 * label.float() + 0.05 * torch.randn(64, 64, generator=g)
    return image[None], label


@pytest.mark.parametrize("seg_head", ["fusion", "patch"])
def test_the_fusion_head_learns_two_pixel_lines(seg_head):
    """Fit 2-px lines on 4 images for 40 steps: the fusion head draws them (IoU > 0.8 on 2 new images); the
    per-cell patch head without refinement is the reference it has to beat (it stays below)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("affmae_tiny", task="segmentation", num_classes=2, seg_head=seg_head, refine=False)
    train = [_thin_lines(s) for s in range(4)]
    x = torch.stack([im for im, _ in train])
    y = torch.stack([lab for _, lab in train])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y, weight=torch.tensor([1.0, 3.0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = [_thin_lines(s) for s in (10, 11)]
    with torch.no_grad():
        pred = model(torch.stack([im for im, _ in test])).argmax(1)
    truth = torch.stack([lab for _, lab in test]).bool()
    iou = float(((pred == 1) & truth).sum() / ((pred == 1) | truth).sum())
    if seg_head == "fusion":
        assert iou > 0.8, iou
    else:
        assert iou < 0.8, iou


def test_segmentation_packages_written_before_the_fusion_head_keep_their_patch_head(tmp_path, package_without_fields):
    torch.manual_seed(0)
    old = create_model("affmae_tiny", task="segmentation", num_classes=3, seg_head="patch")
    saved = save_package(ModelPackage.from_model(old, provenance={"job": "finetune"}), tmp_path / "seg.affmae")
    package = load_package(package_without_fields(saved, tmp_path / "old.affmae", ["seg_head", "fusion_width"]))
    model = package.build_model("cpu")
    assert model.config.seg_head == "patch" and model.fusion is None and model.head is not None
    x = torch.randn(1, 1, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), old.eval()(x))
    # a pretraining package written then fine-tunes into today's default head
    mae = save_package(ModelPackage.from_model(create_model("affmae_tiny"), provenance={"job": "pretrain"}),
                       tmp_path / "mae.affmae")
    config = load_package(package_without_fields(mae, tmp_path / "old_mae.affmae", ["seg_head", "fusion_width"])).config
    assert create_model("affmae_tiny", task="segmentation", num_classes=2, **config).fusion is not None
