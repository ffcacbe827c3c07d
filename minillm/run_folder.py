"""A run folder is the unit of save and load; this module is the one place that names its files.

    RUN_DIR/
      tokenizer.json          the tokenizer (its own format; says which kind it is)
      special_tokens.json     which of its tokens are pad/bos/eos (and which were added to a foreign one)
      chat_template.jinja     the chat template of the model it started from (--init-from), if that had one
      best_model.pt           state_dict of the best model by validation loss (uncompiled keys)
      best_model_config.json  {"model": ModelConfig, "tokenizer_type": ..., "training": {step, val_loss, ...}}:
                              the model's config (the run's one copy of it)
      last.pt                 weights + optimizers + TrainState (step, best, history) + RNG, for --resume
      train_config.json       the TrainConfig the run is trained with
      split.json              how the data was split (and its token counts), so evaluation reuses it
      metrics.jsonl           one JSON row per log step and per evaluation
      loss_curve.png          train and validation loss by step
      test_metrics.json       the best model's loss on the test split
      {split}.bin             the prepared tokens of a plain-text split (train, val, test)
      {split}.src.bin, {split}.tgt.bin, {split}.offsets.npy   the same for a file of pairs
      .minillm.lock           held by the process training here
      .staging-*/             a new run being prepared (and, replacing a run, trained until its first model)
      .swapping-*/            a new run being moved in (RunFolder.swap_in); finished by the next load

Everybody asks a `RunFolder` where a file is (`RunFolder(path).best_model`); adding a file to a run is
one edit here. Imports nothing of ours but errors and the version, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from minillm.errors import MiniLLMError
from minillm.version import VERSION_KEY

try:
    import fcntl  # POSIX file locks; without them (Windows) a run folder is not locked
except ImportError:  # pragma: no cover
    fcntl = None

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
BEST_MODEL_FILE = "best_model.pt"
BEST_CONFIG_FILE = "best_model_config.json"
LAST_CHECKPOINT_FILE = "last.pt"
TRAIN_CONFIG_FILE = "train_config.json"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TEST_METRICS_FILE = "test_metrics.json"

INCOMPLETE_FIX = "train it again with --overwrite"  # what to do about a run folder whose files are damaged
LOCK_FILE = ".minillm.lock"  # held (flock) by the process training into the folder
STAGING_PREFIX = ".staging-"  # a new run's files are written (and, if it replaces a run, trained) here
SWAPPING_PREFIX = ".swapping-"  # a staged run being moved in (see RunFolder.swap_in)
SWAP_MANIFEST = "swap.json"  # in a .swapping- folder: the names of the files it moves in
SWAP_WAIT_SECONDS = 10.0  # how long a reader waits for a live training to finish moving its new run in

SPLITS = ("train", "val", "test")
PAIR_SIDES = ("src", "tgt")  # the source and target token streams of a pair file
# Files whose presence means a folder already holds (part of) a run: never replaced by accident.
RUN_MARKERS = (BEST_MODEL_FILE, LAST_CHECKPOINT_FILE, TRAIN_CONFIG_FILE, METRICS_FILE, SPLIT_FILE)


class RunFolder:
    """The paths of one run's files (they need not exist yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def special_tokens(self) -> Path:
        return self.path / SPECIAL_TOKENS_FILE

    @property
    def chat_template(self) -> Path:
        return self.path / CHAT_TEMPLATE_FILE

    @property
    def best_model(self) -> Path:
        return self.path / BEST_MODEL_FILE

    @property
    def best_config(self) -> Path:
        return self.path / BEST_CONFIG_FILE

    @property
    def last_checkpoint(self) -> Path:
        return self.path / LAST_CHECKPOINT_FILE

    @property
    def train_config(self) -> Path:
        return self.path / TRAIN_CONFIG_FILE

    @property
    def split_record(self) -> Path:
        return self.path / SPLIT_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def loss_curve(self) -> Path:
        return self.path / LOSS_CURVE_FILE

    @property
    def test_metrics(self) -> Path:
        return self.path / TEST_METRICS_FILE

    def tokens(self, split: str) -> Path:
        """The token stream of a plain-text split."""
        return self.path / f"{split}.bin"

    def pair_tokens(self, split: str, side: str) -> Path:
        """The source ("src") or target ("tgt") token stream of a pair split."""
        return self.path / f"{split}.{side}.bin"

    def pair_offsets(self, split: str) -> Path:
        """(2, N + 1) start offsets of each pair's source and target in the two streams."""
        return self.path / f"{split}.offsets.npy"

    def has_best_model(self) -> bool:
        return self.best_model.is_file() and self.best_config.is_file()

    def holds_run(self) -> bool:
        """True when the folder holds any file that marks a run (finished or not)."""
        return any((self.path / name).exists() for name in RUN_MARKERS)

    def is_minillm_run(self) -> bool:
        """True when train_config.json says Mini LLM wrote the folder (files merely named like ours do not)."""
        for path in (self.train_config, self.best_config):
            try:
                if VERSION_KEY in json.loads(path.read_text(encoding="utf-8")):
                    return True
            except (OSError, ValueError, TypeError):
                continue
        return False

    def check_new_run(self, overwrite: bool) -> None:
        """Refuse to start a new run here when that would replace a run the user did not ask to replace, or
        files that are not a Mini LLM run's (a folder that merely holds a file named like ours)."""
        if self.path.exists() and not self.path.is_dir():
            raise MiniLLMError(f"output path {self.path} is a file, not a folder; pick another --out")
        if not self.holds_run():
            return
        if not overwrite:
            raise MiniLLMError(
                f"{self.path} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or --out to pick another folder"
            )
        if not self.is_minillm_run():
            found = ", ".join(name for name in RUN_MARKERS if (self.path / name).exists())
            raise MiniLLMError(
                f"{self.path} holds files named like a run's ({found}) but no {TRAIN_CONFIG_FILE} written by "
                "Mini LLM, so --overwrite will not delete them; pick another --out"
            )

    def file_names(self) -> list[str]:
        """The name of every file a run writes."""
        names = [TOKENIZER_FILE, SPECIAL_TOKENS_FILE, CHAT_TEMPLATE_FILE, BEST_MODEL_FILE, BEST_CONFIG_FILE,
                 LAST_CHECKPOINT_FILE, TRAIN_CONFIG_FILE, SPLIT_FILE, METRICS_FILE, LOSS_CURVE_FILE, TEST_METRICS_FILE]
        for split in SPLITS:
            names += [self.tokens(split).name, self.pair_offsets(split).name]
            names += [self.pair_tokens(split, side).name for side in PAIR_SIDES]
        return names

    def existing_files(self) -> list[Path]:
        """The run's files that exist, with temporary files left by an interrupted atomic write."""
        found = []
        for name in self.file_names():
            if (self.path / name).is_file():
                found.append(self.path / name)
            found += sorted(self.path.glob(f".{name}.*.tmp"))
        return found


    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive OS lock on the folder (created if missing) while the block runs.

        The lock dies with the process, so a crashed training never leaves a stale lock behind. A second
        process asking for it is refused with a MiniLLMError naming the process that holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+", encoding="utf-8") as f:
            if fcntl is not None:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.seek(0)
                    holder = f.read().strip() or "unknown"
                    raise MiniLLMError(
                        f"{self.path} is in use by another training (process {holder}); wait for it to "
                        "finish or stop it, or train into another --out"
                    ) from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder inside this one to write a new run into (call `clean_leftovers` first); removed
        afterwards unless `swap_in` took it, so a failed preparation leaves the old run as it was."""
        self.path.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def swap_in(self, staged: Path) -> list[str]:
        """Replace this folder's run with the staged one; returns the names of the files that were replaced.

        The staged folder is renamed `.swapping-*` first, with the list of its files (one atomic step: from
        then on the new run is the one), then its files are moved in and the old run's other files deleted,
        by exact name (nothing else in the folder). A process killed in between leaves the `.swapping-*`
        folder, and the next `load_run`, `train` or `--resume` here finishes the swap (`finish_swaps`).
        """
        replaced = [p.name for p in self.existing_files()]
        names = sorted(p.name for p in staged.iterdir() if p.is_file())
        with open(staged / SWAP_MANIFEST, "w", encoding="utf-8") as f:
            json.dump({"files": names}, f)
            f.flush()
            os.fsync(f.fileno())
        swapping = self.path / (SWAPPING_PREFIX + staged.name.removeprefix(STAGING_PREFIX))
        os.rename(staged, swapping)  # the commit
        self._finish_swap(swapping)
        return replaced

    def _finish_swap(self, swapping: Path) -> None:
        """Move a committed run's files in (what is still in `swapping`) and delete the old run's others."""
        names = json.loads((swapping / SWAP_MANIFEST).read_text(encoding="utf-8"))["files"]
        for name in names:
            if (swapping / name).exists():
                os.replace(swapping / name, self.path / name)
        for path in self.existing_files():
            if path.name not in names:
                path.unlink(missing_ok=True)
        shutil.rmtree(swapping)

    def pending_swaps(self) -> list[Path]:
        """`.swapping-*` folders: a new run that a killed process had begun to move in."""
        return sorted(self.path.glob(f"{SWAPPING_PREFIX}*")) if self.path.is_dir() else []

    def finish_swaps(self) -> list[str]:
        """Finish the swaps that killed processes left half done (the caller holds the lock); one message each."""
        messages = []
        for swapping in self.pending_swaps():
            if not (swapping / SWAP_MANIFEST).is_file():  # (emptied, not yet removed)
                shutil.rmtree(swapping, ignore_errors=True)
                continue
            self._finish_swap(swapping)
            messages.append(f"finished moving the new run into {self.path} (its training was stopped while "
                            f"it replaced the run that was there)")
        return messages

    def clean_leftovers(self) -> list[str]:
        """What a killed process left (the caller holds the lock): finish its swap, remove its staging folder
        (a new run stopped before its first model: the old run, if any, was never touched). One message each."""
        messages = self.finish_swaps()
        for staged in sorted(self.path.glob(f"{STAGING_PREFIX}*")) if self.path.is_dir() else []:
            size = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
            shutil.rmtree(staged, ignore_errors=True)
            messages.append(f"removed {staged.name} from {self.path} ({size / 2**20:.1f} MB): a new run that a "
                            "stopped training left before its first model; the run that was there is kept")
        return messages

    def finish_swaps_for_reading(self) -> None:
        """Before a run is read: finish a swap that a killed training left half done, so that the new run
        loads whole. A live training that is swapping right now holds the lock: wait for it."""
        deadline = time.monotonic() + SWAP_WAIT_SECONDS
        while self.pending_swaps():
            try:
                with self.lock():
                    self.finish_swaps()
                return
            except OSError:  # a folder we may not write: read it as it is
                return
            except MiniLLMError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(SWAP_WAIT_SECONDS / 100)


def default_run_name(data: str | Path | None, model_type: str, tokenizer: str) -> str:
    """The folder name of a run when none is given: DATA-MODEL-TOKENIZER (the CLI's and the UI's)."""
    stem = Path(data).stem if data else "tinyshakespeare"
    return f"{stem}-{model_type}-{tokenizer}"


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Run folders (holding a best model) directly under `runs_dir`, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and RunFolder(p).has_best_model()]
    return sorted(runs, key=lambda p: RunFolder(p).best_model.stat().st_mtime, reverse=True)
