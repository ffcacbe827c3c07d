"""The optimisation recipe: the optimizers (AdamW, or Muon for the hidden matrices with AdamW for the rest)
and the learning-rate schedule (linear warmup, then cosine decay, or a constant rate with a linear
warm-down, to a floor)."""

from __future__ import annotations

import inspect
import math

import torch

from minillm.config import TrainConfig

# Matrices Muon does not take: the embedding (a lookup table, not a linear map) and the head tied to it.
NOT_FOR_MUON = ("embed_tokens.weight", "lm_head.weight")


def _cosine(progress: float, config: TrainConfig) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _warmdown(progress: float, config: TrainConfig) -> float:
    """Constant, then linear to the floor over the last warmdown_fraction of the steps after warmup."""
    start = 1.0 - config.warmdown_fraction
    return 1.0 if progress <= start else max(0.0, (1.0 - progress) / max(config.warmdown_fraction, 1e-12))


# The schedules by name: the share of (learning_rate - min_lr) kept at a point of the decay (0 to 1).
SCHEDULES = {"cosine": _cosine, "warmdown": _warmdown}


def lr_at(step: float, config: TrainConfig, max_steps: int) -> float:
    """Learning rate for `step` (0-based): linear warmup to learning_rate, then the schedule down to min_lr."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    decay_steps = max(1, max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + SCHEDULES[config.schedule](progress, config) * (config.learning_rate - config.min_lr)


def _adamw(groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    fused = device.type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             **({"fused": True} if fused else {}))


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms or biases); one fused kernel for all parameters
    (on CUDA, and on the CPU where this torch has it: a few percent of a small model's step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return _adamw([{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], config, device)


def make_optimizers(model: torch.nn.Module, config: TrainConfig,
                    device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers of a run, AdamW first. With config.optimizer "muon": Muon (orthogonalised momentum,
    its step scaled to AdamW's size so one learning rate serves both) for the hidden matrices, AdamW for the
    embedding, the head and the norms."""
    if config.optimizer == "adamw":
        return [make_optimizer(model, config, device)]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if p.dim() == 2 and not n.endswith(NOT_FOR_MUON)]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in hidden_ids]
    adamw = _adamw([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
                    {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], config, device)
    muon = torch.optim.Muon(hidden, lr=config.learning_rate, weight_decay=config.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return [adamw, muon]
