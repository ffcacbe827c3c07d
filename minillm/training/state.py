"""What last.pt holds: a trainer's whole state (its TrainState, the weights, the optimizers, every random
number generator's), as tensors and plain types, so that it loads with weights_only=True and a resumed run
draws exactly the numbers the uninterrupted run would have drawn. The configs are not in it: the run folder
holds them (train_config.json, best_model_config.json)."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minillm.checkpoint import clean_state_dict
from minillm.version import stamp

CHECKPOINT_FORMAT = 1


@dataclass
class TrainState:
    """Where a training is: the counters and the history that a resumed run continues from."""

    step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    best_step: int = 0  # the step of the best model (best_model.pt)
    evals_since_best: int = 0  # evaluations without a better validation loss (early stopping counts them)
    elapsed: float = 0.0  # training seconds, summed over resumed sessions
    tokens_seen: float = 0  # training tokens (for pairs: the predicted tokens) of all the steps so far
    overfitting: bool = False  # the overfitting warning was given
    history: list[dict[str, float]] = field(default_factory=list)  # per evaluation: step, train_loss, val_loss

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> TrainState:
        """The TrainState saved in a last.pt (its fields sit beside the weights, as in every last.pt)."""
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})


def rng_state(batch_generator: torch.Generator) -> dict[str, Any]:
    """Python's, numpy's, torch's (and CUDA's) global generators and the batch generator."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "batches": batch_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], batch_generator: torch.Generator) -> None:
    """Put back what rng_state() recorded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    batch_generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainer_state(trainer: Any, rank_rng: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Everything a Trainer needs to continue exactly.

    `rank_rng`: each rank's torch generator state (its dropout) in a distributed run. The batch
    generator is the same on every rank, so rank 0's "rng" serves them all.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        **stamp(),
        "model": clean_state_dict(trainer.model.state_dict()),
        "optimizer": trainer.optimizer.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers[1:]],  # Muon, when used
        "scaler": trainer.scaler.state_dict(),
        **trainer.state.to_dict(),
        "rng": rng_state(trainer.batch_generator),
        "rank_rng": rank_rng or [],
        "world_size": trainer.world_size,
    }


def restore_trainer_state(trainer: Any, state: dict[str, Any]) -> None:
    """Put a Trainer back where trainer_state() found it."""
    trainer.model.load_state_dict(clean_state_dict(state["model"]))
    trainer.optimizer.load_state_dict(state["optimizer"])
    for optimizer, saved in zip(trainer.optimizers[1:], state.get("optimizers", []), strict=True):
        optimizer.load_state_dict(saved)
    if state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.state = TrainState.from_checkpoint(state)
    restore_rng_state(state["rng"], trainer.batch_generator)
    rank_rng = state.get("rank_rng") or []
    if trainer.ddp is not None and len(rank_rng) == trainer.world_size:  # same world size: exactly as it was
        torch.set_rng_state(rank_rng[trainer.rank])
