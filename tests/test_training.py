"""Training end to end on tiny models: it learns, it writes the run folder, it resumes exactly, it stops."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import tiny_configs

from minillm.checkpoint import load_run, load_torch, read_model_config, read_train_config
from minillm.config import ModelConfig, TrainConfig
from minillm.data.split_record import read_split_record
from minillm.data.streams import read_stream
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.models import build_model
from minillm.sampling import SamplingConfig
from minillm.training import StopReason, Trainer, evaluate_run, lr_at, resume, train
from minillm.training import threads as threads_module
from minillm.training import trainer as trainer_module
from minillm.training.evaluation import is_overfitting
from minillm.training.metrics import read_metrics
from minillm.training.optimizer import make_optimizers

RUN_FILES = ["tokenizer.json", "best_model.pt", "best_model_config.json", "last.pt", "metrics.jsonl",
             "loss_curve.png", "test_metrics.json", "train_config.json", "split.json",
             "train.bin", "val.bin", "test.bin"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")


# Tiny models run on one CPU thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(message: str) -> None:
    pass


def run_tiny(run_dir, corpus, model_type="decoder_only", tokenizer="char", overwrite=False, **overrides):
    model_config, train_config = tiny_configs(model_type, tokenizer, corpus, **overrides)
    return train(model_config, train_config, run_dir, overwrite=overwrite, progress=False, log=quiet)


@pytest.mark.parametrize("model_type, tokenizer", [
    ("decoder_only", "char"), ("decoder_only", "bpe"), ("transformer", "char"), ("transformer", "bpe"),
])
def test_tiny_run_learns_and_writes_the_run_folder(tmp_path, corpus_file, tiny_run, model_type, tokenizer):
    if (model_type, tokenizer) == ("decoder_only", "char"):
        run_dir = tiny_run  # the shared fixture is exactly this run
    else:
        run_dir = tmp_path / "run"
        run_tiny(run_dir, corpus_file, model_type, tokenizer)
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "loss_curve.png").read_bytes().startswith(PNG_MAGIC)

    evals = [row for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "eval"]
    assert len(evals) == 3  # tiny preset: 60 steps, an evaluation every 20
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    run = load_run(run_dir)
    assert evals[0]["val_loss"] < math.log(run.config.vocab_size)  # better than guessing uniformly
    assert run.config.model_type == model_type and run.info["tokenizer_type"] == tokenizer

    test_metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert test_metrics["tokens"] > 0
    assert test_metrics["perplexity"] == pytest.approx(math.exp(test_metrics["loss"]))
    # Bits per byte: the nats of every scored token over the UTF-8 bytes of the text they decode to.
    bits = test_metrics["loss"] * test_metrics["tokens"] / math.log(2)
    assert test_metrics["bits_per_byte"] == pytest.approx(bits / test_metrics["bytes"])
    assert test_metrics["bits_per_char"] == pytest.approx(bits / test_metrics["chars"])
    if model_type == "decoder_only":  # every token of the test stream but the first (BOS) is scored
        stream = read_stream(run_dir / "test.bin", read_split_record(run_dir).dtype)
        text = run.tokenizer.decode(stream.tolist())
        assert (test_metrics["bytes"], test_metrics["chars"]) == (len(text.encode()), len(text))
    assert all(math.isfinite(row["val_bits_per_byte"]) for row in evals)
    best = json.loads((run_dir / "best_model_config.json").read_text())["training"]
    assert best["val_loss"] == min(row["val_loss"] for row in evals)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, corpus_file):
    # Dropout on, so the restored torch RNG matters as much as the batch generator and the optimizer.
    settings = dict(max_steps=40, eval_interval=10, log_interval=5, dropout=0.1)

    def configs():
        model_config, train_config = tiny_configs(data=corpus_file, **{
            k: v for k, v in settings.items() if k != "dropout"})
        return model_config.replace(dropout=settings["dropout"]), train_config

    train(*configs(), tmp_path / "straight", progress=False, log=quiet)

    def interrupt_at_step_25(row):
        if row["step"] == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(*configs(), tmp_path / "resumed", progress=False, log=quiet, on_metrics=interrupt_at_step_25)
    assert load_torch(tmp_path / "resumed" / "last.pt")["step"] == 20
    random.seed(12345)  # other RNG use between the two sessions must not matter
    result = resume(tmp_path / "resumed", progress=False, log=quiet)
    assert result.steps == 40

    straight = load_torch(tmp_path / "straight" / "last.pt")
    resumed = load_torch(tmp_path / "resumed" / "last.pt")
    for name, weight in straight["model"].items():
        assert torch.equal(weight, resumed["model"][name]), name
    assert straight["history"] == resumed["history"]
    # metrics.jsonl: rows the interrupted session logged after its checkpoint are replaced, not doubled.
    rows = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    steps = [row["step"] for row in rows if row["kind"] == "train"]
    assert steps == list(range(5, 45, 5))


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path, tiny_run):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    with pytest.raises(MiniLLMError, match="d_model"):
        resume(run_dir, model_overrides={"d_model": 64}, progress=False, log=quiet)
    with pytest.raises(MiniLLMError, match="batch_size"):
        resume(run_dir, {"batch_size": 3}, progress=False, log=quiet)
    (run_dir / "last.pt").unlink()
    with pytest.raises(MiniLLMError, match="nothing to resume"):
        resume(run_dir, progress=False, log=quiet)


def test_a_run_written_before_the_model_config_was_kept_once_still_resumes(tmp_path, tiny_run):
    """Runs before 0.2 kept a copy of the configs in train_config.json ("model") and in last.pt."""
    from minillm.files import save_torch, write_json

    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    model = read_model_config(run_dir / "best_model_config.json")[0].to_dict()
    train_config = read_train_config(run_dir).to_dict()
    write_json(run_dir / "train_config.json", {"minillm_version": "0.1.0", "model": model, "train": train_config})
    last = load_torch(run_dir / "last.pt")
    save_torch(run_dir / "last.pt", {**last, "model_config": model, "train_config": train_config})
    with pytest.raises(MiniLLMError, match="d_model"):
        resume(run_dir, model_overrides={"d_model": 64}, progress=False, log=quiet)
    result = resume(run_dir, {"max_steps": last["step"] + 4}, progress=False, log=quiet)
    assert result.steps == last["step"] + 4
    assert load_torch(run_dir / "last.pt")["history"][:len(last["history"])] == last["history"]


def test_existing_run_is_refused_unless_overwrite(tmp_path, corpus_file, tiny_run):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    before = (run_dir / "best_model.pt").read_bytes()
    with pytest.raises(MiniLLMError, match="already holds a run"):
        run_tiny(run_dir, corpus_file, max_steps=1)
    assert (run_dir / "best_model.pt").read_bytes() == before
    result = run_tiny(run_dir, corpus_file, overwrite=True, max_steps=2, eval_interval=1)
    assert result.steps == 2
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "eval"] == [1, 2]


def script_validation_losses(monkeypatch, losses: list[float]) -> None:
    """The trainer's validation losses, one per evaluation, from `losses` (the final test stays real)."""
    scripted = iter(losses)
    real_mean_loss = trainer_module.mean_loss

    def mean_loss(model, batches, device, dtype):
        if isinstance(batches, list):  # the fixed validation batches
            return next(scripted), 1
        return real_mean_loss(model, batches, device, dtype)  # the final test

    monkeypatch.setattr(trainer_module, "mean_loss", mean_loss)


def test_early_stopping_and_the_overfitting_warning(tmp_path, corpus_file, monkeypatch):
    # Validation loss scripted to rise after the first evaluation; everything else is real.
    script_validation_losses(monkeypatch, [2.0, 2.1, 2.2, 2.3, 2.4])
    messages = []
    model_config, train_config = tiny_configs(data=corpus_file, eval_interval=5, patience=3)
    result = train(model_config, train_config, tmp_path / "run", progress=False, log=messages.append)
    assert result.stop_reason == StopReason.EARLY_STOPPING
    assert (result.steps, result.best_step, result.best_val_loss) == (20, 5, 2.0)
    warning = next(m for m in messages if m.startswith("warning: overfitting"))
    assert "parameters" in warning and "dropout" in warning and "more data" in warning
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["overfitting"] is True


def test_the_overfitting_warning_is_said_once_however_long_it_lasts(tmp_path, corpus_file, monkeypatch):
    # Validation loss scripted to rise at each of 7 evaluations (no early stopping); everything else is real.
    script_validation_losses(monkeypatch, [2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6])
    messages = []
    model_config, train_config = tiny_configs(data=corpus_file, eval_interval=5, max_steps=35)
    train(model_config, train_config, tmp_path / "run", progress=False, log=messages.append)
    evals = [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if row["kind"] == "eval"]
    flagged = [row["step"] for row in evals if row["overfitting"]]
    assert flagged[0] == 20 and flagged == list(range(20, 40, 5))  # from the 4th evaluation on, it stays said
    assert len([m for m in messages if m.startswith("warning: overfitting")]) == 1


def test_early_stopping_counts_on_across_a_resume(tmp_path, corpus_file):
    """The evaluations without improvement are part of the checkpoint: a run stopped and resumed stops early
    at the same step as one that ran straight. (A learning rate of 1e-12 leaves the weights, and so the
    validation loss, exactly as they are: no evaluation after the first improves on it.)"""
    settings = dict(learning_rate=1e-12, min_lr=0.0, eval_interval=5, max_steps=60, patience=2)
    straight = train(*tiny_configs(data=corpus_file, **settings), tmp_path / "straight", progress=False, log=quiet)
    assert (straight.stop_reason, straight.steps, straight.best_step) == ("early_stopping", 15, 5)

    asked = iter(range(1, 1000))
    stopped = train(*tiny_configs(data=corpus_file, **settings), tmp_path / "stopped", progress=False, log=quiet,
                    should_stop=lambda: next(asked) >= 10)
    assert (stopped.stop_reason, stopped.steps) == ("stopped", 10)  # one evaluation without improvement so far
    resumed = resume(tmp_path / "stopped", progress=False, log=quiet)
    assert (resumed.stop_reason, resumed.steps, resumed.best_step) == ("early_stopping", 15, 5)


def test_time_budget_stops_and_keeps_a_model(tmp_path, corpus_file):
    result = run_tiny(tmp_path / "run", corpus_file, max_time=1e-6)
    assert result.stop_reason == StopReason.MAX_TIME and result.steps == 1
    assert load_run(tmp_path / "run").config.model_type == "decoder_only"


def test_epochs_set_the_number_of_steps(tmp_path, corpus_file):
    result = run_tiny(tmp_path / "run", corpus_file, epochs=0.5, eval_interval=1000)
    train_tokens = read_split_record(tmp_path / "run").tokens["train"]
    model_config, train_config = tiny_configs(data=corpus_file)
    tokens_per_step = train_config.batch_size * model_config.max_seq_len
    assert result.steps == math.ceil(0.5 * train_tokens / tokens_per_step)


def test_evaluate_run_reproduces_the_test_metrics(tiny_run, corpus_file):
    saved = json.loads((tiny_run / "test_metrics.json").read_text())
    metrics = evaluate_run(tiny_run)
    assert metrics["loss"] == pytest.approx(saved["loss"], rel=1e-5)
    assert metrics["tokens"] == saved["tokens"]
    on_file = evaluate_run(tiny_run, corpus_file)
    assert on_file["tokens"] > metrics["tokens"] and math.isfinite(on_file["loss"])


def test_a_large_test_set_is_scored_on_a_sample_with_its_confidence(tiny_run, corpus_file, capsys):
    exact = evaluate_run(tiny_run, corpus_file, max_tokens=None)
    assert not exact["sampled"] and exact["tokens"] == exact["tokens_in_split"]
    estimate = evaluate_run(tiny_run, corpus_file, max_tokens=exact["tokens"] // 5, progress=True)
    assert estimate["sampled"] and exact["tokens"] // 5 <= estimate["tokens"] < exact["tokens"] // 4
    assert estimate["tokens_in_split"] == exact["tokens"]
    assert 0 < estimate["loss_ci95"] < 0.2 and 0 < estimate["bits_per_byte_ci95"]
    assert abs(estimate["loss"] - exact["loss"]) < 2 * estimate["loss_ci95"]
    assert "testing" in capsys.readouterr().err  # the progress bar
    assert estimate == evaluate_run(tiny_run, corpus_file, max_tokens=exact["tokens"] // 5)  # a seeded sample


def test_pairs_longer_than_the_context_are_said_and_counted_honestly(tmp_path, one_thread):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 40))) for _ in range(400)]
    data = tmp_path / "long.tsv"
    data.write_text("".join(f"{w}\t{w[::-1]}\n" for w in words), encoding="utf-8")
    messages = []
    model_config, train_config = tiny_configs("transformer", "char", data, epochs=0.5, eval_interval=1000,
                                              test_tokens=200, val_fraction=0.1, test_fraction=0.1)
    result = train(model_config, train_config, tmp_path / "run", progress=False, log=messages.append)
    n_train = 320
    assert result.steps == math.ceil(0.5 * n_train / train_config.batch_size)  # an epoch: one pass over the pairs
    warning = next(m for m in messages if m.startswith("warning: ") and "training pairs" in m)
    long_ones = sum(len(w) + 1 > model_config.max_seq_len for w in words)
    assert f"of {n_train} training pairs are longer than the context of 32 tokens" in warning
    assert "--max-seq-len 48 would fit them all whole" in warning and 0 < long_ones
    assert any(m.startswith("note: the final test scores a random sample of about 200") for m in messages)
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert test["sampled"] and test["pairs"] == 40 and 0 < test["pairs_cut"] < 40
    assert test["tokens_in_split"] < read_split_record(tmp_path / "run").tokens["test"] + 40
    said = next(m for m in messages if m.startswith("test: "))
    assert "random sample" in said and "target tokens beyond it are not scored" in said


def test_encoder_decoder_learns_to_reverse_strings(tmp_path):
    rng = random.Random(0)
    words = set()
    while len(words) < 1200:
        words.add("".join(rng.sample("abcdefgh", rng.randint(3, 5))))  # distinct letters, 3-5 long
    data = tmp_path / "reverse.tsv"
    data.write_text("".join(f"{w}\t{w[::-1]}\n" for w in sorted(words)), encoding="utf-8")
    model_config, train_config = tiny_configs(
        "transformer", "char", data, max_steps=250, learning_rate=3e-3, min_lr=3e-4, warmup_steps=20,
        batch_size=64, eval_interval=125, val_fraction=0.1, test_fraction=0.1)
    model_config = model_config.replace(d_model=64, n_heads=4, n_layers=2, max_seq_len=8)
    result = train(model_config, train_config, tmp_path / "run", progress=False, log=quiet)

    run = load_run(tmp_path / "run")
    record = read_split_record(tmp_path / "run")
    offsets = np.load(tmp_path / "run" / "test.offsets.npy")
    sources = read_stream(tmp_path / "run" / "test.src.bin", record.dtype)
    targets = read_stream(tmp_path / "run" / "test.tgt.bin", record.dtype)
    correct = 0
    n_test = offsets.shape[1] - 1
    for i in range(n_test):  # held-out pairs, greedy decoding
        source = torch.tensor(sources[offsets[0, i]:offsets[0, i + 1]].astype(np.int64))[None]
        out = Engine(run.model).generate(None, SamplingConfig(max_new_tokens=7, temperature=0), source_ids=source,
                                         eos_id=run.tokenizer.eos_id)
        out = out[0].tolist()
        out = out[:out.index(run.tokenizer.eos_id)] if run.tokenizer.eos_id in out else out
        correct += out == targets[offsets[1, i]:offsets[1, i + 1]].tolist()
    assert n_test == 120
    assert correct / n_test >= 0.9
    # The final test's exact match is this hand count (every test pair answered: fewer than --test-pairs).
    assert result.test_metrics["answers"] == n_test
    assert result.test_metrics["exact_match"] == pytest.approx(correct / n_test)


def reversal_file(path, n: int = 300):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) for _ in range(n)]
    path.write_text("".join(f"{w}\t{w[::-1]}\n" for w in words), encoding="utf-8")
    return path


def test_a_decoder_only_model_learns_pairs_with_the_loss_on_the_targets_by_default(tmp_path):
    """A pair file and a decoder-only model: the pairs task (source, "\\n", target, EOS; the loss on the target
    and EOS), said in the plan; scored on the targets; prompted with the source and the separator."""
    from minillm.data.prepare import sample_prompt
    from minillm.data.tasks import PairsTask

    data = reversal_file(tmp_path / "reverse.tsv")
    messages = []
    model_config, train_config = tiny_configs("decoder_only", "char", data, max_steps=40, eval_interval=20)
    assert train_config.task == "auto"
    result = train(model_config, train_config, tmp_path / "run", progress=False, log=messages.append)
    run = load_run(tmp_path / "run")
    record = read_split_record(tmp_path / "run")
    assert record.task == "pairs" and record.separator == run.tokenizer.encode("\n")
    assert any(m.startswith("data: task pairs: ") and "prompt tokens (sources and separators" in m for m in messages)
    assert result.best_val_loss < result.history[0]["val_loss"]  # it learns
    trainer = tiny_trainer(tmp_path / "run")
    assert isinstance(trainer.task, PairsTask) and not trainer.task.encoder_decoder
    assert set(trainer.train_data.sample(2, torch.Generator().manual_seed(0), CPU)) == {"input_ids", "targets"}
    # Scored: every test target and its EOS, no source token.
    offsets = np.load(tmp_path / "run" / "test.offsets.npy")
    assert result.test_metrics["tokens"] == int(offsets[1, -1]) + offsets.shape[1] - 1
    assert evaluate_run(tmp_path / "run")["loss"] == pytest.approx(result.test_metrics["loss"], rel=1e-6)
    on_file = evaluate_run(tmp_path / "run", data)  # another file, read for the run's task: its targets scored
    targets = [line.split("\t")[1] for line in data.read_text(encoding="utf-8").splitlines()]
    assert on_file["tokens"] == sum(len(target) + 1 for target in targets) and not on_file["sampled"]
    prompt = sample_prompt(tmp_path / "run", run.tokenizer, 16, encoder_decoder=False)
    sources = read_stream(tmp_path / "run" / "test.src.bin", record.dtype)
    assert prompt == run.tokenizer.decode(sources[offsets[0, 0]:offsets[0, 1]].tolist()) + "\n"


def test_the_text_task_keeps_a_pair_file_as_text_samples_and_pairs_need_a_pair_file(tmp_path, corpus_file):
    data = reversal_file(tmp_path / "reverse.tsv", 60)
    messages = []
    model_config, train_config = tiny_configs("decoder_only", "char", data, max_steps=2, eval_interval=2,
                                              task="text")
    train(model_config, train_config, tmp_path / "run", progress=False, log=messages.append)
    assert read_split_record(tmp_path / "run").task == "text"
    assert any('pairs, as text samples "source\\ntarget" (--task text)' in m for m in messages)
    # Each sample is BOS source \n target EOS, every token a target: the stream holds them all.
    tokens = read_split_record(tmp_path / "run").tokens
    lines = [line.replace("\t", "\n") for line in data.read_text(encoding="utf-8").splitlines()]
    assert sum(tokens.values()) == sum(len(line) + 2 for line in lines)
    _, pairs_on_text = tiny_configs("decoder_only", "char", corpus_file, task="pairs")
    with pytest.raises(MiniLLMError, match="--task pairs needs a file of"):
        train(model_config, pairs_on_text, tmp_path / "refused", progress=False, log=quiet)
    assert not (tmp_path / "refused").exists()


def test_validation_bits_per_byte_are_the_loss_over_every_validation_batchs_bytes(tmp_path, tiny_run):
    """Counted by hand: the target tokens (not padding) and the UTF-8 bytes they decode to, over all the
    validation windows that every evaluation scores (a Trainer with the run's settings draws the same ones)."""
    trainer = tiny_trainer(shutil.copytree(tiny_run, tmp_path / "run"))
    tokenizer = load_run(tiny_run).tokenizer
    targets = [batch["targets"] for batch, _ in trainer.eval_batches]
    assert len(targets) == trainer.config.eval_batches > 1
    tokens = sum(int((t != tokenizer.pad_id).sum()) for t in targets)
    n_bytes = sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for t in targets for row in t)
    evals = [row for row in read_metrics(tiny_run / "metrics.jsonl") if row["kind"] == "eval"]
    assert evals and 0.9 * tokens < n_bytes <= tokens  # (ASCII text: a byte per token but BOS and EOS)
    for row in evals:
        expected = row["val_loss"] * tokens / math.log(2) / n_bytes
        assert row["val_bits_per_byte"] == pytest.approx(expected, rel=1e-6), row["step"]


def test_learning_rate_warms_up_then_decays_to_min_lr():
    _, config = tiny_configs(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10)
    rates = [lr_at(step, config, max_steps=100) for step in range(100)]
    assert rates[0] == pytest.approx(1e-3 / 11)
    assert all(a < b for a, b in zip(rates[:10], rates[1:11], strict=True))  # warming up
    assert rates[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))  # cosine decay
    assert lr_at(100, config, max_steps=100) == pytest.approx(1e-4)


def test_overfitting_needs_rising_val_and_falling_train_loss():
    def history(val, train):
        pairs = enumerate(zip(val, train, strict=True))
        return [{"step": i, "val_loss": v, "train_loss": t} for i, (v, t) in pairs]

    assert is_overfitting(history([1.0, 1.1, 1.2, 1.3], [1.0, 0.9, 0.8, 0.7]))
    assert not is_overfitting(history([1.0, 1.1, 1.2], [1.0, 0.9, 0.8]))  # too few evaluations
    assert not is_overfitting(history([1.0, 1.1, 1.05, 1.3], [1.0, 0.9, 0.8, 0.7]))  # not rising each time
    assert not is_overfitting(history([1.0, 1.1, 1.2, 1.3], [1.0, 1.1, 1.2, 1.3]))  # train loss rising too


def test_a_time_budget_drives_the_schedule_and_evaluates_more_than_once(tmp_path, corpus_file):
    # Far more steps than the budget allows: the schedule must still warm up and decay within the budget.
    model_config, train_config = tiny_configs(data=corpus_file, max_steps=10**6, max_time=2.0,
                                              eval_interval=10**6, log_interval=1, warmup_steps=5)
    result = train(model_config, train_config, tmp_path / "run", progress=False, log=quiet)
    assert result.stop_reason == StopReason.MAX_TIME and result.steps < 10**6
    assert len(result.history) >= 3  # evaluated at fractions of the budget, not only at the end
    rows = [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if row["kind"] == "train"]
    peak, floor = train_config.learning_rate, train_config.min_lr
    assert max(row["lr"] for row in rows) > floor + 0.5 * (peak - floor)  # it warmed up
    assert rows[-1]["lr"] < floor + 0.1 * (peak - floor)  # and decayed by the end of the budget


def test_a_training_that_slows_down_says_the_cpu_may_be_shared(tmp_path, corpus_file, monkeypatch):
    def another_job_starts(row):  # from step 20 on, each log interval loses 0.2 s to "another process"
        if row["kind"] == "train" and row["step"] >= 20:
            time.sleep(0.2)

    def warnings(run: str) -> list[str]:
        messages = []
        model_config, train_config = tiny_configs(data=corpus_file, max_steps=30, log_interval=2, threads=1)
        threads = torch.get_num_threads()
        try:
            train(model_config, train_config, tmp_path / run, progress=False, log=messages.append,
                  on_metrics=another_job_starts)
            assert torch.get_num_threads() == 1  # --threads took effect
        finally:
            torch.set_num_threads(threads)
        return [m for m in messages if m.startswith("warning: training slowed")]

    assert warnings("short") == []  # a 30-step run slowed for a second: not worth a warning
    # A slowdown that lasts (here: a run whose "lasting" is shortened to half a second) is; with one thread
    # already, the advice is not fewer threads (tests/test_training_messages.py has the rules).
    monkeypatch.setattr(threads_module, "SLOW_SECONDS", 0.5)
    [warning] = warnings("lasting")
    assert "another process is probably using the CPU" in warning and "--threads" not in warning


# ---- the optimizer step --------------------------------------------------------------------------------


def tiny_trainer(run_dir, **overrides) -> Trainer:
    """A Trainer over a copy of the tiny run's prepared data (no dropout, so a forward pass is repeatable)."""
    model_config = read_model_config(run_dir / "best_model_config.json")[0].replace(dropout=0.0)
    config = read_train_config(run_dir).replace(**overrides)
    return Trainer(run_dir, model_config, config, read_split_record(run_dir), log=quiet, progress=False)


def ownership(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[tuple]:
    """Each optimizer's class and, per parameter group, the names of the parameters it steps and its decay."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [(type(optimizer), [(sorted(names[id(p)] for p in group["params"]), group["weight_decay"])
                               for group in optimizer.param_groups]) for optimizer in optimizers]


@pytest.mark.parametrize("optimizer, classes", [("adamw", [torch.optim.AdamW]),
                                                ("muon", [torch.optim.AdamW, torch.optim.Muon])])
def test_the_preview_times_the_optimizers_the_trainer_steps(tiny_run, tmp_path, optimizer, classes):
    from minillm.training.preview import timing_setup

    trainer = tiny_trainer(shutil.copytree(tiny_run, tmp_path / "run"), optimizer=optimizer)
    model, optimizers, _ = timing_setup(trainer.model_config, trainer.config, trainer.device, 8, 2)
    assert [type(o) for o in optimizers] == classes
    assert ownership(model, optimizers) == ownership(trainer.model, trainer.optimizers)
    owned = [name for _, groups in ownership(model, optimizers) for group, _ in groups for name in group]
    assert sorted(owned) == sorted(name for name, _ in model.named_parameters())  # each parameter once


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def grad_norm(grads: dict[str, torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()


def test_weight_decay_shrinks_matrices_but_not_norms(tmp_path, tiny_run):
    trainer = tiny_trainer(shutil.copytree(tiny_run, tmp_path / "run"), weight_decay=0.5, learning_rate=0.1)
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient: AdamW then only applies its decoupled decay
    trainer.optimizer.step()
    norms = [name for name, p in model.named_parameters() if p.dim() == 1]
    assert norms and all("norm" in name for name in norms)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, before[name]), f"{name} (a norm) must not be decayed"
        else:
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.5), msg=f"{name} must be decayed")


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_an_optimizer_step_uses_the_mean_gradient_of_the_accumulated_batches_clipped(tmp_path, tiny_run,
                                                                                    grad_clip):
    accum = 3
    trainer = tiny_trainer(shutil.copytree(tiny_run, tmp_path / "run"), grad_accum_steps=accum,
                           grad_clip=grad_clip)
    # The same micro-batches, drawn from a copy of the trainer's batch generator, by hand on a copy of the model.
    generator = torch.Generator().manual_seed(0)
    generator.set_state(trainer.batch_generator.get_state())
    reference = copy.deepcopy(trainer.model)
    losses = []
    for _ in range(accum):
        _, loss = reference(**trainer.train_data.sample(trainer.config.batch_size, generator, trainer.device))
        (loss / accum).backward()
        losses.append(loss.item())
    expected = gradients(reference)
    norm = grad_norm(expected)
    if grad_clip:
        assert norm > 2 * grad_clip, "the test must clip"
        expected = {name: g * grad_clip / (norm + 1e-6) for name, g in expected.items()}

    stepped_with = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):  # a spy: the real step runs
        stepped_with.append(gradients(trainer.model))
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    returned = trainer._train_step()
    assert returned.item() == pytest.approx(sum(losses) / accum, rel=1e-5)  # the mean loss, not the sum
    assert len(stepped_with) == 1
    for name, grad in stepped_with[0].items():
        torch.testing.assert_close(grad, expected[name], atol=1e-7, rtol=1e-4, msg=name)
    assert grad_norm(stepped_with[0]) == pytest.approx(grad_clip if grad_clip else norm, rel=1e-4)


def test_a_diverging_run_stops_with_a_clear_error(tmp_path, corpus_file):
    # An absurd learning rate (and no clipping) turns the weights into inf and the validation loss into NaN.
    with pytest.raises(MiniLLMError, match=r"training diverged at step 2 .*--learning-rate"):
        run_tiny(tmp_path / "run", corpus_file, learning_rate=1e8, min_lr=0.0, warmup_steps=0, grad_clip=0.0,
                 max_steps=10, eval_interval=2)
    assert not (tmp_path / "run" / "best_model.pt").exists()


def test_the_warmdown_schedule_is_constant_then_linear_to_the_floor():
    config = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, schedule="warmdown",
                         warmdown_fraction=0.5)
    rates = [lr_at(step, config, max_steps=110) for step in range(111)]
    assert rates[9] < rates[10] == pytest.approx(1e-3)  # warmed up
    assert all(rate == pytest.approx(1e-3) for rate in rates[10:60])  # constant for the first half
    assert rates[85] == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway down the line
    assert rates[110] == pytest.approx(1e-4)


def test_the_warmdown_schedule_with_the_default_fraction_never_rises_above_the_peak():
    """The default warmdown_fraction (0.3), where starting the decay at `fraction` instead of `1 - fraction`
    would differ (at 0.5 both agree): constant for the first 70% of the steps after warmup, then down."""
    config = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, schedule="warmdown")
    assert config.warmdown_fraction == 0.3
    rates = [lr_at(step, config, max_steps=110) for step in range(111)]
    assert max(rates) == pytest.approx(1e-3)
    assert all(rate == pytest.approx(1e-3) for rate in rates[10:81])  # constant until 70% of the 100 steps
    assert all(a > b for a, b in zip(rates[80:], rates[81:], strict=False))  # then falling at every step
    assert rates[95] == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway down the last 30 steps
    assert rates[110] == pytest.approx(1e-4)


@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
@pytest.mark.parametrize("tied", [True, False])
def test_muon_owns_the_hidden_matrices_and_adamw_everything_else(model_type, tied):
    """Tied or untied: Muon takes the 2-D weights inside the blocks, AdamW the embedding, the output head and
    the norms; every parameter is trained by exactly one optimizer. (The vocabulary, 37, is no other width of
    the model, so the vocabulary-sized matrices are the embedding and the head.)"""
    vocab = 37
    model = build_model(ModelConfig(model_type=model_type, vocab_size=vocab, d_model=16, n_layers=1, n_heads=2,
                                    max_seq_len=8, tie_embeddings=tied))
    params = {id(p): (name, p) for name, p in model.named_parameters()}
    vocabulary_sized = {i for i, (_, p) in params.items() if vocab in p.shape}
    assert len(vocabulary_sized) == (1 if tied else 2)

    def owned(optimizer):
        return [id(p) for group in optimizer.param_groups for p in group["params"]]

    adamw, muon = make_optimizers(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert type(muon).__name__ == "Muon"
    assert sorted(owned(adamw) + owned(muon)) == sorted(params)  # each parameter once
    hidden = {i for i, (_, p) in params.items() if p.dim() == 2 and i not in vocabulary_sized}
    assert set(owned(muon)) == hidden, sorted(params[i][0] for i in set(owned(muon)) ^ hidden)
    assert vocabulary_sized <= set(owned(adamw))
    [only] = make_optimizers(model, TrainConfig(optimizer="adamw"), torch.device("cpu"))
    assert sorted(owned(only)) == sorted(params)


def test_muon_trains_the_hidden_matrices_and_resumes_exactly(tmp_path, corpus_file):
    settings = dict(max_steps=30, eval_interval=10, log_interval=5, optimizer="muon", schedule="warmdown")
    straight = train(*tiny_configs(data=corpus_file, **settings), tmp_path / "straight", progress=False, log=quiet)
    assert straight.best_val_loss < straight.history[0]["val_loss"] + 1e-9
    trainer = Trainer(tmp_path / "straight", load_run(tmp_path / "straight").config,
                      tiny_configs(data=corpus_file, **settings)[1],
                      read_split_record(tmp_path / "straight"), log=quiet, progress=False)
    muon = trainer.optimizers[1]
    assert type(muon).__name__ == "Muon" and all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    embedding = trainer.model.embed_tokens.weight
    assert all(p is not embedding for g in muon.param_groups for p in g["params"])

    steps = iter(range(1, 1000))
    train(*tiny_configs(data=corpus_file, **settings), tmp_path / "stopped", progress=False, log=quiet,
          should_stop=lambda: next(steps) >= 17)
    resume(tmp_path / "stopped", progress=False, log=quiet)
    a, b = (load_torch(tmp_path / name / "last.pt") for name in ("straight", "stopped"))
    assert len(b["optimizers"]) == 1  # Muon's state is saved beside AdamW's
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name


def test_a_cpu_busy_at_the_start_leaves_its_cores_to_the_other_process(tmp_path, corpus_file):
    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("one core: there is nothing to leave")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # another job holding a core
    try:
        time.sleep(0.5)
        torch.set_num_threads(cores)
        messages = []
        train(*tiny_configs(data=corpus_file, max_steps=2, eval_interval=2), tmp_path / "run", progress=False,
              log=messages.append)
        note = [m for m in messages if m.startswith("note: other processes are keeping about")]
        assert len(note) == 1 and torch.get_num_threads() < cores, messages
    finally:
        busy.kill()
        busy.wait()
        torch.set_num_threads(1)  # (the one_thread fixture puts back the thread count it found)
    with_threads = tiny_configs(data=corpus_file, max_steps=2, eval_interval=2, threads=1)
    messages = []
    train(*with_threads, tmp_path / "chosen", progress=False, log=messages.append)
    assert not [m for m in messages if m.startswith("note: other processes")]  # --threads is the user's choice
