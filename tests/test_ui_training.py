"""The Train tab's handlers and the server's TrainingManager, called directly (no browser): the plan line,
one training at a time, Stop and Resume, live progress, and the form's errors."""

from __future__ import annotations

import threading

import pytest

from minillm.errors import MiniLLMError
from minillm.run_folder import BEST_MODEL_FILE, TOKENIZER_FILE, RunFolder
from minillm.training import train
from minillm.training.preview import preview_run
from minillm.ui import app, training
from minillm.ui.session import Session
from minillm.ui.training_manager import FAILED, FINISHED, RUNNING, STOPPED, TrainingManager

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN_IDS = ["train_tab", "train_file", "train_data_path", "train_tokenizer", "train_vocab_size", "train_model_type",
             "train_preset", "train_max_steps", "train_max_time", "train_out", "train_plan", "train_start",
             "train_stop", "train_resume", "train_status", "train_plot", "train_error"]
WAIT_S = 120


def form(data, out="run", preset="tiny", tokenizer="char", model_type="decoder_only", **changes):
    """The form's values in FORM order: the preset's, with `changes` (by elem_id without "train_")."""
    values = dict(zip(training.FORM[4:-1], training.preset_values(preset), strict=True))
    values.update({f"train_{k}": v for k, v in changes.items()})
    return [str(data), tokenizer, model_type, preset, *values.values(), out]


def shown(update) -> str:
    return update.get("value", "") if update.get("visible") else ""


def finish(manager):
    status = manager.wait(WAIT_S)
    assert status.ended, status
    return status


def test_the_page_has_the_train_tab_with_its_fixed_ids(tmp_path):
    config = app.build_demo(None, runs_dir=tmp_path).get_config_file()
    assert set(TRAIN_IDS) <= {c["props"].get("elem_id") for c in config["components"]}
    assert {"train_start", "train_stop", "train_resume", "train_status"} <= {
        d.get("api_name") for d in config["dependencies"]}


def test_the_plan_line_is_the_one_the_trainer_prints(corpus_file, tmp_path):
    model, config = training.form_configs(*form(corpus_file)[:-1])
    preview = preview_run(model, config)
    printed = []
    train(model, config, tmp_path / "run", progress=False, log=printed.append)
    # Character tokens of a small file are counted, not estimated: the model and plan lines are the CLI's.
    for prefix in ("model:", "plan:"):
        assert [line for line in preview.lines() if line.startswith(prefix)] == [
            line for line in printed if line.startswith(prefix)]
    assert preview.seconds > 0 and "estimated time: about" in preview.lines()[-1]
    plan, error = training.show_plan(str(tmp_path), *form(corpus_file, out="next"))
    assert "plan: 60 steps x 256 tokens" in plan and not shown(error)


@pytest.mark.parametrize("changes", [dict(grad_accum_steps=3), dict(grad_accum_steps=3, epochs=0.5)])
def test_the_plan_counts_every_accumulation_step_as_the_trainer_does(corpus_file, tmp_path, changes):
    model, config = training.form_configs(*form(corpus_file)[:-1])
    config = config.replace(**changes)
    plan = [line for line in preview_run(model, config).lines() if line.startswith("plan:")]
    printed = []
    train(model, config, tmp_path / "run", progress=False, log=printed.append, should_stop=lambda: True)
    assert plan == [line for line in printed if line.startswith("plan:")]
    assert f"x {3 * 8 * 32} tokens" in plan[0]  # 3 accumulation steps x batch 8 x context 32


def test_a_bpe_plan_says_its_tokens_are_estimated(corpus_file, tmp_path):
    plan, error = training.show_plan(str(tmp_path), *form(corpus_file, tokenizer="bpe", model_type="transformer"))
    assert "tokens per character" in plan and "transformer" in plan and not shown(error)


@pytest.mark.parametrize("content, changes, message", [
    ("", {}, "is empty"),
    (b"\x00\x01binary", {}, "looks binary"),
    (None, {"n_heads": 3}, "d_model (32) must be divisible by n_heads (3)"),
    (None, {"n_layers": 2.5}, "n_layers must be a whole number"),
])
def test_bad_input_shows_the_cli_message_and_starts_nothing(corpus_file, tmp_path, content, changes, message):
    data = corpus_file
    if content is not None:
        data = tmp_path / "data.txt"
        data.write_bytes(content if isinstance(content, bytes) else content.encode())
    manager = TrainingManager()
    values = form(data, **changes)
    plan, error = training.show_plan(str(tmp_path), *values)
    assert message in shown(error)
    error, _ = training.start_training(manager, Session(), str(tmp_path), *values)
    assert message in shown(error) and "Traceback" not in shown(error)
    assert manager.status() is None and not (tmp_path / "run").exists()


def test_a_run_folder_that_exists_is_refused(tiny_run, corpus_file):
    manager = TrainingManager()
    error, _ = training.start_training(manager, Session(), str(tiny_run.parent), *form(corpus_file, out=tiny_run.name))
    assert "already holds a run" in shown(error) and manager.status() is None


def test_one_training_at_a_time_and_every_tab_sees_it(tmp_path):
    manager, release = TrainingManager(), threading.Event()

    def work(job):  # a training that runs until released
        job.on_metrics({"kind": "train", "step": 5, "train_loss": 3.0, "lr": 1e-3, "tokens_per_s": 100.0,
                        "elapsed": 1.0})
        job.log("warning: overfitting: validation loss rose for 3 evaluations")
        release.wait(WAIT_S)
        raise MiniLLMError("the data went away")

    manager.start(tmp_path / "a", "tab-1", work, max_steps=100)
    with pytest.raises(MiniLLMError, match=r"already running on this server .*step 5 of 100, started by another"):
        manager.start(tmp_path / "b", "tab-2", work)
    # Another tab's Start shows the running one's progress; any tab's poll shows it.
    owner, other = Session(), Session()
    error, _ = training.start_training(manager, other, str(tmp_path), *form(tmp_path / "x.txt", out="b"))
    assert "data file not found" in shown(error)  # (the form is checked first)
    outputs = training.poll(manager, None, str(tmp_path), None)
    assert "**Training**" in outputs[0] and "5 / 100" in outputs[0]
    assert outputs[1]["caption"] == "1 train and 0 validation points"
    assert outputs[5]["interactive"] and not outputs[4]["interactive"]  # Stop on, Start off
    assert "overfitting: validation loss rose" in shown(outputs[3])  # the trainer's warning, in the page
    # Nothing changed: the next tick sends nothing.
    assert all(update == {"__type__": "update"} for update in training.poll(manager, outputs[-1], str(tmp_path),
                                                                             None)[:-1])
    release.set()
    status = finish(manager)
    assert status.state == FAILED and status.error == "the data went away"
    outputs = training.poll(manager, outputs[-1], str(tmp_path), None)
    assert shown(outputs[2]) == "**Error:** the data went away" and outputs[4]["interactive"]
    manager.start(tmp_path / "b", owner.id, lambda job: release.wait(0))  # free again (it fails at once)
    assert finish(manager).run_dir == tmp_path / "b"


def test_stop_saves_the_run_and_resume_finishes_it(corpus_file, tiny_run, tmp_path):
    manager, session = TrainingManager(), Session()
    values = form(corpus_file, max_steps=5000)
    error, status = training.start_training(manager, session, str(tmp_path), *values)
    assert not shown(error) and "**Training**" in status
    job = manager._job
    for _ in range(WAIT_S * 10):  # until it has trained a little
        if job.status().rows:
            break
        job.thread.join(0.1)
    assert manager.status().state == RUNNING
    # Another tab generates meanwhile: the training holds no lock the generation needs.
    other = Session()
    app.load_model(other, str(tiny_run / BEST_MODEL_FILE), str(tiny_run / TOKENIZER_FILE))
    *_, (output, stats, error, _) = list(app.generate(other, "the", "", 10, 1.0, 0, 1.0, 1.0, 1))
    assert "Generated" in stats and not shown(error)
    assert "stopping" in training.stop_training(manager)
    status = finish(manager)
    folder = RunFolder(tmp_path / "run")
    assert status.state == STOPPED and status.result["stop_reason"] == "stopped"
    stopped_at = status.result["steps"]
    assert 0 < stopped_at < 5000 and folder.last_checkpoint.is_file() and folder.has_best_model()
    assert status.rows[-1]["kind"] == "eval" and status.rows[-1]["step"] == stopped_at  # evaluated at the stop
    text = training.status_markdown(status)
    assert "**Stopped**" in text and "Resume" in text

    # Resume, to a few more steps: it goes on from the stop, its curve keeps the rows before it.
    values = form(corpus_file, max_steps=stopped_at + 10)
    error, _ = training.resume_training(manager, session, str(tmp_path), *values)
    assert not shown(error)
    status = finish(manager)
    assert status.state == FINISHED and status.result["steps"] == stopped_at + 10, status.error
    steps = [row["step"] for row in status.rows if row["kind"] == "train"]
    assert steps == sorted(steps) and steps[0] < stopped_at < steps[-1]
    assert "**Finished**" in training.status_markdown(status)
    outputs = training.poll(manager, None, str(tmp_path), None)
    assert str(folder.path) in outputs[8]["choices"]  # in the run picker
    picked = training.pick_trained_run(manager, str(tmp_path))
    assert picked[0]["value"] == str(folder.path) and picked[1] == str(folder.best_model)


def test_resume_without_a_checkpoint_says_so(corpus_file, tmp_path):
    error, _ = training.resume_training(TrainingManager(), Session(), str(tmp_path), *form(corpus_file))
    assert "nothing to resume" in shown(error)


def test_a_loaded_run_shows_its_test_metrics_and_loss_curve(tiny_run):
    from minillm.ui import loading

    info = loading.load_model(Session(), str(tiny_run / BEST_MODEL_FILE), str(tiny_run / TOKENIZER_FILE))[0]
    assert "| Test loss |" in info and "bits per byte" in info
    curve = loading.run_curve(str(tiny_run / BEST_MODEL_FILE))
    assert curve["visible"] is True and curve["value"] == str(RunFolder(tiny_run).loss_curve)
    assert loading.run_curve("/no/such/best_model.pt")["visible"] == loading.HIDDEN


def test_the_plan_leaves_the_random_generators_alone(corpus_file):
    """A training may be running in another thread: timing the steps must not draw from its generators."""
    import torch

    model, config = training.form_configs(*form(corpus_file, d_model=48, n_heads=4)[:-1])
    before = torch.get_rng_state()
    preview = preview_run(model, config)
    assert torch.equal(before, torch.get_rng_state()) and preview.seconds_per_step > 0
