"""What the page says about a failure: one readable line, never a traceback (gradio-free, so the training
manager can use it too)."""

from __future__ import annotations

import logging

from minillm.errors import MiniLLMError

log = logging.getLogger("minillm.ui")


def describe_error(error: BaseException) -> str:
    """One readable line for the page: a MiniLLMError's own message, never a traceback."""
    if isinstance(error, MiniLLMError):
        return str(error)
    log.exception("unexpected error in the UI", exc_info=error)
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return f"unexpected {type(error).__name__}: {first_line} (details are in the server log)"
