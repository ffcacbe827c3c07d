"""The server's clients, each with its own state (`Session`): a claim on a loaded run, a stop flag, its
generations. A client is a web page's tab or an API client, known by the id its requests carry (Gradio's
session hash); its session is made at its first request and closed when the client goes.

Sessions live here, on the server, not in the page's gr.State: what they point at (the RunCache) is the
server's, shared by every client.
"""

from __future__ import annotations

import threading
from pathlib import Path

from minillm.serve.run_cache import RunCache, ServedRun


class Session:
    """One client's state. The model itself lives in the server's RunCache, shared read-only by the sessions
    that load the same files; the session only names it."""

    def __init__(self, id: str, runs: RunCache) -> None:
        self.id = id
        self.runs = runs
        self.stop = threading.Event()
        self.generating = False  # from the click on Generate (or an API call) until the generation ends
        self.active_generations = 0  # generations of this session running now
        self._lock = threading.Lock()

    @property
    def run(self) -> ServedRun | None:
        """The run this session loaded (loaded again if the cache had to unload it), or None."""
        return self.runs.run_of(self.id)

    @property
    def loaded_run(self) -> ServedRun | None:
        """The run this session loaded if it is in memory now (never loads it again), or None."""
        return self.runs.loaded_run_of(self.id)

    @property
    def has_run(self) -> bool:
        return self.runs.has_claim(self.id)

    def load(self, model_path: str | Path, tokenizer_path: str | Path) -> ServedRun:
        """Load (or share) a run; the session switches to it only once it is fully loaded."""
        return self.runs.claim(self.id, model_path, tokenizer_path)

    def close(self) -> None:
        """The client is gone: its generation stops and its claim is given up (the model is unloaded when no
        other session uses it)."""
        self.stop.set()
        self.runs.release(self.id)

    def begin_generation(self, limit: int) -> bool:
        """Count a generation in; False (and nothing counted) when `limit` of them are running already."""
        with self._lock:
            if self.active_generations >= limit:
                return False
            self.active_generations += 1
            self.generating = True
            return True

    def end_generation(self) -> None:
        with self._lock:
            self.active_generations -= 1
            if self.active_generations == 0:
                self.generating = False
                self.stop.clear()  # a Stop that came after the end does not carry over to the next one


class Sessions:
    """Every client's Session by its id, on one RunCache."""

    def __init__(self, runs: RunCache) -> None:
        self.runs = runs
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def get(self, client: str) -> Session:
        """The client's session, made at its first request."""
        with self._lock:
            session = self._sessions.get(client)
            if session is None:
                session = self._sessions[client] = Session(client, self.runs)
            return session

    def close(self, client: str) -> None:
        """The client went away (its tab closed or reloaded): its session is closed and forgotten."""
        with self._lock:
            session = self._sessions.pop(client, None)
        if session is not None:
            session.close()
