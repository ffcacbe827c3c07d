"""Plain file helpers on the ground floor: atomic writes, JSON, and safe torch load/save.

Everything users keep is written atomically (a temporary file in the same folder, then os.replace), so a
crash leaves either the old file or the new one, never half of each. Weights are read with
`torch.load(..., weights_only=True)`: a checkpoint cannot run code. Imports nothing of ours but errors,
and torch only when a torch file is read or written, so the tokenizers can use it without torch.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minillm.errors import MiniLLMError

MIN_FREE_BYTES = 1 << 20  # a failed write with less than this free on the disk: the disk is full
NEW_FILE_MODE = 0o666  # what open() asks for; the user's umask takes bits away


def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Setting the umask to read it would race with threads creating files, so it is read that way only once,
# at import; Linux shows the current one in /proc, read without changing it.
_UMASK_AT_IMPORT = _umask_by_setting()


def current_umask() -> int:
    """The process's umask (on Linux the current one; elsewhere the one at import)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file beside `path`, then move it into place.

    The file gets the permissions open() would give it (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, NEW_FILE_MODE & ~current_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C included: never leave the temporary file behind
        # A full disk shows as ENOSPC, or (torch.save) as a RuntimeError of its own: look before the
        # temporary file goes and gives the space back.
        full = isinstance(e, OSError) and e.errno in DISK_FULL
        full = full or (isinstance(e, RuntimeError) and shutil.disk_usage(path.parent).free < MIN_FREE_BYTES)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise MiniLLMError(disk_full_message(path)) from None
        raise


DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full_message(path: Path) -> str:
    return (f"no space left on the disk to write {path}; free some space or use a folder on another disk "
            f"(--out); {path.name} was left as it was")


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file, turning every way it can be broken into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise MiniLLMError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniLLMError(f"{what} {path} is not valid JSON ({e}); re-create it or pick another file") from None


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save, atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MiniLLMError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MiniLLMError(
            f"checkpoint {path} is corrupt or not a Mini LLM weights file ({first_line[:200]}); "
            "retrain or pick another file"
        ) from None
