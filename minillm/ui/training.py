"""Train-tab handlers: the form into configs (the CLI's presets and checks), the plan line, Start, Stop,
Resume, and the live progress read from the server's TrainingManager by a timer in every tab."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from minillm.config import PRESETS, ModelConfig, TrainConfig, preset_configs
from minillm.data.prepare import bundled_data_path
from minillm.errors import MiniLLMError
from minillm.run_folder import RunFolder, default_run_name
from minillm.training import check_resumable, resume, train
from minillm.training.preview import describe_seconds, preview_run
from minillm.ui.loading import run_choices, run_paths
from minillm.ui.session import Session, error_box, no_error, warning_box
from minillm.ui.training_manager import FAILED, RUNNING, STOPPED, STOPPING, TrainingManager, TrainingStatus

POLL_INTERVAL_S = 1.0  # how often each tab reads the training's progress
CURVE_COLUMNS = ["step", "loss", "curve"]
# The form fields after the data path, in the order the handlers take them (name, ModelConfig or TrainConfig
# field, or None for the form's own); the preset fills the config fields.
MODEL_FIELDS = {"train_d_model": "d_model", "train_n_layers": "n_layers", "train_n_heads": "n_heads",
                "train_context": "max_seq_len", "train_dropout": "dropout"}
TRAIN_FIELDS = {"train_vocab_size": "bpe_vocab_size", "train_batch_size": "batch_size",
                "train_learning_rate": "learning_rate", "train_max_steps": "max_steps", "train_max_time": "max_time"}
FORM = ["train_data_path", "train_tokenizer", "train_model_type", "train_preset", *MODEL_FIELDS, *TRAIN_FIELDS,
        "train_out"]
START_LABEL, RESUME_LABEL = "Start training", "Resume"


def _number(name: str, value: Any) -> Any:
    """A form number as the config wants it: a whole number as int; a blank max_time means no budget."""
    if isinstance(value, str):
        value = value.strip()
        if not value or value.lower() == "none":
            return None
        try:
            value = float(value)
        except ValueError:
            raise MiniLLMError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, float) and value.is_integer() and name != "max_time":
        return int(value)
    return value


def form_configs(data_path: str, tokenizer: str, model_type: str, preset: str,
                 *values: Any) -> tuple[ModelConfig, TrainConfig]:
    """The configs the form describes: the preset, with the form's values on top (checked as the CLI's are)."""
    model_values, train_values = values[:len(MODEL_FIELDS)], values[len(MODEL_FIELDS):]
    model = {key: _number(key, v) for key, v in zip(MODEL_FIELDS.values(), model_values, strict=True)}
    trained = {key: _number(key, v) for key, v in zip(TRAIN_FIELDS.values(), train_values, strict=True)}
    model = {k: v for k, v in model.items() if v is not None}
    data = (data_path or "").strip() or None
    return preset_configs(preset, {**model, "model_type": model_type},
                          {**trained, "tokenizer": tokenizer, "data": data})


def run_folder(runs_dir: str, name: str, config: TrainConfig, model_type: str) -> Path:
    """The run's folder: the form's name (blank: DATA-MODEL-TOKENIZER) inside the runs folder."""
    name = (name or "").strip() or default_run_name(config.data, model_type, config.tokenizer)
    if Path(name).name != name or name in (".", ".."):
        raise MiniLLMError(f"the run folder name must be a plain folder name (it goes into {runs_dir}/), got "
                           f"{name!r}")
    return Path(runs_dir) / name


def preset_values(preset: str) -> list[Any]:
    """The preset's values for the form's config fields (model fields, then training fields)."""
    model, config = preset_configs(preset)
    return ([getattr(model, key) for key in MODEL_FIELDS.values()]
            + [getattr(config, key) if key != "max_time" else _blank(config.max_time) for key in TRAIN_FIELDS.values()])


def _blank(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def pick_preset(preset: str):
    """Preset changed: its values fill the form (still changeable)."""
    return tuple(preset_values(preset))


def use_upload(path: str | None):
    """A file was uploaded: it becomes the data path (cleared upload: back to Tiny Shakespeare)."""
    return str(path) if path else str(bundled_data_path())


def show_plan(runs_dir: str, *form: Any):
    """The plan line under the form (the CLI's), or the form's error. Outputs: train_plan, train_error."""
    try:
        *config_form, name = form
        model, config = form_configs(*config_form)
        folder = run_folder(runs_dir, name, config, model.model_type)
        lines = preview_run(model, config).lines()
    except Exception as e:
        return gr.update(value=""), error_box(e)
    return f"Run folder `{html.escape(str(folder))}`\n\n```text\n" + "\n".join(lines) + "\n```", no_error()


def start_training(manager: TrainingManager, session: Session, runs_dir: str, *form: Any,
                   request: gr.Request | None = None):
    """Start: everything `train` checks first is checked here, so a bad form starts nothing; then the
    training runs in the background. Outputs: train_error, train_status."""
    session.bind(request)
    try:
        *config_form, name = form
        model, config = form_configs(*config_form)
        folder = run_folder(runs_dir, name, config, model.model_type)
        RunFolder(folder).check_new_run(overwrite=False)
        preview_run(model, config)  # the data, the device, the memory, as `train` checks them

        def work(job):
            return train(model, config, folder, progress=False, log=job.log, on_metrics=job.on_metrics,
                         should_stop=job.should_stop)

        manager.start(folder, session.id, work, config.max_steps if config.epochs is None else None,
                      config.max_time)
    except Exception as e:
        return error_box(e), gr.update()
    return no_error(), status_markdown(manager.status())


def resume_training(manager: TrainingManager, session: Session, runs_dir: str, *form: Any,
                    request: gr.Request | None = None):
    """Resume the stopped run of the form's folder, to the form's max steps and time budget.
    Outputs: train_error, train_status."""
    session.bind(request)
    try:
        *config_form, name = form
        model, config = form_configs(*config_form)
        folder = run_folder(runs_dir, name, config, model.model_type)
        last = manager.status()
        if last is not None and last.state == STOPPED and not (name or "").strip():
            folder = last.run_dir  # the run just stopped (the form's blank name may mean another)
        check_resumable(folder)
        overrides = {"max_steps": config.max_steps, "max_time": config.max_time}

        def work(job):
            return resume(folder, overrides, progress=False, log=job.log, on_metrics=job.on_metrics,
                          should_stop=job.should_stop)

        manager.start(folder, session.id, work, config.max_steps, config.max_time, resumed=True)
    except Exception as e:
        return error_box(e), gr.update()
    return no_error(), status_markdown(manager.status())


def stop_training(manager: TrainingManager):
    """Stop: the trainer's stop hook (it evaluates, saves and ends). Output: train_status."""
    manager.stop()
    return status_markdown(manager.status())


def _figure(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def status_markdown(status: TrainingStatus | None) -> str:
    """The progress table (step, losses, learning rate, tokens/s, elapsed, ETA) and what the run said last."""
    if status is None:
        return "No training yet: fill in the form and press **Start training**."
    train_row, eval_row = status.latest("train"), status.latest("eval")
    of = f" / {status.max_steps:,}" if status.max_steps else ""
    eta = status.eta()
    best = (f" (best {_figure(eval_row.get('best_val_loss'))} at step {eval_row.get('best_step')})"
            if eval_row else "")
    lr = f"{train_row['lr']:.2e}" if train_row.get("lr") is not None else "–"
    speed = f"{train_row['tokens_per_s']:,.0f}" if train_row.get("tokens_per_s") is not None else "–"
    table = ("| Step | Train loss | Validation loss | Learning rate | Tokens/s | Elapsed | ETA |\n"
             "|---|---|---|---|---|---|---|\n"
             f"| {status.step:,}{of} | {_figure(train_row.get('train_loss'))} | "
             f"{_figure(eval_row.get('val_loss'))}{best} | {lr} | {speed} | "
             f"{describe_seconds(status.elapsed)} | {describe_seconds(eta) if eta is not None else '–'} |")
    folder = f"`{html.escape(str(status.run_dir))}`"
    if status.state in (RUNNING, STOPPING):
        doing = "stopping: evaluating and saving" if status.state == STOPPING else (
            "training" if status.rows else "preparing the data and the model")
        head = f"**Training** {folder}: {doing}"
    elif status.state == FAILED:
        head = f"**Failed** {folder}: {html.escape(status.error)}"
    else:
        r = status.result
        test = (f"; test loss {_figure(r.get('loss'))}, perplexity {_figure(r.get('perplexity'), 2)}, "
                f"{_figure(r.get('bits_per_byte'), 3)} bits per byte" if r.get("loss") is not None else "")
        saved = (f"**Stopped** at step {r['steps']:,}: saved (best model and last.pt); **Resume** continues it"
                 if status.state == STOPPED else f"**Finished** ({r['stop_reason']}) after {r['steps']:,} steps")
        head = (f"{saved}. {folder}: best validation loss {_figure(r['best_val_loss'])} at step {r['best_step']:,}"
                f"{test}. It is in the Generate tab's run picker.")
    last = next((line for line in reversed(status.log) if not line.startswith("warning:")), "")
    return f"{head}\n\n{table}" + (f"\n\n`{html.escape(last)}`" if last else "")


def curve_frame(status: TrainingStatus | None) -> pd.DataFrame:
    """Train and validation loss against steps, as the loss curve plots them."""
    points = []
    for row in status.rows if status else []:
        key, curve = ("train_loss", "train") if row.get("kind") == "train" else ("val_loss", "validation")
        if row.get("kind") in ("train", "eval") and isinstance(row.get(key), (int, float)):
            points.append((row["step"], row[key], curve))
    return pd.DataFrame(points, columns=CURVE_COLUMNS)


def curve_caption(frame: pd.DataFrame) -> str:
    counts = frame["curve"].value_counts()
    return f"{counts.get('train', 0)} train and {counts.get('validation', 0)} validation points"


def poll(manager: TrainingManager, seen: tuple, runs_dir: str, picked: str | None):
    """A tick of this tab's timer: what changed in the training since the tab last looked.

    Outputs: train_status, train_plot, train_error, train_warning, train_start, train_stop, train_resume,
    train_load, run_picker, seen."""
    status = manager.status()
    key = (status.started, status.state, len(status.rows), len(status.log)) if status else None
    if key == seen:
        return (gr.update(),) * 9 + (seen,)
    running = status is not None and not status.ended
    frame = curve_frame(status)
    plot = gr.update(value=frame, caption=curve_caption(frame))
    ended_now = status is not None and status.ended and (not seen or seen[:2] != key[:2])
    error = error_box(status.error) if ended_now and status.state == FAILED else gr.update()
    warnings = status.warnings if status else []
    picker = gr.update(choices=run_choices(runs_dir, picked), value=picked) if ended_now else gr.update()
    loadable = status is not None and status.ended and RunFolder(status.run_dir).has_best_model()
    return (status_markdown(status), plot, error, warning_box(warnings[-1] if warnings else ""),
            gr.update(interactive=not running), gr.update(interactive=running),
            gr.update(interactive=not running), gr.update(visible=loadable), picker, key)


def pick_trained_run(manager: TrainingManager, runs_dir: str):
    """"Load this run": the run the training made, picked in the Generate tab (which is shown).

    Outputs: run_picker, model_path, tokenizer_path, model_type, tokenizer_type, tabs."""
    status = manager.status()
    if status is None or not RunFolder(status.run_dir).has_best_model():
        raise gr.Error("no trained run to load yet")
    run_dir = str(status.run_dir)
    model_path, tokenizer_path, model_type, tokenizer_type = run_paths(run_dir)
    return (gr.update(choices=run_choices(runs_dir, run_dir), value=run_dir), model_path, tokenizer_path,
            model_type, tokenizer_type, gr.Tabs(selected="generate"))


__all__ = ["FORM", "POLL_INTERVAL_S", "PRESETS", "RESUME_LABEL", "START_LABEL", "curve_frame", "form_configs",
           "pick_preset", "pick_trained_run", "poll", "preset_values", "resume_training", "show_plan",
           "start_training", "status_markdown", "stop_training", "use_upload"]
