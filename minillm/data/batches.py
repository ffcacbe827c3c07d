"""Batches of a prepared split: random windows of a token stream, or padded (source, target) pairs.

A batch is a dict of tensors passed to the model as keyword arguments: model(**batch) -> (logits, loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.data.corpus import PAIRS
from minillm.data.prepare import INCOMPLETE_FIX, read_offsets, read_split_record, read_stream
from minillm.errors import MiniLLMError
from minillm.run_folder import RunFolder

Batch = dict[str, torch.Tensor]


class LMBatches:
    """Random contiguous windows of a token stream (for the encoder-decoder: split into source, target)."""

    def __init__(self, tokens: np.ndarray, max_seq_len: int, encoder_decoder: bool = False,
                 source_fraction: float = 0.5, bos_id: int = 1, pad_id: int = 0):
        if len(tokens) < 2:
            raise MiniLLMError(f"a data split has only {len(tokens)} token(s); add more data")
        self.tokens = tokens
        # The length of a window: the context length, or less for a split shorter than that (rather than
        # an error).
        self.seq_len = min(max_seq_len, len(tokens) - 1)
        self.encoder_decoder = encoder_decoder
        self.bos_id, self.pad_id = bos_id, pad_id
        # The encoder-decoder sees the first n_source tokens of a window and predicts the rest.
        self.n_source = max(1, min(self.seq_len - 1, round((self.seq_len + 1) * source_fraction)))
        if encoder_decoder and self.seq_len < 2:
            raise MiniLLMError("a data split is too short for the encoder-decoder (3+ tokens); add more data")

    @property
    def n_windows(self) -> int:
        return len(self.tokens) - self.seq_len

    def sample_starts(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.n_windows, (batch_size,), generator=generator)

    def batch_at(self, starts: torch.Tensor, device: torch.device) -> Batch:
        """The windows beginning at `starts` (B,), as model inputs on `device`."""
        offsets = starts.numpy()[:, None] + np.arange(self.seq_len + 1)
        windows = torch.from_numpy(self.tokens[offsets].astype(np.int64))  # (B, seq_len + 1)
        return self.to_inputs(windows, device)

    def to_inputs(self, windows: torch.Tensor, device: torch.device) -> Batch:
        if self.encoder_decoder:
            source, continuation = windows[:, :self.n_source], windows[:, self.n_source:]
            bos = torch.full((len(windows), 1), self.bos_id, dtype=torch.long)
            batch = {"src_ids": source, "tgt_ids": torch.cat([bos, continuation[:, :-1]], dim=1),
                     "targets": continuation}
        else:
            batch = {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}
        return {k: _to_device(v, device) for k, v in batch.items()}

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Batch:
        return self.batch_at(self.sample_starts(batch_size, generator), device)

    def _sequential_starts(self) -> tuple[list[int], int]:
        """The starts of non-overlapping windows that cover every token once, and how many targets of the
        last one were already scored by the one before."""
        step = self.seq_len + 1 - self.n_source if self.encoder_decoder else self.seq_len
        starts = list(range(0, self.n_windows, step))
        last = self.n_windows - 1  # the window that ends with the last token
        if not self.encoder_decoder and starts[-1] != last:
            # The tail no full step reaches: one more window flush with the end, whose first `overlap`
            # targets were already scored and are set to pad (ignored by the loss).
            return [*starts, last], starts[-1] + self.seq_len - last
        return starts, 0

    @property
    def n_sequential(self) -> int:
        """How many rows `sequential` gives (windows)."""
        return len(self._sequential_starts()[0])

    @property
    def sequential_tokens(self) -> int:
        """How many targets `sequential` scores in all."""
        starts, overlap = self._sequential_starts()
        per_window = self.seq_len + 1 - self.n_source if self.encoder_decoder else self.seq_len
        return len(starts) * per_window - overlap

    def sequential(self, batch_size: int, device: torch.device,
                   rows: list[int] | None = None) -> Iterator[tuple[Batch, int]]:
        """Every token once, in non-overlapping windows: (batch, predicted tokens) for exact evaluation.
        `rows` (ascending indices below n_sequential): only those windows, for a sampled estimate."""
        starts, overlap = self._sequential_starts()
        last_row = len(starts) - 1
        rows = list(range(len(starts))) if rows is None else rows
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            batch = self.batch_at(torch.tensor([starts[r] for r in chunk], dtype=torch.long), device)
            if overlap and chunk[-1] == last_row:
                batch["targets"][-1, :overlap] = self.pad_id
            yield batch, int((batch["targets"] != self.pad_id).sum())


CONTEXT_SUGGESTION_MULTIPLE = 8  # a suggested context length is rounded up to this
CONTEXT_SUGGESTION_SHARE = 0.99  # ... and fits this share of the pairs (and one that fits all is named too)


@dataclass
class PairFit:
    """How the pairs of a split fit the context: what is cut, and what would fit."""

    n_pairs: int
    sources_cut: int  # pairs whose source is longer than the context
    targets_cut: int  # pairs whose target + EOS is longer than the context
    source_tokens_cut: int
    target_tokens_cut: int  # target tokens (EOS counted) beyond the context: never trained on, never scored
    kept_target_tokens: int  # target tokens + EOS within the context: what one pass over the pairs trains on
    fit_most: int  # a context length that fits CONTEXT_SUGGESTION_SHARE of the pairs whole
    fit_all: int  # ... and one that fits all of them

    @property
    def pairs_cut(self) -> int:
        return max(self.sources_cut, self.targets_cut)

    def warning(self, split: str, max_seq_len: int) -> str:
        """What is cut, by how much, and a context length that fits ("" when nothing is cut)."""
        if not self.sources_cut and not self.targets_cut:
            return ""
        cuts = []
        if self.sources_cut:
            cuts.append(f"{self.sources_cut:,} source(s) lose {self.source_tokens_cut:,} tokens")
        if self.targets_cut:
            total = self.kept_target_tokens + self.target_tokens_cut
            lost = "never learned" if split == "training" else "not scored"
            cuts.append(f"{self.targets_cut:,} target(s) lose {self.target_tokens_cut:,} of {total:,} target "
                        f"tokens ({self.target_tokens_cut / total:.0%}; EOS counted), which are {lost}")
        if self.fit_most < self.fit_all:
            fix = (f"--max-seq-len {self.fit_most} would fit {CONTEXT_SUGGESTION_SHARE:.0%} of them whole, "
                   f"{self.fit_all} all")
        else:
            fix = f"--max-seq-len {self.fit_all} would fit them all whole"
        return (f"warning: {self.pairs_cut:,} of {self.n_pairs:,} {split} pairs are longer than the context of "
                f"{max_seq_len} tokens and are cut: {'; '.join(cuts)}; {fix}")


def data_notes(split_record: dict[str, Any], train: LMBatches | PairBatches, test: LMBatches | PairBatches,
               test_tokens: int | None) -> list[str]:
    """What a training says about its data before it starts: the tokens of each split (for pairs, those that
    fit the context, and what is cut), and whether the final test will score a sample (over test_tokens)."""
    samples, tokens = split_record["samples"], split_record["tokens"]
    if isinstance(train, PairBatches):
        notes = [f"data: {samples['train']:,} training pairs with {tokens['train']:,} target tokens, "
                 f"{train.fit().kept_target_tokens:,} within the context with their EOS "
                 f"({samples['val']:,} validation, {samples['test']:,} test pairs)",
                 train.fit().warning("training", train.max_seq_len), test.fit().warning("test", test.max_seq_len)]
    else:
        notes = [f"data: {tokens['train']:,} training tokens ({tokens['val']:,} validation, {tokens['test']:,} test)"]
    if test_tokens is not None and test.sequential_tokens > test_tokens:
        notes.append(f"note: the final test scores a random sample of about {test_tokens:,} of the "
                     f"{test.sequential_tokens:,} test tokens, with its 95% confidence (--test-tokens none: all)")
    return [note for note in notes if note]


def _round_up(n: float, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


class PairBatches:
    """Padded batches of (source, target) pairs for the encoder-decoder.

    Decoder input = BOS + target, targets = target + EOS; padded positions have target pad_id (ignored
    by the loss) and mask False. A pair longer than the context is cut: the source to max_seq_len tokens,
    target + EOS to max_seq_len (a cut target has no EOS: its text does not end there); `fit()` says how
    much is cut.
    """

    def __init__(self, src: np.ndarray, tgt: np.ndarray, offsets: np.ndarray, max_seq_len: int,
                 pad_id: int, bos_id: int, eos_id: int):
        self.src, self.tgt, self.offsets = src, tgt, offsets  # offsets: (2, N + 1) starts of sources, targets
        self.max_seq_len = max_seq_len
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    @property
    def n_pairs(self) -> int:
        return self.offsets.shape[1] - 1

    def fit(self) -> PairFit:
        """What the context cuts from these pairs, and what context length would fit them."""
        src_len, tgt_len = np.diff(self.offsets.astype(np.int64), axis=1)  # (N,) each
        predicted = tgt_len + 1  # the target and its EOS
        length = self.max_seq_len
        needed = np.maximum(src_len, predicted)
        return PairFit(
            n_pairs=self.n_pairs,
            sources_cut=int((src_len > length).sum()),
            targets_cut=int((predicted > length).sum()),
            source_tokens_cut=int(np.clip(src_len - length, 0, None).sum()),
            target_tokens_cut=int(np.clip(predicted - length, 0, None).sum()),
            kept_target_tokens=int(np.minimum(predicted, length).sum()),
            fit_most=_round_up(np.quantile(needed, CONTEXT_SUGGESTION_SHARE) if len(needed) else 1,
                               CONTEXT_SUGGESTION_MULTIPLE),
            fit_all=_round_up(needed.max() if len(needed) else 1, CONTEXT_SUGGESTION_MULTIPLE),
        )

    def batch_of(self, indices: list[int] | np.ndarray, device: torch.device) -> Batch:
        """The pairs `indices`, padded: source cut to the context; target + EOS cut to the context, as
        targets and, shifted right after BOS, as the decoder's input (teacher forcing). Built with whole-array
        numpy operations, no loop over rows."""
        idx = np.asarray(indices, dtype=np.int64)
        (s0, t0), (s1, t1) = self.offsets[:, idx], self.offsets[:, idx + 1]
        src_len = np.minimum(s1 - s0, self.max_seq_len)
        predicted_len = np.minimum(t1 - t0 + 1, self.max_seq_len)  # the target and its EOS
        width = max(1, int(src_len.max()))
        in_source = np.arange(width) < src_len[:, None]
        src_ids = np.where(in_source, _rows(self.src, s0, width), self.pad_id)
        columns = np.arange(int(predicted_len.max()))
        in_target = columns < predicted_len[:, None]
        predicted = np.where(columns == (t1 - t0)[:, None], self.eos_id, _rows(self.tgt, t0, len(columns)))
        targets = np.where(in_target, predicted, self.pad_id)
        tgt_ids = np.full_like(targets, self.pad_id)
        tgt_ids[:, 0] = self.bos_id
        tgt_ids[:, 1:] = np.where(in_target[:, 1:], predicted[:, :-1], self.pad_id)
        batch = {"src_ids": torch.from_numpy(src_ids.astype(np.int64)),
                 "tgt_ids": torch.from_numpy(tgt_ids.astype(np.int64)),
                 # an empty source still shows one (pad) position
                 "src_mask": torch.from_numpy(np.arange(src_ids.shape[1]) < np.maximum(1, src_len)[:, None]),
                 "targets": torch.from_numpy(targets.astype(np.int64))}
        batch["tgt_mask"] = batch["targets"] != self.pad_id
        return {k: _to_device(v, device) for k, v in batch.items()}

    def sample_starts(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.n_pairs, (batch_size,), generator=generator)

    def batch_at(self, starts: torch.Tensor, device: torch.device) -> Batch:
        return self.batch_of(starts.numpy(), device)

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Batch:
        return self.batch_at(self.sample_starts(batch_size, generator), device)

    @property
    def n_sequential(self) -> int:
        """How many rows `sequential` gives (pairs)."""
        return self.n_pairs

    @property
    def sequential_tokens(self) -> int:
        """How many targets `sequential` scores in all (target + EOS within the context)."""
        return self.fit().kept_target_tokens

    def sequential(self, batch_size: int, device: torch.device,
                   rows: list[int] | None = None) -> Iterator[tuple[Batch, int]]:
        """Every pair once, in order (or only the pairs `rows`): (batch, predicted tokens)."""
        rows = list(range(self.n_pairs)) if rows is None else rows
        for i in range(0, len(rows), batch_size):
            batch = self.batch_of(rows[i:i + batch_size], device)
            yield batch, int((batch["targets"] != self.pad_id).sum())


def _rows(stream: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """(len(starts), width) int64 tokens of `stream` from each start on. Past the stream's end (or for an
    empty stream) the values are arbitrary: the callers mask them."""
    if len(stream) == 0:
        return np.zeros((len(starts), width), dtype=np.int64)
    return stream[np.minimum(starts[:, None] + np.arange(width), len(stream) - 1)].astype(np.int64)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def open_split(run_dir: str | Path, split: str, model_config: Any, encoder_decoder: bool,
               source_fraction: float) -> LMBatches | PairBatches:
    """Batches of one split of a prepared run folder, checked against the token counts in split.json."""
    record = read_split_record(run_dir)
    return open_prepared(run_dir, split, record["format"], record["dtype"], model_config, encoder_decoder,
                         source_fraction, expected_tokens=record["tokens"].get(split))


def open_prepared(folder: str | Path, split: str, fmt: str, dtype: str, model_config: Any, encoder_decoder: bool,
                  source_fraction: float, expected_tokens: int | None = None) -> LMBatches | PairBatches:
    """Batches of one split prepared in `folder` (a run folder, or a temporary one for `evaluate --data`)."""
    files = RunFolder(folder)
    if fmt == PAIRS:
        offsets_path = files.pair_offsets(split)
        if not offsets_path.is_file():
            raise MiniLLMError(f"{offsets_path} is missing; the run folder is incomplete: {INCOMPLETE_FIX}")
        offsets = read_offsets(offsets_path)
        src = read_stream(files.pair_tokens(split, "src"), dtype, int(offsets[0, -1]))
        tgt = read_stream(files.pair_tokens(split, "tgt"), dtype, int(offsets[1, -1]))
        return PairBatches(src, tgt, offsets, model_config.max_seq_len, model_config.pad_id,
                           model_config.bos_id, model_config.eos_id)
    tokens = read_stream(files.tokens(split), dtype, expected_tokens)
    return LMBatches(tokens, model_config.max_seq_len, encoder_decoder, source_fraction, model_config.bos_id,
                     model_config.pad_id)

