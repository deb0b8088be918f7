"""napari-affmae: pretrain, fine-tune and segment EM stacks with AFFMAE in napari."""
__version__ = "0.1.0"
