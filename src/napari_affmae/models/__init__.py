"""Models: AFFMAE and the baselines behind one registry.

>>> from napari_affmae.models import create_model, list_models
>>> mae = create_model("affmae_tiny")                      # MAE pretraining model
>>> seg = create_model("affmae_tiny", task="segmentation", num_classes=3)
"""
from .registry import create_model, list_models, register_model

from . import affmae, baselines, feature_forest  # noqa: E402,F401,I001  (each family registers its models)

__all__ = ["create_model", "list_models", "register_model"]
