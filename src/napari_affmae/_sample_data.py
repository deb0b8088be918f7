"""napari sample data: a synthetic EM stack with its ground-truth classes.

Called by napari through the npe2 manifest (``napari.yaml``); imports nothing from napari.
"""
from __future__ import annotations

from typing import Any

SAMPLE_SHAPE = (16, 256, 320)  # (Z, Y, X): a small, non-square stack that loads in well under a second


def make_synthetic_em() -> list[tuple[Any, dict[str, Any], str]]:
    """Return napari LayerData tuples ``[(image, meta, "image"), (labels, meta, "labels")]``:
    uint8 stacks ``[Z, Y, X]``; labels 1 = membrane, 2 = mitochondrion, 3 = cytoplasm."""
    from napari_affmae.data.synthetic import CLASS_NAMES, synthetic_em

    image, labels = synthetic_em(SAMPLE_SHAPE, seed=0)
    class_meta = {"class_names": list(CLASS_NAMES), "source": "napari_affmae.data.synthetic_em(seed=0)"}
    image_meta = {"name": "Synthetic EM", "colormap": "gray", "contrast_limits": (0, 255), "metadata": class_meta}
    labels_meta = {"name": "Synthetic EM labels", "opacity": 0.4, "metadata": class_meta}
    return [(image, image_meta, "image"), (labels, labels_meta, "labels")]
