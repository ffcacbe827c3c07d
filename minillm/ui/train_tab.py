"""The Train tab: the form into configs (the CLI's presets and checks), the plan line, Start, Stop, Resume,
and the live progress read from the server's TrainingManager (minillm.serve.training_manager) by a timer in
every tab, so a page opened later shows a training already running.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from minillm.config import DEFAULT_PRESET, PRESETS, TOKENIZER_TYPES, ModelConfig, TrainConfig, preset_configs
from minillm.data.prepare import bundled_data_path
from minillm.errors import MiniLLMError
from minillm.models import model_kinds
from minillm.run_folder import RunFolder, default_run_name
from minillm.serve.training_manager import FAILED, RUNNING, STOPPED, STOPPING, TrainingManager, TrainingStatus
from minillm.training import check_resumable, resume, train
from minillm.training.preview import describe_seconds, preview_run
from minillm.ui.generate_tab import GenerateTab, run_choices, run_paths
from minillm.ui.shared import client_of, error_box, no_error, warning_box

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
PRESET_FIELDS = FORM[4:-1]  # what a preset fills
LABELS = {"train_d_model": "Width (d_model)", "train_n_layers": "Layers", "train_n_heads": "Heads",
          "train_context": "Context length (tokens)", "train_dropout": "Dropout",
          "train_vocab_size": "BPE vocabulary size", "train_batch_size": "Batch size",
          "train_learning_rate": "Learning rate", "train_max_steps": "Max steps",
          "train_max_time": "Time budget (s)"}
FLOAT_FIELDS = ("train_dropout", "train_learning_rate")
START_LABEL, RESUME_LABEL = "Start training", "Resume"
# "Start from" (TrainConfig.init_from): nothing (random weights), a run of the runs folder, or a folder path
# typed in (a Hugging Face checkpoint). Its value comes after the FORM values, where the handlers take it.
FROM_NOTHING = "nothing (random weights)"


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


def split_start(form: tuple) -> tuple[tuple, str | None]:
    """(the FORM values, the "start from" folder after them: None to start from nothing)."""
    start = form[len(FORM)] if len(form) > len(FORM) else None
    start = (start or "").strip()
    return form[:len(FORM)], None if start in ("", FROM_NOTHING) else start


def form_run_dir(runs_dir: str, name: str, config: TrainConfig, model_type: str) -> Path:
    """The folder the form's run goes to: the form's name (blank: DATA-MODEL-TOKENIZER) inside the runs folder."""
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


class TrainTab:
    """The tab's components (made inside a gr.Tab) and its handlers, which close over the server's training
    manager and runs folder. A finished run is loaded in `generate`, the Generate tab (one of `tabs`)."""

    def __init__(self, manager: TrainingManager, runs_dir: str, generate: GenerateTab, tabs: gr.Tabs) -> None:
        self.manager, self.runs_dir, self.generate, self.tabs = manager, runs_dir, generate, tabs
        values = dict(zip(PRESET_FIELDS, preset_values(DEFAULT_PRESET), strict=True))
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                self._form(values)
            with gr.Column(scale=3, min_width=400):
                gr.Markdown("## Progress")
                self.train_error = gr.Markdown(visible=False, elem_id="train_error")
                self.train_warning = gr.Markdown(visible=False, elem_id="train_warning")
                self.train_status = gr.Markdown(status_markdown(None), elem_id="train_status")
                self.train_plot = gr.LinePlot(curve_frame(None), x="step", y="loss", color="curve",
                                              elem_id="train_plot", label="Loss curve", x_title="step",
                                              y_title="loss (nats per token)",
                                              color_map={"train": "#1f77b4", "validation": "#ff7f0e"},
                                              colors_in_legend=["train", "validation"], caption="no points yet",
                                              height=320)
                self.train_load = gr.Button("Load this run in the Generate tab", elem_id="train_load", visible=False)
        self.seen = gr.State(None)  # what this tab last showed of the training (see `poll`)
        self.timer = gr.Timer(POLL_INTERVAL_S)

    def _form(self, values: dict[str, Any]) -> None:
        gr.Markdown("## Data and model")
        self.train_file = gr.File(label="Upload a text file (or TSV/JSONL pairs)", type="filepath",
                                  elem_id="train_file", height=120)
        self.train_data_path = gr.Textbox(str(bundled_data_path()), label="Data file (a path on the server)",
                                          elem_id="train_data_path", max_lines=1)
        with gr.Row():
            self.train_tokenizer = gr.Dropdown(list(TOKENIZER_TYPES), value=TrainConfig().tokenizer,
                                               label="Tokenizer", elem_id="train_tokenizer")
            self.train_model_type = gr.Dropdown(list(model_kinds()), value=ModelConfig().model_type,
                                                label="Model type", elem_id="train_model_type")
            self.train_preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Preset",
                                            elem_id="train_preset")
        for row in (("train_d_model", "train_n_layers", "train_n_heads", "train_context"),
                    ("train_vocab_size", "train_batch_size", "train_learning_rate", "train_dropout")):
            with gr.Row():
                for elem_id in row:
                    setattr(self, elem_id, gr.Number(values[elem_id], label=LABELS[elem_id], elem_id=elem_id,
                                                     precision=None if elem_id in FLOAT_FIELDS else 0,
                                                     min_width=100))
        with gr.Row():
            self.train_max_steps = gr.Number(values["train_max_steps"], label=LABELS["train_max_steps"],
                                             elem_id="train_max_steps", precision=0, min_width=100)
            self.train_max_time = gr.Textbox(values["train_max_time"], label=LABELS["train_max_time"],
                                             elem_id="train_max_time", max_lines=1, placeholder="blank = none")
            self.train_out = gr.Textbox("", label="Run folder name", elem_id="train_out", max_lines=1,
                                        placeholder="blank = DATA-MODEL-TOKENIZER")
        self.train_init_from = gr.Dropdown(
            [FROM_NOTHING, *run_choices(self.runs_dir)], value=FROM_NOTHING, allow_custom_value=True,
            label="Start from", elem_id="train_init_from",
            info="nothing, one of your runs, or a Hugging Face checkpoint folder on the server (Llama, Qwen3; type "
                 "its path): its model shape and tokenizer replace the form's")
        self.train_plan = gr.Markdown(elem_id="train_plan")
        with gr.Row():
            self.train_start = gr.Button(START_LABEL, variant="primary", elem_id="train_start")
            self.train_stop = gr.Button("Stop", variant="stop", elem_id="train_stop", interactive=False)
            self.train_resume = gr.Button(RESUME_LABEL, elem_id="train_resume")

    @property
    def form(self) -> list[gr.Component]:
        """The form's fields in FORM order (the order the handlers take them)."""
        return [getattr(self, name) for name in FORM]

    # ---- events ---------------------------------------------------------------------------------------

    def wire(self, quick: dict[str, Any], demo: gr.Blocks) -> None:
        """The tab's events, and the plan of the default form when the page opens. "Load this run" picks the
        trained run in the Generate tab (and loads it there); the poll refreshes that tab's run picker."""
        form, generate = self.form, self.generate
        inputs = [*form, self.train_init_from]  # the form, then where the run starts from (split_start)
        plan = dict(fn=self.show_plan, inputs=inputs, outputs=[self.train_plan, self.train_error], api_name=False,
                    concurrency_limit=1, concurrency_id="train_plan", show_progress="minimal")
        for component in inputs:
            (component.change if isinstance(component, gr.Dropdown) else component.blur)(
                **plan, trigger_mode="always_last")
        self.train_init_from.focus(self.start_choices, self.train_init_from, self.train_init_from, api_name=False,
                                   **quick)
        self.train_data_path.submit(**plan, trigger_mode="always_last")
        presets = self.train_preset.change(self.pick_preset, self.train_preset,
                                           [getattr(self, name) for name in PRESET_FIELDS], api_name=False, **quick)
        presets.then(**plan, trigger_mode="always_last")
        for event in (self.train_file.upload, self.train_file.clear):
            event(self.use_upload, self.train_file, self.train_data_path, api_name=False, **quick).then(
                **plan, trigger_mode="always_last")
        started = [self.train_error, self.train_status]
        self.train_start.click(self.start_training, inputs, started, api_name="train_start", **quick)
        self.train_resume.click(self.resume_training, form, started, api_name="train_resume", **quick)
        self.train_stop.click(self.stop_training, None, self.train_status, api_name="train_stop", **quick)
        polled = [self.train_status, self.train_plot, self.train_error, self.train_warning, self.train_start,
                  self.train_stop, self.train_resume, self.train_load, generate.run_picker, self.seen]
        self.timer.tick(self.poll, [self.seen, generate.run_picker], polled, api_name="train_status", **quick)
        picked = self.train_load.click(self.pick_trained_run, None,
                                       [generate.run_picker, *generate.run_fields, self.tabs], api_name=False, **quick)
        generate.load_after(picked.then(generate.start_loading, None, generate.load_button, api_name=False, **quick),
                            quick)
        demo.load(**plan)

    # ---- handlers -------------------------------------------------------------------------------------

    def pick_preset(self, preset: str) -> dict:
        """Preset changed: its values fill the form (still changeable)."""
        return dict(zip((getattr(self, name) for name in PRESET_FIELDS), preset_values(preset), strict=True))

    def use_upload(self, path: str | None) -> str:
        """A file was uploaded: it becomes the data path (cleared upload: back to Tiny Shakespeare)."""
        return str(path) if path else str(bundled_data_path())

    def start_choices(self, current: str | None) -> dict:
        """"Start from" opened: the runs of the runs folder as they are now (a typed folder stays)."""
        typed = None if current == FROM_NOTHING else current
        return gr.update(choices=[FROM_NOTHING, *run_choices(self.runs_dir, typed)])

    def show_plan(self, *form: Any) -> dict:
        """The plan line under the form (the CLI's), or the form's error."""
        try:
            form, start = split_start(form)
            *config_form, name = form
            model, config = form_configs(*config_form)
            config = config.replace(init_from=start)
            folder = form_run_dir(self.runs_dir, name, config, model.model_type)
            lines = preview_run(model, config).lines()
        except Exception as e:
            return {self.train_plan: gr.update(value=""), self.train_error: error_box(e)}
        plan = f"Run folder `{html.escape(str(folder))}`\n\n```text\n" + "\n".join(lines) + "\n```"
        return {self.train_plan: plan, self.train_error: no_error()}

    def start_training(self, *form: Any, request: gr.Request | None = None) -> dict:
        """Start: everything `train` checks first is checked here, so a bad form starts nothing; then the
        training runs in the background."""
        try:
            form, start = split_start(form)
            *config_form, name = form
            model, config = form_configs(*config_form)
            config = config.replace(init_from=start)  # (its shape and tokenizer then replace the form's)
            folder = form_run_dir(self.runs_dir, name, config, model.model_type)
            RunFolder(folder).check_new_run(overwrite=False)
            preview_run(model, config)  # the data, the device, the memory, as `train` checks them

            def work(job):
                return train(model, config, folder, progress=False, log=job.log, on_metrics=job.on_metrics,
                             should_stop=job.should_stop)

            self.manager.start(folder, client_of(request), work,
                               config.max_steps if config.epochs is None else None, config.max_time)
        except Exception as e:
            return {self.train_error: error_box(e)}
        return {self.train_error: no_error(), self.train_status: status_markdown(self.manager.status())}

    def resume_training(self, *form: Any, request: gr.Request | None = None) -> dict:
        """Resume the stopped run of the form's folder, to the form's max steps and time budget."""
        try:
            *config_form, name = form
            model, config = form_configs(*config_form)
            folder = form_run_dir(self.runs_dir, name, config, model.model_type)
            last = self.manager.status()
            if last is not None and last.state == STOPPED and not (name or "").strip():
                folder = last.run_dir  # the run just stopped (the form's blank name may mean another)
            check_resumable(folder)
            overrides = {"max_steps": config.max_steps, "max_time": config.max_time}

            def work(job):
                return resume(folder, overrides, progress=False, log=job.log, on_metrics=job.on_metrics,
                              should_stop=job.should_stop)

            self.manager.start(folder, client_of(request), work, config.max_steps, config.max_time, resumed=True)
        except Exception as e:
            return {self.train_error: error_box(e)}
        return {self.train_error: no_error(), self.train_status: status_markdown(self.manager.status())}

    def stop_training(self) -> str:
        """Stop: the trainer's stop hook (it evaluates, saves and ends). Output: train_status."""
        self.manager.stop()
        return status_markdown(self.manager.status())

    def poll(self, seen: tuple | None, picked: str | None) -> dict:
        """A tick of this tab's timer: what changed in the training since the tab last looked (nothing is
        sent when nothing changed)."""
        status = self.manager.status()
        key = (status.started, status.state, len(status.rows), len(status.log)) if status else None
        if key == seen:
            return gr.skip()
        running = status is not None and not status.ended
        frame = curve_frame(status)
        ended_now = status is not None and status.ended and (not seen or seen[:2] != key[:2])
        warnings = status.warnings if status else []
        picker = self.generate.run_picker
        return {
            self.train_status: status_markdown(status),
            self.train_plot: gr.update(value=frame, caption=curve_caption(frame)),
            self.train_error: error_box(status.error) if ended_now and status.state == FAILED else gr.skip(),
            self.train_warning: warning_box(warnings[-1] if warnings else ""),
            self.train_start: gr.update(interactive=not running),
            self.train_stop: gr.update(interactive=running),
            self.train_resume: gr.update(interactive=not running),
            self.train_load: gr.update(visible=status is not None and status.ended
                                       and RunFolder(status.run_dir).has_best_model()),
            picker: gr.update(choices=run_choices(self.runs_dir, picked), value=picked) if ended_now else gr.skip(),
            self.seen: key,
        }

    def pick_trained_run(self) -> dict:
        """"Load this run": the run the training made, picked in the Generate tab (which is shown)."""
        status = self.manager.status()
        if status is None or not RunFolder(status.run_dir).has_best_model():
            raise gr.Error("no trained run to load yet")
        run_dir = str(status.run_dir)
        return {self.generate.run_picker: gr.update(choices=run_choices(self.runs_dir, run_dir), value=run_dir),
                **dict(zip(self.generate.run_fields, run_paths(run_dir), strict=True)),
                self.tabs: gr.Tabs(selected="generate")}
