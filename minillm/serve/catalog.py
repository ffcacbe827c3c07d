"""The models an API server offers: the run folder it was started on, or every run directly under a folder,
each named by its folder. A request names a model, never a path: only these runs exist for it.

Runs load on their first request (at most RunCache.max_runs stay loaded, the least recently used out), in
a loader thread; a request waits for its run's load up to `load_wait_s`, then is told the run is still
loading (HTTP 503) rather than held.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

from minillm.errors import MiniLLMError, describe_error
from minillm.run_folder import RunFolder, find_runs
from minillm.serve.api_requests import APIError
from minillm.serve.batching import BatchSettings
from minillm.serve.run_cache import RunCache, ServedRun, model_files

LOAD_WAIT_S = 30.0  # how long a request waits for its run to load before it is told to retry
LOADER_THREADS = 2  # runs loading at once


class ServedModels:
    """The runs under `path` by name, loaded on demand into `runs`."""

    def __init__(self, path: str | Path, runs: RunCache, batch: BatchSettings | None = None,
                 load_wait_s: float = LOAD_WAIT_S) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MiniLLMError(f"{path} is not a folder; give a run folder (with {RunFolder(path).best_model.name}) "
                               "or a folder of runs (train one with `minillm train --out runs/NAME`)")
        self.runs, self.batch, self.load_wait_s = runs, batch or BatchSettings(), load_wait_s
        self._loader = concurrent.futures.ThreadPoolExecutor(LOADER_THREADS, thread_name_prefix="minillm-load")
        self._loading: dict[str, concurrent.futures.Future] = {}

    def folders(self) -> dict[str, Path]:
        """Model name -> run folder, as the disk holds them now (a run trained meanwhile is there)."""
        if RunFolder(self.path).has_best_model():
            return {self.path.resolve().name: self.path}
        return {folder.name: folder for folder in find_runs(self.path)}

    def loaded(self, name: str) -> ServedRun | None:
        """The model's run when it is loaded (and its files unchanged), else None; never loads."""
        folder = self.folders().get(name)
        if folder is None:
            return None
        try:
            return self.runs.claim_loaded(name, *model_files(str(folder)))
        except MiniLLMError:
            return None

    def start_loading(self, name: str) -> concurrent.futures.Future:
        """Load the model's run in the loader thread (once, however many ask); its scheduler is made too."""
        future = self._loading.get(name)
        if future is None or future.done():
            folder = self.folders()[name]
            future = self._loading[name] = self._loader.submit(self._load, name, folder)
        return future

    def _load(self, name: str, folder: Path) -> ServedRun:
        served = self.runs.claim(name, *model_files(str(folder)))
        served.scheduler(self.batch)
        return served

    async def get(self, name: str) -> ServedRun:
        """The model's run, loaded; APIError 404 for a name that is not a run here, 503 while it loads."""
        if name not in self.folders():
            raise APIError(404, f"the model {name!r} does not exist on this server; GET /v1/models lists the "
                                "models it serves", "model", "model_not_found")
        served = self.loaded(name)
        if served is not None:
            return served
        future = asyncio.wrap_future(self.start_loading(name))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.load_wait_s)
        except asyncio.TimeoutError:
            raise APIError(503, f"the model {name!r} is still loading; retry in a few seconds", "model",
                           "model_loading") from None
        except Exception as e:  # the run's files cannot be loaded: the server's problem, said in one line
            raise APIError(500, f"the model {name!r} cannot be loaded: {describe_error(e)}", "model") from None

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
