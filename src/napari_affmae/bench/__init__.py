"""Benchmarks that ship with the package (``affmae bench ...``).

* `efficiency`: parameters, FLOPs, peak memory and step times of AFFMAE and the baselines
  (ViT-MAE, UM-MAE, GreenMIM) at matched size across resolutions; writes docs/benchmarks.md.
* `flops`: FLOP counting that also covers the ops ``torch.utils.flop_counter`` cannot see.
* `memory`: peak memory of one call (CUDA allocator statistics, or the process's peak RSS on CPU).
"""
