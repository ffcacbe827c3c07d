"""Tokenizing a run's data into its folder, and reading it back.

Plain text becomes one token stream per split (samples written as BOS ... EOS), stored as a numpy memmap
(train.bin / val.bin / test.bin), so a large corpus never sits in memory as Python ints. A file of pairs
is stored per split as two token streams plus offsets. The split is recorded with the run (split.json), so
`minillm evaluate` scores the same test set. File names come from minillm.run_folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from minillm.data.corpus import ENCODE_CHUNK_CHARS, PAIRS, load_samples, split_data
from minillm.errors import MiniLLMError
from minillm.files import atomic_write, read_json, write_json
from minillm.run_folder import PAIR_SIDES, RunFolder
from minillm.tokenizers import Tokenizer, import_tokenizer, save_special_tokens, train_tokenizer

INCOMPLETE_FIX = "train it again with --overwrite"
LogFn = Callable[[str], None]


def bundled_data_path() -> Path:
    """The bundled Tiny Shakespeare text (used when no data file is given)."""
    return Path(str(resources.files("minillm").joinpath("data", "tinyshakespeare.txt")))


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


def write_pair_streams(folder: str | Path, split: str, tokenizer: Any, pairs: list[tuple[str, str]],
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


def read_stream(path: str | Path, dtype: str | np.dtype) -> np.ndarray:
    """A token file as a read-only memmap (an empty file as an empty array: memmap refuses size 0)."""
    path = Path(path)
    if not path.is_file():
        raise MiniLLMError(f"token file missing: {path}; the run folder is incomplete: {INCOMPLETE_FIX}")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# ----------------------------------------------------------------------------------------------------
# A run's data: read and split (no file touched), then tokenized into a folder


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


def write_splits(folder: str | Path, fmt: str, splits: dict[str, list], tokenizer: Any, contiguous: bool,
                 progress_factory: Any = None) -> DataSpec:
    """Tokenize each split ({"train": samples, ...}) into `folder`; returns what was written."""
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = {}
    for name in splits:
        bar = None
        if progress_factory is not None:
            bar = progress_factory(total=len(splits[name]), desc=f"tokenizing {name}")
        try:
            if fmt == PAIRS:
                tokens[name] = write_pair_streams(folder, name, tokenizer, splits[name], dtype, bar)
            else:
                tokens[name] = write_token_stream(RunFolder(folder).tokens(name), tokenizer, splits[name], dtype,
                                                  mark_samples=not contiguous, progress=bar)
        finally:
            if bar is not None:
                bar.close()
    return DataSpec(format=fmt, dtype=dtype.name, tokens=tokens,
                    samples={name: len(part) for name, part in splits.items()}, contiguous=contiguous)


def save_split_record(folder: str | Path, spec: DataSpec, record: dict[str, Any], source: str) -> dict[str, Any]:
    """Write split.json; returns what it holds (what read_split_record will read)."""
    split_record = {"source": source, **spec.to_dict(), **record}
    write_json(RunFolder(folder).split_record, split_record)
    return split_record


def read_split_record(run_dir: str | Path) -> dict[str, Any]:
    return read_json(RunFolder(run_dir).split_record, "split record")


@dataclass
class SplitData:
    """A data file read and split in memory, checked, before any file of the run is written."""

    path: Path
    format: str  # TEXT or PAIRS
    splits: dict[str, list]  # split name -> samples (texts, or (source, target) pairs)
    record: dict[str, Any]  # what split.json records about the split itself


def read_data(data: str | Path | None, keep_pairs: bool, split_mode: str, separator: str, val_fraction: float,
              test_fraction: float, seed: int, log: LogFn) -> SplitData:
    """Read the data file (the bundled corpus when None) and split it; a bad file is a MiniLLMError here."""
    path = Path(data) if data else bundled_data_path()
    fmt, samples = load_samples(path, keep_pairs, split_mode, separator)
    splits, record = split_data(fmt, samples, path, val_fraction, test_fraction, seed)
    if record["contiguous"]:
        log(f"only {record['n_samples']} sample(s) in {path}: splitting the text into contiguous "
            f"train/val/test stretches instead of by sample")
    return SplitData(path=path, format=fmt, splits=splits, record=record)


def training_texts(data: SplitData) -> Iterator[str]:
    """The texts of the training split only (both sides of each pair): what a tokenizer learns from."""
    for sample in data.splits["train"]:
        if data.format == PAIRS:
            yield from sample
        else:
            yield sample


@dataclass
class ImportedTokenizer:
    """An existing tokenizer a run uses instead of training one (TrainConfig.tokenizer_file)."""

    tokenizer: Tokenizer
    added: list[str]  # the special tokens it lacked, added after its last id
    source: Path

    @classmethod
    def read(cls, path: str | Path) -> ImportedTokenizer:
        tokenizer, added = import_tokenizer(path)
        return cls(tokenizer, added, Path(path).resolve())


def write_data(folder: str | Path, data: SplitData, tokenizer_kind: str, bpe_vocab_size: int,
               progress_factory: Any = None,
               imported: ImportedTokenizer | None = None) -> tuple[Tokenizer, dict[str, Any]]:
    """Train the tokenizer on the training split (or use the `imported` one), save it, which of its tokens
    are special, the tokenized splits and split.json into `folder`; returns (tokenizer, split record)."""
    files = RunFolder(folder)
    if imported is not None:
        tokenizer, added, source = imported.tokenizer, imported.added, str(imported.source)
    else:
        tokenizer, added = train_tokenizer(tokenizer_kind, training_texts(data), bpe_vocab_size), []
        source = "trained"
    tokenizer.save(files.tokenizer)
    save_special_tokens(tokenizer, files.special_tokens, added, source)
    spec = write_splits(folder, data.format, data.splits, tokenizer, data.record["contiguous"], progress_factory)
    return tokenizer, save_split_record(folder, spec, data.record, str(data.path.resolve()))


def sample_prompt(run_dir: str | Path, tokenizer: Tokenizer, max_tokens: int) -> str:
    """A prompt in the style of the data: the start of the test split (up to its first line end), or the
    first test source of a pair file; at most `max_tokens` tokens."""
    files = RunFolder(run_dir)
    record = read_split_record(run_dir)
    pairs = record["format"] == PAIRS
    if pairs:
        offsets = np.load(files.pair_offsets("test"))
        ids = read_stream(files.pair_tokens("test", "src"), record["dtype"])[offsets[0, 0]:offsets[0, 1]]
    else:
        ids = read_stream(files.tokens("test"), record["dtype"])
    ids = ids[:max_tokens].tolist()
    while ids:
        text = tokenizer.decode(ids)
        if not pairs:
            text = text.lstrip("\n")
            line_end = text.find("\n")
            text = text[:line_end + 1] if line_end > 0 else text
        if len(tokenizer.encode(text)) <= max_tokens:  # BPE may split decoded text differently
            return text
        ids = ids[:-1]
    return ""
