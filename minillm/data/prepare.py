"""A run's data: read and split for its task (nothing written yet), tokenized into the run folder, and
opened again as batches.

The task (data.tasks) says how: plain text becomes one token stream per split (samples written as BOS ...
EOS), stored as a numpy memmap (train.bin / val.bin / test.bin, data.streams), so a large corpus never sits
in memory as Python ints; a file of pairs is stored per split as two token streams plus offsets. The split
is recorded with the run (split.json, data.split_record), so `minillm evaluate` scores the same test set.
File names come from minillm.run_folder.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from minillm.config import ModelConfig, TrainConfig
from minillm.data.batches import Batches
from minillm.data.corpus import split_data
from minillm.data.sources import data_files, describe_samples, load_samples
from minillm.data.split_record import SplitRecord, read_split_record
from minillm.data.streams import token_dtype
from minillm.data.tasks import Task, task_for
from minillm.errors import MiniLLMError
from minillm.run_folder import RunFolder
from minillm.tokenizers import Tokenizer, import_tokenizer, save_chat_template, save_special_tokens, train_tokenizer

LogFn = Callable[[str], None]
MAX_UNSPELLED_SHARE = 0.01  # an imported tokenizer that cannot spell more of the training text is refused
HASH_CHUNK_BYTES = 1 << 20  # a data file is hashed a mebibyte at a time
SHOWN_CHARACTERS = 8  # the characters named in that refusal (or warning), most frequent first


def bundled_data_path() -> Path:
    """The bundled Tiny Shakespeare text (used when no data file is given)."""
    return Path(str(resources.files("minillm").joinpath("data", "tinyshakespeare.txt")))


# ----------------------------------------------------------------------------------------------------
# A run's data: read and split (no file touched), then tokenized into a folder


@dataclass
class SplitData:
    """A data file read and split in memory, checked, before any file of the run is written."""

    path: Path  # the data, as messages name it (a file, a folder, a glob; several: the first and how many more)
    task: Task  # what the run learns from it (TrainConfig.task, "auto" decided by the file)
    splits: dict[str, list]  # split name -> samples (texts, or (source, target) pairs)
    record: SplitRecord  # what split.json records about the split itself (the rest is filled in by write_data)
    source: str = ""  # what split.json records as the data's source (data.sources.data_label)
    files: list[Path] = field(default_factory=list)  # the files it was read from (data.sources.data_files)


def read_data(config: TrainConfig, encoder_decoder: bool, log: LogFn) -> SplitData:
    """Read the data of a TrainConfig (the bundled corpus when None: one file or many, see data.sources) for its
    task, say how it was read, and split it; bad data is a MiniLLMError here, before anything is written."""
    loaded = load_samples(config.data or str(bundled_data_path()), config.task, config.split_mode, config.separator,
                          config.data_format, config.source_column, config.target_column, config.text_column,
                          skip_bad_lines=config.skip_bad_lines)
    path = Path(loaded.label)
    splits, record = split_data(loaded.task, loaded.samples, path, config.val_fraction, config.test_fraction,
                                config.seed, config.holdout)
    log(describe_samples(loaded, config.split_mode))
    for note in loaded.notes:
        log(note)
    if record.holdout == "tail":
        log(f"held out: the last {config.val_fraction + config.test_fraction:.0%} of {path.name} (validation, "
            "then test), as nanoGPT does: text after everything the model trains on")
    elif record.contiguous:
        log(f"only {record.n_samples} sample(s) in {path}: splitting the text into contiguous "
            f"train/val/test stretches instead of by sample")
    task = task_for(loaded.task, encoder_decoder)
    task.check_training_split(splits["train"], path)
    return SplitData(path=path, task=task, splits=splits, record=record, source=loaded.label,
                     files=data_files(config.data or str(bundled_data_path())))


def write_splits(folder: str | Path, task: Task, splits: dict[str, list], tokenizer: Tokenizer, contiguous: bool,
                 progress_factory: Any = None) -> tuple[str, dict[str, int]]:
    """Tokenize each split ({"train": samples, ...}) into `folder` as `task` stores them; returns (the token
    files' dtype, tokens per split)."""
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = {}
    for name in splits:
        bar = None
        if progress_factory is not None:
            bar = progress_factory(total=len(splits[name]), desc=f"tokenizing {name}")
        try:
            tokens[name] = task.write_split(folder, name, splits[name], tokenizer, dtype, contiguous, bar)
        finally:
            if bar is not None:
                bar.close()
    return dtype.name, tokens


@dataclass
class Spelling:
    """What a tokenizer cannot spell of some texts: the characters it drops or maps to its unknown token."""

    missing: Counter[str]  # character -> how often
    text_bytes: int  # UTF-8 bytes of the texts

    @classmethod
    def measure(cls, tokenizer: Tokenizer, texts: Iterable[str]) -> Spelling:
        missing: Counter[str] = Counter()
        text_bytes = 0
        for text in texts:
            text_bytes += _utf8_size(text)
            if not tokenizer.spells_every_text:
                missing.update(tokenizer.unspelled(text))
        return cls(missing, text_bytes)

    @property
    def unspelled_bytes(self) -> int:
        return sum(_utf8_size(char) * n for char, n in self.missing.items())

    @property
    def share(self) -> float:
        """The share of the texts' bytes that no token spells."""
        return self.unspelled_bytes / self.text_bytes if self.text_bytes else 0.0

    def characters(self) -> str:
        """The most frequent missing characters: "'世' x120, '界' x118 and 40 other characters"."""
        shown = ", ".join(f"{char!r} x{n:,}" for char, n in self.missing.most_common(SHOWN_CHARACTERS))
        others = len(self.missing) - SHOWN_CHARACTERS
        return shown + (f" and {others:,} other characters" if others > 0 else "")


@dataclass
class ImportedTokenizer:
    """An existing tokenizer a run uses instead of training one (TrainConfig.tokenizer_file)."""

    tokenizer: Tokenizer
    added: list[str]  # the special tokens it lacked, added after its last id
    source: Path
    from_model: bool = False  # the tokenizer of a model the run starts from (--init-from): its template stays

    @classmethod
    def read(cls, path: str | Path, from_model: bool = False) -> ImportedTokenizer:
        tokenizer, added = import_tokenizer(path)
        return cls(tokenizer, added, Path(path).resolve(), from_model)

    def check_spelling(self, data: SplitData, log: LogFn) -> None:
        """Refuse a tokenizer that cannot spell more than MAX_UNSPELLED_SHARE of the training text (the model
        would never see it, and its scores would be of another text); warn when it cannot spell some."""
        spelling = Spelling.measure(self.tokenizer, data.task.training_texts(data.splits["train"]))
        if spelling.share > MAX_UNSPELLED_SHARE:
            raise MiniLLMError(
                f"tokenizer {self.source} cannot spell {spelling.share:.1%} of the training text of {data.path} "
                f"(it drops them or maps them to its unknown token): {spelling.characters()}; use a tokenizer "
                "with byte fallback or a byte-level pre-tokenizer (GPT-2's, Llama's), or train one on the data "
                "(leave out --tokenizer-file)")
        if spelling.missing:
            log(f"warning: tokenizer {self.source} cannot spell {spelling.share:.2%} of the training text "
                f"({spelling.characters()}): the model never sees them, and bits per byte count each of their "
                "bytes as 8 bits")


def write_data(folder: str | Path, data: SplitData, tokenizer_kind: str, bpe_vocab_size: int,
               progress_factory: Any = None,
               imported: ImportedTokenizer | None = None) -> tuple[Tokenizer, SplitRecord]:
    """Train the tokenizer on the training split (or use the `imported` one), save it, which of its tokens
    are special, the tokenized splits and split.json into `folder`; returns (tokenizer, split record)."""
    files = RunFolder(folder)
    if imported is not None:
        tokenizer, added, source = imported.tokenizer, imported.added, str(imported.source)
    else:
        texts = data.task.training_texts(data.splits["train"])
        tokenizer, added, source = train_tokenizer(tokenizer_kind, texts, bpe_vocab_size), [], "trained"
    # (a chat run's role markers and template; a model started from keeps its template, whatever the task)
    tokenizer, added_by_task = data.task.prepare_tokenizer(tokenizer, imported is not None and imported.from_model)
    tokenizer.save(files.tokenizer)
    save_special_tokens(tokenizer, files.special_tokens, [*added, *added_by_task], source)
    save_chat_template(tokenizer, folder)
    dtype, tokens = write_splits(folder, data.task, data.splits, tokenizer, data.record.contiguous,
                                 progress_factory)
    if tokens["train"] == 0:
        raise MiniLLMError(f"the training split of {data.path} has 0 tokens: there is nothing to train on; "
                           "add data")
    record = data.record.written(dtype, tokens, {name: len(part) for name, part in data.splits.items()},
                                 data.source or str(data.path.resolve()), data.task.separator_ids(tokenizer))
    record.unspelled = unspelled_bytes(tokenizer, data.task, data.splits)
    record.source_size, record.source_hash = data_identity(data.files)
    record.save(folder)
    return tokenizer, record


def unspelled_bytes(tokenizer: Tokenizer, task: Task, splits: dict[str, list]) -> dict[str, list[int]]:
    """Split -> [bytes no token spells, bytes of its text], for the splits where any is unspelled (bits per
    byte count them: evaluation.honest_bits_per_byte)."""
    if tokenizer.spells_every_text:
        return {}
    spellings = {name: Spelling.measure(tokenizer, task.training_texts(samples)) for name, samples in splits.items()}
    return {name: [s.unspelled_bytes, s.text_bytes] for name, s in spellings.items() if s.missing}


def data_identity(files: list[Path]) -> tuple[int, str]:
    """(size in bytes, sha256) of a run's data files (a save_to_disk folder: every file in it), in order, as
    split.json records them."""
    digest, size = hashlib.sha256(), 0
    for path in files:
        for part in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            digest.update(f"{part.relative_to(path) if path.is_dir() else part.name}\n".encode())
            size += part.stat().st_size
            with open(part, "rb") as f:
                while chunk := f.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
    return size, digest.hexdigest()


def data_change(record: SplitRecord, data: str | list[str] | None) -> str | None:
    """How the data (TrainConfig.data) of a prepared run differs from what it was when the run was prepared
    (its size, or its contents), or None when it is the same (or the run recorded neither: an older run)."""
    if record.source is None or record.source_size is None:
        return None
    try:
        files = data_files(data or str(bundled_data_path()))
    except MiniLLMError:
        return f"{record.source} is no longer there"
    size, digest = data_identity(files)
    if size != record.source_size:
        return (f"{record.source} has changed since the run was prepared ({record.source_size:,} bytes then, "
                f"{size:,} now)")
    if record.source_hash is not None and digest != record.source_hash:
        return f"{record.source} has changed since the run was prepared (same size, other contents)"
    return None


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def run_task(run_dir: str | Path, encoder_decoder: bool) -> Task:
    """The task a run folder's data was prepared for (its split.json's), for a model of that kind."""
    return task_for(read_split_record(run_dir).task, encoder_decoder)


def open_split(run_dir: str | Path, split: str, model_config: ModelConfig, encoder_decoder: bool,
               source_fraction: float) -> Batches:
    """Batches of one split of a prepared run folder, as its task makes them, checked against the token
    counts in split.json."""
    record = read_split_record(run_dir)
    return task_for(record.task, encoder_decoder).open_batches(run_dir, split, record, model_config,
                                                                source_fraction)


def sample_prompt(run_dir: str | Path, tokenizer: Tokenizer, max_tokens: int, encoder_decoder: bool) -> str:
    """A prompt in the style of the data, at most `max_tokens` tokens: the start of the test split (up to its
    first line end), the first test source of a file of pairs (for a decoder-only model with the
    separator after it, so that the answer follows), or a chat run's first test conversation up to its answer
    (special tokens spelled out)."""
    record = read_split_record(run_dir)
    return task_for(record.task, encoder_decoder).test_prompt(run_dir, record, tokenizer, max_tokens)


def sample_prompt_ids(run_dir: str | Path, encoder_decoder: bool) -> list[int] | None:
    """The sample prompt as ids, for a run whose prompts hold special tokens (chat); None for the others."""
    record = read_split_record(run_dir)
    return task_for(record.task, encoder_decoder).test_prompt_ids(run_dir, record)
