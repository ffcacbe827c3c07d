"""The run folder: one owner of its file names, a stop hook that saves, and nothing lost by accident
(a bad --overwrite keeps the old run, only a run's own files are deleted, one training at a time)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_configs

from minillm.errors import MiniLLMError
from minillm.files import load_torch
from minillm.run_folder import RUN_MARKERS, RunFolder
from minillm.training import resume, train

# Tiny models run on one CPU thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(message: str) -> None:
    pass


def test_every_file_of_a_finished_run_is_named_by_the_run_folder(tiny_run):
    on_disk = {p.name for p in tiny_run.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert on_disk <= set(RunFolder(tiny_run).file_names())
    folder = RunFolder(tiny_run)
    assert folder.is_minillm_run() and folder.has_best_model() and folder.holds_run()
    assert {p.name for p in folder.existing_files()} == on_disk


def test_the_stop_hook_saves_and_a_resume_matches_an_uninterrupted_run(tmp_path, corpus_file):
    settings = dict(max_steps=30, eval_interval=10, log_interval=5)
    train(*tiny_configs(data=corpus_file, **settings), tmp_path / "straight", progress=False, log=quiet)

    steps = iter(range(1, 1000))
    stop_after_13 = lambda: next(steps) >= 13  # noqa: E731 (asked once per step)
    messages = []
    stopped = train(*tiny_configs(data=corpus_file, **settings), tmp_path / "stopped", progress=False,
                    log=messages.append, should_stop=stop_after_13)
    assert (stopped.stop_reason, stopped.steps) == ("stopped", 13)
    assert any("stopped at step 13" in m and "--resume" in m for m in messages)
    assert load_torch(tmp_path / "stopped" / "last.pt")["step"] == 13  # evaluated and saved at the stop
    assert stopped.test_metrics["tokens"] > 0

    result = resume(tmp_path / "stopped", progress=False, log=quiet)
    assert (result.stop_reason, result.steps) == ("max_steps", 30)
    straight = load_torch(tmp_path / "straight" / "last.pt")["model"]
    resumed = load_torch(tmp_path / "stopped" / "last.pt")["model"]
    for name, weight in straight.items():
        assert torch.equal(weight, resumed[name]), name


def test_overwrite_with_a_bad_data_path_keeps_the_old_run(tmp_path, tiny_run, corpus_file):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for bad in (tmp_path / "typo.txt", tmp_path):
        with pytest.raises(MiniLLMError):
            train(*tiny_configs(data=bad), run_dir, overwrite=True, progress=False, log=quiet)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(MiniLLMError, match="empty"):
        train(*tiny_configs(data=empty), run_dir, overwrite=True, progress=False, log=quiet)
    with pytest.raises(MiniLLMError, match="vocab_size"):  # the tokenizer fails: after the data was read
        train(*tiny_configs(tokenizer="bpe", data=corpus_file, bpe_vocab_size=10), run_dir,
              overwrite=True, progress=False, log=quiet)
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before
    assert not list(run_dir.glob(".staging-*"))


def test_overwrite_deletes_only_the_runs_own_files_and_says_so(tmp_path, tiny_run, corpus_file):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    (run_dir / "notes.bin").write_bytes(b"mine")  # the user's file, named like a token file
    (run_dir / "keep.txt").write_text("mine", encoding="utf-8")
    messages = []
    train(*tiny_configs(data=corpus_file, max_steps=2, eval_interval=1), run_dir, overwrite=True,
          progress=False, log=messages.append)
    assert (run_dir / "notes.bin").read_bytes() == b"mine"
    assert (run_dir / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert any(m.startswith(f"replaced the run that was in {run_dir}") for m in messages)
    assert load_torch(run_dir / "last.pt")["step"] == 2


@pytest.mark.parametrize("marker", RUN_MARKERS)
def test_a_folder_with_a_file_named_like_ours_is_not_a_run_to_overwrite(tmp_path, corpus_file, marker):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / marker).write_text("the user's own file", encoding="utf-8")
    with pytest.raises(MiniLLMError, match="already holds a run"):
        train(*tiny_configs(data=corpus_file), folder, progress=False, log=quiet)
    with pytest.raises(MiniLLMError, match=f"named like a run's \\({marker}\\).*will not delete"):
        train(*tiny_configs(data=corpus_file), folder, overwrite=True, progress=False, log=quiet)
    assert (folder / marker).read_text(encoding="utf-8") == "the user's own file"


def _hold_lock(path, ready, release):
    with RunFolder(path).lock():
        ready.set()
        release.wait(30)


def test_a_second_training_into_a_locked_folder_is_refused(tmp_path, corpus_file):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path / "run", ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(MiniLLMError, match=rf"in use by another training \(process {holder.pid}\)"):
            train(*tiny_configs(data=corpus_file), tmp_path / "run", progress=False, log=quiet)
        with pytest.raises(MiniLLMError, match="in use by another training"):
            with RunFolder(tmp_path / "run").lock():
                pass
    finally:
        release.set()
        holder.join(30)
    with RunFolder(tmp_path / "run").lock():  # free again once the holder is gone
        pass


def test_a_killed_training_leaves_no_stale_lock(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path / "run", ready, release))
    holder.start()
    assert ready.wait(60)
    holder.kill()
    holder.join(30)
    deadline = time.monotonic() + 10
    while True:
        try:
            with RunFolder(tmp_path / "run").lock():
                break
        except MiniLLMError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_training_that_cannot_fit_in_memory_is_refused_with_its_estimate(tmp_path, corpus_file):
    model_config, train_config = tiny_configs(data=corpus_file, batch_size=10**6)
    model_config = model_config.replace(max_seq_len=4096)
    with pytest.raises(MiniLLMError, match=r"needs about [\d.]+ (GiB|TiB).* free; make it smaller: --batch-size"):
        train(model_config, train_config, tmp_path / "run", progress=False, log=quiet)
    assert not (tmp_path / "run").exists()


def test_the_memory_estimate_grows_with_the_batch_and_the_context():
    from minillm.config import preset_configs
    from minillm.training.memory import estimate_training_memory

    model, config = preset_configs("cpu")
    base = estimate_training_memory(model, config)
    assert base.parameters > 0 and base.weights_and_optimizer == 16 * base.parameters
    double_batch = estimate_training_memory(model, config.replace(batch_size=2 * config.batch_size))
    assert double_batch.activations == 2 * base.activations
    assert double_batch.weights_and_optimizer == base.weights_and_optimizer
    assert estimate_training_memory(model.replace(max_seq_len=128), config).activations == 2 * base.activations


# Trains in a fresh process and prints its peak resident memory during a training of the given shape (after a
# tiny warm-up training, so that lazy imports and first allocations are not counted), with the estimate.
MEASURE_PEAK = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from conftest import tiny_configs
from minillm.config import ModelConfig, TrainConfig
from minillm.training import train
from minillm.training.memory import estimate_training_memory

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

torch.set_num_threads(1)
corpus, out = sys.argv[1], Path(sys.argv[2])
model, config = tiny_configs(data=corpus, max_steps=1, eval_batches=1, test_tokens=64)
train(model, config, out / "warm-up", progress=False, log=lambda m: None)
model = model.replace(d_model=128, n_layers=2, n_heads=4, max_seq_len=128)
config = config.replace(batch_size=32, max_steps=2, eval_interval=2)
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # (Linux) the peak starts again from here
train(model, config, out / "run", progress=False, log=lambda m: None)
peak = status("VmHWM") - before
saved = json.loads((out / "run" / "train_config.json").read_text())
estimate = estimate_training_memory(ModelConfig.from_dict(saved["model"]), TrainConfig.from_dict(saved["train"]))
print(json.dumps({"peak": peak, "estimate": estimate.total, "activations": estimate.activations}))
"""
ESTIMATE_FACTOR = 3.0


def test_the_memory_estimate_is_a_floor_within_a_few_times_the_measured_peak(tmp_path, corpus_file):
    """A real training (batch 32 x 128 tokens, d_model 128, 2 layers; the estimate about 50 MB, mostly
    activations) in a fresh process: its peak resident memory, from Linux's high-water mark, is at least the
    estimate and at most ESTIMATE_FACTOR times it. The estimate counts float32 weights, gradients, AdamW's
    moments and the activations autograd keeps; the real peak also holds the backward pass's temporaries
    (each activation's gradient while it is made), the allocator's slack and the batches: measured here 1.7-2x
    the estimate over four shapes (16-64 rows, 128-256 tokens, d_model 64-128, 1-4 layers). So an estimate
    several times too small (which would let a run that cannot fit start) or too large (which would refuse one
    that fits) fails this test."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the peak is read from Linux's /proc/self/status")
    result = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(corpus_file), str(tmp_path),
                             str(Path(__file__).parent)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    peak, estimate = measured["peak"], measured["estimate"]
    assert measured["activations"] > 0.9 * estimate  # (the activations are what this shape measures)
    said = f"peak {peak / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB"
    assert estimate <= peak <= ESTIMATE_FACTOR * estimate, said
