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

from minillm.data.corpus import ENCODE_CHUNK_CHARS, PAIRS, describe_samples, load_samples, split_data
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


def write_splits(folder: str | Path, fmt: str, splits: dict[str, list], tokenizer: Tokenizer, contiguous: bool,
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


SPLIT_RECORD_KEYS = {"format": str, "dtype": str, "tokens": dict, "samples": dict}


def read_split_record(run_dir: str | Path) -> dict[str, Any]:
    """split.json, checked to hold what the batches need."""
    path = RunFolder(run_dir).split_record
    record = read_json(path, "split record")
    broken = not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in SPLIT_RECORD_KEYS.items())
    if broken:
        raise MiniLLMError(f"split record {path} is damaged (it needs {sorted(SPLIT_RECORD_KEYS)}): {INCOMPLETE_FIX}")
    return record


@dataclass
class SplitData:
    """A data file read and split in memory, checked, before any file of the run is written."""

    path: Path
    format: str  # TEXT or PAIRS
    splits: dict[str, list]  # split name -> samples (texts, or (source, target) pairs)
    record: dict[str, Any]  # what split.json records about the split itself


def read_data(config: Any, keep_pairs: bool, log: LogFn) -> SplitData:
    """Read the data file of a TrainConfig (the bundled corpus when None), say how it was read, and split
    it; a bad file is a MiniLLMError here, before anything is written."""
    path = Path(config.data) if config.data else bundled_data_path()
    loaded = load_samples(path, keep_pairs, config.split_mode, config.separator, config.data_format,
                          config.source_column, config.target_column)
    splits, record = split_data(loaded.format, loaded.samples, path, config.val_fraction, config.test_fraction,
                                config.seed, config.holdout)
    log(describe_samples(path, loaded, config.split_mode))
    for note in loaded.notes:
        log(note)
    if record["holdout"] == "tail":
        log(f"held out: the last {config.val_fraction + config.test_fraction:.0%} of {path.name} (validation, "
            "then test), as nanoGPT does: text after everything the model trains on")
    elif record["contiguous"]:
        log(f"only {record['n_samples']} sample(s) in {path}: splitting the text into contiguous "
            f"train/val/test stretches instead of by sample")
    if loaded.format == PAIRS and not any(target.strip() for _, target in splits["train"]):
        raise MiniLLMError(
            f"every target of the {len(splits['train']):,} training pairs of {path} is empty (0 training "
            "tokens): there is nothing to learn; add pairs with targets, or check --target-column"
        )
    return SplitData(path=path, format=loaded.format, splits=splits, record=record)


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
    if spec.tokens["train"] == 0:
        raise MiniLLMError(f"the training split of {data.path} has 0 tokens: there is nothing to train on; "
                           "add data")
    return tokenizer, save_split_record(folder, spec, data.record, str(data.path.resolve()))


def sample_prompt(run_dir: str | Path, tokenizer: Tokenizer, max_tokens: int) -> str:
    """A prompt in the style of the data: the start of the test split (up to its first line end), or the
    first test source of a pair file; at most `max_tokens` tokens."""
    files = RunFolder(run_dir)
    record = read_split_record(run_dir)
    pairs = record["format"] == PAIRS
    if pairs:
        offsets = read_offsets(files.pair_offsets("test"))
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
