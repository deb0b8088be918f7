"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio * base_lr``.

The schedule is a pure function of the step, so resuming only needs the step count. Each
optimiser param group may carry an ``lr_scale`` (layer-wise decay); its lr is
``schedule(step) * lr_scale``.
"""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr_ratio: float = 0.01) -> float:
    """Learning rate at ``step`` (0-based) of ``total_steps``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive; got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    min_lr = base_lr * min_lr_ratio
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets the lr of every param group of ``optimizer`` for a given step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, base_lr: float,
                 min_lr_ratio: float = 0.01) -> None:
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.base_lr = float(base_lr)
        self.min_lr_ratio = float(min_lr_ratio)
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr_ratio)

    def apply(self, step: int) -> float:
        """Set the lr for ``step`` on every group; returns the unscaled lr."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.step_count = step
        return lr

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "base_lr": self.base_lr,
                "min_lr_ratio": self.min_lr_ratio, "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.base_lr = float(state["base_lr"])
        self.min_lr_ratio = float(state["min_lr_ratio"])
        self.step_count = int(state["step_count"])
