"""From the user's file to samples: read it, cut it into samples, split them into train/val/test.

Plain text is cut into samples (paragraphs, lines, or by a separator). A file of (source, target) pairs
(TSV `source<TAB>target`, extra columns allowed, or JSONL `{"input": ..., "output": ...}`) gives pairs; JSON
Lines, parquet and arrow tables give texts or pairs by their columns (data.tables); a JSONL file of
conversations (`{"messages": [...]}`, data.conversations) gives conversations. The file format is taken
from --format, else from the extension (.tsv, .jsonl, .parquet, .arrow), else from the content, and always
said (data.sources.describe_samples; data.sources also reads several files into one list of samples). The
task (--task) says what the samples are: pairs for the pairs task (the default for a pair file), texts for the
text task (a pair becomes the text "source\ntarget"), conversations for the chat task (the default for a
conversation file). A file with few samples is cut into contiguous train/val/test stretches instead of being
shuffled by sample.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from minillm.config import DATA_FORMATS, MAX_COLUMN, TASKS
from minillm.data.conversations import (
    conversation_chars,
    is_conversation_line,
    looks_like_conversations,
    parse_conversations,
)
from minillm.data.split_record import SplitRecord
from minillm.data.tables import arrow_table, is_dataset_folder, jsonl_table, table_samples
from minillm.errors import MiniLLMError
from minillm.run_folder import SPLITS

# What a run's samples are (--task; "auto": chat for a conversation file, pairs for a pair file, else text).
AUTO_TASK, TEXT, PAIRS, CHAT = TASKS
# Between a source and its target: in a pair file read as text samples, and in a decoder-only pairs sample.
PAIR_SEPARATOR = "\n"
AUTO_FORMAT, TEXT_FILE, TSV_FILE, JSONL_FILE, PARQUET_FILE, ARROW_FILE = DATA_FORMATS  # how a file is read (--format)
FILE_FORMATS = DATA_FORMATS[1:]
FILE_FORMAT_NAMES = {TEXT_FILE: "plain text", TSV_FILE: "tab-separated pairs", JSONL_FILE: "JSON lines",
                     PARQUET_FILE: "a parquet table", ARROW_FILE: "an arrow table"}
CONVERSATIONS_NAME = "JSON-lines conversations"  # (a JSONL file whose lines are {"messages": [...]})
BINARY_FORMATS = {".parquet": PARQUET_FILE, ".arrow": ARROW_FILE}  # read by extension, never sniffed as text
FORMAT_HINT = "--format text|tsv|jsonl overrides"
DEFAULT_COLUMNS = (1, 2)  # the source and target columns of a TSV file (1-based, as `cut -f` counts)
# Fewer samples than this and a shuffled split by sample is too coarse (a single paragraph could be the whole
# validation set), so the file is split into contiguous chunks instead, like nanoGPT's 90/10 cut.
MIN_SAMPLES_FOR_SAMPLE_SPLIT = 20
MIN_PAIRS = 3  # one pair for each of train, val and test
# Characters tokenized per encode_batch call: bounds how many Python ints are alive at once.
ENCODE_CHUNK_CHARS = 1_000_000
PAIR_DETECT_LINES = 50  # how many non-empty lines the content sniffer looks at
BOM = "\ufeff"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")

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


# How text is cut into samples, by TrainConfig.split_mode: (text, separator) -> the pieces.
SPLITTERS: dict[str, Callable[[str, str], list[str]]] = {
    "paragraph": lambda text, separator: _BLANK_LINE.split(text),  # blank lines
    "line": lambda text, separator: text.split("\n"),
    "separator": lambda text, separator: text.split(separator),
}


def split_samples(text: str, mode: str = "paragraph", separator: str = "<|endoftext|>") -> list[str]:
    """Cut text into samples: by blank lines ("paragraph"), one per line ("line"), or by a separator."""
    if mode not in SPLITTERS:
        raise MiniLLMError(f"split_mode must be one of {tuple(SPLITTERS)}, got {mode!r}")
    return [p.strip("\n") for p in SPLITTERS[mode](text, separator) if p.strip()]


def detect_format(path: str | Path, text: str) -> tuple[str, str]:
    """(file format, how it was decided): by extension (.tsv, .jsonl), else by content (every sniffed line
    a JSON pair, or every one with the same number of tabs and text before the first), else plain text."""
    suffix = Path(path).suffix.lower()
    by_extension = {".tsv": TSV_FILE, ".jsonl": JSONL_FILE}
    if suffix in by_extension:
        return by_extension[suffix], f"by its {suffix} extension"
    lines = [line for line in text[:200_000].split("\n")[:PAIR_DETECT_LINES * 4] if line.strip()]
    lines = lines[:PAIR_DETECT_LINES]
    if len(lines) >= 2:
        if all(is_conversation_line(line) for line in lines):
            return JSONL_FILE, "by its content: every line is a JSON conversation"
        if all(_json_object(line) for line in lines):
            return JSONL_FILE, "by its content: every line is a JSON object"
        tabs = {line.count("\t") for line in lines}
        indented = any(not line.split("\t", 1)[0].strip() for line in lines)  # tabs as indentation: text
        if len(tabs) == 1 and min(tabs) >= 1 and not indented:
            return TSV_FILE, f"by its content: every line has {min(tabs) + 1} tab-separated columns"
    return TEXT_FILE, "by its content: not every line is a pair"


def _json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def parse_pairs(path: str | Path, text: str, file_format: str, source_column: int | str | None = None,
                target_column: int | str | None = None, notes: list[str] | None = None,
                skip_bad_lines: bool = False) -> list[tuple[str, str]]:
    """(source, target) pairs from TSV or JSONL text; a malformed line is an error naming its number (JSONL,
    with `skip_bad_lines`: left out, and counted in `notes`).

    TSV: every line has the same columns; the source and target are columns `source_column` and
    `target_column` (1-based; default 1 and 2; other columns are left out, with a warning added to `notes`).
    JSONL: the fields named so (default "input" and "output").
    """
    if file_format == JSONL_FILE:
        table = jsonl_table(path, text, skip_bad_lines, notes if notes is not None else [])
        _, pairs, _ = table_samples(path, table, True, None, _name(source_column),
                                    _name(target_column))
    else:
        pairs = _tsv_pairs(path, text, source_column, target_column, notes if notes is not None else [])
    which = f"column {target_column or DEFAULT_COLUMNS[1]}" if file_format == TSV_FILE else None
    check_pairs(str(path), pairs, which)
    return pairs


def check_pairs(label: str, pairs: list[tuple[str, str]], which: str | None = None) -> None:
    """Refuse too few pairs, or pairs whose targets (`which`: where they come from) are all empty."""
    if len(pairs) < MIN_PAIRS:
        raise MiniLLMError(f"{label} has {len(pairs)} pair(s); at least {MIN_PAIRS} are needed (train, val, test)")
    if not any(target.strip() for _, target in pairs):
        raise MiniLLMError(
            f"every target{f' ({which})' if which else ''} in {label} is empty: there is nothing to learn to "
            "produce; pick the target with --target-column, or read the file as plain text with --format text"
        )


def _name(column: int | str | None) -> str | None:
    return None if column is None else str(column)


def _column_number(name: str, column: int | str | None, default: int) -> int:
    """A TSV column as a number from 1 (an option's text, "2", or a number)."""
    if column is None:
        return default
    if isinstance(column, int) or str(column).strip().isdigit():
        number = int(column)
        if 1 <= number <= MAX_COLUMN:
            return number
    raise MiniLLMError(f"{name} of a TSV file is a column number from 1 (1 = first), got {column!r}")


def _tsv_pairs(path: str | Path, text: str, source_column: int | str | None, target_column: int | str | None,
               notes: list[str]) -> list[tuple[str, str]]:
    lines = [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    first_number, first = lines[0]
    n_columns = first.count("\t") + 1
    if n_columns < 2:
        raise MiniLLMError(f"{path} line {first_number} has no tab; a TSV pair file needs `source<TAB>target` "
                           "on every line (or read the file as plain text with --format text)")
    columns = (_column_number("--source-column", source_column, DEFAULT_COLUMNS[0]),
               _column_number("--target-column", target_column, DEFAULT_COLUMNS[1]))
    for name, column in zip(("--source-column", "--target-column"), columns, strict=True):
        if not 1 <= column <= n_columns:
            raise MiniLLMError(f"{name} {column} is not a column of {path}: its lines have {n_columns} "
                               f"tab-separated columns (1 to {n_columns})")
    if columns[0] == columns[1]:
        raise MiniLLMError(f"--source-column and --target-column are both {columns[0]}; pick two columns")
    if n_columns > 2 and source_column is None and target_column is None:
        notes.append(f"warning: {path} has {n_columns} tab-separated columns; using column {columns[0]} as the "
                     f"source and column {columns[1]} as the target and leaving out the others (choose with "
                     "--source-column and --target-column)")
    pairs = []
    for number, line in lines:
        parts = line.split("\t")
        if len(parts) != n_columns:
            raise MiniLLMError(
                f"{path} line {number} has {len(parts)} tab-separated columns, line {first_number} has "
                f"{n_columns}; every line of a TSV pair file needs the same columns (a tab inside a text?)"
            )
        pairs.append((parts[columns[0] - 1], parts[columns[1] - 1]))
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


@dataclass
class Samples:
    """The samples of a data file (or of several, merged by data.sources) and how they were read."""

    task: str  # TEXT, PAIRS or CHAT: what the samples are
    samples: list  # texts, (source, target) pairs, or conversations (lists of messages)
    file_format: str  # one of FILE_FORMATS: how the file was read
    how: str  # why it was read so ("by its .tsv extension", "as --format says", ...)
    notes: list[str] = field(default_factory=list)  # warnings about the reading ("warning: ...")
    from_pairs: bool = False  # read as pairs (kept as pairs, or made text samples "source\ntarget")
    columns: str = ""  # which columns of a table were read ("column 'text'")
    target: str | None = None  # where the targets come from, for messages ("column 2")
    label: str = ""  # the data as the user gave it (a file, a folder, a glob, a list), for messages
    files: list[Path] = field(default_factory=list)  # the files read


def _file_format(path: Path, file_format: str) -> tuple[str, str]:
    """(format, why) as far as the name tells ("" for a text file whose content decides)."""
    if file_format in FILE_FORMATS:
        return file_format, "as --format says"
    if file_format != AUTO_FORMAT:
        raise MiniLLMError(f"--format must be {AUTO_FORMAT} or one of {FILE_FORMATS}, got {file_format!r}")
    if is_dataset_folder(path):
        return ARROW_FILE, "a folder saved by datasets' save_to_disk"
    suffix = path.suffix.lower()
    return (BINARY_FORMATS[suffix], f"by its {suffix} extension") if suffix in BINARY_FORMATS else ("", "")


def read_samples(path: str | Path, task: str, split_mode: str, separator: str, file_format: str = AUTO_FORMAT,
                 source_column: int | str | None = None, target_column: int | str | None = None,
                 text_column: str | None = None, skip_bad_lines: bool = False) -> Samples:
    """The samples of one data file for `task` (AUTO_TASK, TEXT, PAIRS or CHAT): text samples, (source,
    target) pairs, or conversations (how many is for the caller to check: data.sources.load_samples).
    `file_format` (AUTO_FORMAT or one of FILE_FORMATS) says how to read the file; `skip_bad_lines` leaves out
    (and counts) the bad lines of a JSONL file instead of stopping at the first.

    AUTO_TASK is CHAT for a conversation file, PAIRS for a pair file and TEXT otherwise; TEXT on a pair file
    makes each pair the text sample "source\\ntarget" (so a model learns the sources too); PAIRS on plain
    text, CHAT on anything but conversations, and a conversation file for another task are refused.
    """
    path = Path(path)
    file_format, how = _file_format(path, file_format)
    notes: list[str] = []
    text = None if file_format in (PARQUET_FILE, ARROW_FILE) else read_text_file(path)
    if not file_format:
        file_format, how = detect_format(path, text)
    if task == CHAT or (file_format == JSONL_FILE and looks_like_conversations(text)):
        return _conversation_samples(path, text, task, file_format, how, skip_bad_lines)
    if file_format in (JSONL_FILE, PARQUET_FILE, ARROW_FILE):
        table = (jsonl_table(path, text, skip_bad_lines, notes) if text is not None
                 else arrow_table(path, file_format == PARQUET_FILE, notes))
        pairs, samples, columns = table_samples(path, table, task == PAIRS, text_column, _name(source_column),
                                                _name(target_column))
        target = f"column {columns.split(' and ')[-1]}" if pairs else None
        if pairs:
            return _pairs_for(task, samples, file_format, how, notes, columns, target)
        if task == PAIRS:
            raise MiniLLMError(f"--task pairs needs (source, target) pairs, but {path} is read as texts ({columns}); "
                               "choose --source-column and --target-column, or use --task text")
        return Samples(TEXT, samples, file_format, how, notes, columns=columns)
    if text_column is not None:
        raise MiniLLMError(f"{path} is read as {FILE_FORMAT_NAMES[file_format]} ({how}): --text-column is for JSON "
                           "lines, parquet and arrow data; leave it out")
    if file_format == TSV_FILE:
        pairs = _tsv_pairs(path, text, source_column, target_column, notes)
        return _pairs_for(task, pairs, file_format, how, notes, "", f"column {target_column or DEFAULT_COLUMNS[1]}")
    if task == PAIRS:
        raise MiniLLMError(f"--task pairs needs a file of (source, target) pairs, but {path} is read as plain "
                           f"text ({how}); give a TSV or JSONL pair file (or --format tsv|jsonl), or use --task "
                           "text")
    if source_column is not None or target_column is not None:
        raise MiniLLMError(f"{path} is read as plain text ({how}): --source-column and --target-column are "
                           "for pair files; leave them out, or read it as pairs with --format tsv")
    samples = split_samples(text, split_mode, separator)
    if not samples:
        raise MiniLLMError(
            f"data file {path} has no samples after splitting by {split_mode}; try --split-mode line"
        )
    return Samples(TEXT, samples, file_format, how)


def _conversation_samples(path: Path, text: str | None, task: str, file_format: str, how: str,
                          skip_bad_lines: bool) -> Samples:
    """The conversations of a JSONL file for the chat task (another task, or another file, is refused)."""
    if file_format != JSONL_FILE:
        raise MiniLLMError(f"--task chat needs a JSONL file of conversations ({{\"messages\": [...]}} per line), "
                           f"but {path} is read as {FILE_FORMAT_NAMES[file_format]} ({how}); give a .jsonl file "
                           "(or --format jsonl), or another --task")
    if task not in (AUTO_TASK, CHAT):
        raise MiniLLMError(f"{path} holds conversations ({{\"messages\": [...]}} lines): they train --task chat "
                           f"(or auto), not --task {task}")
    notes: list[str] = []
    return Samples(CHAT, parse_conversations(path, text, skip_bad_lines, notes), file_format, how, notes)


def _pairs_for(task: str, pairs: list[tuple[str, str]], file_format: str, how: str, notes: list[str],
               columns: str, target: str | None) -> Samples:
    """Pairs as the task wants them: pairs, or (--task text) text samples "source\\ntarget"."""
    if task in (AUTO_TASK, PAIRS):
        return Samples(PAIRS, pairs, file_format, how, notes, True, columns, target)
    return Samples(TEXT, [f"{source}{PAIR_SEPARATOR}{target}" for source, target in pairs], file_format, how,
                   notes, True, columns, target)


def sample_unit(loaded: Samples, split_mode: str) -> str:
    """What one of the samples is, in words: "paragraphs", "pairs", "rows", ..."""
    if loaded.task == CHAT:
        turns = sum(m["role"] == "assistant" for conversation in loaded.samples for m in conversation)
        return f"conversations with {turns:,} assistant messages"
    if loaded.from_pairs:
        return "pairs" if loaded.task == PAIRS else 'pairs, as text samples "source\\ntarget" (--task text)'
    if loaded.file_format == TEXT_FILE:
        return {"paragraph": "paragraphs", "line": "lines", "separator": "samples"}[split_mode]
    return "rows"


def sample_chars(loaded: Samples) -> int:
    """The characters of the samples (a pair's two sides; not the separator a text sample puts between them)."""
    if loaded.task == PAIRS:
        return sum(len(s) + len(t) for s, t in loaded.samples)
    if loaded.task == CHAT:
        return sum(conversation_chars(conversation) for conversation in loaded.samples)
    return sum(len(sample) for sample in loaded.samples) - len(PAIR_SEPARATOR) * len(loaded.samples) * \
        loaded.from_pairs


def split_data(task: str, samples: list, path: str | Path, val_fraction: float, test_fraction: float,
               seed: int, holdout: str = "shuffled") -> tuple[dict[str, list], SplitRecord]:
    """Samples of each split and the record of the split (indices of val/test, or contiguous cuts), to be
    completed with what is written (SplitRecord.written).

    holdout "shuffled": val and test are samples drawn at random (a fair split of a user's data, whose
    held-out samples sit among the training ones). "tail": they are the end of the file, in order, as
    nanoGPT holds out the last 10%: text the model has not seen the like of.
    """
    tail = holdout == "tail"
    if task in (PAIRS, CHAT) or (len(samples) >= MIN_SAMPLES_FOR_SAMPLE_SPLIT and not tail):
        if tail:  # the last pairs (conversations) of the file
            counts = split_counts(len(samples), val_fraction, test_fraction)
            order = list(range(len(samples)))
            indices = {"train": order[:counts["train"]], "val": order[counts["train"]:-counts["test"]],
                       "test": order[-counts["test"]:]}
        else:
            indices = shuffled_split(len(samples), val_fraction, test_fraction, seed)
        splits = {name: [samples[i] for i in indices[name]] for name in SPLITS}
        return splits, SplitRecord(task, holdout=holdout, n_samples=len(samples),
                                   indices={"val": indices["val"], "test": indices["test"]})
    # The tail, or few (possibly huge) samples: cut the text itself into contiguous train/val/test stretches.
    joined = "\n\n".join(samples)
    parts = contiguous_split(joined, val_fraction, test_fraction)
    splits = {name: chunk_text(part) for name, part in parts.items()}
    return splits, SplitRecord(task, contiguous=True, holdout="tail" if tail else "contiguous",
                               n_samples=len(samples), chars={name: len(part) for name, part in parts.items()})
