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


# The schedules by TrainConfig.schedule: the share of (learning_rate - min_lr) kept at a point of the decay (0 to 1).
SCHEDULE_SHAPES = {"cosine": _cosine, "warmdown": _warmdown}


def lr_at(step: float, config: TrainConfig, max_steps: int) -> float:
    """Learning rate for `step` (0-based): linear warmup to learning_rate, then the schedule down to min_lr."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    decay_steps = max(1, max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + SCHEDULE_SHAPES[config.schedule](progress, config) * (config.learning_rate - config.min_lr)


def _adamw(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms or biases); one fused kernel for all its parameters
    where this torch has one for the device (CUDA, CPU)."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             **({"fused": True} if fused else {}))


def _muon(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Muon: orthogonalised momentum, its step scaled to AdamW's size so one learning rate serves both."""
    return torch.optim.Muon(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                            adjust_lr_fn="match_rms_adamw")


# Each optimizer a run may use: how it is built from the parameters it steps, and the state it keeps per
# parameter, in floats of the parameter's size (AdamW's two moments, Muon's one momentum buffer).
OPTIMIZER_BUILDERS = {"adamw": _adamw, "muon": _muon}
STATE_FLOATS = {"adamw": 2, "muon": 1}

Named = list[tuple[str, torch.nn.Parameter]]


def _all_adamw(named: Named) -> dict[str, list[torch.nn.Parameter]]:
    return {"adamw": [p for _, p in named]}


def _muon_for_hidden(named: Named) -> dict[str, list[torch.nn.Parameter]]:
    hidden = [p for n, p in named if p.dim() == 2 and not n.endswith(NOT_FOR_MUON)]
    hidden_ids = {id(p) for p in hidden}
    return {"adamw": [p for _, p in named if id(p) not in hidden_ids], "muon": hidden}


# The recipes by TrainConfig.optimizer: which optimizer steps each trainable parameter (AdamW first).
OPTIMIZER_RECIPES = {"adamw": _all_adamw, "muon": _muon_for_hidden}


def owned_parameters(model: torch.nn.Module, config: TrainConfig) -> dict[str, list[torch.nn.Parameter]]:
    """Optimizer name -> the trainable parameters it steps in a run of `config` (each parameter once; a tied
    weight is one parameter). "adamw": all of them; "muon": the hidden matrices to Muon, the embedding,
    the head and the norms to AdamW."""
    return OPTIMIZER_RECIPES[config.optimizer]([(n, p) for n, p in model.named_parameters() if p.requires_grad])


def make_optimizers(model: torch.nn.Module, config: TrainConfig,
                    device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers of a run, AdamW first: what the trainer steps, the preview times and memory.py counts."""
    return [OPTIMIZER_BUILDERS[name](params, config, device)
            for name, params in owned_parameters(model, config).items()]


def optimizer_state_floats(model: torch.nn.Module, config: TrainConfig) -> int:
    """The floats the run's optimizers keep (their per-parameter state; `model` may be on the meta device)."""
    return sum(STATE_FLOATS[name] * sum(p.numel() for p in params)
               for name, params in owned_parameters(model, config).items())
