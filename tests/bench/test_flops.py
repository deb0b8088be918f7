"""count_flops on the registered formulas of the affmae:: ops (no op is re-bound in any module)."""
from __future__ import annotations

import torch

import affmae_kernels
from napari_affmae.bench import flops as fl
from napari_affmae.models.registry import create_model


def test_both_modes_agree_op_class_by_op_class():
    torch.manual_seed(0)
    mae = create_model("affmae_tiny")
    x = torch.randn(1, 1, 64, 96)
    mask = mae.random_mask(1, 8, 12)
    counts = []
    for exact in (False, True):
        mae.zero_grad(set_to_none=True)
        counts.append(fl.count_flops(lambda: mae(x, mask=mask)["loss"].backward(), exact=exact))
    stand_in, exact = counts
    assert stand_in.by_op == exact.by_op
    assert stand_in.calls == exact.calls
    assert {fl.DENSE, fl.NEIGHBORHOOD, fl.MERGE, fl.KNN} <= set(stand_in.by_op)


def test_stand_ins_replace_the_ops_without_rebinding_them():
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    idx = torch.zeros(1, 8, 8, dtype=torch.long)
    with fl.shape_only_neighborhood_ops() as tally:
        assert affmae_kernels.neighborhood_attention is fl.dispatch.neighborhood_attention
        out = affmae_kernels.neighborhood_attention(q, q, q, idx)
        out.sum().backward()
    assert torch.count_nonzero(out) == 0 and torch.count_nonzero(q.grad) == 0
    assert tally.calls == {fl.NEIGHBORHOOD: 1}
    real = affmae_kernels.neighborhood_attention(q, q, q, idx)
    assert torch.count_nonzero(real) > 0
