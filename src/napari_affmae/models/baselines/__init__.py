"""Baselines in the same framework as AFFMAE, registered on import:

- ``vit_mae_{tiny,small,base}``: ViT-MAE (`vit_mae`), encoder on visible tokens only.
- ``um_mae_{tiny,small,base}``: UM-MAE (`um_mae`), uniform sampling + secondary masking,
  Swin pyramid on the compacted quarter-size image.
- ``greenmim_{tiny,small,base}``: GreenMIM (`greenmim`), Swin with group window attention
  over visible tokens and sparse merging.
- ``unet_{tiny,small}``: a plain U-Net (`unet`), segmentation from scratch only (the lab baseline).

All take one-channel ``[B, 1, H, W]`` input on the 8-px patch lattice; ``model.size_multiple``
is the side multiple (pixels) a model needs (16 for UM-MAE pretraining, 8 otherwise), and
``model.random_mask(batch, h, w, spec=None, device=None, generator=None)`` (same signature as AFFMAE)
draws a mask of the family's structure; ``spec`` is a `masking.MaskSpec` (None: the family's
``default_mask``).
"""
from . import greenmim, um_mae, unet, vit_mae  # noqa: F401  (registration)
from .greenmim import GreenMIM, GreenMIMConfig, GreenMIMSegmenter
from .um_mae import UMMAE, UMMAEConfig, UMMAESegmenter
from .vit_mae import ViTMAE, ViTMAEConfig, ViTSegmenter

__all__ = ["GreenMIM", "GreenMIMConfig", "GreenMIMSegmenter", "UMMAE", "UMMAEConfig", "UMMAESegmenter",
           "ViTMAE", "ViTMAEConfig", "ViTSegmenter"]
