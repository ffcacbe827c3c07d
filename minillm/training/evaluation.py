"""Scoring a model: token-weighted mean loss, perplexity, and `evaluate_run` (a run's best model on its
test split or on another file; for a task with answers, also its greedy answers: training.answers)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minillm.checkpoint import load_run, read_train_config
from minillm.config import IGNORE_INDEX
from minillm.data.batches import Batch, Batches
from minillm.data.corpus import FILE_FORMAT_NAMES
from minillm.data.prepare import Spelling, open_split, write_splits
from minillm.data.sources import load_samples
from minillm.data.split_record import SplitRecord, read_split_record
from minillm.data.tasks import Task, task_for
from minillm.generation import unknown_characters_warning
from minillm.models import is_encoder_decoder
from minillm.tokenizers import Tokenizer
from minillm.training.answers import score_answers
from minillm.training.precision import autocast, autocast_dtype

MAX_LOG_PERPLEXITY = 700.0  # exp(700) is near the float64 limit
OVERFIT_EVALS = 3  # val loss rising this many evaluations in a row (train loss falling) = overfitting
UTF8_CONTINUATION_MASK, UTF8_CONTINUATION = 0xC0, 0x80  # a byte 10xxxxxx continues a character
Z_95 = 1.96  # a 95% confidence interval is +- this many standard errors
MIN_SAMPLE_ROWS = 30  # a sampled estimate uses at least this many rows (windows or pairs)
RAW_BITS_PER_BYTE = 8  # what a byte no token spells costs in bits per byte: it can only be sent as it is


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged loss reads as a huge number rather than an overflow."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def is_overfitting(history: list[dict[str, float]], evals: int = OVERFIT_EVALS) -> bool:
    """Val loss rose at each of the last `evals` evaluations while train loss fell over them."""
    recent = history[-(evals + 1):]
    if len(recent) < evals + 1:
        return False
    val_rising = all(b["val_loss"] > a["val_loss"] for a, b in zip(recent, recent[1:], strict=False))
    return val_rising and recent[-1]["train_loss"] < recent[0]["train_loss"]


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


def overfitting_warning(parameters: int, train_tokens: int, best_step: int, best_val_loss: float) -> str:
    """What the run says, once, when it starts overfitting (see is_overfitting), and what usually helps."""
    return (f"warning: overfitting: validation loss rose for {OVERFIT_EVALS} evaluations while training loss "
            f"fell; the model ({parameters:,} parameters) is memorising its {train_tokens:,} training tokens. "
            "What usually helps: a smaller model (--d-model, --n-layers), dropout (--dropout 0.1-0.3), or more "
            f"data. Early stopping keeps the best model (step {best_step}, val loss {best_val_loss:.4f}).")


def text_sizes(tokenizer: Tokenizer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes, characters) that each token id stands for, as (vocab_size,) int64 tensors on `device`.

    Characters are counted as UTF-8 lead bytes, so that they add up over BPE tokens holding part of one.
    """
    table = tokenizer.token_bytes()
    n_bytes = [len(piece) for piece in table]
    n_chars = [sum((byte & UTF8_CONTINUATION_MASK) != UTF8_CONTINUATION for byte in piece) for piece in table]
    return (torch.tensor(n_bytes, dtype=torch.long, device=device),
            torch.tensor(n_chars, dtype=torch.long, device=device))


def _sizes_of(table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) the sizes (bytes or characters, by `table`) of each row's scored targets (IGNORE_INDEX counts 0)."""
    scored = targets != IGNORE_INDEX
    return (table[targets.clamp_min(0)] * scored).sum(1)


def target_bytes(batches: Iterable[tuple[Batch, int]], tokenizer: Tokenizer, device: torch.device) -> int:
    """The UTF-8 bytes of the text that the scored targets of (batch, tokens) pairs stand for."""
    n_bytes, _ = text_sizes(tokenizer, device)
    return sum(int(_sizes_of(n_bytes, batch["targets"]).sum()) for batch, _ in batches)


def bits_per_unit(loss: float, tokens: int, units: int) -> float:
    """Bits per byte (or character) of a mean loss in nats per token over `tokens` tokens."""
    return loss * tokens / math.log(2) / units if units else float("nan")


def honest_bits_per_byte(loss: float, tokens: int, spelled_bytes: int, unspelled_share: float = 0.0) -> float:
    """Bits per byte of the text, counting the bytes that the tokenizer cannot spell (`unspelled_share` of
    the text: dropped, or encoded as its unknown token) at RAW_BITS_PER_BYTE each. Left out, they would make
    a tokenizer that drops most of a text look like a good model of it."""
    if unspelled_share <= 0:
        return bits_per_unit(loss, tokens, spelled_bytes)
    if unspelled_share >= 1 or not spelled_bytes:
        return float(RAW_BITS_PER_BYTE)
    unspelled_bytes = spelled_bytes * unspelled_share / (1 - unspelled_share)
    bits = loss * tokens / math.log(2) + RAW_BITS_PER_BYTE * unspelled_bytes
    return bits / (spelled_bytes + unspelled_bytes)


@torch.no_grad()
def _row_scores(model: torch.nn.Module, batches: Iterable[tuple[Batch, int]], sizes: tuple[torch.Tensor, ...],
                device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """(rows, 4) float64: nats, tokens, bytes and characters of the targets of each row of the batches."""
    was_training = model.training
    model.eval()
    rows = []
    for batch, _ in batches:
        targets = batch["targets"]  # (B, T)
        with autocast(device, dtype):
            logits, _ = model(**{k: v for k, v in batch.items() if k != "targets"})  # (B, T, V)
        nats = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                               reduction="none")
        scored = targets != IGNORE_INDEX
        rows.append(torch.stack([nats.double().sum(1), scored.sum(1).double(),
                                 *(_sizes_of(table, targets).double() for table in sizes)], dim=1))
    model.train(was_training)
    return torch.cat(rows).cpu() if rows else torch.zeros((0, 4), dtype=torch.float64)


def _ratio_ci95(numerator: torch.Tensor, denominator: torch.Tensor, population: int) -> float:
    """Half-width of the 95% confidence interval of sum(numerator) / sum(denominator) over a simple random
    sample of `population` rows (the ratio estimator, with the finite-population correction)."""
    n = len(numerator)
    if n < 2 or n >= population or float(denominator.sum()) == 0:
        return 0.0
    ratio = numerator.sum() / denominator.sum()
    residual_var = ((numerator - ratio * denominator) ** 2).sum() / (n - 1)
    variance = (1 - n / population) * residual_var / (n * denominator.mean() ** 2)
    return Z_95 * math.sqrt(float(variance))


def score(model: torch.nn.Module, batches: Batches, batch_size: int, device: torch.device, dtype: torch.dtype | None,
          tokenizer: Tokenizer, max_tokens: int | None = None, seed: int = 0, progress: bool = False,
          unspelled_share: float = 0.0) -> dict[str, Any]:
    """Loss, perplexity, bits per byte and per character over the scored targets of `batches` (a split's, as
    its task batches it): all of them, or, when there are more than `max_tokens`, an estimate from a seeded random
    sample of rows (windows or pairs) of about that many tokens, with 95% confidence half-widths.
    `unspelled_share`: of the split's text, what the tokenizer cannot spell (see honest_bits_per_byte)."""
    n_rows, all_tokens = batches.n_sequential, batches.sequential_tokens
    rows = None
    if max_tokens is not None and all_tokens > max_tokens:
        k = max(MIN_SAMPLE_ROWS, math.ceil(n_rows * max_tokens / all_tokens))
        if k < n_rows:
            order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
            rows = sorted(order[:k].tolist())
    n_batches = math.ceil((n_rows if rows is None else len(rows)) / batch_size)
    bar = tqdm(batches.sequential(batch_size, device, rows), total=n_batches, unit="batch", leave=False,
               dynamic_ncols=True, desc="testing", disable=not progress)
    try:
        scores = _row_scores(model, bar, text_sizes(tokenizer, device), device, dtype)
    finally:
        bar.close()
    nats, tokens, n_bytes, chars = scores.T
    total_tokens, total_bytes, total_chars = (int(column.sum()) for column in (tokens, n_bytes, chars))
    loss = float(nats.sum()) / total_tokens if total_tokens else float("nan")
    metrics = {"loss": loss, "perplexity": perplexity(loss),
               "bits_per_byte": honest_bits_per_byte(loss, total_tokens, total_bytes, unspelled_share),
               "bits_per_char": bits_per_unit(loss, total_tokens, total_chars),
               "tokens": total_tokens, "bytes": total_bytes, "chars": total_chars,
               "sampled": rows is not None, "tokens_in_split": all_tokens}
    if unspelled_share > 0:
        metrics["unspelled_share"] = unspelled_share
    if rows is not None:
        metrics["loss_ci95"] = _ratio_ci95(nats, tokens, n_rows)
        metrics["bits_per_byte_ci95"] = _ratio_ci95(nats / math.log(2), n_bytes, n_rows)
    return {**metrics, **batches.cuts()}  # (for pairs: how many the context cut, and the targets it left out)


def describe_score(metrics: dict[str, Any]) -> str:
    """"loss 1.3550, perplexity 3.88, 1.955 bits per byte (1.955 per character) over 55,000 tokens"."""
    def ci(key: str) -> str:
        return f" \u00b1 {metrics[key]:.4f}" if key in metrics else ""

    text = (f"loss {metrics['loss']:.4f}{ci('loss_ci95')}, perplexity {metrics['perplexity']:.2f}, "
            f"{metrics['bits_per_byte']:.3f}{ci('bits_per_byte_ci95')} bits per byte "
            f"({metrics['bits_per_char']:.3f} per character) over ")
    if metrics.get("sampled"):
        text += (f"a random sample of {metrics['tokens']:,} of the {metrics['tokens_in_split']:,} tokens "
                 "(\u00b1: 95% confidence; --test-tokens sets the sample size)")
    else:
        text += f"{metrics['tokens']:,} tokens"
    if metrics.get("unspelled_share"):
        text += (f"; {metrics['unspelled_share']:.2%} of the text's bytes, which the tokenizer cannot spell, count "
                 f"{RAW_BITS_PER_BYTE} bits each")
    if metrics.get("pairs_cut"):
        text += (f"; {metrics['pairs_cut']:,} of {metrics['pairs']:,} pairs are longer than the context, and "
                 f"{metrics['target_tokens_cut']:,} target tokens beyond it are not scored")
    return text


def task_scores(task: Task, model: torch.nn.Module, batches: Batches, batch_size: int, device: torch.device,
                dtype: torch.dtype | None, tokenizer: Tokenizer, max_tokens: int | None, max_pairs: int | None,
                seed: int, progress: bool = False, unspelled_share: float = 0.0) -> dict[str, Any]:
    """`score`, and for a task with answers (pairs) the scores of the model's greedy answers to at most
    `max_pairs` of them (training.answers): the final test's and `evaluate`'s figures."""
    metrics = score(model, batches, batch_size, device, dtype, tokenizer, max_tokens, seed, progress,
                    unspelled_share)
    pairs = task.answer_pairs(batches)
    if pairs is not None and pairs.n_pairs:
        metrics.update(score_answers(model, tokenizer, pairs, max_pairs, seed, batch_size, progress,
                                     task.answer_unit))
    return metrics


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, device: str | None = None,
                 max_tokens: int | None | str = "run", progress: bool = False, max_pairs: int | None | str = "run",
                 warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a run's best model on its test split, or on every sample of
    another file (read for the run's task: a run trained on pairs reads a pair file as pairs and plain text
    as text); on pairs, also the scores of its greedy answers. `max_tokens` and `max_pairs`: see score and
    training.answers.score_answers (default "run": the run's --test-tokens and --test-pairs). `warn` hears
    that another file has characters the run's tokenizer does not know."""
    run = load_run(run_dir, device)
    config = read_train_config(run_dir)
    dtype = autocast_dtype(config.dtype, run.device)
    encoder_decoder = is_encoder_decoder(run.config)
    settings = dict(tokenizer=run.tokenizer, seed=config.seed, progress=progress,
                    max_tokens=config.test_tokens if max_tokens == "run" else max_tokens,
                    max_pairs=config.test_pairs if max_pairs == "run" else max_pairs)
    run_task = task_for(read_split_record(run_dir).task, encoder_decoder)
    if data is None:
        batches = open_split(run_dir, "test", run.config, encoder_decoder, config.source_fraction)
        metrics = task_scores(run_task, run.model, batches, config.batch_size, run.device, dtype, **settings,
                              unspelled_share=read_split_record(run_dir).unspelled_share("test"))
        return {**metrics, "data": f"{run_dir} test split"}
    loaded = load_samples(data, run_task.scores_files_as, config.split_mode, config.separator, config.data_format,
                          config.source_column, config.target_column, config.text_column)
    task = task_for(loaded.task, encoder_decoder)
    spelling = Spelling.measure(run.tokenizer, task.training_texts(loaded.samples))
    settings["unspelled_share"] = spelling.share
    warning = unknown_characters_warning(run.tokenizer, "".join(text for sample in loaded.samples
                                                                for text in task.sample_texts(sample)))
    if warning and warn is not None:
        warn(f"{data}: {warning}")
    with tempfile.TemporaryDirectory(prefix="minillm-eval-") as tmp:
        token_type, tokens = write_splits(tmp, task, {"test": loaded.samples}, run.tokenizer, contiguous=False)
        record = SplitRecord(task.name, token_type, tokens, {"test": len(loaded.samples)},
                             separator=task.separator_ids(run.tokenizer))
        batches = task.open_batches(tmp, "test", record, run.config, config.source_fraction)
        metrics = task_scores(task, run.model, batches, config.batch_size, run.device, dtype, **settings)
        del batches  # release the memmaps before the folder goes
    read_as = FILE_FORMAT_NAMES.get(loaded.file_format, "each file by its format")
    return {**metrics, "data": f"{data} (read as {read_as}, {loaded.how})"}
