"""Where an export goes: `--out` checked before anything is written, the export written into a staging
folder, then moved in whole. Only what an export wrote is ever replaced, and what a killed export leaves
behind is cleaned up by the next export to the same `--out`.

An export is recognised by a marker it writes, as a run folder is by its train_config.json: a folder
format's `minillm_export.json` (the format, Mini LLM's version and the files it wrote), a one-file format's
own (GGUF: a `minillm.version` key). With --overwrite a folder is replaced only when it holds nothing but
the files its marker lists, and a file only when it carries the marker.

    --out does not exist         staged beside it (.NAME.minillm-export-*), then renamed into place
    an earlier export (a file)   staged beside it, then renamed over it: one atomic step
    an earlier export (a folder) staged beside it, then swapped with it in one atomic step (Linux's
                                 renameat2 RENAME_EXCHANGE), given the old folder's permissions and owner;
                                 the old one is then deleted
    an empty folder, a mount point, the current folder (or where the swap is impossible)
                                 the folder itself is kept (permissions, owner, mount): the export is staged
                                 inside it and its files are moved in one by one, the marker last; a move
                                 that a kill interrupted is finished by the next export to that --out
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from minillm.errors import MiniLLMError
from minillm.export.base import ExportFormat
from minillm.files import DiskFullError, exchange_paths, follow_umask, is_disk_full, write_json
from minillm.version import stamp

try:
    import fcntl  # POSIX file locks: a live export's staging folder is never cleaned up as a leftover
except ImportError:  # pragma: no cover
    fcntl = None

EXPORT_MARKER = "minillm_export.json"
STAGING_TAG = ".minillm-export-"  # .NAME.minillm-export-* beside --out, .minillm-export-* inside it
MOVING_TAG = ".minillm-moving-"  # inside --out: a staged export whose files are being moved in
STAGING_LOCK = ".lock"  # inside a staging folder, held (flock) while its export runs
OLD_STAGING_RANDOM = 8  # Mini LLM 0.x staged an export in .NAME.XXXXXXXX.tmp (mkdtemp's 8 random characters)


class ExportTarget:
    """One export's `--out`: checked (`check`), staged (`staging`), then moved in (`commit`)."""

    def __init__(self, fmt: ExportFormat, out: str | Path, overwrite: bool, log: Callable[[str], None]):
        self.fmt, self.given, self.log = fmt, Path(out), log
        self.out = _real_out(self.given)
        self.in_place = False  # written into the existing folder itself (see the module docstring)
        self.staging_folder: Path | None = None
        self.clean_leftovers()
        self.check(overwrite)

    # -- before anything is written --------------------------------------------------------------------

    def check(self, overwrite: bool) -> None:
        """Refuse an --out that the user did not ask to replace, or that is not an export; choose how to
        move the new export in."""
        out, fmt = self.out, self.fmt
        if not out.exists():
            return
        if fmt.folder != out.is_dir():
            kind = "a folder" if out.is_dir() else "a file"
            raise MiniLLMError(f"--out {self.given} is {kind}, but the {fmt.name} format writes "
                               f"{'a folder' if fmt.folder else 'one file'}; pick another --out")
        entries = [p for p in out.iterdir() if not p.name.startswith((STAGING_TAG, MOVING_TAG))] if fmt.folder else []
        if fmt.folder and not entries:
            self.in_place = True  # an empty folder: kept as it is (its permissions, a mount point)
            return
        if not overwrite:
            raise MiniLLMError(f"--out {self.given} already exists; pass --overwrite to replace it, or pick "
                               "another --out")
        if not fmt.folder:
            if not fmt.is_export(out):
                raise MiniLLMError(f"--out {self.given} is not a {fmt.name} file that Mini LLM exported, so "
                                   "--overwrite will not replace it; pick another --out")
            return
        listed = export_files(out)
        if listed is None:
            names = ", ".join(sorted(p.name for p in entries)[:3])
            raise MiniLLMError(f"--out {self.given} holds files that no Mini LLM export wrote ({names}; it has no "
                               f"{EXPORT_MARKER}), so --overwrite will not replace them; pick another --out")
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in entries
                         if p.is_symlink() or not p.is_file() or p.name not in (*listed, EXPORT_MARKER))
        if foreign:
            raise MiniLLMError(f"--out {self.given} holds {', '.join(foreign[:3])}, which the export there did "
                               "not write, so --overwrite will not delete it; move it out, or pick another --out")
        self.in_place = os.path.ismount(out) or out in (Path.cwd(), *Path.cwd().parents)

    def clean_leftovers(self) -> None:
        """Remove the staging folders that killed exports to this --out left (a live export's are locked),
        and finish a move into it that a kill interrupted; say what was done."""
        out = self.out
        name = glob.escape(out.name)
        beside = [*out.parent.glob(f".{name}{STAGING_TAG}*"), *_old_staging(out)] if out.parent.is_dir() else []
        inside = sorted(out.glob(f"{STAGING_TAG}*")) if out.is_dir() else []
        for leftover in (*beside, *inside):
            if leftover.is_dir() and _claim(leftover):
                size = sum(p.stat().st_size for p in leftover.rglob("*") if p.is_file() and not p.is_symlink())
                shutil.rmtree(leftover, ignore_errors=True)
                self.log(f"removed {leftover} ({size / 2**20:.1f} MB), left by an export to --out {self.given} "
                         "that was stopped")
        for moving in sorted(out.glob(f"{MOVING_TAG}*")) if out.is_dir() else []:
            if _claim(moving):
                _move_in(moving, out)
                self.log(f"finished moving into --out {self.given} the export that a stopped export had begun "
                         "to move there")

    # -- writing ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """The path to write the export to (named as --out: a model card may mention it), in a staging
        folder that is removed afterwards whatever happens; a full disk is one line naming the file."""
        parent = self.out if self.in_place else self.out.parent
        prefix = STAGING_TAG if self.in_place else f".{self.out.name}{STAGING_TAG}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging_folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except OSError as e:
            raise MiniLLMError(f"cannot write to {parent} for --out {self.given} ({e.strerror}); pick another "
                               "--out") from None
        staged = self.staging_folder / self.out.name
        try:
            with _held(self.staging_folder):
                yield staged
        except DiskFullError as e:
            written = self.given / e.path.relative_to(staged) if self.fmt.folder else self.given
            raise MiniLLMError(self._disk_full(written)) from None
        except Exception as e:
            if is_disk_full(e, self.staging_folder):
                raise MiniLLMError(self._disk_full(self.given)) from None
            raise
        finally:
            if self.staging_folder.exists():
                shutil.rmtree(self.staging_folder, ignore_errors=True)

    def _disk_full(self, path: Path) -> str:
        return (f"no space left on the disk to write {path}; free some space or pick an --out on another disk; "
                f"--out {self.given} was left as it was")

    def commit(self, staged: Path) -> None:
        """Mark the staged export as one (the marker last), give it the usual permissions, move it in."""
        files = sorted(p.name for p in staged.iterdir() if p.is_file()) if self.fmt.folder else []
        for path in (staged, *(staged / name for name in files)):
            follow_umask(path)  # (mkstemp and safetensors make files 0600)
        if self.fmt.folder:
            write_json(staged / EXPORT_MARKER, {"format": self.fmt.name, **stamp(),
                                                "files": files})
        out, folder = self.out, self.staging_folder
        if self.in_place:
            _move_in(folder.rename(out / (MOVING_TAG + folder.name.split(STAGING_TAG)[-1])), out)
        elif not out.exists() or not self.fmt.folder:
            try:
                os.replace(staged, out) if not self.fmt.folder else os.rename(staged, out)
            except OSError as e:
                raise MiniLLMError(f"--out {self.given} appeared while exporting ({e.strerror}); export again, "
                                   "with --overwrite to replace it") from None
        elif _same_owner(out, staged) and exchange_paths(staged, out):
            pass  # the old export is now in the staging folder, removed with it
        else:  # no atomic swap here: moved in file by file, into the folder itself
            _move_in(folder.rename(out / (MOVING_TAG + folder.name.split(STAGING_TAG)[-1])), out)


def export_files(folder: Path) -> list[str] | None:
    """The files that the export in `folder` wrote, by its marker; None when it has no (readable) marker."""
    try:
        files = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return [name for name in files if isinstance(name, str) and "/" not in name] if isinstance(files, list) else None


def _real_out(out: Path) -> Path:
    """--out as an absolute path without `.` or `..` (so `--out .` has a name and a parent), a symbolic
    link followed to where it points."""
    absolute = Path(os.path.abspath(out))
    if absolute.is_symlink():
        target = absolute.resolve()
        if not target.exists():
            raise MiniLLMError(f"--out {out} is a symbolic link to {target}, which does not exist; pick another "
                               "--out")
        return target
    return absolute


def _old_staging(out: Path) -> list[Path]:
    """Staging folders of Mini LLM 0.x's exports: .NAME.XXXXXXXX.tmp holding one entry, NAME."""
    found = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.{'?' * OLD_STAGING_RANDOM}.tmp"):
        if path.is_dir() and [p.name for p in path.iterdir()] == [out.name]:
            found.append(path)
    return found


def _held(folder: Path) -> contextlib.AbstractContextManager:
    """Hold the staging folder's lock while the export runs (a no-op without POSIX locks)."""
    stack = contextlib.ExitStack()
    if fcntl is not None:
        lock = stack.enter_context(open(folder / STAGING_LOCK, "a", encoding="utf-8"))
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return stack


def _claim(folder: Path) -> bool:
    """True when no live export holds the staging folder (a killed one's lock died with it)."""
    if fcntl is None or not (folder / STAGING_LOCK).is_file():
        return True
    with open(folder / STAGING_LOCK, "a", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(lock, fcntl.LOCK_UN)
    return True


def _same_owner(old: Path, new: Path) -> bool:
    """Give the new folder the old one's permissions and owner; False when the owner cannot be given."""
    before = old.stat()
    os.chmod(new, stat.S_IMODE(before.st_mode))  # (setgid and sticky bits included)
    after = new.stat()
    if (before.st_uid, before.st_gid) != (after.st_uid, after.st_gid):
        try:
            os.chown(new, before.st_uid, before.st_gid)
        except OSError:
            return False
    return True


def _move_in(moving: Path, out: Path) -> None:
    """Move the export staged in `moving` (a folder inside `out`) into `out` file by file: the old export's
    other files deleted, the new files renamed in, the marker last. Run again, it finishes what a kill
    interrupted."""
    staged = next((p for p in moving.iterdir() if p.is_dir()), None)
    new_files = export_files(staged) if staged is not None else None
    if new_files is not None:
        for name in set(export_files(out) or []) - set(new_files):
            (out / name).unlink(missing_ok=True)
        for name in new_files:
            if (staged / name).exists():
                os.replace(staged / name, out / name)
        os.replace(staged / EXPORT_MARKER, out / EXPORT_MARKER)
    shutil.rmtree(moving)
