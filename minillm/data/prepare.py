"""A run's data: read and split for its task (nothing written yet), tokenized into the run folder, and
opened again as batches.

The task (data.tasks) says how: plain text becomes one token stream per split (samples written as BOS ...
EOS), stored as a numpy memmap (train.bin / val.bin / test.bin, data.streams), so a large corpus never sits
in memory as Python ints; a file of pairs is stored per split as two token streams plus offsets. The split
is recorded with the run (split.json, data.split_record), so `minillm evaluate` scores the same test set.
File names come from minillm.run_folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from minillm.config import ModelConfig, TrainConfig
from minillm.data.batches import Batches
from minillm.data.corpus import describe_samples, load_samples, split_data
from minillm.data.split_record import SplitRecord, read_split_record
from minillm.data.streams import token_dtype
from minillm.data.tasks import Task, task_for
from minillm.errors import MiniLLMError
from minillm.run_folder import RunFolder
from minillm.tokenizers import Tokenizer, import_tokenizer, save_chat_template, save_special_tokens, train_tokenizer

LogFn = Callable[[str], None]


def bundled_data_path() -> Path:
    """The bundled Tiny Shakespeare text (used when no data file is given)."""
    return Path(str(resources.files("minillm").joinpath("data", "tinyshakespeare.txt")))


# ----------------------------------------------------------------------------------------------------
# A run's data: read and split (no file touched), then tokenized into a folder


@dataclass
class SplitData:
    """A data file read and split in memory, checked, before any file of the run is written."""

    path: Path
    task: Task  # what the run learns from it (TrainConfig.task, "auto" decided by the file)
    splits: dict[str, list]  # split name -> samples (texts, or (source, target) pairs)
    record: SplitRecord  # what split.json records about the split itself (the rest is filled in by write_data)


def read_data(config: TrainConfig, encoder_decoder: bool, log: LogFn) -> SplitData:
    """Read the data file of a TrainConfig (the bundled corpus when None) for its task, say how it was read,
    and split it; a bad file is a MiniLLMError here, before anything is written."""
    path = Path(config.data) if config.data else bundled_data_path()
    loaded = load_samples(path, config.task, config.split_mode, config.separator, config.data_format,
                          config.source_column, config.target_column, config.skip_bad_lines)
    splits, record = split_data(loaded.task, loaded.samples, path, config.val_fraction, config.test_fraction,
                                config.seed, config.holdout)
    log(describe_samples(path, loaded, config.split_mode))
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
    return SplitData(path=path, task=task, splits=splits, record=record)


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
               imported: ImportedTokenizer | None = None) -> tuple[Tokenizer, SplitRecord]:
    """Train the tokenizer on the training split (or use the `imported` one), save it, which of its tokens
    are special, the tokenized splits and split.json into `folder`; returns (tokenizer, split record)."""
    files = RunFolder(folder)
    if imported is not None:
        tokenizer, added, source = imported.tokenizer, imported.added, str(imported.source)
    else:
        texts = data.task.training_texts(data.splits["train"])
        tokenizer, added, source = train_tokenizer(tokenizer_kind, texts, bpe_vocab_size), [], "trained"
    tokenizer, added_by_task = data.task.prepare_tokenizer(tokenizer)  # (a chat run's role markers, template)
    tokenizer.save(files.tokenizer)
    save_special_tokens(tokenizer, files.special_tokens, [*added, *added_by_task], source)
    save_chat_template(tokenizer, folder)
    dtype, tokens = write_splits(folder, data.task, data.splits, tokenizer, data.record.contiguous,
                                 progress_factory)
    if tokens["train"] == 0:
        raise MiniLLMError(f"the training split of {data.path} has 0 tokens: there is nothing to train on; "
                           "add data")
    record = data.record.written(dtype, tokens, {name: len(part) for name, part in data.splits.items()},
                                 str(data.path.resolve()), data.task.separator_ids(tokenizer))
    record.save(folder)
    return tokenizer, record


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
