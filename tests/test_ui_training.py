"""The Train tab's handlers and the server's TrainingManager, called directly (no browser): the plan line,
one training at a time, Stop and Resume, live progress, and the form's errors."""

from __future__ import annotations

import errno
import html
import threading

import gradio as gr
import pytest

from minillm.errors import MiniLLMError, describe_error
from minillm.run_folder import BEST_MODEL_FILE, TOKENIZER_FILE, RunFolder
from minillm.serve.training_manager import FAILED, FINISHED, RUNNING, STOPPED, TrainingManager
from minillm.training import train
from minillm.training.preview import preview_run
from minillm.ui import app, generate_tab, train_tab, train_view

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN_IDS = ["train_tab", "train_file", "train_data_path", "train_tokenizer", "train_vocab_size", "train_model_type",
             "train_preset", "train_max_steps", "train_max_time", "train_out", "train_plan", "train_start",
             "train_stop", "train_resume", "train_status", "train_plot", "train_error"]
WAIT_S = 120


def form(data, out="run", preset="tiny", tokenizer="char", model_type="decoder_only", upload=None, **changes):
    """The form's values in FORM order: the preset's, with `changes` (by elem_id without "train_")."""
    values = dict(zip(train_tab.PRESET_FIELDS, train_tab.preset_values(preset), strict=True))
    values.update({f"train_{k}": v for k, v in changes.items()})
    return [upload, str(data), tokenizer, model_type, preset, *values.values(), out]


def shown(update) -> str:
    return update.get("value", "") if update and update.get("visible") else ""


class FakeRequest:
    """What Gradio passes a handler that asks for a gr.Request: the client's session hash."""

    def __init__(self, session_hash):
        self.session_hash = session_hash


POLLED = ["train_status", "train_plot", "train_error", "train_warning", "train_start", "train_stop", "train_resume",
          "train_load", "seen"]


class TrainPage:
    """A page on a training manager, its Train tab's handlers called as Gradio would, outputs by name. It may
    train on the files under `data_dirs` (by default the tests' temporary folders: see allow_test_files)."""

    data_dirs: tuple = ()

    def __init__(self, runs_dir, manager=None, data_dirs=None):
        self.page = app.build_page(runs_dir=runs_dir, trainings=manager or TrainingManager(),
                                   data_dirs=self.data_dirs if data_dirs is None else data_dirs)
        self.tab, self.manager = self.page.train, self.page.trainings

    def named(self, update):
        if update == gr.skip():
            return {}
        components = {getattr(self.tab, name): name for name in POLLED + ["train_plan"]}
        components[self.page.generate.run_picker] = "run_picker"
        return {components[component]: value for component, value in update.items()}

    def show_plan(self, values):
        return self.named(self.tab.show_plan(*values))

    def start(self, values, client="tab-1"):
        return self.named(self.tab.start_training(*values, request=FakeRequest(client)))

    def resume(self, values, client="tab-1"):
        return self.named(self.tab.resume_training(*values, request=FakeRequest(client)))

    def poll(self, seen=None, picked=None):
        return self.named(self.tab.poll(seen, picked))


@pytest.fixture(autouse=True)
def allow_test_files(tmp_path_factory, monkeypatch):
    """The pages of these tests may train on the tests' files (as `minillm ui --data-dir BASETEMP` would)."""
    monkeypatch.setattr(TrainPage, "data_dirs", (tmp_path_factory.getbasetemp(),))


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
    model, config = train_tab.form_configs(*form(corpus_file)[1:-1])
    assert config.sample_interval == 0  # (no samples from the page: it shows none)
    preview = preview_run(model, config)
    printed = []
    train(model, config, tmp_path / "run", progress=False, log=printed.append)
    # Character tokens of a small file are counted, not estimated: the model and plan lines are the CLI's.
    for prefix in ("model:", "plan:"):
        assert [line for line in preview.lines() if line.startswith(prefix)] == [
            line for line in printed if line.startswith(prefix)]
    assert preview.seconds > 0 and "estimated time: about" in preview.lines()[-1]
    out = TrainPage(tmp_path).show_plan(form(corpus_file, out="next"))
    assert "plan: 60 steps x 256 tokens" in out["train_plan"] and not shown(out["train_error"])
    assert f"Run folder `{tmp_path / 'next'}`" in out["train_plan"]


@pytest.mark.parametrize("changes", [dict(grad_accum_steps=3), dict(grad_accum_steps=3, epochs=0.5)])
def test_the_plan_counts_every_accumulation_step_as_the_trainer_does(corpus_file, tmp_path, changes):
    model, config = train_tab.form_configs(*form(corpus_file)[1:-1])
    config = config.replace(**changes)
    plan = [line for line in preview_run(model, config).lines() if line.startswith("plan:")]
    printed = []
    train(model, config, tmp_path / "run", progress=False, log=printed.append, should_stop=lambda: True)
    assert plan == [line for line in printed if line.startswith("plan:")]
    assert f"x {3 * 8 * 32} tokens" in plan[0]  # 3 accumulation steps x batch 8 x context 32


def test_a_bpe_plan_says_its_tokens_are_estimated(corpus_file, tmp_path):
    out = TrainPage(tmp_path).show_plan(form(corpus_file, tokenizer="bpe", model_type="transformer"))
    assert "tokens per character" in out["train_plan"] and "transformer" in out["train_plan"]
    assert not shown(out["train_error"])


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
    page = TrainPage(tmp_path)
    values = form(data, **changes)
    assert message in shown(page.show_plan(values)["train_error"])
    out = page.start(values)
    assert message in shown(out["train_error"]) and "Traceback" not in shown(out["train_error"])
    assert "train_status" not in out and page.manager.status() is None and not (tmp_path / "run").exists()


def test_a_run_folder_that_exists_is_refused(tiny_run, corpus_file):
    page = TrainPage(tiny_run.parent)
    out = page.start(form(corpus_file, out=tiny_run.name))
    assert "already holds a run" in shown(out["train_error"]) and page.manager.status() is None


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
    # Another tab's Start shows the running one's progress; any tab's poll shows it. Two pages (two servers'
    # worth of handlers) on one manager see the same training.
    page, other_page = TrainPage(tmp_path, manager), TrainPage(tmp_path, manager)
    out = page.start(form(tmp_path / "x.txt", out="b"), client="tab-2")
    assert "data file not found" in shown(out["train_error"])  # (the form is checked first)
    for polled in (page.poll(), other_page.poll()):
        assert "**Training**" in polled["train_status"] and "5 / 100" in polled["train_status"]
        assert "1 train and 0 validation points" in polled["train_plot"]
        assert polled["train_stop"]["interactive"] and not polled["train_start"]["interactive"]  # Stop on, Start off
        assert "overfitting: validation loss rose" in shown(polled["train_warning"])  # the trainer's, in the page
    outputs = page.poll()
    # Nothing changed: the next tick sends nothing.
    assert page.poll(outputs["seen"]) == {}
    release.set()
    status = finish(manager)
    assert status.state == FAILED and status.error == "the data went away"
    outputs = page.poll(outputs["seen"])
    assert shown(outputs["train_error"]) == "**Error:** the data went away" and outputs["train_start"]["interactive"]
    manager.start(tmp_path / "b", "tab-1", lambda job: release.wait(0))  # free again (it fails at once)
    assert finish(manager).run_dir == tmp_path / "b"


def test_stop_saves_the_run_and_resume_finishes_it(corpus_file, tiny_run, tmp_path):
    page = TrainPage(tmp_path)
    manager = page.manager
    values = form(corpus_file, max_steps=5000)
    out = page.start(values)
    assert not shown(out["train_error"]) and "**Training**" in out["train_status"]
    job = manager._job
    for _ in range(WAIT_S * 10):  # until it has trained a little
        if job.status().rows:
            break
        job.thread.join(0.1)
    assert manager.status().state == RUNNING and manager.status().owner == "tab-1"
    # Another tab generates meanwhile: the training holds no lock the generation needs.
    generate, other = page.page.generate, FakeRequest("tab-2")
    generate.load_model(str(tiny_run / BEST_MODEL_FILE), str(tiny_run / TOKENIZER_FILE), other)
    *_, last = generate.generate("the", "", 10, 1.0, 0, 1.0, 1.0, 1, other)
    assert "Generated" in last[generate.stats] and generate.error not in last
    assert "stopping" in page.tab.stop_training()
    status = finish(manager)
    folder = RunFolder(tmp_path / "run")
    assert status.state == STOPPED and status.result["stop_reason"] == "stopped"
    stopped_at = status.result["steps"]
    assert 0 < stopped_at < 5000 and folder.last_checkpoint.is_file() and folder.has_best_model()
    assert status.rows[-1]["kind"] == "eval" and status.rows[-1]["step"] == stopped_at  # evaluated at the stop
    text = train_view.status_markdown(status)
    assert "**Stopped**" in text and "Resume" in text

    # Resume, to a few more steps: it goes on from the stop, its curve keeps the rows before it.
    out = page.resume(form(corpus_file, max_steps=stopped_at + 10))
    assert not shown(out["train_error"])
    status = finish(manager)
    assert status.state == FINISHED and status.result["steps"] == stopped_at + 10, status.error
    steps = [row["step"] for row in status.rows if row["kind"] == "train"]
    assert steps == sorted(steps) and steps[0] < stopped_at < steps[-1]
    assert "**Finished**" in train_view.status_markdown(status)
    assert str(folder.path) in page.poll()["run_picker"]["choices"]  # in the run picker
    picked = page.tab.pick_trained_run()
    assert picked[generate.run_picker]["value"] == str(folder.path)
    assert picked[generate.model_path] == str(folder.best_model)


def settings_shown(page) -> dict:
    """What a page opening now shows in its form, by field id."""
    update = page.tab.show_last_settings()
    return {} if update == gr.skip() else {component.elem_id: value for component, value in update.items()}


def test_a_page_opened_later_shows_the_runs_own_settings_and_its_whole_curve(corpus_file, tmp_path):
    page = TrainPage(tmp_path)
    assert settings_shown(page) == {}  # nothing trained yet: the defaults stay
    out = page.start(form(corpus_file, out="mine", max_steps=40, learning_rate=0.002, max_time=""))
    assert not shown(out["train_error"])
    status = finish(page.manager)
    later = TrainPage(tmp_path, page.manager)  # another page of the server (a reload is the same)
    settings = settings_shown(later)
    assert (settings["train_out"], settings["train_preset"], settings["train_tokenizer"]) == ("mine", "tiny", "char")
    assert (settings["train_max_steps"], settings["train_learning_rate"]) == (40, 0.002)
    assert settings["train_data_path"] == str(corpus_file)
    # Its first poll draws the run's whole curve, from the job's rows: 8 train points, 2 validation points,
    # both lines named in the legend.
    curve = later.poll()["train_plot"]
    assert "8 train and 2 validation points" in curve and "<svg" in curve
    assert ">train loss<" in curve and ">val loss<" in curve
    assert later.poll(later.poll()["seen"]) == {}  # drawn once: the next tick sends nothing
    # Resumed to more steps, a page shows the limits Resume used and the run's own model, whatever its form.
    out = page.resume(form(corpus_file, out="mine", max_steps=50, d_model=64, max_time="30"))
    assert not shown(out["train_error"]) and finish(page.manager).result["steps"] == 50
    settings = settings_shown(TrainPage(tmp_path, page.manager))
    assert (settings["train_max_steps"], settings["train_max_time"], settings["train_d_model"]) == (50, "30", 32)
    assert status.run_dir == tmp_path / "mine"


def test_the_warnings_shown_still_hold_and_name_the_forms_fields(tmp_path):
    manager, release, finish_now = TrainingManager(), threading.Event(), threading.Event()

    def evaluation(step, best_step, overfitting):
        return {"kind": "eval", "step": step, "val_loss": 2.0, "train_loss": 1.0, "best_val_loss": 1.9,
                "best_step": best_step, "overfitting": overfitting}

    def work(job):  # the trainer's warnings, worded as it words them, and its evaluations
        job.log("warning: training slowed to 4,288 tokens/s from 61,299 early on and has stayed that slow for "
                "20 s: another process is probably using the CPU (stop it, or train with fewer threads, which "
                "suffer less from sharing: --threads 1; now 2)")
        job.on_metrics(evaluation(200, 100, False))
        job.log("warning: overfitting: validation loss rose for 3 evaluations while training loss fell; the model "
                "(30,000 parameters) is memorising its 14,651 training tokens. What usually helps: a smaller model "
                "(--d-model, --n-layers), dropout (--dropout 0.1-0.3), or more data. Early stopping keeps the best "
                "model (step 100, val loss 1.9000).")
        job.on_metrics(evaluation(300, 100, True))
        release.wait(WAIT_S)
        job.on_metrics(evaluation(400, 400, True))  # a better model after all: the warning no longer holds
        finish_now.wait(WAIT_S)

    manager.start(tmp_path / "a", "tab-1", work, max_steps=1000)
    page = TrainPage(tmp_path, manager)
    for _ in range(WAIT_S * 10):
        if len(manager.status().rows) == 2:
            break
        threading.Event().wait(0.1)
    warning = shown(page.poll()["train_warning"])
    assert "another process is probably using the CPU" in warning and "threads" not in warning
    assert ("a smaller model (**Width (d_model)**, **Layers**), dropout (**Dropout** 0.1-0.3), or more data. "
            "Early stopping keeps the best model (step 100, val loss 1.9000)") in warning
    assert "--" not in warning
    release.set()
    for _ in range(WAIT_S * 10):
        if len(manager.status().rows) == 3:
            break
        threading.Event().wait(0.1)
    warning = shown(page.poll()["train_warning"])
    assert "overfitting" not in warning and "another process" in warning
    finish_now.set()
    finish(manager)


@pytest.mark.parametrize("name, message", [
    ("run\x00one", "the run folder name contains a control character (\\x00); type it again without it"),
    ("two\nlines", "contains a control character (\\n)"),
    ("x" * 256, "the run folder name is 256 bytes long; a folder name takes at most 255"),
])
def test_a_run_name_no_folder_can_have_is_one_clear_line(corpus_file, tmp_path, name, message):
    page = TrainPage(tmp_path)
    for out in (page.show_plan(form(corpus_file, out=name)), page.start(form(corpus_file, out=name)),
                page.resume(form(corpus_file, out=name))):
        assert message in shown(out["train_error"])
    assert page.manager.status() is None


def test_resume_without_a_checkpoint_says_so(corpus_file, tmp_path):
    out = TrainPage(tmp_path).resume(form(corpus_file))
    assert "nothing to resume" in shown(out["train_error"])


def test_a_loaded_run_shows_its_test_metrics_and_loss_curve(tiny_run):
    generate = app.build_page(runs_dir=tiny_run.parent).generate
    info = generate.load_model(str(tiny_run / BEST_MODEL_FILE), str(tiny_run / TOKENIZER_FILE))[generate.model_info]
    assert "| Test loss |" in info and "bits per byte" in info
    curve = generate.run_curve(str(tiny_run / BEST_MODEL_FILE))
    assert curve["visible"] is True and curve["value"] == str(RunFolder(tiny_run).loss_curve)
    assert generate.run_curve("/no/such/best_model.pt")["visible"] == generate_tab.HIDDEN


def test_the_plan_leaves_the_random_generators_alone(corpus_file):
    """A training may be running in another thread: timing the steps must not draw from its generators."""
    import torch

    model, config = train_tab.form_configs(*form(corpus_file, d_model=48, n_heads=4)[1:-1])
    before = torch.get_rng_state()
    preview = preview_run(model, config)
    assert torch.equal(before, torch.get_rng_state()) and preview.seconds_per_step > 0


@pytest.mark.parametrize("error, expected", [
    (MiniLLMError("the data\n  went away"), "the data went away"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/a/train.bin"),
     "No space left on device: /runs/a/train.bin; free some space or use a folder on another disk"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "out of memory (RuntimeError); use a smaller"),
    (ValueError("a bug\n  File 'x.py'"), "unexpected ValueError: a bug (details are in the server log)"),
])
def test_a_failure_is_the_same_one_line_in_the_cli_the_page_and_a_background_training(
        tmp_path, monkeypatch, capsys, error, expected):
    import minillm.cli

    line = describe_error(error)
    assert line.startswith(expected) and "\n" not in line
    manager = TrainingManager()

    def failing(job):
        raise error

    manager.start(tmp_path / "a", "tab-1", failing)
    assert finish(manager).error == line
    assert shown(TrainPage(tmp_path, manager).poll()["train_error"]) == f"**Error:** {html.escape(line, quote=False)}"
    monkeypatch.setattr(minillm.cli, "cmd_evaluate", lambda args: failing(None))
    if isinstance(error, ValueError):  # a bug: the CLI keeps its traceback
        with pytest.raises(ValueError):
            minillm.cli.main(["evaluate", str(tmp_path)])
        return
    assert minillm.cli.main(["evaluate", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {line}\n"


def test_start_from_a_run_trains_from_its_weights_and_a_missing_folder_is_one_error(tiny_run, corpus_file, tmp_path):
    """"Start from": the runs of the runs folder are offered; a run started from one has its shape and its
    weights (the form's width is ignored); a folder that does not exist is the CLI's error, and starts nothing."""
    import json
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_run, source)
    page = TrainPage(tmp_path)
    assert page.tab.train_init_from.value == train_tab.FROM_NOTHING
    assert str(source) in page.tab.start_choices(train_tab.FROM_NOTHING)["choices"]
    out = page.start([*form(corpus_file, out="missing", max_steps=5), str(tmp_path / "nowhere")])
    assert "no such folder" in shown(out["train_error"]) and page.manager.status() is None
    assert not (tmp_path / "missing").exists()
    values = [*form(corpus_file, out="tuned", d_model=64, max_steps=5), str(source)]
    assert "d_model 32" in page.show_plan(values)["train_plan"]  # the source's shape, not the form's 64
    out = page.start(values)
    assert not shown(out["train_error"])
    status = finish(page.manager)
    assert status.state == FINISHED, status.error
    assert any(line.startswith(f"starting from the run {source}") for line in status.log)
    record = json.loads(RunFolder(tmp_path / "tuned").best_config.read_text())["init_from"]
    assert (record["kind"], record["path"]) == ("run", str(source.resolve()))
