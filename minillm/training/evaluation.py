"""Scoring a model: token-weighted mean loss, perplexity, and `evaluate_run` (a run's best model on its
test split or on another file)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from minillm.checkpoint import load_run, read_train_config
from minillm.data.batches import Batch, open_prepared, open_split
from minillm.data.corpus import FILE_FORMAT_NAMES, load_samples
from minillm.data.prepare import write_splits
from minillm.models import is_encoder_decoder
from minillm.training.precision import autocast, autocast_dtype

MAX_LOG_PERPLEXITY = 700.0  # exp(700) is near the float64 limit


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged loss reads as a huge number rather than an overflow."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[tuple[Batch, int]], device: torch.device,
              dtype: torch.dtype | None) -> tuple[float, int]:
    """Token-weighted mean loss over (batch, target tokens) pairs, and the tokens counted."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for batch, n_tokens in batches:
        with autocast(device, dtype):
            _, loss = model(**batch)
        total += loss.double() * n_tokens
        tokens += n_tokens
    model.train(was_training)
    return (total.item() / tokens if tokens else float("nan")), tokens


def score(model: torch.nn.Module, batches: Any, batch_size: int, device: torch.device,
          dtype: torch.dtype | None) -> dict[str, Any]:
    """Loss, perplexity and tokens scored over every token of `batches` (LMBatches or PairBatches)."""
    loss, tokens = mean_loss(model, batches.sequential(batch_size, device), device, dtype)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}


def evaluate_run(run_dir: str | Path, data: str | Path | None = None,
                 device: str | None = None) -> dict[str, Any]:
    """Loss and perplexity of a run's best model on its test split, or on every sample of another file."""
    run = load_run(run_dir, device)
    config = read_train_config(run_dir)
    dtype = autocast_dtype(config.dtype, run.device)
    encoder_decoder = is_encoder_decoder(run.config)
    if data is None:
        batches = open_split(run_dir, "test", run.config, encoder_decoder, config.source_fraction)
        return {**score(run.model, batches, config.batch_size, run.device, dtype), "data": f"{run_dir} test split"}
    loaded = load_samples(data, encoder_decoder, config.split_mode, config.separator, config.data_format,
                          config.source_column, config.target_column)
    with tempfile.TemporaryDirectory(prefix="minillm-eval-") as tmp:
        spec = write_splits(tmp, loaded.format, {"test": loaded.samples}, run.tokenizer, contiguous=False)
        batches = open_prepared(tmp, "test", loaded.format, spec.dtype, run.config, encoder_decoder,
                                config.source_fraction)
        metrics = score(run.model, batches, config.batch_size, run.device, dtype)
        del batches  # release the memmaps before the folder goes
    return {**metrics, "data": f"{data} (read as {FILE_FORMAT_NAMES[loaded.file_format]}, {loaded.how})"}
