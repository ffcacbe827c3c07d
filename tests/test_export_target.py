"""Where an export goes (export.target): only what an export wrote is ever replaced, the new export appears
whole, a killed export's leftovers are cleaned up by the next one, every refusal names --out and the fix,
a full disk is one line naming the file, and the files get the user's usual permissions."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess

import pytest
from conftest import tiny_configs

from minillm.cli import main
from minillm.errors import MiniLLMError
from minillm.export import export_run
from minillm.export.hf import HF_FILES
from minillm.export.target import EXPORT_MARKER, MOVING_TAG, STAGING_TAG, _move_in
from minillm.training import train

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_DISK = "64k"  # room for an export's JSON files, not for its weights (about 150 KB)


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_file):
    """A tiny byte-level BPE run (every format takes it)."""
    path = tmp_path_factory.mktemp("target-run") / "run"
    model_config, train_config = tiny_configs(tokenizer="bpe", data=corpus_file, max_steps=10, eval_interval=10)
    train(model_config, train_config, path, progress=False, log=quiet)
    return path


def contents(path):
    """{name: bytes} of a folder's files (or {"": bytes} of a file)."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


# ---- what an export is, and what --overwrite replaces -----------------------------------------------

def test_an_export_is_marked_with_the_files_it_wrote_and_replaced_whole(run, tmp_path):
    out = export_run(run, "hf", tmp_path / "hf", log=quiet)
    marker = json.loads((out / EXPORT_MARKER).read_text(encoding="utf-8"))
    assert marker["format"] == "hf" and marker["files"] == sorted(HF_FILES)
    assert sorted(p.name for p in out.iterdir()) == sorted([*HF_FILES, EXPORT_MARKER])
    before = contents(out)
    export_run(run, "hf", out, dtype="float16", overwrite=True, log=quiet)
    after = contents(out)
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no staging folder left beside it


def test_refusals_name_out_and_the_fix_and_touch_nothing(run, tmp_path, capsys):
    args = ["export", str(run), "--format", "hf", "--overwrite", "--out"]
    mine = tmp_path / "mine"  # a folder holding only the user's own README.md and config.json
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "config.json").write_text("{}")
    err = one_line_error(capsys, [*args, str(mine)])
    assert f"--out {mine} holds files that no Mini LLM export wrote (README.md, config.json" in err
    assert "pick another --out" in err
    assert contents(mine) == {"README.md": b"my notes", "config.json": b"{}"}

    nested = tmp_path / "nested"  # an export, and a sub-folder of the user's named like one of its files
    export_run(run, "hf", nested, log=quiet)
    (nested / "model.safetensors").unlink()
    (nested / "model.safetensors").mkdir()
    (nested / "model.safetensors" / "keep.bin").write_bytes(b"mine")
    err = one_line_error(capsys, [*args, str(nested)])
    assert f"--out {nested} holds model.safetensors/, which the export there did not write" in err
    assert (nested / "model.safetensors" / "keep.bin").read_bytes() == b"mine"

    (nested / "model.safetensors" / "keep.bin").unlink()
    (nested / "model.safetensors").rmdir()
    (nested / "notes.txt").write_text("mine")
    assert "notes.txt, which the export there did not write" in one_line_error(capsys, [*args, str(nested)])
    assert (nested / "notes.txt").read_text() == "mine"

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    assert f"--out {link} is a symbolic link to" in one_line_error(capsys, [*args, str(link)])

    gguf = tmp_path / "llama.gguf"  # a GGUF file that Mini LLM did not write
    gguf.write_bytes(b"GGUF" + bytes(60))
    err = one_line_error(capsys, ["export", str(run), "--format", "gguf", "--overwrite", "--out", str(gguf)])
    assert f"--out {gguf} is not a gguf file that Mini LLM exported" in err
    assert gguf.read_bytes() == b"GGUF" + bytes(60)
    err = one_line_error(capsys, ["export", str(run), "--format", "gguf", "--out", str(nested)])
    assert f"--out {nested} is a folder, but the gguf format writes one file" in err
    err = one_line_error(capsys, ["export", str(run), "--format", "hf", "--out", str(mine / "README.md")])
    assert "is a file, but the hf format writes a folder" in err


def test_an_earlier_export_is_replaced_only_with_overwrite(run, tmp_path, capsys):
    for fmt, name in (("hf", "hf"), ("gguf", "m.gguf"), ("safetensors", "st")):
        args = ["export", str(run), "--format", fmt, "--out", str(tmp_path / name)]
        assert main(args) == 0
        before = contents(tmp_path / name)
        assert "already exists; pass --overwrite" in one_line_error(capsys, args)
        assert contents(tmp_path / name) == before
        assert main([*args, "--overwrite", "--dtype", "float16"]) == 0
        assert contents(tmp_path / name) != before


def test_out_dot_a_symlink_and_an_empty_shared_folder_keep_the_folder(run, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for overwrite in (False, True):  # `--out .`: written into the current folder, then replaced there
        assert main(["export", str(run), "--format", "hf", "--out", "."] + ["--overwrite"] * overwrite) == 0
        assert sorted(p.name for p in here.iterdir()) == sorted([*HF_FILES, EXPORT_MARKER])
        assert os.path.samefile(".", here)  # the process is still in a folder that exists

    shared = tmp_path / "shared"  # an empty folder with its own permissions (group-writable, setgid)
    shared.mkdir()
    os.chmod(shared, 0o2775)
    identity = shared.stat().st_ino
    export_run(run, "hf", shared, log=quiet)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o2775 and shared.stat().st_ino == identity
    export_run(run, "hf", shared, dtype="float16", overwrite=True, log=quiet)  # swapped whole: mode kept
    assert stat.S_IMODE(shared.stat().st_mode) == 0o2775
    assert sorted(p.name for p in shared.iterdir()) == sorted([*HF_FILES, EXPORT_MARKER])

    link = tmp_path / "latest"  # a link to an earlier export: the export it points to is replaced
    link.symlink_to(shared)
    export_run(run, "hf", link, overwrite=True, log=quiet)
    assert link.is_symlink() and json.loads((shared / "config.json").read_text())["torch_dtype"] == "float32"


@contextlib.contextmanager
def mounted_tmpfs(path, size):
    """A real tmpfs of `size` at `path` (needs root; skipped with the reason otherwise)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        busy = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if busy.returncode != 0:  # a file left open on it: let go of the mount anyway, then say so
            subprocess.run(["umount", "-l", str(path)], check=True)
            pytest.fail(f"the tmpfs was still in use after the test: {busy.stderr.strip()}")


def test_an_empty_mount_point_is_written_into(run, tmp_path):
    with mounted_tmpfs(tmp_path / "mnt", "4m") as mnt:
        export_run(run, "hf", mnt, log=quiet)
        assert os.path.ismount(mnt) and (mnt / EXPORT_MARKER).is_file()
        export_run(run, "hf", mnt, dtype="float16", overwrite=True, log=quiet)  # replaced in the mount
        assert sorted(p.name for p in mnt.iterdir()) == sorted([*HF_FILES, EXPORT_MARKER])


@pytest.mark.parametrize("fmt, name, written", [("hf", "hf", "model.safetensors"),
                                                ("safetensors", "st", "model.safetensors"),
                                                ("gguf", "m.gguf", "")])
def test_a_full_disk_is_one_line_naming_the_file(run, tmp_path, capsys, fmt, name, written):
    with mounted_tmpfs(tmp_path / "disk", SMALL_DISK) as disk:
        out = disk / name
        err = one_line_error(capsys, ["export", str(run), "--format", fmt, "--out", str(out)])
        assert f"error: no space left on the disk to write {out / written if written else out}; free" in err
        assert f"--out {out} was left as it was" in err
        assert list(disk.iterdir()) == []  # the staging folder went, and gave the space back
        assert shutil.disk_usage(disk).used == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the current umask on Linux only")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_exported_file_follows_the_umask(run, tmp_path, umask):
    previous = os.umask(umask)
    try:
        outs = [export_run(run, fmt, tmp_path / name, log=quiet)
                for fmt, name in (("hf", "hf"), ("safetensors", "st"), ("gguf", "m.gguf"))]
    finally:
        os.umask(previous)
    for out in outs:
        files = list(out.iterdir()) if out.is_dir() else [out]
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
            p.name: oct(0o666 & ~umask) for p in files}
        if out.is_dir():
            assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


# ---- what a killed export leaves, and the next export -------------------------------------------------

def test_the_next_export_removes_a_killed_exports_staging_folders_and_says_so(run, tmp_path):
    out = export_run(run, "hf", tmp_path / "hf", log=quiet)
    beside = tmp_path / f".hf{STAGING_TAG}abc123"  # as a SIGKILL while writing leaves them
    (beside / "hf").mkdir(parents=True)
    (beside / "hf" / "model.safetensors").write_bytes(bytes(1 << 20))
    old_style = tmp_path / ".hf.k2j4_x9q.tmp"  # Mini LLM 0.x's staging folder
    (old_style / "hf").mkdir(parents=True)
    inside = out / f"{STAGING_TAG}def456"
    inside.mkdir()
    messages = []
    export_run(run, "hf", out, overwrite=True, log=messages.append)
    assert not beside.exists() and not old_style.exists() and not inside.exists()
    assert any(f"removed {beside} (1.0 MB), left by an export to --out {out}" in m for m in messages)
    assert len(messages) == 3

    unrelated = tmp_path / ".hf.notes.tmp"  # not a staging folder's shape: not ours, kept
    unrelated.mkdir()
    export_run(run, "hf", out, overwrite=True, log=quiet)
    assert unrelated.exists()


class Killed(Exception):
    """Where a SIGKILL would stop the process (nothing after it runs)."""


@pytest.mark.parametrize("old", [True, False])
def test_a_move_into_a_kept_folder_killed_at_any_step_is_finished_by_the_next_export(run, tmp_path, monkeypatch,
                                                                                     old):
    """The file-by-file move (a mount point, the current folder, an empty folder) stopped after each of its
    renames and deletions: the next export finishes it, and the folder then holds the new export whole."""
    new = export_run(run, "hf", tmp_path / "new-export" / "out", dtype="float16", log=quiet)
    expected = contents(new)
    step = 0
    while True:
        step += 1
        out = tmp_path / f"try{step}" / "out"
        out.mkdir(parents=True)
        if old:
            export_run(run, "hf", out, log=quiet)
        moving = out / f"{MOVING_TAG}x"
        shutil.copytree(new.parent, moving)  # (holds `out`, as a staging folder does)
        calls = iter(range(1, 10**6))
        real = {name: getattr(os, name) for name in ("replace", "unlink")}

        def dying(name, real=real, calls=calls, step=step):
            def call(*args, **kwargs):
                if next(calls) == step:
                    raise Killed
                return real[name](*args, **kwargs)
            return call

        with monkeypatch.context() as patched:
            for name in real:
                patched.setattr(os, name, dying(name))
            try:
                _move_in(moving, out)
                finished = True
            except Killed:
                finished = False
        messages = []
        if not finished:
            export_run(run, "hf", tmp_path / "elsewhere" / f"{step}", log=quiet)  # another --out: not touched
            assert moving.exists()
            with pytest.raises(MiniLLMError, match="already exists"):
                export_run(run, "hf", out, log=messages.append)
            assert any("finished moving into --out" in m for m in messages)
        assert contents(out) == expected, step
        if finished:
            break
    assert step > len(HF_FILES)
