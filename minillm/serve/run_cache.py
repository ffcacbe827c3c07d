"""The runs a server has loaded, shared by all its clients (the web UI's tabs, API clients), each with the
scheduler that generates from it.

Clients who load the same files get the same `ServedRun`, read-only: its model is in eval mode, its weights
need no gradient, and generation runs under torch.inference_mode. A ServedRun generates through one batch
scheduler (minillm.serve.batching) for as long as it stays loaded, so generations of many clients are
decoded together and, with BatchSettings(compile=True), its decode steps compile in the background once,
when it loads, and then serve every later request (eagerly until they are ready: no request waits for a
compile). The cache alone owns the runs; a client holds a claim (its id -> the key of the files it loaded).
At most `max_runs` runs stay loaded, the least recently used go first, and a run that nobody claims any more
is dropped at once. A client whose run was pushed out gets it loaded again from the same files when it next
needs it, unless the files changed meanwhile.
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
from minillm.generation import TokenStream, stream_reply, stream_tokens
from minillm.run_folder import BEST_CONFIG_FILE, BEST_MODEL_FILE, TOKENIZER_FILE
from minillm.sampling import SamplingConfig
from minillm.serve.access import run_file
from minillm.serve.batching import BatchScheduler, BatchSettings
from minillm.serve.limits import ServerLimits
from minillm.tokenizers.chat_template import Message


def model_files(model_path: str, tokenizer_path: str = "") -> tuple[Path, Path]:
    """The (model, tokenizer) files a client names: a run folder works as the model path; a blank tokenizer
    path means the one beside the model. Only a run's files (serve.access.run_file): anything else, or a
    file that is not there, is refused (MiniLLMError)."""
    if not model_path or not model_path.strip():
        raise MiniLLMError(f"enter the path of a model ({BEST_MODEL_FILE}) or a run folder, or pick a run")
    model = run_file(model_path, BEST_MODEL_FILE)
    tokenizer_path = (tokenizer_path or "").strip()
    return model, run_file(tokenizer_path or model.parent, TOKENIZER_FILE)


@dataclass(frozen=True)
class RunKey:
    """What a loaded run is in the cache: the resolved paths of its three files and their (mtime_ns, size)
    when it was loaded; files rewritten since are another key."""

    model: Path
    tokenizer: Path
    config: Path
    stamps: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, model_path: str | Path, tokenizer_path: str | Path) -> RunKey:
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


class ServedRun:
    """A run as a server holds it: the loaded `Run` (read-only) and the one scheduler that decodes every
    client's generations from it, made with `batch` (with batch.compile, made at once: its decode steps
    compile in the background from the moment the run is loaded)."""

    def __init__(self, run: Run, batch: BatchSettings | None = None) -> None:
        self.run = run
        self.batch = batch or BatchSettings()
        self._scheduler: BatchScheduler | None = None
        self._lock = threading.Lock()
        if self.batch.compile:
            self.scheduler()

    def scheduler(self, limits: BatchSettings | None = None) -> BatchScheduler:
        """The run's batch scheduler (made at the first ask, with `limits` or the run's own settings; kept
        while the run is loaded)."""
        with self._lock:
            if self._scheduler is None:
                self._scheduler = BatchScheduler(self.run.model, limits or self.batch)
            return self._scheduler

    def stream(self, prompt: str, sampling: SamplingConfig, source: str | None = None) -> TokenStream:
        """Generate from this run through its scheduler: minillm.generation.stream_tokens' items."""
        return stream_tokens(self.run.model, self.run.tokenizer, prompt, sampling, source, self.scheduler())

    def reply(self, messages: list[Message], sampling: SamplingConfig) -> TokenStream:
        """A chat run's answer to `messages` through its scheduler: minillm.generation.stream_reply's items."""
        return stream_reply(self.run.model, self.run.tokenizer, messages, sampling, self.scheduler())


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


def load_read_only(key: RunKey, batch: BatchSettings | None = None) -> ServedRun:
    """Load the key's files into a ServedRun whose model nothing may train or change (its scheduler: `batch`)."""
    run = load_model_files(key.model, key.tokenizer, key.config)
    run.model.requires_grad_(False)  # shared by many clients
    return ServedRun(run, batch)


class RunCache:
    """At most `max_runs` loaded runs, shared by the clients that claim them, least recently used out."""

    def __init__(self, max_runs: int = ServerLimits.max_loaded_runs,
                 load: Callable[[RunKey], ServedRun] = load_read_only):
        if max_runs < 1:
            raise MiniLLMError(f"the run cache must hold at least one run, got {max_runs}")
        self.max_runs = max_runs
        self._load = load
        self._runs: OrderedDict[RunKey, ServedRun] = OrderedDict()  # least recently used first
        self._claims: dict[str, RunKey] = {}  # client id -> the run it loaded last
        self._loading: dict[RunKey, threading.Event] = {}  # loads in progress, so each run loads once
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The number of distinct runs loaded now."""
        with self._lock:
            return len(self._runs)

    def claim(self, client: str, model_path: str | Path, tokenizer_path: str | Path) -> ServedRun:
        """Load (or share) a run for `client`; it replaces the run `client` held before."""
        return self._get(RunKey.of(model_path, tokenizer_path), client)

    def claim_loaded(self, client: str, model_path: str | Path, tokenizer_path: str | Path) -> ServedRun | None:
        """`claim` when the run is loaded already (without waiting); None when it would have to be loaded."""
        key = RunKey.of(model_path, tokenizer_path)
        with self._lock:
            run = self._runs.get(key)
            if run is None:
                return None
            self._runs.move_to_end(key)
            dropped = self._set_claim(client, key)
        if dropped:
            return_freed_memory()
        return run

    def run_of(self, client: str) -> ServedRun | None:
        """The run `client` claimed (loaded again if it was pushed out), or None when it claimed none."""
        with self._lock:
            key = self._claims.get(client)
            if key is None:
                return None
            run = self._runs.get(key)
            if run is not None:
                self._runs.move_to_end(key)
                return run
        if key.changed():
            raise MiniLLMError(
                f"{key.model} or its tokenizer changed on disk since it was loaded, and the model was unloaded "
                f"to make room (at most {self.max_runs} stay loaded); press Load model to load the files as "
                "they are now")
        return self._get(key, client)

    def loaded_run_of(self, client: str) -> ServedRun | None:
        """The run `client` claimed if it is loaded now, else None; never loads and counts as no use."""
        with self._lock:
            key = self._claims.get(client)
            return None if key is None else self._runs.get(key)

    def has_claim(self, client: str) -> bool:
        with self._lock:
            return client in self._claims

    def release(self, client: str) -> None:
        """`client` is gone: forget its claim; a run nobody claims any more is unloaded."""
        with self._lock:
            key = self._claims.pop(client, None)
            dropped = key is not None and self._drop_if_unclaimed(key)
        if dropped:
            return_freed_memory()

    def _get(self, key: RunKey, client: str) -> ServedRun:
        while True:
            with self._lock:
                run = self._runs.get(key)
                if run is not None:
                    self._runs.move_to_end(key)
                    dropped = self._set_claim(client, key)
                    break
                loading = self._loading.get(key)
                if loading is None:
                    loading = self._loading[key] = threading.Event()
                    break
            loading.wait()  # another client is loading the same files: share its copy (or fail on our own)
        if run is None:
            run = self._load_new(key, client, loading)
            dropped = True  # and the loading's own buffers (the weights as read) are free now
        if dropped:
            return_freed_memory()
        return run

    def _load_new(self, key: RunKey, client: str, loading: threading.Event) -> ServedRun:
        """Load a run that is not loaded yet, unloading the least recently used beyond max_runs."""
        try:
            run = self._load(key)
            with self._lock:
                self._runs[key] = run
                self._set_claim(client, key)
                while len(self._runs) > self.max_runs:
                    self._runs.popitem(last=False)
            return run
        finally:
            with self._lock:
                del self._loading[key]
            loading.set()

    def _set_claim(self, client: str, key: RunKey) -> bool:
        """Record `client`'s claim; whether the run it held before was unloaded."""
        previous = self._claims.get(client)
        self._claims[client] = key
        return previous is not None and previous != key and self._drop_if_unclaimed(previous)

    def _drop_if_unclaimed(self, key: RunKey) -> bool:
        if key in self._claims.values():
            return False
        return self._runs.pop(key, None) is not None
