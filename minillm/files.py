"""Plain file helpers on the ground floor: atomic writes, JSON, and safe torch load/save.

Everything users keep is written atomically (a temporary file in the same folder, then os.replace), so a
crash leaves either the old file or the new one, never half of each. Weights are read with
`torch.load(..., weights_only=True)`: a checkpoint cannot run code. Imports nothing of ours but errors,
and torch only when a torch file is read or written, so the tokenizers can use it without torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pickle
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from minillm.errors import MiniLLMError

MIN_FREE_BYTES = 1 << 20  # a failed write with less than this free on the disk: the disk is full
NEW_FILE_MODE = 0o666  # what open() asks for; the user's umask takes bits away
NEW_FOLDER_MODE = 0o777  # what mkdir() asks for


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


def follow_umask(path: str | Path) -> None:
    """Give a file or folder the permissions open() or mkdir() would have given it (0666 or 0777 less the
    umask): for what mkstemp, mkdtemp or a library made private (0600, 0700)."""
    os.chmod(path, (NEW_FOLDER_MODE if Path(path).is_dir() else NEW_FILE_MODE) & ~current_umask())


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file beside `path`, then move it into place.

    The file gets the permissions open() would give it (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        follow_umask(tmp)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C included: never leave the temporary file behind
        full = is_disk_full(e, path.parent)  # (asked before the temporary file goes and gives the space back)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise DiskFullError(path) from None
        raise


DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# How libraries that do not raise an OSError with its errno word it (safetensors: "... No space left on
# device (os error 28)").
DISK_FULL_TEXTS = tuple(os.strerror(code) for code in DISK_FULL)


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether `error`, raised while writing into `folder`, means the disk (or the user's quota) is full."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            return True
        if any(text in str(cause) for text in DISK_FULL_TEXTS):
            return True
        cause = cause.__cause__ or cause.__context__
    # torch.save (a RuntimeError) and numpy's tofile ("16384 requested and 13184 written", an OSError without
    # an errno) report a short write in words of their own: look at the space left.
    if isinstance(error, RuntimeError) or (isinstance(error, OSError) and error.errno is None):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < MIN_FREE_BYTES
    return False


class DiskFullError(MiniLLMError):
    """A write that failed because the disk was full; `path` is the file that was being written."""

    def __init__(self, path: Path) -> None:
        super().__init__(disk_full_message(path))
        self.path = path


def disk_full_message(path: Path, kept: str | None = None) -> str:
    return (f"no space left on the disk to write {path}; free some space or use a folder on another disk "
            f"(--out); {kept or path.name} was left as it was")


@contextlib.contextmanager
def reporting_full_disk(path: str | Path) -> Iterator[None]:
    """Turn a full disk while the block writes `path` (with a library's own writer) into a DiskFullError."""
    path = Path(path)
    try:
        yield
    except MiniLLMError:
        raise
    except Exception as e:
        if is_disk_full(e, path.parent):
            raise DiskFullError(path) from None
        raise


# renameat2's flag that swaps two paths in one step (Linux 3.15+, glibc 2.28+); where it is missing, a
# caller falls back to moving files one by one.
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two folders (or files) atomically, each name then holding what the other held; False where the
    system or file system cannot (nothing was changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rename = libc.renameat2
    except (OSError, AttributeError):
        return False
    if rename(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EBUSY, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


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
