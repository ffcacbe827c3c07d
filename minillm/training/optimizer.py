"""The optimisation recipe: AdamW with weight decay on matrices only, and the learning-rate schedule
(linear warmup, then cosine decay to a floor)."""

from __future__ import annotations

import inspect
import math

import torch

from minillm.config import TrainConfig


def lr_at(step: int, config: TrainConfig, max_steps: int) -> float:
    """Learning rate for `step` (0-based): linear warmup to learning_rate, then cosine decay to min_lr."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    decay_steps = max(1, max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms or biases); one fused kernel for all parameters
    (on CUDA, and on the CPU where this torch has it: a few percent of a small model's step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             **({"fused": True} if fused else {}))
