"""The one exception type that Mini LLM shows to users, and the one line any failure becomes for them."""

from __future__ import annotations

import errno
import logging

log = logging.getLogger("minillm")
UNEXPECTED_LINE_CHARS = 200  # an unexpected error's first line is cut here: the details go to the log


class MiniLLMError(Exception):
    """A problem the user can fix. The message names the file or value and says what to do.

    The CLI prints it as one line and exits non-zero; the UI shows it in the page.
    """


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    text = str(error).lower()
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or "out of memory" in text or "can't allocate memory" in text)


def is_expected(error: BaseException) -> bool:
    """Whether `describe_error` says all a user needs (a MiniLLMError, a file or memory problem), rather than
    a bug: the CLI shows a bug's traceback, a server logs it."""
    return isinstance(error, (MiniLLMError, OSError)) or is_out_of_memory(error)


def describe_error(error: BaseException) -> str:
    """The one line a user sees for any failure, in the CLI, the web UI and a background training alike:
    a MiniLLMError's own message; an OS error with its file (and the fix for a full disk); out of memory
    with the settings that lower it; anything else (a bug) as its type and first line, the traceback logged."""
    if isinstance(error, MiniLLMError):
        return " ".join(str(error).split())
    if isinstance(error, OSError):  # permission denied, disk full, ...: name the file
        where = f": {error.filename}" if error.filename else ""
        hint = "; free some space or use a folder on another disk" if error.errno == errno.ENOSPC else ""
        return f"{error.strerror or error}{where}{hint}"
    if is_out_of_memory(error):
        return (f"out of memory ({type(error).__name__}); use a smaller batch size, context length or model "
                "(--batch-size, --block-size, --d-model, --n-layers), or --grad-accum-steps to keep the batch")
    log.error("unexpected error", exc_info=error)
    first_line = (str(error).strip().splitlines() or [""])[0][:UNEXPECTED_LINE_CHARS]
    return f"unexpected {type(error).__name__}: {first_line} (details are in the server log)"
