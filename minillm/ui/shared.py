"""What both tabs use: the error and warning boxes, the client a request comes from, and how the page names
an uploaded file (by its name, not the server's temporary path)."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from minillm.errors import describe_error

# The client of a handler called without a request (a direct call, as in the tests): one shared client.
DIRECT_CLIENT = "direct"


def client_of(request: gr.Request | None) -> str:
    """The id of the client (a page's tab, an API client) a request comes from: Gradio's session hash."""
    return getattr(request, "session_hash", None) or DIRECT_CLIENT


def upload_folder() -> Path:
    """Where Gradio keeps the files the page's users upload (one sub-folder per file)."""
    return Path(get_upload_folder())


def is_upload(path: str | Path) -> bool:
    try:
        return upload_folder().resolve() in Path(path).resolve().parents
    except (OSError, ValueError, RuntimeError):
        return False


def shown_text(text: str) -> str:
    """`text` with each uploaded file's temporary path (UPLOAD_FOLDER/HASH/NAME) shortened to its NAME, the
    name the user knows: the server's folders are none of the page's business."""
    for folder in {str(upload_folder()), str(upload_folder().resolve())}:
        text = re.sub(re.escape(folder.rstrip("/")) + r"/[^/\s]+/", "", text)
    return text


def message_box(kind: str, text: str) -> dict[str, Any]:
    """A Markdown box update: shown with `text`, or hidden when `text` is empty."""
    # Escape <, > and & so tokens such as <|eos|> in a message are shown, not swallowed as HTML.
    value = f"**{kind}:** {html.escape(shown_text(text), quote=False)}" if text else ""
    return gr.update(value=value, visible=bool(text))


def error_box(error: BaseException | str) -> dict[str, Any]:
    """The error box showing `error` (an exception as describe_error's one line)."""
    return message_box("Error", describe_error(error) if isinstance(error, BaseException) else error)


def no_error() -> dict[str, Any]:
    return message_box("Error", "")


def warning_box(text: str) -> dict[str, Any]:
    return message_box("Warning", text)
