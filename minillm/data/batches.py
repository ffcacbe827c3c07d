"""Batches of a prepared split: random windows of a token stream (LMBatches), padded (source, target) pairs
for the encoder-decoder (PairBatches), or pairs as one sequence for a decoder-only model (PromptAnswerBatches:
source, separator, target, EOS, the loss on the target and EOS only). Which one a run uses is its
task's to say (data.tasks).

A batch is a dict of tensors passed to the model as keyword arguments: model(**batch) -> (logits, loss).
Targets the loss skips (padding, a prompt, tokens already scored) are IGNORE_INDEX.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from minillm.config import IGNORE_INDEX
from minillm.errors import MiniLLMError

Batch = dict[str, torch.Tensor]


class Batches(Protocol):
    """What the trainer and the scorer ask of a split's batches."""

    def sample_starts(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size,) random rows (window starts, or pair indices)."""
        ...

    def batch_at(self, starts: torch.Tensor, device: torch.device) -> Batch:
        """The batch of the rows `starts`, as model inputs on `device`."""
        ...

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Batch: ...

    @property
    def n_sequential(self) -> int:
        """How many rows `sequential` gives."""
        ...

    @property
    def sequential_tokens(self) -> int:
        """How many targets `sequential` scores in all."""
        ...

    def sequential(self, batch_size: int, device: torch.device,
                   rows: list[int] | None = None) -> Iterator[tuple[Batch, int]]:
        """Every scored token once (or only the rows `rows`): (batch, targets it scores)."""
        ...

    def cuts(self) -> dict[str, int]:
        """What the context cuts from the rows (for pairs: pairs cut, target tokens left out); {} for none."""
        ...


class AnswerPairs(Protocol):
    """A split of (prompt, answer) pairs that a model can be asked to answer: what the test's exact match,
    character error rate and chrF score (training.answers). A task with answers gives one (Task.answer_pairs)."""

    @property
    def n_pairs(self) -> int: ...

    def prompt_ids(self, pair: int) -> list[int]:
        """What the model reads before it answers: a decoder-only model's prompt, which it continues; an
        encoder-decoder's source (its decoder starts from BOS). Cut to the context as training cut it."""
        ...

    def answer_ids(self, pair: int) -> list[int]:
        """The reference answer's tokens, whole (no EOS)."""
        ...


def scored_tokens(batch: Batch) -> int:
    """The targets of a batch that the loss counts."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


class LMBatches:
    """Random contiguous windows of a token stream (for the encoder-decoder: split into source, target)."""

    def __init__(self, tokens: np.ndarray, max_seq_len: int, encoder_decoder: bool = False,
                 source_fraction: float = 0.5, bos_id: int = 1):
        if len(tokens) < 2:
            raise MiniLLMError(f"a data split has only {len(tokens)} token(s); add more data")
        self.tokens = tokens
        # The length of a window: the context length, or less for a split shorter than that (rather than
        # an error).
        self.seq_len = min(max_seq_len, len(tokens) - 1)
        self.encoder_decoder = encoder_decoder
        self.bos_id = bos_id
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
        return {k: to_device(v, device) for k, v in batch.items()}

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
            # targets were already scored and are set to IGNORE_INDEX.
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
                # (a copy: the decoder-only targets are a view of the same windows as the inputs)
                batch["targets"] = batch["targets"].clone()
                batch["targets"][-1, :overlap] = IGNORE_INDEX
            yield batch, scored_tokens(batch)

    def cuts(self) -> dict[str, int]:
        return {}


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
    kept_prompt_tokens: int  # the tokens read but not learned: sources (and a decoder-only model's separators)
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


def round_up(n: float, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


# Per pair (arrays of the pairs' source and target lengths): (source tokens kept, target tokens + EOS kept,
# the context that would hold the pair whole).
Kept = tuple[np.ndarray, np.ndarray, np.ndarray]


def encoder_decoder_kept(src_len: np.ndarray, tgt_len: np.ndarray, max_seq_len: int) -> Kept:
    """What an encoder-decoder batch keeps of pairs: the source and target + EOS, each cut to the context."""
    predicted = tgt_len + 1  # the target and its EOS
    return np.minimum(src_len, max_seq_len), np.minimum(predicted, max_seq_len), np.maximum(src_len, predicted)


def prompt_answer_kept(src_len: np.ndarray, tgt_len: np.ndarray, max_seq_len: int, n_separator: int) -> Kept:
    """What a decoder-only pair sequence (source, separator, target, EOS) keeps: the source cut to leave room
    for the separator and one predicted token, then as much of the target + EOS as fits."""
    src_kept = np.minimum(src_len, max_seq_len - n_separator)
    prompt = src_kept + n_separator  # source, separator: the first target's position
    # The token at position p of the sequence is predicted at input position p - 1 < max_seq_len.
    predicted_kept = np.minimum(tgt_len + 1, max_seq_len + 1 - prompt)
    return src_kept, predicted_kept, src_len + n_separator + tgt_len


class SampleRows:
    """Batches whose rows are whole samples (a pair, a conversation): a batch is `batch_of` the indices
    `sample_starts` draws."""

    def sample_starts(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def batch_of(self, indices: list[int] | np.ndarray, device: torch.device) -> Batch:
        raise NotImplementedError

    def batch_at(self, starts: torch.Tensor, device: torch.device) -> Batch:
        return self.batch_of(starts.numpy(), device)

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Batch:
        return self.batch_at(self.sample_starts(batch_size, generator), device)


class PairBatches(SampleRows):
    """Padded batches of (source, target) pairs for the encoder-decoder.

    Decoder input = BOS + target, targets = target + EOS; padded positions have target IGNORE_INDEX and
    mask False. A pair longer than the context is cut: the source to max_seq_len tokens, target + EOS to
    max_seq_len (a cut target has no EOS: its text does not end there); `fit()` says how much is cut.
    """

    def __init__(self, src: np.ndarray, tgt: np.ndarray, offsets: np.ndarray, max_seq_len: int,
                 pad_id: int, bos_id: int, eos_id: int):
        self.src, self.tgt, self.offsets = src, tgt, offsets  # offsets: (2, N + 1) starts of sources, targets
        self.max_seq_len = max_seq_len
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.n_separator = 0  # tokens between a source and its target in a row (a decoder-only model's)

    @property
    def n_pairs(self) -> int:
        return self.offsets.shape[1] - 1

    def kept(self, src_len: np.ndarray, tgt_len: np.ndarray) -> Kept:
        return encoder_decoder_kept(src_len, tgt_len, self.max_seq_len)

    def fit(self) -> PairFit:
        """What the context cuts from these pairs, and what context length would fit them."""
        src_len, tgt_len = np.diff(self.offsets.astype(np.int64), axis=1)  # (N,) each
        src_kept, predicted_kept, needed = self.kept(src_len, tgt_len)
        return PairFit(
            n_pairs=self.n_pairs,
            sources_cut=int((src_kept < src_len).sum()),
            targets_cut=int((predicted_kept < tgt_len + 1).sum()),
            source_tokens_cut=int((src_len - src_kept).sum()),
            target_tokens_cut=int((tgt_len + 1 - predicted_kept).sum()),
            kept_target_tokens=int(predicted_kept.sum()),
            kept_prompt_tokens=int(src_kept.sum()) + self.n_pairs * self.n_separator,
            fit_most=round_up(np.quantile(needed, CONTEXT_SUGGESTION_SHARE) if len(needed) else 1,
                               CONTEXT_SUGGESTION_MULTIPLE),
            fit_all=round_up(needed.max() if len(needed) else 1, CONTEXT_SUGGESTION_MULTIPLE),
        )

    def cuts(self) -> dict[str, int]:
        fit = self.fit()
        return {"pairs": fit.n_pairs, "pairs_cut": fit.pairs_cut, "target_tokens_cut": fit.target_tokens_cut}

    def prompt_ids(self, pair: int) -> list[int]:
        """The source of pair `pair`, cut to the context (see AnswerPairs)."""
        start, end = self.offsets[0, pair], self.offsets[0, pair + 1]
        return self.src[start:min(end, start + self.max_seq_len)].tolist()

    def answer_ids(self, pair: int) -> list[int]:
        return self.tgt[self.offsets[1, pair]:self.offsets[1, pair + 1]].tolist()

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
        src_ids = np.where(in_source, stream_rows(self.src, s0, width), self.pad_id)
        columns = np.arange(int(predicted_len.max()))
        in_target = columns < predicted_len[:, None]
        predicted = np.where(columns == (t1 - t0)[:, None], self.eos_id, stream_rows(self.tgt, t0, len(columns)))
        targets = np.where(in_target, predicted, IGNORE_INDEX)
        tgt_ids = np.full_like(targets, self.pad_id)
        tgt_ids[:, 0] = self.bos_id
        tgt_ids[:, 1:] = np.where(in_target[:, 1:], predicted[:, :-1], self.pad_id)
        batch = {"src_ids": torch.from_numpy(src_ids.astype(np.int64)),
                 "tgt_ids": torch.from_numpy(tgt_ids.astype(np.int64)),
                 # an empty source still shows one (pad) position
                 "src_mask": torch.from_numpy(np.arange(src_ids.shape[1]) < np.maximum(1, src_len)[:, None]),
                 "targets": torch.from_numpy(targets.astype(np.int64))}
        batch["tgt_mask"] = torch.from_numpy(in_target)
        return {k: to_device(v, device) for k, v in batch.items()}

    def sample_starts(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.n_pairs, (batch_size,), generator=generator)

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
            yield batch, scored_tokens(batch)


class PromptAnswerBatches(PairBatches):
    """Pairs as one sequence each for a decoder-only model: source, separator, target, EOS, right-padded; the
    targets of the source and separator positions are IGNORE_INDEX, so the loss is on the target and its EOS
    only (the model reads the source and learns to answer it, not to write sources). No BOS: the prompt a
    user types, "source\\n", is the sequence's start as training saw it.

    A pair longer than the context is cut: the source to what leaves room for the separator and one
    predicted token, then the target (a cut target has no EOS). Every row predicts at least one token.
    """

    def __init__(self, src: np.ndarray, tgt: np.ndarray, offsets: np.ndarray, max_seq_len: int,
                 pad_id: int, eos_id: int, separator: list[int]):
        super().__init__(src, tgt, offsets, max_seq_len, pad_id, pad_id, eos_id)  # (no BOS)
        self.separator = np.asarray(separator, dtype=np.int64)
        self.n_separator = len(separator)
        if not separator or max_seq_len < len(separator):
            raise MiniLLMError(f"a context of {max_seq_len} tokens cannot hold the {len(separator)}-token separator "
                               "and an answer token; raise --max-seq-len")

    def kept(self, src_len: np.ndarray, tgt_len: np.ndarray) -> Kept:
        return prompt_answer_kept(src_len, tgt_len, self.max_seq_len, len(self.separator))

    def prompt_ids(self, pair: int) -> list[int]:
        """The source, cut as a batch cuts it, and the separator: what the model answers (see AnswerPairs)."""
        start = self.offsets[0, pair]
        src_kept = int(self.kept(np.array([self.offsets[0, pair + 1] - start]), np.array([0]))[0][0])
        return self.src[start:start + src_kept].tolist() + self.separator.tolist()

    def batch_of(self, indices: list[int] | np.ndarray, device: torch.device) -> Batch:
        """The pairs `indices` as input_ids (B, T) and targets (B, T) (the sequence shifted by one), built with
        whole-array numpy operations, no loop over rows."""
        idx = np.asarray(indices, dtype=np.int64)
        (s0, t0), (s1, t1) = self.offsets[:, idx], self.offsets[:, idx + 1]
        src_kept, predicted_kept, _ = self.kept(s1 - s0, t1 - t0)
        source_end = src_kept[:, None]  # (B, 1): the source is at positions 0..source_end - 1
        prompt = source_end + len(self.separator)  # the first target position
        answer_end = prompt + (t1 - t0)[:, None]  # EOS's position
        end = prompt + predicted_kept[:, None]  # one past the last position kept
        p = np.arange(int(end.max()))[None, :]  # (1, W) positions in the sequences
        separator = self.separator[np.clip(p - source_end, 0, len(self.separator) - 1)]
        sequence = np.select(
            [p < source_end, p < prompt, p < answer_end, p == answer_end],
            [stream_rows(self.src, s0, p.shape[1]), separator, stream_rows(self.tgt, t0 - prompt[:, 0], p.shape[1]),
             self.eos_id], default=self.pad_id)
        sequence = np.where(p < end, sequence, self.pad_id)  # (B, W)
        inputs = np.where(p[:, :-1] < end - 1, sequence[:, :-1], self.pad_id)  # (the last kept token is no input)
        scored = (p[:, 1:] >= prompt) & (p[:, 1:] < end)  # the target and EOS positions
        batch = {"input_ids": torch.from_numpy(inputs.astype(np.int64)),
                 "targets": torch.from_numpy(np.where(scored, sequence[:, 1:], IGNORE_INDEX).astype(np.int64))}
        return {k: to_device(v, device) for k, v in batch.items()}


def stream_rows(stream: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """(len(starts), width) int64 tokens of `stream` from each start on (a start may be negative). Outside the
    stream (or for an empty stream) the values are arbitrary: the callers mask them."""
    if len(stream) == 0:
        return np.zeros((len(starts), width), dtype=np.int64)
    return stream[np.clip(starts[:, None] + np.arange(width), 0, len(stream) - 1)].astype(np.int64)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
