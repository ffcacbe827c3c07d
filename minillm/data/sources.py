"""Where a run's data comes from, and reading all of it as one list of samples.

TrainConfig.data is a path or a list of them; each path is

    a file            read by its format (data.corpus: text, TSV, JSON Lines; data.tables: parquet, arrow)
    a folder          its files (not its sub-folders, nor hidden files), in name order; a folder written by
                      `datasets`' save_to_disk is one arrow table instead
    a glob            "notes/*.txt", "books/**/*.md": the files it matches, in name order

Several files are read each by its own format and merged: text files give their samples one after the other
(a file's end always ends a sample), pair files their pairs; files that read as different kinds of sample
(plain text and pairs) are refused, naming both. Nothing is downloaded: a name that is not on disk (a
Hugging Face hub name, say) is one line saying how to save the dataset to disk first.
"""

from __future__ import annotations

import glob
from pathlib import Path

from minillm.data.corpus import (
    CHAT,
    CONVERSATIONS_NAME,
    FILE_FORMAT_NAMES,
    FORMAT_HINT,
    JSONL_FILE,
    PAIRS,
    TEXT_FILE,
    TSV_FILE,
    Samples,
    check_pairs,
    read_samples,
    sample_chars,
    sample_unit,
)
from minillm.data.tables import is_dataset_folder
from minillm.errors import MiniLLMError

GLOB_CHARS = "*?["
NAMES_SHOWN = 3  # files named in the line that says how the data was read (then "and N more")
SAVE_HINT = ("Mini LLM reads data from disk and downloads nothing: to train on a Hugging Face dataset, save it "
             "first (`datasets.load_dataset(NAME).save_to_disk(FOLDER)`, or `...['train'].to_parquet(FILE)`) and give "
             "that folder or file")


def _files_of(entry: str) -> list[Path]:
    """The files one data entry (a file, a folder or a glob) stands for."""
    path = Path(entry).expanduser()
    if any(c in entry for c in GLOB_CHARS) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file() or is_dataset_folder(p)]
        if not files:
            raise MiniLLMError(f"no data file matches {entry!r}; check the pattern (quote it, so that the shell "
                               "leaves it to Mini LLM)")
        return files
    if path.is_dir() and not is_dataset_folder(path):
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise MiniLLMError(f"data folder {path} holds no files (sub-folders are not read); put the data files "
                               "in it, or give a glob like 'folder/**/*.txt'")
        return files
    if not path.exists():
        hub = "://" in entry or (len(Path(entry).parts) <= 2 and not Path(entry).suffix
                                 and not entry.startswith((".", "/", "~")))
        raise MiniLLMError(f"data file not found: {entry}; " + (SAVE_HINT if hub else
                           "check the path, or omit it to train on Tiny Shakespeare"))
    return [path]


def data_files(data: str | list[str]) -> list[Path]:
    """Every file (or save_to_disk folder) a TrainConfig.data stands for, in order; the same file once."""
    entries = data if isinstance(data, list) else [data]
    return list(dict.fromkeys(path for entry in entries for path in _files_of(str(entry))))


def data_label(data: str | list[str]) -> str:
    """The data as messages and split.json name it: a file or folder's resolved path, a glob as given, a list by
    its first entry and how many more."""
    if isinstance(data, list) and len(data) > 1:
        return f"{data_label(data[0])} (+{len(data) - 1} more)"
    entry = data[0] if isinstance(data, list) else data
    path = Path(entry).expanduser()
    return str(path.resolve()) if path.exists() or not any(c in entry for c in GLOB_CHARS) else entry


def load_samples(data: str | Path | list[str], task: str, split_mode: str, separator: str,
                 file_format: str = "auto", source_column: int | str | None = None,
                 target_column: int | str | None = None, text_column: str | None = None,
                 skip_bad_lines: bool = False) -> Samples:
    """The samples of all the data (see the module's docstring), for `task`; a pair file needs at least 3 pairs
    in all, and a target that is not empty."""
    data = str(data) if isinstance(data, Path) else data
    files = data_files(data)
    parts = [read_samples(path, task, split_mode, separator, file_format, source_column, target_column,
                          text_column, skip_bad_lines) for path in files]
    first = parts[0]
    for path, part in zip(files, parts, strict=True):
        if part.task != first.task:
            raise MiniLLMError(f"{files[0].name} reads as {_kind(first)} but {path.name} as {_kind(part)}; give "
                               "files of one kind (or --task text to read pairs as text)")
    formats = {part.file_format for part in parts}
    hows = {part.how for part in parts}
    merged = Samples(first.task, [sample for part in parts for sample in part.samples],
                     first.file_format if len(formats) == 1 else "mixed",
                     first.how if len(hows) == 1 else "each by its extension or content",
                     [note for part in parts for note in part.notes], first.from_pairs,
                     first.columns if len({part.columns for part in parts}) == 1 else "",
                     first.target, data_label(data), files)
    if merged.task == PAIRS:
        check_pairs(merged.label if len(files) > 1 else str(files[0]), merged.samples, merged.target)
    return merged


def _kind(samples: Samples) -> str:
    what = {PAIRS: "pairs", CHAT: "conversations"}.get(samples.task, "text samples")
    return f"{FILE_FORMAT_NAMES[samples.file_format]} ({what})"


def describe_samples(loaded: Samples, split_mode: str) -> str:
    """One line for the user: how the data was read and how many samples it gave."""
    names = [path.name for path in loaded.files]
    if len(names) == 1:
        what = f"data file: {names[0]}"
    else:
        shown = ", ".join(names[:NAMES_SHOWN]) + (f" and {len(names) - NAMES_SHOWN:,} more" if len(names) >
                                                   NAMES_SHOWN else "")
        what = f"data: {len(names):,} files ({shown})"
    read_as = CONVERSATIONS_NAME if loaded.task == CHAT else FILE_FORMAT_NAMES.get(loaded.file_format,
                                                                                    "each by its format")
    columns = f", {loaded.columns}" if loaded.columns else ""
    hint = f"; {FORMAT_HINT}" if loaded.file_format in (TEXT_FILE, TSV_FILE, JSONL_FILE) else ""
    return (f"{what} read as {read_as} ({loaded.how}{columns}{hint}): {len(loaded.samples):,} "
            f"{sample_unit(loaded, split_mode)}, {sample_chars(loaded):,} characters")


def data_files_key(data: str | list[str] | None) -> list[tuple[str, int, int]] | None:
    """What identifies the data's current contents cheaply: each file's path, mtime and size (None when a file
    cannot be found: reading it says why)."""
    if data is None:
        return []
    try:
        files = data_files(data)
        return [(str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in files]
    except (MiniLLMError, OSError):
        return None
