"""What both tabs use: the error and warning boxes, and the client a request comes from."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from minillm.errors import describe_error

# The client of a handler called without a request (a direct call, as in the tests): one shared client.
DIRECT_CLIENT = "direct"


def client_of(request: gr.Request | None) -> str:
    """The id of the client (a page's tab, an API client) a request comes from: Gradio's session hash."""
    return getattr(request, "session_hash", None) or DIRECT_CLIENT


def message_box(kind: str, text: str) -> dict[str, Any]:
    """A Markdown box update: shown with `text`, or hidden when `text` is empty."""
    # Escape <, > and & so tokens such as <|eos|> in a message are shown, not swallowed as HTML.
    value = f"**{kind}:** {html.escape(text, quote=False)}" if text else ""
    return gr.update(value=value, visible=bool(text))


def error_box(error: BaseException | str) -> dict[str, Any]:
    """The error box showing `error` (an exception as describe_error's one line)."""
    return message_box("Error", describe_error(error) if isinstance(error, BaseException) else error)


def no_error() -> dict[str, Any]:
    return message_box("Error", "")


def warning_box(text: str) -> dict[str, Any]:
    return message_box("Warning", text)
