"""Training on several processes: torchrun, 2 CPU processes, Gloo (what CI can run)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm.files import load_torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--batch-size", "4", "--eval-interval", "10", "--max-steps", "120", "--no-progress",
        "--device", "cpu"]
TIMEOUT_S = 240
# Two processes sum the same two micro-batches that one process accumulates: the same numbers in another
# order at most. Measured: bit-identical weights on this CPU; allowed: float32 rounding.
WEIGHT_TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def torchrun_temporary_files(tmp_path, monkeypatch):
    """Each torchrun start leaves a torchelastic_* folder in the temporary directory: in the test's own."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def torchrun(*args: str, **kwargs) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "minillm", "train", *args]


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def processes_naming(path: Path) -> list[int]:
    """The pids of the processes whose command line names `path`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(path).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def kill_processes_naming(path: Path) -> None:
    """SIGKILL every process whose command line names `path` (torchrun starts its workers in a session of
    their own, so killing its process group is not enough), and wait until they are gone: a worker that
    outlived the kill by a moment could still write a checkpoint."""
    for pid in processes_naming(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 30
    while processes_naming(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_torch(run_dir / "last.pt")["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()  # and no `module.` prefixes
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=WEIGHT_TOLERANCE, rtol=0), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file) -> Path:
    """One process, two accumulation steps of 4: the same global batch as 2 processes x 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = run([sys.executable, "-m", "minillm", "train", str(corpus_file), *TINY, "--grad-accum-steps", "2",
                  "--out", str(out)])
    assert result.returncode == 0, result.stderr
    return out


def test_two_processes_train_like_one_with_accumulation(tmp_path, corpus_file, reference):
    out = tmp_path / "run"
    result = run(torchrun(str(corpus_file), *TINY, "--out", str(out)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distributed: 2 processes (cpu); global batch 8 sequences" in result.stdout
    assert result.stdout.count("run saved in") == 1  # rank 0 reports, rank 1 is silent
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in reference.iterdir() if not p.name.startswith("."))
    assert_same_weights(out, reference)
    history, expected = (load_torch(path / "last.pt")["history"] for path in (out, reference))
    assert [row["step"] for row in history] == [row["step"] for row in expected]
    assert [row["val_loss"] for row in history] == pytest.approx([row["val_loss"] for row in expected], abs=1e-5)
    # The run loads like any other (generate, evaluate, the UI).
    generate = run([sys.executable, "-m", "minillm", "generate", str(out), "--prompt", "the", "--seed", "1",
                    "--max-new-tokens", "5"])
    assert generate.returncode == 0 and generate.stdout.startswith("the"), generate.stderr


def test_a_killed_distributed_run_resumes_under_torchrun(tmp_path, corpus_file, reference):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(torchrun(str(corpus_file), *TINY, "--out", str(out)), cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "last.pt").is_file():
            assert job.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        kill_processes_naming(out)  # torchrun and both workers, at once
        job.wait(30)
    killed_at = load_torch(out / "last.pt")["step"]
    assert killed_at < 120

    result = run(torchrun(str(corpus_file), *TINY, "--out", str(out), "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {out} at step {killed_at}" in result.stdout
    assert_same_weights(out, reference)


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    started = time.monotonic()
    result = run(torchrun(str(tmp_path / "missing.txt"), *TINY, "--out", str(tmp_path / "run")))
    assert result.returncode != 0
    assert result.stderr.count("error: data file not found") == 1  # said by rank 0 alone
    assert "Traceback" not in "".join(line for line in result.stderr.splitlines(True) if "error:" in line)
    assert time.monotonic() - started < TIMEOUT_S  # (it ends; no rank waits in a collective)
    assert not (tmp_path / "run" / "train_config.json").exists()


def test_resuming_with_another_number_of_processes_says_the_global_batch_and_keeps_it_when_asked(tmp_path,
                                                                                                corpus_file,
                                                                                                reference):
    """The reference ran as 1 process x 2 accumulation steps x 4 (global batch 8): 2 processes double it unless
    --grad-accum-steps 1 keeps it, which resume accepts."""
    changed, kept = (shutil.copytree(reference, tmp_path / name) for name in ("changed", "kept"))
    more = ["--max-steps", "122", "--eval-interval", "2"]
    result = run(torchrun(str(corpus_file), *TINY, *more, "--out", str(changed), "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("warning: the global batch changes from 8 sequences (1 process(es) x 4 x 2 accumulation steps) to 16 "
            "(2 x 4 x 2)" in result.stderr and "--grad-accum-steps 1 keeps it" in result.stderr)
    result = run(torchrun(str(corpus_file), *TINY, *more, "--grad-accum-steps", "1", "--out", str(kept), "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "global batch changes" not in result.stderr and load_torch(kept / "last.pt")["step"] == 122
