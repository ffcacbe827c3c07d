"""Kill `train --overwrite` and `export --overwrite` with a real SIGKILL at random moments: afterwards the old
run (export) or the new one loads, whole, never neither and never a mix.

The moment is drawn once the process has begun to write (its staging folder appeared), uniformly over how
long the rest took in an uninterrupted run, so that the kills land in the preparation, the training, the
swap and after it. 3 tries each here; `pytest -m slow` runs 10 of each, and more formats.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from minillm.checkpoint import load_run
from minillm.generation import generate_text
from minillm.run_folder import RunFolder
from minillm.sampling import SamplingConfig

POLL_SECONDS = 0.005
PROCESS_TIMEOUT = 300
SLOW_TIMEOUT = 1800  # ten tries of a process that takes tens of seconds on a busy machine
NEW_WIDTH = 48  # the new run's d_model (the old one, tiny_run, has the tiny preset's 32)
TRIES = [pytest.param(3, id="3-tries"),
         pytest.param(10, id="10-tries", marks=[pytest.mark.slow, pytest.mark.timeout(SLOW_TIMEOUT)])]


def started(argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "minillm", *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(process, writing) -> float:
    """Seconds until `writing()` is true (the process has begun to write), or it ended."""
    start = time.monotonic()
    while not writing() and process.poll() is None:
        time.sleep(POLL_SECONDS)
        assert time.monotonic() - start < PROCESS_TIMEOUT
    return time.monotonic()


def writing_window(argv, cwd, writing) -> float:
    """How long an uninterrupted process writes: from its staging folder's appearance to its end."""
    process = started(argv, cwd)
    began = wait_for(process, writing)
    _, err = process.communicate(timeout=PROCESS_TIMEOUT)
    assert process.returncode == 0, err
    return time.monotonic() - began


def kill_at_random(argv, cwd, writing, window, rng) -> str:
    """Run `argv`, SIGKILL it at a random moment of its writing; 'killed' or 'finished' (it was faster)."""
    process = started(argv, cwd)
    wait_for(process, writing)
    time.sleep(rng.uniform(0, window))
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=PROCESS_TIMEOUT)
    assert process.returncode in (0, -signal.SIGKILL), err
    return "killed" if process.returncode else "finished"


def run_files(path):
    return {p.name: p.read_bytes() for p in RunFolder(path).existing_files()}


def contents(path):
    if not path.exists():
        return None
    return {"": path.read_bytes()} if path.is_file() else {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("tries", TRIES)
def test_train_overwrite_killed_at_random_leaves_the_old_run_or_the_new_one(tmp_path, tiny_run, corpus_file, tries):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    old = run_files(tiny_run)
    run_dir = tmp_path / "run"
    argv = ["train", str(corpus_file), "--preset", "tiny", "--tokenizer", "bpe", "--d-model", str(NEW_WIDTH),
            "--max-steps", "20", "--eval-interval", "10", "--threads", "1", "--no-progress", "--out", str(run_dir),
            "--overwrite"]

    def writing() -> bool:
        return any(run_dir.glob(".staging-*"))

    shutil.copytree(tiny_run, run_dir)
    window = writing_window(argv, tmp_path, writing)
    outcomes = Counter()
    for attempt in range(tries):
        shutil.rmtree(run_dir)
        shutil.copytree(tiny_run, run_dir)
        ended = kill_at_random(argv, tmp_path, writing, window, rng)
        where = f"try {attempt} ({ended}; seed {seed})"
        run = load_run(run_dir)  # (finishes a swap the kill interrupted)
        assert isinstance(generate_text(run.model, run.tokenizer, "the", SamplingConfig(max_new_tokens=4)), str)
        files = run_files(run_dir)
        if files == old:
            outcomes[f"old run ({ended})"] += 1
            continue
        train_config = json.loads(files["train_config.json"])["train"]
        assert run.config.d_model == NEW_WIDTH and train_config["tokenizer"] == "bpe", where
        assert run.tokenizer.kind == "bpe" and files.get("test_metrics.json") != old["test_metrics.json"], where
        outcomes[f"new run ({ended})"] += 1
    print(f"train --overwrite, SIGKILL at random (seed {seed}, window {window:.1f} s): {dict(outcomes)}")
    messages = RunFolder(run_dir).clean_leftovers()  # what the next start does (no training holds the lock)
    assert not [p for p in run_dir.iterdir() if p.name.startswith((".staging-", ".swapping-"))], messages


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, corpus_file):
    from conftest import single_thread, tiny_configs

    from minillm.training import train

    path = tmp_path_factory.mktemp("kill-export") / "run"
    with single_thread():
        train(*tiny_configs(tokenizer="bpe", data=corpus_file, max_steps=10, eval_interval=10), path,
              progress=False, log=lambda m: None)
    return path


# The folder formats share one way in (export.target): safetensors tries it here, without the seconds that
# importing transformers takes; the slow run tries hf (the folder of 7 files) and the GGUF file too.
@pytest.mark.parametrize("fmt, name", [pytest.param("safetensors", "out", id="safetensors"),
                                       pytest.param("hf", "out", id="hf", marks=pytest.mark.slow),
                                       pytest.param("gguf", "out.gguf", id="gguf", marks=pytest.mark.slow)])
@pytest.mark.parametrize("tries", TRIES)
def test_export_overwrite_killed_at_random_leaves_the_old_export_or_the_new_one(tmp_path, bpe_run, tries, fmt,
                                                                                  name):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from minillm.export import export_run

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    (tmp_path / "old").mkdir()
    old_export = export_run(bpe_run, fmt, tmp_path / "old" / name, log=lambda m: None)  # float32
    old = contents(old_export)
    reference = tmp_path / "new"
    reference.mkdir()
    window = writing_window(["export", str(bpe_run), "--format", fmt, "--dtype", "float16", "--out", name],
                            reference, lambda: any(reference.glob(f".{name}.minillm-export-*")))
    new = contents(reference / name)
    assert new != old

    out = tmp_path / name
    argv = ["export", str(bpe_run), "--format", fmt, "--dtype", "float16", "--out", str(out), "--overwrite"]
    outcomes = Counter()
    for attempt in range(tries):
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        (shutil.copytree if old_export.is_dir() else shutil.copyfile)(old_export, out)
        ended = kill_at_random(argv, tmp_path, lambda: any(tmp_path.glob(f".{name}.minillm-export-*")), window, rng)
        found = contents(out)
        assert found in (old, new), f"try {attempt} ({ended}; seed {seed}): --out is neither export, whole"
        outcomes[f"{'old' if found == old else 'new'} export ({ended})"] += 1
    print(f"export --format {fmt} --overwrite, SIGKILL at random (seed {seed}, window {window:.1f} s): "
          f"{dict(outcomes)}")
    messages = []
    export_run(bpe_run, fmt, out, overwrite=True, log=messages.append)  # the next export cleans up
    assert not list(tmp_path.glob(f".{name}.minillm-export-*")), messages
