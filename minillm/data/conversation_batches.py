"""Batches of conversations for a decoder-only model (the chat task): one conversation a row, its tokens as
the chat template renders them, the loss on its learned tokens only (the assistant's turns, each with its
end-of-turn token: a mask stored beside the tokens); every other target is IGNORE_INDEX.

A conversation longer than the context is cut to its first max_seq_len + 1 tokens (what is beyond is never
learned, and `fit().warning` says how much and which context would hold them); one with nothing learned
within the context is left out of the batches.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from minillm.config import IGNORE_INDEX
from minillm.data.batches import (
    CONTEXT_SUGGESTION_MULTIPLE,
    CONTEXT_SUGGESTION_SHARE,
    Batch,
    SampleRows,
    round_up,
    scored_tokens,
    stream_rows,
    to_device,
)
from minillm.errors import MiniLLMError


@dataclass(frozen=True)
class ConversationFit:
    """How the conversations of a split fit the context."""

    n_conversations: int
    cut: int  # conversations longer than the context (+ 1: the last token is only predicted)
    learned_cut: int  # learned tokens beyond the context: never trained on, never scored
    kept_learned: int  # learned tokens within the context: what one pass trains on
    kept_prompt: int  # the other tokens within the context: read, not learned (system and user turns, markers)
    fit_most: int  # a context that holds CONTEXT_SUGGESTION_SHARE of the conversations whole
    fit_all: int  # ... and one that holds all of them

    def warning(self, split: str, max_seq_len: int) -> str:
        """What is cut, and a context length that fits ("" when nothing is cut)."""
        if not self.cut:
            return ""
        lost = "never learned" if split == "training" else "not scored"
        fix = (f"--max-seq-len {self.fit_most} would fit {CONTEXT_SUGGESTION_SHARE:.0%} of them whole, "
               f"{self.fit_all} all" if self.fit_most < self.fit_all else
               f"--max-seq-len {self.fit_all} would fit them all whole")
        return (f"warning: {self.cut:,} of {self.n_conversations:,} {split} conversations are longer than the "
                f"context of {max_seq_len} tokens and are cut: {self.learned_cut:,} of their learned tokens are "
                f"{lost}; {fix}")


class ConversationBatches(SampleRows):
    """Padded rows of conversations: input_ids (B, T) and targets (B, T), the targets of the tokens that are
    not learned set to IGNORE_INDEX."""

    def __init__(self, tokens: np.ndarray, learned: np.ndarray, offsets: np.ndarray, max_seq_len: int, pad_id: int):
        # offsets (2, N + 1): each conversation's start in `tokens`, and the learned tokens before it.
        self.tokens, self.learned, self.offsets = tokens, learned, offsets
        self.max_seq_len, self.pad_id = max_seq_len, pad_id
        starts, ends = offsets[0, :-1].astype(np.int64), offsets[0, 1:].astype(np.int64)
        self._lengths = ends - starts
        self._kept = np.minimum(self._lengths, max_seq_len + 1)  # tokens of each row, the first one no target
        # Learned tokens within each row (the first token of a row is never predicted).
        learned_before = np.concatenate([[0], np.cumsum(learned, dtype=np.int64)])
        self._kept_learned = learned_before[starts + self._kept] - learned_before[np.minimum(starts + 1, ends)]
        self._all_learned = learned_before[ends] - learned_before[np.minimum(starts + 1, ends)]
        self.rows = np.flatnonzero(self._kept_learned > 0)  # the conversations that train (and are scored)

    @property
    def n_conversations(self) -> int:
        return self.offsets.shape[1] - 1

    # As AnswerPairs (data.batches): each conversation whose last learned turn lies within the context is a
    # pair, the prompt everything before that turn (its role marker included), the answer the turn's text.

    @functools.cached_property
    def _last_turns(self) -> list[tuple[int, int, int]]:
        """(start, answer start, answer end) in `tokens` of each answerable conversation's last learned turn
        (the end before its end-of-turn token)."""
        found = []
        for c in range(self.n_conversations):
            start, end = int(self.offsets[0, c]), int(self.offsets[0, c + 1])
            learned = np.flatnonzero(self.learned[start:end])
            if not len(learned) or learned[-1] + 1 > self._kept[c]:
                continue  # nothing learned, or its last turn beyond the context (never trained, never scored)
            last = learned[-1]
            first = last
            while first > 0 and self.learned[start + first - 1]:
                first -= 1
            if first > 0:
                found.append((start, start + int(first), start + int(last)))
        return found

    @property
    def n_pairs(self) -> int:
        return len(self._last_turns)

    def prompt_ids(self, pair: int) -> list[int]:
        start, answer, _ = self._last_turns[pair]
        return self.tokens[start:answer].tolist()

    def answer_ids(self, pair: int) -> list[int]:
        _, answer, end = self._last_turns[pair]
        return self.tokens[answer:end].tolist()

    def fit(self) -> ConversationFit:
        needed = self._lengths - 1  # a conversation of n tokens needs a context of n - 1
        kept_learned = int(self._kept_learned.sum())
        return ConversationFit(
            n_conversations=self.n_conversations,
            cut=int((self._kept < self._lengths).sum()),
            learned_cut=int(self._all_learned.sum()) - kept_learned,
            kept_learned=kept_learned,
            kept_prompt=int(np.maximum(self._kept - 1, 0).sum()) - kept_learned,
            fit_most=round_up(np.quantile(needed, CONTEXT_SUGGESTION_SHARE) if len(needed) else 1,
                               CONTEXT_SUGGESTION_MULTIPLE),
            fit_all=round_up(needed.max() if len(needed) else 1, CONTEXT_SUGGESTION_MULTIPLE))

    def cuts(self) -> dict[str, int]:
        fit = self.fit()
        return {"conversations": fit.n_conversations, "conversations_cut": fit.cut,
                "learned_tokens_cut": fit.learned_cut}

    def check_trainable(self, split: str) -> None:
        """Refuse a split none of whose conversations has a learned token within the context."""
        if not len(self.rows):
            raise MiniLLMError(f"no {split} conversation has an assistant token within the context of "
                               f"{self.max_seq_len} tokens; raise --max-seq-len (to {self.fit().fit_most} or more)")

    def batch_of(self, indices: list[int] | np.ndarray, device: torch.device) -> Batch:
        """The conversations `indices` (into the split), right-padded, as whole-array numpy operations."""
        idx = np.asarray(indices, dtype=np.int64)
        starts, kept = self.offsets[0, idx].astype(np.int64), self._kept[idx]
        width = int(kept.max())
        p = np.arange(width)[None, :]  # (1, W)
        inside = p < kept[:, None]  # (B, W)
        sequence = np.where(inside, stream_rows(self.tokens, starts, width), self.pad_id)
        learned = inside & (stream_rows(self.learned, starts, width) > 0)
        inputs = np.where(inside[:, 1:], sequence[:, :-1], self.pad_id)  # (the last kept token is no input)
        targets = np.where(learned[:, 1:], sequence[:, 1:], IGNORE_INDEX)
        batch = {"input_ids": torch.from_numpy(inputs.astype(np.int64)),
                 "targets": torch.from_numpy(targets.astype(np.int64))}
        return {k: to_device(v, device) for k, v in batch.items()}

    def sample_starts(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.from_numpy(self.rows)[torch.randint(len(self.rows), (batch_size,), generator=generator)]

    @property
    def n_sequential(self) -> int:
        """How many rows `sequential` gives (the conversations with something learned within the context)."""
        return len(self.rows)

    @property
    def sequential_tokens(self) -> int:
        return int(self._kept_learned.sum())

    def sequential(self, batch_size: int, device: torch.device,
                   rows: list[int] | None = None) -> Iterator[tuple[Batch, int]]:
        """Every learned token once, a conversation a row (or only the rows `rows` of n_sequential)."""
        chosen = self.rows if rows is None else self.rows[np.asarray(rows, dtype=np.int64)]
        for i in range(0, len(chosen), batch_size):
            batch = self.batch_of(chosen[i:i + batch_size], device)
            yield batch, scored_tokens(batch)
