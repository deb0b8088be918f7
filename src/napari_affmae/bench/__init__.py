"""Benchmarks a lab runs on its own machine and data (``affmae bench ...``).

* `efficiency`: parameters, FLOPs, peak memory and step times of AFFMAE and the baselines
  (ViT-MAE, UM-MAE, GreenMIM) at matched size across resolutions.
* `em_protocol`: the few-strokes protocol on EM stacks: tasks, slice splits, label regimes, metrics.
* `em_segmentation`, `em_ablation`, `preview`: few-label segmentation, variants of AFFMAE
  pretraining, and the Live preview against an ilastik-style random forest, under that protocol.
* `flops`: FLOP counting that also covers the ops ``torch.utils.flop_counter`` cannot see.
* `memory`: peak memory of one call (CUDA allocator statistics, or the process's peak RSS on CPU).

Each command prints a table or JSON and writes its results as JSON where asked.
"""
