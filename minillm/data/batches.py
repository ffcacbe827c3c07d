"""Batches of a prepared split: random windows of a token stream, or padded (source, target) pairs.

A batch is a dict of tensors passed to the model as keyword arguments: model(**batch) -> (logits, loss).
"""

from __future__ import annotations

from collections.abc import Iterator
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

    def sequential(self, batch_size: int, device: torch.device) -> Iterator[tuple[Batch, int]]:
        """Every token once, in non-overlapping windows: (batch, predicted tokens) for exact evaluation."""
        step = self.seq_len + 1 - self.n_source if self.encoder_decoder else self.seq_len
        starts = list(range(0, self.n_windows, step))
        last = self.n_windows - 1  # the window that ends with the last token
        overlap = 0
        if not self.encoder_decoder and starts[-1] != last:
            # The tail no full step reaches: one more window flush with the end, whose first `overlap`
            # targets were already scored and are set to pad (ignored by the loss).
            overlap = starts[-1] + self.seq_len - last
            starts.append(last)
        for i in range(0, len(starts), batch_size):
            batch = self.batch_at(torch.tensor(starts[i:i + batch_size], dtype=torch.long), device)
            if overlap and i + batch_size >= len(starts):
                batch["targets"][-1, :overlap] = self.pad_id
            yield batch, int((batch["targets"] != self.pad_id).sum())


class PairBatches:
    """Padded batches of (source, target) pairs for the encoder-decoder.

    Decoder input = BOS + target, targets = target + EOS; padded positions have target pad_id (ignored
    by the loss) and mask False.
    """

    def __init__(self, src: np.ndarray, tgt: np.ndarray, offsets: np.ndarray, max_seq_len: int,
                 pad_id: int, bos_id: int, eos_id: int):
        self.src, self.tgt, self.offsets = src, tgt, offsets  # offsets: (2, N + 1) starts of sources, targets
        self.max_seq_len = max_seq_len
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    @property
    def n_pairs(self) -> int:
        return self.offsets.shape[1] - 1

    def _pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        (s0, t0), (s1, t1) = self.offsets[:, i], self.offsets[:, i + 1]
        return self.src[s0:s1][:self.max_seq_len], self.tgt[t0:t1][:self.max_seq_len - 1]

    def batch_of(self, indices: list[int], device: torch.device) -> Batch:
        pairs = [self._pair(i) for i in indices]
        src_len = max(1, max(len(s) for s, _ in pairs))
        tgt_len = max(len(t) for _, t in pairs) + 1
        src_ids = torch.full((len(pairs), src_len), self.pad_id, dtype=torch.long)
        tgt_ids = torch.full((len(pairs), tgt_len), self.pad_id, dtype=torch.long)
        targets = torch.full((len(pairs), tgt_len), self.pad_id, dtype=torch.long)
        src_mask = torch.zeros_like(src_ids, dtype=torch.bool)
        for row, (source, target) in enumerate(pairs):
            target = torch.from_numpy(target.astype(np.int64))
            src_ids[row, :len(source)] = torch.from_numpy(source.astype(np.int64))
            src_mask[row, :max(1, len(source))] = True  # an empty source still shows one (pad) position
            tgt_ids[row, 0] = self.bos_id
            tgt_ids[row, 1:len(target) + 1] = target
            targets[row, :len(target)] = target
            targets[row, len(target)] = self.eos_id
        tgt_mask = targets != self.pad_id
        batch = {"src_ids": src_ids, "tgt_ids": tgt_ids, "src_mask": src_mask, "tgt_mask": tgt_mask,
                 "targets": targets}
        return {k: _to_device(v, device) for k, v in batch.items()}

    def sample_starts(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.n_pairs, (batch_size,), generator=generator)

    def batch_at(self, starts: torch.Tensor, device: torch.device) -> Batch:
        return self.batch_of(starts.tolist(), device)

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Batch:
        return self.batch_at(self.sample_starts(batch_size, generator), device)

    def sequential(self, batch_size: int, device: torch.device) -> Iterator[tuple[Batch, int]]:
        for i in range(0, self.n_pairs, batch_size):
            batch = self.batch_of(list(range(i, min(i + batch_size, self.n_pairs))), device)
            yield batch, int((batch["targets"] != self.pad_id).sum())


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

