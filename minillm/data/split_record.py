"""What split.json records about a run's data: the task it was prepared for, where it came from, how it was
split into train/val/test, and what was written (token type, tokens and samples per split). `minillm
evaluate` and a resumed run read it to open the same splits; the split itself is made by data.corpus and the
rest is filled in when the splits are written (data.prepare).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.config import TASKS
from minillm.errors import MiniLLMError
from minillm.files import read_json, write_json
from minillm.run_folder import INCOMPLETE_FIX, RunFolder

TASK_NAMES = TASKS[1:]  # (without "auto": a record names the task its data was prepared for)


@dataclass
class SplitRecord:
    """A run's split.json."""

    task: str  # "text" or "pairs": what the samples are (split.json's "format" before 0.2)
    dtype: str = ""  # numpy dtype of the token files
    tokens: dict[str, int] = field(default_factory=dict)  # tokens per split (for pairs: target tokens)
    samples: dict[str, int] = field(default_factory=dict)  # samples (pairs, contiguous pieces) per split
    contiguous: bool = False  # the splits are stretches of the text, not whole samples
    holdout: str = "shuffled"  # "shuffled", "tail", or "contiguous" (too few samples to split by sample)
    n_samples: int = 0  # samples in the file
    source: str | None = None  # the data file (its resolved path)
    indices: dict[str, list[int]] | None = None  # a split by sample: the val and test samples' indices
    chars: dict[str, int] | None = None  # a contiguous split: the characters of each split
    separator: list[int] = field(default_factory=list)  # pairs: the token ids between a prompt and its answer
    # split -> [bytes of its text that no token spells, bytes of its text]: splits where any is unspelled
    unspelled: dict[str, list[int]] = field(default_factory=dict)
    source_size: int | None = None  # the data file's size in bytes when the run was prepared
    source_hash: str | None = None  # ... and its sha256 (resume says when the file has changed since)

    def written(self, dtype: str, tokens: dict[str, int], samples: dict[str, int], source: str,
                separator: list[int]) -> SplitRecord:
        """This record with what writing the splits made."""
        return dataclasses.replace(self, dtype=dtype, tokens=tokens, samples=samples, source=source,
                                   separator=separator)

    def unspelled_share(self, split: str) -> float:
        """The share of a split's text bytes that no token of the run's tokenizer spells (0.0: none)."""
        unspelled, total = self.unspelled.get(split, (0, 0))
        return unspelled / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def save(self, folder: str | Path) -> None:
        write_json(RunFolder(folder).split_record, self.to_dict())



def read_split_record(run_dir: str | Path) -> SplitRecord:
    """The split.json of a run folder, checked to hold what the batches need (a record from before 0.2 names
    its task "format"; keys this version does not know are left out)."""
    path = RunFolder(run_dir).split_record
    raw = read_json(path, "split record")
    record = None
    if isinstance(raw, dict):
        raw = {"task": raw.get("format"), **raw}
        known = {f.name for f in dataclasses.fields(SplitRecord)}
        try:
            record = SplitRecord(**{k: v for k, v in raw.items() if k in known})
        except TypeError:  # a field missing
            record = None
    if (record is None or record.task not in TASK_NAMES or not isinstance(record.dtype, str) or not record.dtype
            or not isinstance(record.tokens, dict) or not isinstance(record.samples, dict)
            or not isinstance(record.separator, list) or not isinstance(record.unspelled, dict)
            or not all(isinstance(v, list) and len(v) == 2 for v in record.unspelled.values())):
        raise MiniLLMError(f"split record {path} is damaged (it needs a task of {TASK_NAMES}, dtype, tokens and "
                           f"samples): {INCOMPLETE_FIX}")
    return record
