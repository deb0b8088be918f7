"""Memory-lean layers: chunked, recomputed relative-position MLPs keep the maths of the plain MLP."""
from __future__ import annotations

import pytest
import torch

from affmae_kernels import reference
from napari_affmae.models import create_model
from napari_affmae.models.layers import Mlp, RelativePositionBias, chunked_pointwise_mlp


def _mlp_and_input(n=37, m=6):
    torch.manual_seed(0)
    mlp = Mlp(5, 32, 8).double()
    x = torch.randn(2, n, m, 5, dtype=torch.float64)
    return mlp, x


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 6 * 32 * 8 * 5, 10**9])  # one row, 5 rows, everything
def test_chunked_mlp_equals_plain_mlp_with_gradients(chunk_bytes):
    mlp, x = _mlp_and_input()
    x.requires_grad_(True)
    grad_out = torch.randn(2, 37, 6, 8, dtype=torch.float64)
    want = mlp(x)
    want_grads = torch.autograd.grad(want, [x, *mlp.parameters()], grad_out)
    got = chunked_pointwise_mlp(mlp, x, chunk_bytes=chunk_bytes)
    got_grads = torch.autograd.grad(got, [x, *mlp.parameters()], grad_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(chunked_pointwise_mlp(mlp, x, chunk_bytes=chunk_bytes), want.detach(),
                                   rtol=1e-12, atol=1e-12)


def test_relative_position_bias_saves_no_hidden_activations():
    torch.manual_seed(0)
    rpb = RelativePositionBias(heads=4, layers=2, hidden=32)
    rel = torch.randn(1, 512, 64, 5)
    hidden_bytes = 512 * 64 * 32 * 4
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in rpb.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        biases = rpb(rel)
    assert sum(saved.values()) < hidden_bytes // 4  # the input (5 features) only, no [B, Nq, M, 32]
    sum(b.sum() for b in biases).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in rpb.parameters())


@pytest.mark.parametrize("neighborhood", ["token", "cluster"])
def test_model_step_equals_unchunked_reference(monkeypatch, neighborhood):
    """A float64 AFFMAE training step: same loss and gradients with the unchunked attention."""
    torch.manual_seed(0)
    model = create_model("affmae_tiny", neighborhood=neighborhood).double()
    x = torch.randn(1, 1, 64, 48, dtype=torch.float64)
    mask = model.random_mask(1, 8, 6)

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = model(x, mask=mask)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    monkeypatch.setattr(reference, "neighborhood_attention", reference._unchunked_neighborhood_attention)
    monkeypatch.setattr("napari_affmae.models.layers.chunked_pointwise_mlp", lambda mlp, x, **kw: mlp(x))
    monkeypatch.setattr("napari_affmae.models.affmae_encoder.chunked_pointwise_mlp", lambda mlp, x, **kw: mlp(x))
    want_loss, want_grads = step()
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-8, atol=1e-10, msg=name)
