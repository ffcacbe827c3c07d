"""Data in columns: JSON Lines, and the formats the Hugging Face `datasets` library keeps on disk (a parquet file,
an arrow file, a folder written by `save_to_disk`), read with pyarrow (the 'data' extra) and never downloaded.

A table gives texts (one sample per row, from --text-column, default "text") or (source, target) pairs (from
--source-column and --target-column, default "input" and "output"). Which, when no column is named: pairs
when the table has "input" and "output" and no "text" (or the task is pairs), texts when it has "text"; any
other table is one error listing its columns and the options that choose. data.corpus turns the result into
the samples of the run's task.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minillm.data.conversations import SKIP_HINT, SKIPPED_SHOWN
from minillm.errors import MiniLLMError

TEXT_COLUMN = "text"
PAIR_COLUMNS = ("input", "output")
DATASET_INFO = "dataset_info.json"  # what save_to_disk writes beside a Dataset's arrow files
DATASET_STATE = "state.json"  # ... and the list of those files
DATASET_DICT = "dataset_dict.json"  # a DatasetDict: one Dataset folder per split
DATASET_SPLIT = "train"  # the split read from a DatasetDict (Mini LLM makes its own train/val/test)
PYARROW_HINT = "pip install 'mini-llm[data]' (or pip install pyarrow)"


@dataclass
class Table:
    """Named columns of equal length, and how to point at a row in a message ("line 3", "row 3")."""

    names: list[str]
    column: Callable[[str], list[Any]]
    where: Callable[[int], str]


def is_dataset_folder(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset, or a DatasetDict of splits)."""
    return path.is_dir() and ((path / DATASET_STATE).is_file() or (path / DATASET_DICT).is_file())


def jsonl_table(path: str | Path, text: str, skip_bad_lines: bool = False, notes: list[str] | None = None) -> Table:
    """The rows of a JSON Lines file (blank lines skipped); a line that is not a JSON object is an error, or
    with `skip_bad_lines` left out, and counted in a warning added to `notes`."""
    rows, numbers, skipped = [], [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if skip_bad_lines:
                skipped.append(number)
                continue
            raise MiniLLMError(f"{path} line {number} is not a JSON object; {SKIP_HINT} (or read the file as plain "
                               "text with --format text)")
        rows.append(row)
        numbers.append(number)
    if skipped and notes is not None:
        shown = ", ".join(map(str, skipped[:SKIPPED_SHOWN])) + (", ..." if len(skipped) > SKIPPED_SHOWN else "")
        notes.append(f"warning: left out {len(skipped):,} line(s) of {path} that are not JSON objects "
                     f"(--skip-bad-lines): line {shown}")
    names = list(dict.fromkeys(key for row in rows for key in row))
    return Table(names, lambda name: [row.get(name) for row in rows], lambda i: f"line {numbers[i]}")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise MiniLLMError(f"reading parquet and arrow data needs pyarrow, which is not installed: {PYARROW_HINT}") \
            from None
    return pyarrow


def arrow_table(path: Path, parquet: bool, notes: list[str]) -> Table:
    """A parquet file, an arrow file (IPC file or stream, as `datasets` writes), or a save_to_disk folder."""
    pa = _pyarrow()
    try:
        if parquet:
            table = pa.parquet.read_table(path)
        elif path.is_dir():
            table = pa.concat_tables([_read_ipc(pa, file) for file in _dataset_files(path, notes)])
        else:
            table = _read_ipc(pa, path)
    except (pa.ArrowException, OSError) as e:
        kind = "parquet" if parquet else "arrow"
        raise MiniLLMError(f"cannot read {path} as {kind} data ({' '.join(str(e).split())[:200]})") from None
    return Table(list(table.column_names), lambda name: table.column(name).to_pylist(), lambda i: f"row {i + 1}")


def _read_ipc(pa: Any, path: Path) -> Any:
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:  # (not the file format: `datasets` writes the stream format)
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()


def _dataset_files(path: Path, notes: list[str]) -> list[Path]:
    """The arrow files of a save_to_disk folder (of a DatasetDict: of its "train" split, said in `notes`)."""
    if (path / DATASET_DICT).is_file():
        splits = json.loads((path / DATASET_DICT).read_text(encoding="utf-8")).get("splits", [])
        if not splits:
            raise MiniLLMError(f"{path / DATASET_DICT} lists no splits; save the dataset again")
        split = DATASET_SPLIT if DATASET_SPLIT in splits else splits[0]
        notes.append(f"{path.name} holds the splits {splits}: reading {split!r} (Mini LLM makes its own train, "
                     "validation and test splits from it)")
        path = path / split
    state = json.loads((path / DATASET_STATE).read_text(encoding="utf-8"))
    files = [path / entry["filename"] for entry in state.get("_data_files", [])]
    if not files:
        raise MiniLLMError(f"{path / DATASET_STATE} lists no data files; save the dataset again")
    return files


def table_samples(path: str | Path, table: Table, pairs_task: bool, text_column: str | None,
                  source_column: str | None, target_column: str | None) -> tuple[bool, list, str]:
    """(whether they are pairs, the samples, which columns were read): texts, one per non-blank row, or
    (source, target) pairs, one per row; a missing column or a value that is not text is an error."""
    names = set(table.names)
    if source_column or target_column:
        columns = (source_column or PAIR_COLUMNS[0], target_column or PAIR_COLUMNS[1])
    elif text_column:
        columns = (text_column,)
    elif pairs_task or (set(PAIR_COLUMNS) <= names and TEXT_COLUMN not in names):
        columns = PAIR_COLUMNS
    elif TEXT_COLUMN in names and not pairs_task:
        columns = (TEXT_COLUMN,)
    else:
        raise MiniLLMError(f"{path} has the columns {table.names}: name the one to read with --text-column (texts) "
                           "or --source-column and --target-column (pairs)")
    for name in columns:
        if name not in names:
            raise MiniLLMError(f"{path} has no column {name!r}; its columns are {table.names} (choose with "
                               "--text-column, or --source-column and --target-column)")
    values = [table.column(name) for name in columns]
    for name, column in zip(columns, values, strict=True):
        bad = next((i for i, value in enumerate(column) if not isinstance(value, str)), None)
        if bad is not None:
            raise MiniLLMError(f"{path} {table.where(bad)}: column {name!r} holds {column[bad]!r}, not text; fix or "
                               "remove it, or choose other columns")
    said = " and ".join(repr(name) for name in columns)
    if len(columns) == 2:
        return True, list(zip(*values, strict=True)), f"columns {said}"
    return False, [text.strip("\n") for text in values[0] if text.strip()], f"column {said}"
