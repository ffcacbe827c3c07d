"""What last.pt holds: a trainer's whole state, every random number generator's included, as tensors and
plain types, so that it loads with weights_only=True and a resumed run draws exactly the numbers the
uninterrupted run would have drawn."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from minillm.checkpoint import clean_state_dict
from minillm.version import __version__

CHECKPOINT_FORMAT = 1


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
        "minillm_version": __version__,
        "model": clean_state_dict(trainer.model.state_dict()),
        "optimizer": trainer.optimizer.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers[1:]],  # Muon, when used
        "scaler": trainer.scaler.state_dict(),
        **{name: getattr(trainer, name) for name in COUNTERS},
        "history": trainer.history,
        "rng": rng_state(trainer.batch_generator),
        "rank_rng": rank_rng or [],
        "world_size": trainer.world_size,
        "model_config": trainer.model_config.to_dict(),
        "train_config": trainer.config.to_dict(),
    }


COUNTERS = ("step", "best_val_loss", "best_step", "evals_since_best", "elapsed", "tokens_seen", "overfitting")


def restore_trainer_state(trainer: Any, state: dict[str, Any]) -> None:
    """Put a Trainer back where trainer_state() found it."""
    trainer.model.load_state_dict(clean_state_dict(state["model"]))
    trainer.optimizer.load_state_dict(state["optimizer"])
    for optimizer, saved in zip(trainer.optimizers[1:], state.get("optimizers", []), strict=True):
        optimizer.load_state_dict(saved)
    if state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    for name in COUNTERS:
        setattr(trainer, name, state[name])
    trainer.history = list(state["history"])
    restore_rng_state(state["rng"], trainer.batch_generator)
    rank_rng = state.get("rank_rng") or []
    if trainer.ddp is not None and len(rank_rng) == trainer.world_size:  # same world size: exactly as it was
        torch.set_rng_state(rank_rng[trainer.rank])
