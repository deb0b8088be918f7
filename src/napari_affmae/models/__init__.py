"""Models: AFFMAE and the baselines behind one registry.

>>> from napari_affmae.models import create_model, list_models
>>> mae = create_model("affmae_tiny")                      # MAE pretraining model
>>> seg = create_model("affmae_tiny", task="segmentation", num_classes=3)
"""
from .masking import MaskSpec
from .registry import create_model, list_models, masking_of, register_model

from . import affmae, baselines, feature_forest  # noqa: E402,F401,I001  (each family registers its models)

__all__ = ["MaskSpec", "create_model", "list_models", "masking_of", "register_model"]
