"""From the user's file to batches: read, split into samples, split train/val/test, tokenize, batch.

Plain text becomes one token stream per split (samples joined with EOS), stored as a numpy memmap in the
run folder (train.bin / val.bin / test.bin), so a large corpus never sits in memory as Python ints.
A language-model batch is a set of random contiguous windows of block_size + 1 tokens.

A file of (source, target) pairs (TSV `source<TAB>target` or JSONL `{"input": ..., "output": ...}`) is
stored per split as two token streams plus offsets, and batched with padding for the encoder-decoder.

The split is saved with the run (split.json), so `minillm evaluate` scores the same test set.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.checkpoint import atomic_write, read_json, write_json
from minillm.errors import MiniLLMError

SPLITS = ("train", "val", "test")
SPLIT_FILE = "split.json"
TEXT, PAIRS = "text", "pairs"
Batch = dict[str, torch.Tensor]

# Fewer samples than this and a shuffled split by sample is too coarse (a single paragraph could be the whole
# validation set), so the file is split into contiguous chunks instead, like nanoGPT's 90/10 cut.
MIN_SAMPLES_FOR_SAMPLE_SPLIT = 20
MIN_PAIRS = 3  # one pair for each of train, val and test
# Characters tokenized per encode_batch call: bounds how many Python ints are alive at once.
ENCODE_CHUNK_CHARS = 1_000_000
PAIR_DETECT_LINES = 50  # how many non-empty lines the content sniffer looks at
BOM = "\ufeff"
INCOMPLETE_FIX = "train it again with --overwrite"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


# ----------------------------------------------------------------------------------------------------
# Reading and splitting


def read_text_file(path: str | Path) -> str:
    """The file's text as UTF-8 (BOM dropped); a missing, binary, empty or blank file is a MiniLLMError."""
    path = Path(path)
    if not path.exists():
        raise MiniLLMError(
            f"data file not found: {path}; check the path, or omit it to train on Tiny Shakespeare"
        )
    if not path.is_file():
        raise MiniLLMError(f"data path {path} is not a file; pass a UTF-8 text file")
    raw = path.read_bytes()
    if b"\x00" in raw[:1_000_000]:
        raise MiniLLMError(f"data file {path} looks binary (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MiniLLMError(
            f"data file {path} is not UTF-8 text (bad byte at offset {e.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"
        ) from None
    del raw
    text = text.removeprefix(BOM).replace("\r\n", "\n")
    if not text.strip():
        raise MiniLLMError(f"data file {path} is empty (or only whitespace); put some text in it")
    return text


def split_samples(text: str, mode: str = "paragraph", separator: str = "<|endoftext|>") -> list[str]:
    """Cut text into samples: by blank lines ("paragraph"), one per line ("line"), or by a separator."""
    if mode == "paragraph":
        pieces = _BLANK_LINE.split(text)
    elif mode == "line":
        pieces = text.split("\n")
    elif mode == "separator":
        pieces = text.split(separator)
    else:
        raise MiniLLMError(f"split_mode must be paragraph, line or separator, got {mode!r}")
    return [p.strip("\n") for p in pieces if p.strip()]


def detect_format(path: str | Path, text: str) -> str:
    """TEXT or PAIRS: by extension (.tsv, .jsonl), else by content (every sniffed line a pair)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".tsv", ".jsonl"):
        return PAIRS
    lines = [line for line in text[:200_000].split("\n")[:PAIR_DETECT_LINES * 4] if line.strip()]
    lines = lines[:PAIR_DETECT_LINES]
    if len(lines) < 2:
        return TEXT
    if all(_json_pair(line) is not None for line in lines):
        return PAIRS
    if all(line.count("\t") == 1 and all(part.strip() for part in line.split("\t")) for line in lines):
        return PAIRS
    return TEXT


def _json_pair(line: str) -> tuple[str, str] | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("input"), str) and isinstance(obj.get("output"), str):
        return obj["input"], obj["output"]
    return None


def parse_pairs(path: str | Path, text: str) -> list[tuple[str, str]]:
    """(source, target) pairs from TSV or JSONL text; a malformed line is an error naming its number."""
    pairs = []
    is_jsonl = Path(path).suffix.lower() == ".jsonl" or text.lstrip().startswith("{")
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if is_jsonl:
            pair = _json_pair(line)
            if pair is None:
                raise MiniLLMError(
                    f"{path} line {number} is not a JSON object with string \"input\" and \"output\"; "
                    "fix or remove that line"
                )
        else:
            parts = line.split("\t")
            if len(parts) != 2:
                raise MiniLLMError(
                    f"{path} line {number} has {len(parts) - 1} tabs; a TSV pair file needs "
                    "`source<TAB>target` on every line"
                )
            pair = (parts[0], parts[1])
        pairs.append(pair)
    if len(pairs) < MIN_PAIRS:
        raise MiniLLMError(
            f"{path} has {len(pairs)} pair(s); at least {MIN_PAIRS} are needed (train, val, test)"
        )
    return pairs


def split_counts(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """How many samples go to each split: at least one in val and test, the rest in train."""
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise MiniLLMError(f"{n} samples are too few to split into train, val and test; add more data")
    return {"train": n_train, "val": n_val, "test": n_test}


def shuffled_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Sample indices of each split, after a seeded shuffle."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    counts = split_counts(n, val_fraction, test_fraction)
    val_end = counts["val"]
    test_end = val_end + counts["test"]
    return {"val": order[:val_end], "test": order[val_end:test_end], "train": order[test_end:]}


def contiguous_split(text: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Train, val and test as contiguous stretches of the text, in that order, cut at line ends."""
    n = len(text)
    cuts = [_snap_to_newline(text, round(n * (1 - val_fraction - test_fraction))),
            _snap_to_newline(text, round(n * (1 - test_fraction)))]
    cuts[1] = max(cuts[1], cuts[0] + 1)
    parts = {"train": text[:cuts[0]], "val": text[cuts[0]:cuts[1]], "test": text[cuts[1]:]}
    for name, part in parts.items():
        if not part.strip():
            raise MiniLLMError(f"the text is too short to cut a {name} split from it; add more data")
    return parts


def _snap_to_newline(text: str, position: int) -> int:
    """The position just after the next newline, if there is one nearby; else `position` itself."""
    position = min(max(position, 1), len(text) - 1)
    newline = text.find("\n", position, position + 1000)
    return newline + 1 if 0 <= newline < len(text) - 1 else position


def chunk_text(text: str, chunk_chars: int = ENCODE_CHUNK_CHARS) -> list[str]:
    """Cut a long text into pieces of about chunk_chars at line ends where possible (streamed encoding)."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


# ----------------------------------------------------------------------------------------------------
# Tokenizing into memmapped streams


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _encode_chunks(tokenizer: Any, samples: Iterable[str]) -> Iterator[list[list[int]]]:
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


def write_token_stream(path: str | Path, tokenizer: Any, samples: Iterable[str], dtype: np.dtype,
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


def write_pair_streams(run_dir: Path, split: str, tokenizer: Any, pairs: list[tuple[str, str]],
                       dtype: np.dtype, progress: Any = None) -> int:
    """Token streams of the sources and targets of a split, plus their offsets; returns the target tokens."""
    offsets = []
    for side, column in (("src", 0), ("tgt", 1)):
        lengths: list[int] = []
        texts = (pair[column] for pair in pairs)
        write_token_stream(run_dir / f"{split}.{side}.bin", tokenizer, texts, dtype, mark_samples=False,
                           progress=progress if side == "tgt" else None, lengths=lengths)
        offsets.append(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
    atomic_write(run_dir / f"{split}.offsets.npy", lambda f: np.save(f, np.stack(offsets)))  # (2, N + 1)
    return int(offsets[1][-1])


def read_stream(path: str | Path, dtype: str | np.dtype) -> np.ndarray:
    """A token file as a read-only memmap (an empty file as an empty array: memmap refuses size 0)."""
    path = Path(path)
    if not path.is_file():
        raise MiniLLMError(f"token file missing: {path}; the run folder is incomplete: {INCOMPLETE_FIX}")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# ----------------------------------------------------------------------------------------------------
# Preparing a run's data


@dataclass
class DataSpec:
    """What split.json records about a run's data."""

    format: str  # TEXT or PAIRS
    dtype: str
    tokens: dict[str, int]  # tokens per split (targets for pairs)
    samples: dict[str, int]  # samples (or pairs, or contiguous pieces) per split
    contiguous: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(format=self.format, dtype=self.dtype, tokens=self.tokens, samples=self.samples,
                    contiguous=self.contiguous)


def load_samples(path: str | Path, model_type: str, split_mode: str, separator: str) -> tuple[str, list]:
    """(format, samples) of a data file: text samples, or (source, target) pairs for the encoder-decoder.

    A pair file given to the decoder-only model becomes text samples "source\\ntarget".
    """
    text = read_text_file(path)
    if detect_format(path, text) == PAIRS:
        pairs = parse_pairs(path, text)
        if model_type == "transformer":
            return PAIRS, pairs
        return TEXT, [f"{source}\n{target}" for source, target in pairs]
    samples = split_samples(text, split_mode, separator)
    if not samples:
        raise MiniLLMError(
            f"data file {path} has no samples after splitting by {split_mode}; try --split-mode line"
        )
    return TEXT, samples


def split_data(fmt: str, samples: list, path: str | Path, val_fraction: float, test_fraction: float,
               seed: int) -> tuple[dict[str, list], dict[str, Any]]:
    """Samples of each split and what to record about the split (indices of val/test, or contiguous cuts)."""
    if fmt == PAIRS or len(samples) >= MIN_SAMPLES_FOR_SAMPLE_SPLIT:
        indices = shuffled_split(len(samples), val_fraction, test_fraction, seed)
        splits = {name: [samples[i] for i in indices[name]] for name in SPLITS}
        record = {"contiguous": False, "n_samples": len(samples),
                  "indices": {"val": indices["val"], "test": indices["test"]}}
        return splits, record
    # Few (possibly huge) samples: cut the text itself into contiguous train/val/test stretches.
    joined = "\n\n".join(samples)
    parts = contiguous_split(joined, val_fraction, test_fraction)
    splits = {name: chunk_text(part) for name, part in parts.items()}
    record = {"contiguous": True, "n_samples": len(samples),
              "chars": {name: len(part) for name, part in parts.items()}}
    return splits, record


def write_splits(run_dir: Path, fmt: str, splits: dict[str, list], tokenizer: Any, contiguous: bool,
                 progress_factory: Any = None) -> DataSpec:
    """Tokenize each split ({"train": samples, ...}) into `run_dir`; returns what was written."""
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = {}
    for name in splits:
        bar = None
        if progress_factory is not None:
            bar = progress_factory(total=len(splits[name]), desc=f"tokenizing {name}")
        try:
            if fmt == PAIRS:
                tokens[name] = write_pair_streams(run_dir, name, tokenizer, splits[name], dtype, bar)
            else:
                tokens[name] = write_token_stream(run_dir / f"{name}.bin", tokenizer, splits[name], dtype,
                                                  mark_samples=not contiguous, progress=bar)
        finally:
            if bar is not None:
                bar.close()
    return DataSpec(format=fmt, dtype=dtype.name, tokens=tokens,
                    samples={name: len(part) for name, part in splits.items()}, contiguous=contiguous)


def save_split_record(run_dir: Path, spec: DataSpec, record: dict[str, Any], source: str) -> dict[str, Any]:
    """Write split.json; returns what it holds (what read_split_record will read)."""
    split_record = {"source": source, **spec.to_dict(), **record}
    write_json(run_dir / SPLIT_FILE, split_record)
    return split_record


def read_split_record(run_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / SPLIT_FILE, "split record")


# ----------------------------------------------------------------------------------------------------
# Batches. A batch is a dict of tensors passed to the model as keyword arguments:
# model(**batch) -> (logits, loss).


class LMBatches:
    """Random contiguous windows of a token stream (for the encoder-decoder: split into source, target)."""

    def __init__(self, tokens: np.ndarray, block_size: int, model_type: str = "decoder_only",
                 source_fraction: float = 0.5, bos_id: int = 1, pad_id: int = 0):
        if len(tokens) < 2:
            raise MiniLLMError(f"a data split has only {len(tokens)} token(s); add more data")
        self.tokens = tokens
        # A split shorter than a window gets shorter windows rather than an error.
        self.block_size = min(block_size, len(tokens) - 1)
        self.model_type = model_type
        self.bos_id, self.pad_id = bos_id, pad_id
        # The encoder-decoder sees the first n_source tokens of a window and predicts the rest.
        self.n_source = max(1, min(self.block_size - 1, round((self.block_size + 1) * source_fraction)))
        if model_type == "transformer" and self.block_size < 2:
            raise MiniLLMError("a data split is too short for the encoder-decoder (3+ tokens); add more data")

    @property
    def n_windows(self) -> int:
        return len(self.tokens) - self.block_size

    def sample_starts(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.n_windows, (batch_size,), generator=generator)

    def batch_at(self, starts: torch.Tensor, device: torch.device) -> Batch:
        """The windows beginning at `starts` (B,), as model inputs on `device`."""
        offsets = starts.numpy()[:, None] + np.arange(self.block_size + 1)
        windows = torch.from_numpy(self.tokens[offsets].astype(np.int64))  # (B, block_size + 1)
        return self.to_inputs(windows, device)

    def to_inputs(self, windows: torch.Tensor, device: torch.device) -> Batch:
        if self.model_type == "transformer":
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
        step = self.block_size if self.model_type == "decoder_only" else self.block_size + 1 - self.n_source
        starts = list(range(0, self.n_windows, step))
        last = self.n_windows - 1  # the window that ends with the last token
        overlap = 0
        if self.model_type == "decoder_only" and starts[-1] != last:
            # The tail no full step reaches: one more window flush with the end, whose first `overlap`
            # targets were already scored and are set to pad (ignored by the loss).
            overlap = starts[-1] + self.block_size - last
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

    def __init__(self, src: np.ndarray, tgt: np.ndarray, offsets: np.ndarray, max_len: int,
                 pad_id: int, bos_id: int, eos_id: int):
        self.src, self.tgt, self.offsets = src, tgt, offsets  # offsets: (2, N + 1) starts of sources, targets
        self.max_len = max_len
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    @property
    def n_pairs(self) -> int:
        return self.offsets.shape[1] - 1

    def _pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        (s0, t0), (s1, t1) = self.offsets[:, i], self.offsets[:, i + 1]
        return self.src[s0:s1][:self.max_len], self.tgt[t0:t1][:self.max_len - 1]

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


def open_split(run_dir: str | Path, split: str, model_config: Any,
               source_fraction: float) -> LMBatches | PairBatches:
    """Batches of one split of a prepared run folder."""
    run_dir = Path(run_dir)
    record = read_split_record(run_dir)
    return open_prepared(run_dir, split, record["format"], record["dtype"], model_config, source_fraction)


def open_prepared(folder: Path, split: str, fmt: str, dtype: str, model_config: Any,
                  source_fraction: float) -> LMBatches | PairBatches:
    if fmt == PAIRS:
        offsets_path = folder / f"{split}.offsets.npy"
        if not offsets_path.is_file():
            raise MiniLLMError(f"{offsets_path} is missing; the run folder is incomplete: {INCOMPLETE_FIX}")
        src = read_stream(folder / f"{split}.src.bin", dtype)
        tgt = read_stream(folder / f"{split}.tgt.bin", dtype)
        return PairBatches(src, tgt, np.load(offsets_path), model_config.max_seq_len, model_config.pad_id,
                           model_config.bos_id, model_config.eos_id)
    tokens = read_stream(folder / f"{split}.bin", dtype)
    return LMBatches(tokens, model_config.max_seq_len, model_config.model_type, source_fraction,
                     model_config.bos_id, model_config.pad_id)
