"""End to end: the AFFMAE model on the Triton kernels equals the model on the reference ops.

Every attention, merge and KNN call of the model goes through the dispatching ops, so forcing
``kernel_settings(backend="triton")`` runs the whole tiny model on the kernels (interpreted on CPU).
"""
from __future__ import annotations

import torch

from affmae_kernels import kernel_settings
from napari_affmae.models.registry import create_model


def _loss_and_grads(model, image, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same mask for both backends
    loss = model(image)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tiny_affmae_matches_reference_backend(tops, device, monkeypatch):
    """The model's default (per-token neighbourhoods); cluster tiles are covered op by op."""
    torch.manual_seed(0)
    model = create_model("affmae_tiny", task="mae").to(device)
    image = torch.randn(1, 1, 32, 64, device=device)
    with kernel_settings(backend="reference"):
        ref_loss, ref_grads = _loss_and_grads(model, image, seed=1)
    calls = []
    original = tops.attention_forward
    monkeypatch.setattr(tops, "attention_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    with kernel_settings(backend="triton", debug=True):
        loss, grads = _loss_and_grads(model, image, seed=1)
    assert calls, "the model did not reach the Triton attention"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        err = float((grads[name] - ref).abs().max())
        assert err <= 1e-3 * max(float(ref.abs().max()), 1e-6), f"{name}: gradient differs by {err:.2e}"
