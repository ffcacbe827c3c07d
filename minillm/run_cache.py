"""Loaded runs shared by the many users of one process (the web UI's tabs and API clients).

Users who load the same files get the same model object, read-only: it is in eval mode, its weights need no
gradient, and generation runs under torch.inference_mode. The cache alone owns the models; a user holds a
claim (its id -> the files it loaded). At most `max_runs` models stay loaded, the least recently used go
first, and a run that nobody claims any more is dropped at once. A user whose run was pushed out gets it
loaded again from the same files when it next needs it, unless the files changed meanwhile.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from minillm.checkpoint import Run, load_model_files
from minillm.errors import MiniLLMError
from minillm.run_folder import BEST_CONFIG_FILE

# Distinct models one process keeps loaded: each costs its weights in memory (4 bytes per parameter).
DEFAULT_MAX_RUNS = 4


@dataclass(frozen=True)
class RunFiles:
    """What identifies a loaded run: the resolved paths of its three files and their (mtime_ns, size)."""

    model: Path
    tokenizer: Path
    config: Path
    stamps: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, model_path: str | Path, tokenizer_path: str | Path) -> RunFiles:
        model, tokenizer = Path(model_path).resolve(), Path(tokenizer_path).resolve()
        config = model.parent / BEST_CONFIG_FILE
        return cls(model, tokenizer, config, _stamps(model, tokenizer, config))

    def changed(self) -> bool:
        """Whether any of the files is no longer what was loaded (rewritten, removed)."""
        return _stamps(self.model, self.tokenizer, self.config) != self.stamps


def _stamps(*paths: Path) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            stamps.append((-1, -1))  # missing: loading it names the file
        else:
            stamps.append((stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc (Linux)
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Give the memory of unloaded models back to the operating system. glibc keeps freed blocks in per-thread
    arenas (a server loads in many threads): without this the process only grows, whatever it frees."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _load_read_only(files: RunFiles) -> Run:
    run = load_model_files(files.model, files.tokenizer, files.config)
    run.model.requires_grad_(False)  # shared by many users: nothing may train or change it
    return run


class RunCache:
    """At most `max_runs` loaded runs, shared by the users that claim them, least recently used out."""

    def __init__(self, max_runs: int = DEFAULT_MAX_RUNS, load: Callable[[RunFiles], Run] = _load_read_only):
        if max_runs < 1:
            raise MiniLLMError(f"the run cache must hold at least one run, got {max_runs}")
        self.max_runs = max_runs
        self._load = load
        self._runs: OrderedDict[RunFiles, Run] = OrderedDict()  # least recently used first
        self._claims: dict[str, RunFiles] = {}  # user id -> the run it loaded last
        self._loading: dict[RunFiles, threading.Event] = {}  # loads in progress, so each run loads once
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The number of distinct runs loaded now."""
        with self._lock:
            return len(self._runs)

    def claim(self, user: str, model_path: str | Path, tokenizer_path: str | Path) -> Run:
        """Load (or share) a run for `user`; it replaces the run `user` held before."""
        return self._get(RunFiles.of(model_path, tokenizer_path), user)

    def run_of(self, user: str) -> Run | None:
        """The run `user` claimed (loaded again if it was pushed out), or None when it claimed none."""
        with self._lock:
            files = self._claims.get(user)
            if files is None:
                return None
            run = self._runs.get(files)
            if run is not None:
                self._runs.move_to_end(files)
                return run
        if files.changed():
            raise MiniLLMError(
                f"{files.model} or its tokenizer changed on disk since it was loaded, and the model was unloaded "
                f"to make room (at most {self.max_runs} stay loaded); press Load model to load the files as "
                "they are now")
        return self._get(files, user)

    def has_claim(self, user: str) -> bool:
        with self._lock:
            return user in self._claims

    def rename(self, old: str, new: str) -> None:
        """The user `old` is known as `new` from now on (its claim moves along)."""
        with self._lock:
            files = self._claims.pop(old, None)
            dropped = files is not None and self._set_claim(new, files)
        if dropped:
            return_freed_memory()

    def release(self, user: str) -> None:
        """`user` is gone: forget its claim; a run nobody claims any more is unloaded."""
        with self._lock:
            files = self._claims.pop(user, None)
            dropped = files is not None and self._drop_if_unclaimed(files)
        if dropped:
            return_freed_memory()

    def _get(self, files: RunFiles, user: str) -> Run:
        while True:
            with self._lock:
                run = self._runs.get(files)
                if run is not None:
                    self._runs.move_to_end(files)
                    dropped = self._set_claim(user, files)
                    break
                loading = self._loading.get(files)
                if loading is None:
                    loading = self._loading[files] = threading.Event()
                    break
            loading.wait()  # another user is loading the same files: share its copy (or fail on our own)
        if run is None:
            run = self._load_new(files, user, loading)
            dropped = True  # and the loading's own buffers (the weights as read) are free now
        if dropped:
            return_freed_memory()
        return run

    def _load_new(self, files: RunFiles, user: str, loading: threading.Event) -> Run:
        """Load a run that is not loaded yet, unloading the least recently used beyond max_runs."""
        try:
            run = self._load(files)
            with self._lock:
                self._runs[files] = run
                self._set_claim(user, files)
                while len(self._runs) > self.max_runs:
                    self._runs.popitem(last=False)
            return run
        finally:
            with self._lock:
                del self._loading[files]
            loading.set()

    def _set_claim(self, user: str, files: RunFiles) -> bool:
        """Record `user`'s claim; whether the run it held before was unloaded."""
        previous = self._claims.get(user)
        self._claims[user] = files
        return previous is not None and previous != files and self._drop_if_unclaimed(previous)

    def _drop_if_unclaimed(self, files: RunFiles) -> bool:
        if files in self._claims.values():
            return False
        return self._runs.pop(files, None) is not None
