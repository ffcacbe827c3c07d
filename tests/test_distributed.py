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
from minillm.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--batch-size", "2", "--eval-interval", "10", "--max-steps", "40", "--no-progress",
        "--device", "cpu"]
# 2 processes x 2 accumulation steps against 1 process x 4: a shape where the micro-batch a rank takes at
# accumulation step j matters (j * world + rank gives rank 1 the rows of micro-batches 1 and 3; j + rank would
# give it 1 and 2, and micro-batch 3 to nobody). (2 x 1 against 1 x 2 picks the same rows either way.)
ACCUMULATION = ["--grad-accum-steps", "2"]
REFERENCE_ACCUMULATION = ["--grad-accum-steps", "4"]
TIMEOUT_S = 240
# Two processes sum the same four micro-batches that one process accumulates: the same numbers in another
# order at most. Measured: bit-identical weights on this CPU; allowed: float32 rounding.
WEIGHT_TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def torchrun_temporary_files(tmp_path, monkeypatch):
    """Each torchrun start leaves a torchelastic_* folder in the temporary directory: in the test's own."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def torchrun(logs: Path, *args: str, program: tuple[str, ...] = ("-m", "minillm", "train")) -> list[str]:
    """`minillm train args` (or another program) on 2 processes; each rank's output is also kept whole in its
    own files under `logs` (and shown on the console, each line prefixed with its rank)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "--log-dir", str(logs), "--redirects", "3", "--tee", "3", *program, *args]


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def outputs(result: subprocess.CompletedProcess, logs: Path | None = None) -> str:
    """What a failed command said: its own stderr, then the whole stderr of each rank (what killed a rank, e.g.
    a C++ abort's message, is in its file, where torchrun's summary at the end of the console does not say)."""
    said = [f"exit status {result.returncode}; stderr:\n{result.stderr}"]
    for path in sorted(logs.glob("*/attempt_*/*/stderr.log")) if logs else []:
        said.append(f"---- rank {path.parent.name} ({path.parent.parent.name}) stderr:\n"
                    f"{path.read_text(errors='replace')}")
    return "\n".join(said)


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
    """One process, four accumulation steps of 2: the same global batch as 2 processes x 2 steps of 2."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = run([sys.executable, "-m", "minillm", "train", str(corpus_file), *TINY, *REFERENCE_ACCUMULATION,
                  "--out", str(out)])
    assert result.returncode == 0, outputs(result)
    return out


def train_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train"]


def assert_same_history(a: Path, b: Path) -> None:
    """The same evaluations (validation and training loss, the latter over every rank's micro-batches) and the
    same logged training losses."""
    history, expected = (load_torch(path / "last.pt")["history"] for path in (a, b))
    assert [row["step"] for row in history] == [row["step"] for row in expected]
    for name in ("val_loss", "train_loss"):
        assert [row[name] for row in history] == pytest.approx([row[name] for row in expected], abs=1e-5), name
    logged, expected_logged = train_rows(a), train_rows(b)
    assert [row["step"] for row in logged] == [row["step"] for row in expected_logged]
    assert [row["train_loss"] for row in logged] == pytest.approx(
        [row["train_loss"] for row in expected_logged], abs=1e-5)


def test_two_processes_train_like_one_with_accumulation(tmp_path, corpus_file, reference):
    out, logs = tmp_path / "run", tmp_path / "logs"
    result = run(torchrun(logs, str(corpus_file), *TINY, *ACCUMULATION, "--out", str(out)))
    assert result.returncode == 0, outputs(result, logs)
    assert "distributed: 2 processes (cpu); global batch 8 sequences = 2 x batch 2 x 2" in result.stdout
    assert result.stdout.count("run saved in") == 1  # rank 0 reports, rank 1 is silent
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in reference.iterdir() if not p.name.startswith("."))
    assert_same_weights(out, reference)
    assert_same_history(out, reference)
    # The run loads like any other (generate, evaluate, the UI).
    generate = run([sys.executable, "-m", "minillm", "generate", str(out), "--prompt", "the", "--seed", "1",
                    "--max-new-tokens", "5"])
    assert generate.returncode == 0 and generate.stdout.startswith("the"), generate.stderr


def test_a_killed_distributed_run_with_dropout_resumes_exactly_under_torchrun(tmp_path, corpus_file):
    """With dropout each rank draws its own masks from its own torch generator: a resume must give each rank
    back its own state (giving rank 1 rank 0's would change its masks, and so the weights)."""
    train_args = [str(corpus_file), *TINY, *ACCUMULATION, "--dropout", "0.1", "--max-steps", "20"]
    straight = tmp_path / "straight"
    result = run(torchrun(tmp_path / "logs-straight", *train_args, "--out", str(straight)))
    assert result.returncode == 0, outputs(result, tmp_path / "logs-straight")

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(torchrun(tmp_path / "logs-killed", *train_args, "--out", str(out)), cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "last.pt").is_file():
            assert job.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        kill_processes_naming(out)  # torchrun and both workers, at once
        job.wait(30)
    killed = load_torch(out / "last.pt")
    assert killed["step"] < 20 and len(killed["rank_rng"]) == 2
    assert not torch.equal(*killed["rank_rng"]), "each rank has its own generator state"

    logs = tmp_path / "logs-resumed"
    result = run(torchrun(logs, *train_args, "--out", str(out), "--resume"))
    assert result.returncode == 0, outputs(result, logs)
    assert f"resuming {out} at step {killed['step']}" in result.stdout
    assert_same_weights(out, straight)
    assert_same_history(out, straight)


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    started = time.monotonic()
    result = run(torchrun(tmp_path / "logs", str(tmp_path / "missing.txt"), *TINY, "--out", str(tmp_path / "run")))
    assert result.returncode != 0
    assert result.stderr.count("error: data file not found") == 1  # said by rank 0 alone
    assert "Traceback" not in "".join(line for line in result.stderr.splitlines(True) if "error:" in line)
    assert time.monotonic() - started < TIMEOUT_S  # (it ends; no rank waits in a collective)
    assert not (tmp_path / "run" / "train_config.json").exists()


# A rank's life as the trainer leads it: join, train through DDP, leave. Exits non-zero naming the Gloo threads
# still running after teardown.
LEAVE_THE_GROUP = """
import os, sys
import torch
from torch.nn.parallel import DistributedDataParallel
from minillm.training import distributed

distributed.setup(torch.device("cpu"))
model = DistributedDataParallel(torch.nn.Linear(4, 4))
model(torch.randn(2, 4)).sum().backward()
del model
distributed.teardown()
tasks = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
left = sorted(name for name in tasks if "gloo" in name)
sys.exit(f"rank {distributed.rank()}: Gloo threads still running after teardown: {left}" if left else 0)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads are read from Linux's /proc")
def test_leaving_the_process_group_stops_its_threads(tmp_path):
    """teardown() frees the process group, so no Gloo thread runs on into the interpreter's exit (where one
    left running was seen to abort rank 1 with SIGABRT at the end of a 2-process run, about once in 150)."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_THE_GROUP, encoding="utf-8")
    logs = tmp_path / "logs"
    result = run(torchrun(logs, program=(str(script),)))
    assert result.returncode == 0, outputs(result, logs)


def test_resuming_with_another_number_of_processes_says_the_global_batch_and_keeps_it_when_asked(tmp_path,
                                                                                                corpus_file,
                                                                                                reference):
    """The reference ran as 1 process x 4 accumulation steps x 2 (global batch 8): 2 processes double it unless
    --grad-accum-steps 2 keeps it, which resume accepts."""
    changed, kept = (shutil.copytree(reference, tmp_path / name) for name in ("changed", "kept"))
    more = ["--max-steps", "42", "--eval-interval", "2"]
    logs = tmp_path / "logs"
    result = run(torchrun(logs / "changed", str(corpus_file), *TINY, *REFERENCE_ACCUMULATION, *more, "--out",
                          str(changed), "--resume"))
    assert result.returncode == 0, outputs(result, logs / "changed")
    assert ("warning: the global batch changes from 8 sequences (1 process(es) x 2 x 4 accumulation steps) to 16 "
            "(2 x 2 x 4)" in result.stderr and "--grad-accum-steps 2 keeps it" in result.stderr)
    result = run(torchrun(logs / "kept", str(corpus_file), *TINY, *more, *ACCUMULATION, "--out", str(kept),
                          "--resume"))
    assert result.returncode == 0, outputs(result, logs / "kept")
    assert "global batch changes" not in result.stderr and load_torch(kept / "last.pt")["step"] == 42
