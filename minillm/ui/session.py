"""What each browser tab keeps (its `Session`) and how the page shows errors and warnings."""

from __future__ import annotations

import html
import logging
import threading
from typing import Any

import gradio as gr

from minillm.checkpoint import Run
from minillm.errors import MiniLLMError

log = logging.getLogger("minillm.ui")


class Session:
    """One browser tab's state: the run it has loaded and its stop flag. Never shared between tabs."""

    def __init__(self) -> None:
        self.run: Run | None = None
        self.stop = threading.Event()
        self.generating = False  # from the click on Generate (or an API call) until the generation ends

    def __deepcopy__(self, memo: dict) -> Session:
        # Gradio deep-copies a State's initial value for every new tab: each tab gets a fresh session.
        return Session()




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


def describe_error(error: BaseException) -> str:
    """One readable line for the page: a MiniLLMError's own message, never a traceback."""
    if isinstance(error, MiniLLMError):
        return str(error)
    log.exception("unexpected error in the UI", exc_info=error)
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return f"unexpected {type(error).__name__}: {first_line} (details are in the server log)"
