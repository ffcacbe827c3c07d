"""What a server reads for the people who use it: only what the person who started it allowed, whatever path
a request names (a page user is not the server's user, and may be anyone on the network with --host).

- Training data (DataAccess): an uploaded file (in the front's upload folder), the bundled corpus, or a file
  under one of the folders given with `minillm ui --data-dir DIR` (none by default). Anything else is refused
  with a line that says how to allow it.
- Runs (run_file, run_folder): a run folder (one holding a best model and its config), or its best_model.pt
  or tokenizer.json, wherever the server can read it; no other file.

A path is checked by what it resolves to (symlinks and `..` followed), so neither a link nor `..` leads out.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from minillm.data.prepare import bundled_data_path
from minillm.errors import MiniLLMError
from minillm.run_folder import BEST_MODEL_FILE, RunFolder

DATA_DIR_OPTION = "--data-dir"


def check_text_path(path: str, what: str) -> str:
    """`path` stripped, refused when it holds a character no file name on the server can (a null byte) or a
    control character (a pasted line break, an escape): it names no file the user meant."""
    path = (path or "").strip()
    bad = sorted({repr(c)[1:-1] for c in path if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise MiniLLMError(f"the {what} contains a control character ({', '.join(bad)}); type it again without it")
    return path


def _resolved(path: str | Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an unknown ~user
        return Path(path)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class DataAccess:
    """The training data a server's users may name (see the module docstring). `data_dirs`: the folders
    allowed (`--data-dir`); `upload_dir`: where the front keeps uploaded files (None: no uploads)."""

    def __init__(self, data_dirs: Iterable[str | Path] = (), upload_dir: str | Path | None = None) -> None:
        self.data_dirs = tuple(Path(d) for d in data_dirs)
        self.upload_dir = Path(upload_dir) if upload_dir is not None else None

    @staticmethod
    def check_folders(data_dirs: Iterable[str | Path]) -> None:
        """Refuse (at the server's start) a --data-dir that is not a folder."""
        for folder in data_dirs:
            if not Path(folder).is_dir():
                raise MiniLLMError(f"{DATA_DIR_OPTION} {folder} is not a folder; give a folder whose files the "
                                   "web UI may train on")

    def allowed(self) -> str:
        """What may be named, in words (the form's label, the README)."""
        if not self.data_dirs:
            return "the bundled Tiny Shakespeare (other files: upload them)"
        folders = ", ".join(str(d) for d in self.data_dirs)
        return f"the bundled Tiny Shakespeare, or a file under {folders}"

    def check(self, path: str | None) -> Path:
        """The data file a user typed, if it may be read: blank is the bundled corpus."""
        path = check_text_path(path or "", "data path")
        if not path:
            return bundled_data_path()
        resolved = _resolved(path)
        if resolved == _resolved(bundled_data_path()):
            return resolved
        if any(_within(resolved, _resolved(folder)) for folder in self.data_dirs):
            return resolved
        allowed = (f" (now it allows the files under {', '.join(str(d) for d in self.data_dirs)})"
                   if self.data_dirs else "")
        raise MiniLLMError(
            f"the web UI does not read {path}: it trains only on an uploaded file, the bundled Tiny Shakespeare "
            f"or a file under a folder the server allows{allowed}; upload the file, or start the server with "
            f"`minillm ui {DATA_DIR_OPTION} FOLDER` to allow the files under FOLDER")

    def check_upload(self, path: str | Path) -> Path:
        """An uploaded file: it must be in the upload folder (a client cannot pass a server path off as one)."""
        if self.upload_dir is None or not _within(_resolved(path), _resolved(self.upload_dir)):
            raise MiniLLMError(f"{Path(path).name} is not an uploaded file; upload it again")
        return Path(path)


def run_folder(path: str | Path) -> Path:
    """A run folder a client names (it holds a best model and its config), else the one refusal."""
    typed = check_text_path(str(path), "run path")
    if typed and RunFolder(_resolved(typed)).has_best_model():
        return Path(typed).expanduser()
    raise MiniLLMError(f"no run in {typed or '(blank)'}: a run folder holds {BEST_MODEL_FILE} and its config; "
                       "check the path or pick a run from the list")


def run_file(path: str | Path, file_name: str) -> Path:
    """The `file_name` (BEST_MODEL_FILE or TOKENIZER_FILE) of the run a client names, by its folder or by the
    file itself; any other file is refused with the same line whether it exists or not."""
    typed = check_text_path(str(path), f"{file_name} path")
    resolved = _resolved(typed)
    if resolved.is_dir():
        resolved, typed = _resolved(resolved / file_name), str(Path(typed) / file_name)
    if typed and resolved.name == file_name and resolved.is_file() and RunFolder(resolved.parent).has_best_model():
        return Path(typed).expanduser()
    raise MiniLLMError(f"{typed or '(blank)'} is not the {file_name} of a run (the web UI loads runs only); "
                       "give a run folder or its file, or pick a run from the list")

