"""The run folder: one owner of its file names, a stop hook that saves, and nothing lost by accident
(a bad --overwrite keeps the old run, only a run's own files are deleted, one training at a time)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_configs

from minillm.checkpoint import load_run
from minillm.errors import MiniLLMError
from minillm.files import load_torch
from minillm.generation import generate_text
from minillm.run_folder import RUN_MARKERS, RunFolder
from minillm.sampling import SamplingConfig
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

    model, config = preset_configs("cpu", train_overrides={"optimizer": "adamw"})
    base = estimate_training_memory(model, config)
    # Per parameter: the weight, its gradient and AdamW's two moments, 4 bytes each.
    assert base.parameters > 0 and base.weights_and_optimizer == 16 * base.parameters
    double_batch = estimate_training_memory(model, config.replace(batch_size=2 * config.batch_size))
    assert double_batch.activations == 2 * base.activations
    assert double_batch.weights_and_optimizer == base.weights_and_optimizer
    assert estimate_training_memory(model.replace(max_seq_len=128), config).activations == 2 * base.activations


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_memory_floor_counts_the_state_the_run_s_optimizers_keep(optimizer):
    """The estimate's weights and optimizer state equal what a real step of the run's optimizers allocates
    (Muon keeps one momentum buffer where AdamW keeps two moments): a floor for either recipe."""
    from minillm.config import preset_configs
    from minillm.models import build_model
    from minillm.training.memory import BYTES_PER_FLOAT, estimate_training_memory
    from minillm.training.optimizer import make_optimizers

    model_config, config = preset_configs("tiny", train_overrides={"optimizer": optimizer})
    model = build_model(model_config)
    optimizers = make_optimizers(model, config, torch.device("cpu"))
    _, loss = model(torch.randint(3, model_config.vocab_size, (2, 8)), targets=torch.randint(3, 50, (2, 8)))
    loss.backward()
    for o in optimizers:
        o.step()
    state = sum(t.numel() for o in optimizers for p, kept in o.state.items() for t in kept.values()
                if torch.is_tensor(t) and t.shape == p.shape)
    gradients = sum(p.grad.numel() for p in model.parameters())
    weights = sum(p.numel() for p in model.parameters())
    estimate = estimate_training_memory(model_config, config)
    assert estimate.weights_and_optimizer == (weights + gradients + state) * BYTES_PER_FLOAT
    adamw = estimate_training_memory(model_config, config.replace(optimizer="adamw"))
    assert (estimate.weights_and_optimizer < adamw.weights_and_optimizer) == (optimizer == "muon")


# ---- --overwrite: the old run loads until the new one has a model, then the new one --------------------

@pytest.fixture(scope="module")
def other_run(tmp_path_factory, corpus_file):
    """A run that differs from tiny_run in every file a load reads (BPE, another width)."""
    path = tmp_path_factory.mktemp("other") / "run"
    model_config, train_config = tiny_configs(tokenizer="bpe", data=corpus_file, max_steps=5, eval_interval=5)
    train(model_config.replace(d_model=48), train_config, path, progress=False, log=quiet)
    return path


def run_files(path):
    """{name: bytes} of a run's own files in a folder."""
    return {p.name: p.read_bytes() for p in RunFolder(path).existing_files()}


def test_overwrite_keeps_the_old_run_loadable_until_the_new_one_has_a_model(tmp_path, tiny_run, corpus_file):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    old = run_files(run_dir)
    seen = []

    def look() -> bool:  # asked after every step: which run loads now?
        run = load_run(run_dir)
        seen.append("old" if run_files(run_dir) == old else run.config.d_model)
        return False

    messages = []
    model_config, train_config = tiny_configs(data=corpus_file, max_steps=8, eval_interval=4)
    train(model_config.replace(d_model=48), train_config, run_dir, overwrite=True, progress=False,
          log=messages.append, should_stop=look)
    assert seen == ["old"] * 4 + [48] * 4  # (asked before the evaluation of its step) swapped at step 4
    assert any(m.startswith(f"replaced the run that was in {run_dir}") for m in messages)
    assert not list(run_dir.glob(".staging-*")) and not list(run_dir.glob(".swapping-*"))
    assert load_run(run_dir).config.d_model == 48 and "test_metrics.json" in run_files(run_dir)


def test_an_overwrite_interrupted_before_its_first_model_keeps_the_old_run_and_says_so(tmp_path, tiny_run,
                                                                                        corpus_file):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    old = run_files(run_dir)
    steps = iter(range(1, 100))

    def ctrl_c() -> bool:
        if next(steps) == 2:
            raise KeyboardInterrupt
        return False

    messages = []
    with pytest.raises(KeyboardInterrupt):
        train(*tiny_configs(data=corpus_file, max_steps=8, eval_interval=4), run_dir, overwrite=True,
              progress=False, log=messages.append, should_stop=ctrl_c)
    assert run_files(run_dir) == old and not list(run_dir.glob(".staging-*"))
    assert f"the run that was in {run_dir} is kept: the new one had not saved a model yet" in messages


KILL_AT_CALL = """
import os, signal, sys
from minillm.run_folder import RunFolder
calls = iter(range(1, 10**6))
def dying(real):
    def call(*args, **kwargs):
        if next(calls) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call
for name in ("rename", "replace", "unlink"):
    setattr(os, name, dying(getattr(os, name)))
RunFolder(sys.argv[1]).swap_in(RunFolder(sys.argv[2]).path)
"""


def test_a_swap_killed_at_any_step_leaves_the_old_run_or_the_new_one(tmp_path, tiny_run, other_run):
    """A real process swaps a new run in and is SIGKILLed at its n-th rename or deletion, for every n: the
    folder then loads as the old run (killed before the commit) or the new one (after it), whole."""
    old, new = run_files(tiny_run), run_files(other_run)
    outcomes = []
    for step in range(1, 100):
        run_dir = shutil.copytree(tiny_run, tmp_path / f"run{step}")
        staged = shutil.copytree(other_run, run_dir / ".staging-test", ignore=shutil.ignore_patterns(".*"))
        done = subprocess.run([sys.executable, "-c", KILL_AT_CALL, str(run_dir), str(staged), str(step)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr
        run = load_run(run_dir)  # finishes a swap that was committed
        generate_text(run.model, run.tokenizer, "the", SamplingConfig(max_new_tokens=4, seed=0))
        outcomes.append("old" if run_files(run_dir) == old else "new" if run_files(run_dir) == new else "mixed")
        assert outcomes[-1] != "mixed", step
        assert not list(run_dir.glob(".swapping-*"))
        with RunFolder(run_dir).lock():
            messages = RunFolder(run_dir).clean_leftovers()  # what the next train or --resume does first
        assert not list(run_dir.glob(".staging-*")) and run_files(run_dir) in (old, new)
        assert (outcomes[-1] == "old") == any("removed .staging-test" in m for m in messages)
        if done.returncode == 0:
            break
    assert outcomes[0] == "old" and set(outcomes[1:]) == {"new"} and len(outcomes) > len(new)


def test_the_next_training_finishes_a_swap_or_removes_a_staging_folder_and_says_so(tmp_path, tiny_run,
                                                                                    other_run, corpus_file):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    swapping = shutil.copytree(other_run, run_dir / ".swapping-x", ignore=shutil.ignore_patterns(".*"))
    (swapping / "swap.json").write_text(json.dumps({"files": sorted(run_files(other_run))}))
    (swapping / "best_model.pt").rename(run_dir / "best_model.pt")  # killed after its first move
    messages = []
    resume(run_dir, {"max_steps": 6}, progress=False, log=messages.append)
    assert f"finished moving the new run into {run_dir} (its training was stopped while it replaced the run " \
           "that was there)" in messages
    assert load_run(run_dir).config.d_model == 48

    (run_dir / ".staging-y").mkdir()
    (run_dir / ".staging-y" / "train.bin").write_bytes(bytes(2**20))
    messages = []
    train(*tiny_configs(data=corpus_file, max_steps=2, eval_interval=1), run_dir, overwrite=True,
          progress=False, log=messages.append)
    assert any(m.startswith(f"removed .staging-y from {run_dir} (1.0 MB): a new run that a stopped training "
                            "left before its first model") for m in messages)
    assert not (run_dir / ".staging-y").exists()


# Trains in a fresh process and prints its peak resident memory during a training of the given shape (after a
# tiny warm-up training, so that lazy imports and first allocations are not counted), with the estimate.
MEASURE_PEAK = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from conftest import tiny_configs
from minillm.checkpoint import read_model_config
from minillm.config import TrainConfig
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
trained, _ = read_model_config(out / "run" / "best_model_config.json")
estimate = estimate_training_memory(trained, TrainConfig.from_dict(saved["train"]))
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
