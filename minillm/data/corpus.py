"""From the user's file to samples: read it, cut it into samples, split them into train/val/test.

Plain text is cut into samples (paragraphs, lines, or by a separator). A file of (source, target) pairs
(TSV `source<TAB>target` or JSONL `{"input": ..., "output": ...}`) gives pairs. A file with few samples is
cut into contiguous train/val/test stretches instead of being shuffled by sample.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from minillm.errors import MiniLLMError
from minillm.run_folder import SPLITS

TEXT, PAIRS = "text", "pairs"
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


def load_samples(path: str | Path, keep_pairs: bool, split_mode: str, separator: str) -> tuple[str, list]:
    """(format, samples) of a data file: text samples, or (source, target) pairs if `keep_pairs` (for a
    model with an encoder).

    A pair file read without `keep_pairs` (for a decoder-only model) becomes text samples "source\\ntarget".
    """
    text = read_text_file(path)
    if detect_format(path, text) == PAIRS:
        pairs = parse_pairs(path, text)
        if keep_pairs:
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
