"""What each browser tab keeps (its `Session`) and how the page shows errors and warnings."""

from __future__ import annotations

import html
import threading
import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from minillm.checkpoint import Run
from minillm.run_cache import RunCache
from minillm.ui.messages import describe_error

__all__ = ["Session", "describe_error", "error_box", "message_box", "no_error", "warning_box"]


class Session:
    """One browser tab's (or API client's) state: its claim on a loaded run, its stop flag, its generations.

    The model itself lives in the server's RunCache, shared read-only by the sessions that load the same
    files; the session only names it. Gradio deep-copies the page's template session for every new tab."""

    def __init__(self, runs: RunCache | None = None) -> None:
        self.runs = runs if runs is not None else RunCache()
        self.id = uuid.uuid4().hex  # Gradio's session hash once an event tells it (see `bind`)
        self.stop = threading.Event()
        self.generating = False  # from the click on Generate (or an API call) until the generation ends
        self.active_generations = 0  # generations of this session running now
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> Session:
        return Session(self.runs)  # a fresh session on the same shared cache

    def bind(self, request: gr.Request | None) -> None:
        """Take Gradio's id for this tab, so that closing the tab (demo.unload) releases its model."""
        if request is not None and request.session_hash and request.session_hash != self.id:
            self.runs.rename(self.id, request.session_hash)
            self.id = request.session_hash

    @property
    def run(self) -> Run | None:
        """The run this session loaded (loaded again if the cache had to unload it), or None."""
        return self.runs.run_of(self.id)

    @property
    def has_run(self) -> bool:
        return self.runs.has_claim(self.id)

    def load(self, model_path: str | Path, tokenizer_path: str | Path) -> Run:
        """Load (or share) a run; the session switches to it only once it is fully loaded."""
        return self.runs.claim(self.id, model_path, tokenizer_path)

    def close(self) -> None:
        """The tab is gone: give up its claim (the model is unloaded when no other session uses it)."""
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


def message_box(kind: str, text: str) -> dict[str, Any]:
    """A Markdown box update: shown with `text`, or hidden when `text` is empty."""
    # Escape <, > and & so tokens such as <|eos|> in a message are shown, not swallowed as HTML.
    value = f"**{kind}:** {html.escape(text, quote=False)}" if text else ""
    return gr.update(value=value, visible=bool(text))


def error_box(error: BaseException | str) -> dict[str, Any]:
    return message_box("Error", describe_error(error) if isinstance(error, BaseException) else error)


def no_error() -> dict[str, Any]:
    return message_box("Error", "")


def warning_box(text: str) -> dict[str, Any]:
    return message_box("Warning", text)
