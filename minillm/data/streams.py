"""A run's token files: tokenized samples appended to a binary stream (numpy memmaps on reading), and the
offsets of a pair split's two streams. A damaged or truncated file is a MiniLLMError that says to prepare
the run again. File names come from minillm.run_folder.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from minillm.data.corpus import ENCODE_CHUNK_CHARS
from minillm.errors import MiniLLMError
from minillm.files import atomic_write
from minillm.run_folder import INCOMPLETE_FIX, PAIR_SIDES, RunFolder
from minillm.tokenizers import Tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _encode_chunks(tokenizer: Tokenizer, samples: Iterable[str]) -> Iterator[list[list[int]]]:
    """encode_batch over groups of samples of about ENCODE_CHUNK_CHARS characters."""
    group: list[str] = []
    size = 0
    for sample in samples:
        group.append(sample)
        size += len(sample)
        if size >= ENCODE_CHUNK_CHARS:
            yield tokenizer.encode_batch(group)
            group, size = [], 0
    if group:
        yield tokenizer.encode_batch(group)


def write_token_stream(path: str | Path, tokenizer: Tokenizer, samples: Iterable[str], dtype: np.dtype,
                       mark_samples: bool = True, progress: Any = None,
                       lengths: list[int] | None = None) -> int:
    """Tokenize samples in chunks and append them to a binary file; returns the count.

    With `mark_samples`, each sample is written as BOS, its tokens, EOS: the model learns where a sample
    starts (generation from an empty prompt begins at BOS) and where it ends (generation stops at EOS).

    `lengths`, if given, receives each sample's token count (the offsets of a pair file).
    """
    count = 0

    def write(f) -> None:
        nonlocal count
        for encoded in _encode_chunks(tokenizer, samples):
            for ids in encoded:
                if mark_samples:
                    ids = [tokenizer.bos_id, *ids, tokenizer.eos_id]
                array = np.asarray(ids, dtype=dtype)
                f.write(array.tobytes())
                count += len(array)
                if lengths is not None:
                    lengths.append(len(array))
            if progress is not None:
                progress.update(len(encoded))

    atomic_write(path, write)
    return count


def write_pair_streams(folder: str | Path, split: str, tokenizer: Tokenizer, pairs: list[tuple[str, str]],
                       dtype: np.dtype, progress: Any = None) -> int:
    """Token streams of the sources and targets of a split, plus their offsets; returns the target tokens."""
    files = RunFolder(folder)
    offsets = []
    for column, side in enumerate(PAIR_SIDES):
        lengths: list[int] = []
        texts = (pair[column] for pair in pairs)
        write_token_stream(files.pair_tokens(split, side), tokenizer, texts, dtype, mark_samples=False,
                           progress=progress if side == "tgt" else None, lengths=lengths)
        offsets.append(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
    atomic_write(files.pair_offsets(split), lambda f: np.save(f, np.stack(offsets)))  # (2, N + 1)
    return int(offsets[1][-1])


def write_conversation_streams(folder: str | Path, split: str, tokenizer: Tokenizer, conversations: list[list[dict]],
                               dtype: np.dtype, progress: Any = None) -> int:
    """The token stream of a split's conversations (by the tokenizer's chat template), the byte mask of the
    tokens learned (the assistant's turns), and their offsets; returns the learned tokens."""
    files = RunFolder(folder)
    starts, learned_before = [0], [0]

    def write_tokens(tokens_file) -> None:
        def write_mask(mask_file) -> None:
            for conversation in conversations:
                ids, learned = tokenizer.chat_training_ids(conversation)
                mask = np.asarray(learned, dtype=np.uint8)
                mask[:1] = 0  # (a row's first token is never predicted)
                tokens_file.write(np.asarray(ids, dtype=dtype).tobytes())
                mask_file.write(mask.tobytes())
                starts.append(starts[-1] + len(ids))
                learned_before.append(learned_before[-1] + int(mask.sum()))
                if progress is not None:
                    progress.update(1)

        atomic_write(files.loss_mask(split), write_mask)

    atomic_write(files.tokens(split), write_tokens)
    offsets = np.array([starts, learned_before], dtype=np.int64)  # (2, N + 1)
    atomic_write(files.pair_offsets(split), lambda f: np.save(f, offsets))
    return learned_before[-1]


def read_stream(path: str | Path, dtype: str | np.dtype, expected: int | None = None) -> np.ndarray:
    """A token file as a read-only memmap (an empty file as an empty array: memmap refuses size 0).

    A file whose size is not a whole number of tokens, or not the `expected` count, is damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise MiniLLMError(f"token file missing: {path}; the run folder is incomplete: {INCOMPLETE_FIX}")
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        raise MiniLLMError(f"unknown token type {dtype!r} for {path}; the split record is damaged: "
                           f"{INCOMPLETE_FIX}") from None
    size = path.stat().st_size
    if size % itemsize or (expected is not None and size // itemsize != expected):
        found = f"{size:,} bytes" if size % itemsize else f"{size // itemsize:,} tokens"
        wanted = f", {expected:,} expected" if expected is not None else ""
        raise MiniLLMError(f"token file {path} is damaged or truncated ({found}{wanted}): {INCOMPLETE_FIX}")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def read_offsets(path: Path) -> np.ndarray:
    """The (2, N + 1) offsets of a pair split: non-decreasing from 0, or the file is damaged."""
    try:
        offsets = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise MiniLLMError(f"{path} is damaged ({e}): {INCOMPLETE_FIX}") from None
    if (offsets.ndim != 2 or offsets.shape[0] != 2 or offsets.shape[1] < 1
            or not np.issubdtype(offsets.dtype, np.integer) or (offsets[:, 0] != 0).any()
            or (np.diff(offsets, axis=1) < 0).any()):
        raise MiniLLMError(f"{path} is damaged (not the offsets of a pair split): {INCOMPLETE_FIX}")
    return offsets
