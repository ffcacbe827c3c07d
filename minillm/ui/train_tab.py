"""The Train tab: the form into configs (the CLI's presets and checks), the plan line, Start, Stop, Resume,
and the live progress read from the server's TrainingManager (minillm.serve.training_manager) by a timer in
every tab, so a page opened later shows a training already running, with that run's own settings in its
form. The progress is drawn by train_view.py.

The data comes from an upload, the bundled corpus, or a file under a folder the server allows
(`minillm ui --data-dir DIR`; minillm.serve.access): a page user names no other file on the server.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from minillm.checkpoint import read_model_config, read_train_config
from minillm.config import DEFAULT_PRESET, PRESETS, TASKS, TOKENIZER_TYPES, ModelConfig, TrainConfig, preset_configs
from minillm.data.prepare import bundled_data_path
from minillm.errors import MiniLLMError
from minillm.models import model_kinds
from minillm.run_folder import RunFolder, default_run_name
from minillm.serve.access import DataAccess, check_text_path
from minillm.serve.training_manager import FAILED, STOPPED, TrainingManager
from minillm.training import check_resumable, resume, train
from minillm.training.preview import preview_run
from minillm.ui.generate_tab import GenerateTab, run_choices, run_paths
from minillm.ui.shared import client_of, error_box, is_upload, no_error, shown_text, warning_box
from minillm.ui.train_view import curve_html, for_the_form, page_warnings, status_markdown

POLL_INTERVAL_S = 1.0  # how often each tab reads the training's progress
# The form fields after the data path, in the order the handlers take them (name, ModelConfig or TrainConfig
# field, or None for the form's own); the preset fills the config fields.
MODEL_FIELDS = {"train_d_model": "d_model", "train_n_layers": "n_layers", "train_n_heads": "n_heads",
                "train_context": "max_seq_len", "train_dropout": "dropout"}
TRAIN_FIELDS = {"train_vocab_size": "bpe_vocab_size", "train_batch_size": "batch_size",
                "train_learning_rate": "learning_rate", "train_max_steps": "max_steps", "train_max_time": "max_time",
                "train_task": "task"}
FORM = ["train_file", "train_data_path", "train_tokenizer", "train_model_type", "train_preset", *MODEL_FIELDS,
        *TRAIN_FIELDS, "train_out"]
PRESET_FIELDS = [*MODEL_FIELDS, *TRAIN_FIELDS]  # what a preset fills
LABELS = {"train_d_model": "Width (d_model)", "train_n_layers": "Layers", "train_n_heads": "Heads",
          "train_context": "Context length (tokens)", "train_dropout": "Dropout",
          "train_vocab_size": "BPE vocabulary size", "train_batch_size": "Batch size",
          "train_learning_rate": "Learning rate", "train_max_steps": "Max steps",
          "train_max_time": "Time budget (s)", "train_task": "Task"}
FLOAT_FIELDS = ("train_dropout", "train_learning_rate")
CHOSEN_FIELDS = ("task",)  # config fields the form picks from a list (names, not numbers)
START_LABEL, RESUME_LABEL = "Start training", "Resume"
UPLOADED = " (uploaded)"  # how the Data file box names an uploaded file
MAX_NAME_BYTES = 255  # the longest file name most file systems take
# The CLI options a trainer's message may name that the form has a field for: the page names the field.
FLAG_LABELS = {f"--{field.replace('_', '-')}": LABELS[elem_id]
               for elem_id, field in {**MODEL_FIELDS, **TRAIN_FIELDS}.items()}
FLAG_LABELS.update({"--block-size": LABELS["train_context"], "--vocab-size": LABELS["train_vocab_size"],
                    "--tokenizer": "Tokenizer", "--model": "Model type", "--preset": "Preset",
                    "--out": "Run folder name"})
# "Start from" (TrainConfig.init_from): nothing (random weights), a run of the runs folder, or a folder path
# typed in (a Hugging Face checkpoint). Its value comes after the FORM values, where the handlers take it.
FROM_NOTHING = "nothing (random weights)"


def _number(name: str, value: Any) -> Any:
    """A form number as the config wants it: a whole number as int; a blank max_time means no budget (a
    choice among names, the task, is kept as it is)."""
    if name in CHOSEN_FIELDS:
        return value
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
    # No samples during training (the page shows none): a run asks for them in its recipe or the CLI.
    return preset_configs(preset, {**model, "model_type": model_type},
                          {"sample_interval": 0, **trained, "tokenizer": tokenizer, "data": data})


def split_start(form: tuple) -> tuple[tuple, str | None]:
    """(the FORM values, the "start from" folder after them: None to start from nothing)."""
    start = form[len(FORM)] if len(form) > len(FORM) else None
    start = (start or "").strip()
    return form[:len(FORM)], None if start in ("", FROM_NOTHING) else start


def form_run_dir(runs_dir: str, name: str, config: TrainConfig, model_type: str) -> Path:
    """The folder the form's run goes to: the form's name (blank: DATA-MODEL-TOKENIZER) inside the runs folder."""
    name = check_text_path(name, "run folder name") or default_run_name(config.data, model_type, config.tokenizer)
    if Path(name).name != name or name in (".", ".."):
        raise MiniLLMError(f"the run folder name must be a plain folder name (it goes into {runs_dir}/), got "
                           f"{name!r}")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise MiniLLMError(f"the run folder name is {len(name.encode('utf-8', 'surrogatepass'))} bytes long; "
                           f"a folder name takes at most {MAX_NAME_BYTES}: shorten it")
    return Path(runs_dir) / name


def preset_values(preset: str) -> list[Any]:
    """The preset's values for the form's config fields (model fields, then training fields)."""
    model, config = preset_configs(preset)
    return ([getattr(model, key) for key in MODEL_FIELDS.values()]
            + [getattr(config, key) if key != "max_time" else _blank(config.max_time) for key in TRAIN_FIELDS.values()])


def _blank(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def form_settings(model: ModelConfig, config: TrainConfig, preset: str, folder: Path, data: str) -> dict:
    """A run's settings as the form's values, by field id (what a page opened later shows of the run)."""
    values = {"train_data_path": data, "train_tokenizer": config.tokenizer, "train_model_type": model.model_type,
              "train_preset": preset, "train_out": folder.name}
    values.update({elem_id: getattr(model, key) for elem_id, key in MODEL_FIELDS.items()})
    values.update({elem_id: _blank(config.max_time) if key == "max_time" else getattr(config, key)
                   for elem_id, key in TRAIN_FIELDS.items()})
    return values


def data_shown(path: str | Path) -> str:
    """A data file as the Data file box shows it: an upload by its name, a server path as it is."""
    return f"{Path(path).name}{UPLOADED}" if is_upload(path) else str(path)


class TrainTab:
    """The tab's components (made inside a gr.Tab) and its handlers, which close over the server's training
    manager, runs folder and data access. A finished run is loaded in `generate`, the Generate tab (one of
    `tabs`)."""

    def __init__(self, manager: TrainingManager, runs_dir: str, generate: GenerateTab, tabs: gr.Tabs,
                 access: DataAccess) -> None:
        self.manager, self.runs_dir, self.generate, self.tabs = manager, runs_dir, generate, tabs
        self.access = access
        self._curve: tuple[Any, str] = (None, curve_html(None))  # (status key, its curve), shared by the tabs
        values = dict(zip(PRESET_FIELDS, preset_values(DEFAULT_PRESET), strict=True))
        with gr.Row(equal_height=False, elem_id="train_columns"):
            with gr.Column(scale=2, min_width=320):
                self._form(values)
            with gr.Column(scale=3, min_width=320):
                gr.Markdown("## Progress")
                self.train_error = gr.Markdown(visible=False, elem_id="train_error")
                self.train_warning = gr.Markdown(visible=False, elem_id="train_warning")
                self.train_status = gr.Markdown(status_markdown(None), elem_id="train_status")
                self.train_plot = gr.HTML(curve_html(None), elem_id="train_plot", label="Loss curve",
                                          show_label=True, container=True, js_on_load=None)
                self.train_load = gr.Button("Load this run in the Generate tab", elem_id="train_load", visible=False)
        self.seen = gr.State(None)  # what this tab last showed of the training (see `poll`)
        self.timer = gr.Timer(POLL_INTERVAL_S)

    def _form(self, values: dict[str, Any]) -> None:
        gr.Markdown("## Data and model")
        self.train_file = gr.File(label="Upload a text file (or TSV/JSONL pairs, or JSONL conversations)",
                                  type="filepath", elem_id="train_file", height=120)
        self.train_data_path = gr.Textbox(str(bundled_data_path()), label=f"Data file: {self.access.allowed()}",
                                          elem_id="train_data_path", max_lines=1,
                                          placeholder="blank = the bundled Tiny Shakespeare")
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
        # auto: chat for a conversation file, pairs for a pair file, text otherwise (the plan says which)
        self.train_task = gr.Dropdown(list(TASKS), value=values["train_task"], label=LABELS["train_task"],
                                      elem_id="train_task", info="auto: chosen from the data, as the plan says")
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
        """The tab's events; when the page opens, the last training's settings in the form, then its plan.
        "Load this run" picks the trained run in the Generate tab (and loads it there); the poll refreshes
        that tab's run picker."""
        form, generate = self.form, self.generate
        inputs = [*form, self.train_init_from]  # the form, then where the run starts from (split_start)
        plan = dict(fn=self.show_plan, inputs=inputs, outputs=[self.train_plan, self.train_error], api_name=False,
                    concurrency_limit=1, concurrency_id="train_plan", show_progress="minimal")
        for component in inputs[1:]:  # (an upload has its own event)
            (component.change if isinstance(component, gr.Dropdown) else component.blur)(
                **plan, trigger_mode="always_last")
        self.train_init_from.focus(self.start_choices, self.train_init_from, self.train_init_from, api_name=False,
                                   **quick)
        self.train_data_path.submit(**plan, trigger_mode="always_last")
        # .input, not .change: a preset the page sets (a run's settings) must not overwrite the values with it.
        presets = self.train_preset.input(self.pick_preset, self.train_preset,
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
        demo.load(self.show_last_settings, None, form[1:], api_name=False, **quick).then(**plan)

    # ---- handlers -------------------------------------------------------------------------------------

    def pick_preset(self, preset: str) -> dict:
        """Preset chosen: its values fill the form (still changeable)."""
        return dict(zip((getattr(self, name) for name in PRESET_FIELDS), preset_values(preset), strict=True))

    def use_upload(self, path: str | None) -> dict:
        """A file was uploaded: the Data file box names it and cannot be edited while the upload is there (the
        upload is what trains); a cleared upload: back to Tiny Shakespeare."""
        if path:
            return gr.update(value=data_shown(path), interactive=False)
        return gr.update(value=str(bundled_data_path()), interactive=True)

    def show_last_settings(self) -> dict:
        """A page opens: the form shows the settings of the training running or last run (what Resume
        continues), not the defaults."""
        status = self.manager.status()
        if status is None or not status.form:
            return gr.skip()
        return {getattr(self, name): value for name, value in status.form.items()}

    def _configs(self, form: tuple) -> tuple[ModelConfig, TrainConfig, Path, str]:
        """(model config, training config, run folder, the data as the form shows it) of the form's values;
        the data only from an upload, the bundled corpus or an allowed folder."""
        form, start = split_start(form)
        upload, data_path, *config_form, name = form
        if not upload and (data_path or "").endswith(UPLOADED):  # (a run's settings, shown by a page opened later)
            raise MiniLLMError(f"{data_path.removesuffix(UPLOADED)} was uploaded in another page: upload it "
                               "here to start a new run on it (Resume needs no data)")
        data = self.access.check_upload(upload) if upload else self.access.check(data_path)
        model, config = form_configs(str(data), *config_form)
        config = config.replace(init_from=start)  # (its shape and tokenizer then replace the form's)
        return model, config, form_run_dir(self.runs_dir, name, config, model.model_type), data_shown(data)

    def start_choices(self, current: str | None) -> dict:
        """"Start from" opened: the runs of the runs folder as they are now (a typed folder stays)."""
        typed = None if current == FROM_NOTHING else current
        return gr.update(choices=[FROM_NOTHING, *run_choices(self.runs_dir, typed)])

    def show_plan(self, *form: Any) -> dict:
        """The plan line under the form (the CLI's, naming the form's fields), or the form's error."""
        upload, data_path = form[:2]
        if not upload and (data_path or "").endswith(UPLOADED):  # no plan without the data, and no error either
            return {self.train_plan: f"The run's data, {html.escape(data_path.removesuffix(UPLOADED))}, was "
                                     "uploaded in another page: upload it here for the plan of a new run on it.",
                    self.train_error: no_error()}
        try:
            model, config, folder, _ = self._configs(form)
            lines = [for_the_form(line, FLAG_LABELS) for line in preview_run(model, config).lines()]
        except Exception as e:
            return {self.train_plan: gr.update(value=""), self.train_error: error_box(e)}
        plan = f"Run folder `{html.escape(str(folder))}`\n\n```text\n" + "\n".join(lines) + "\n```"
        return {self.train_plan: shown_text(plan), self.train_error: no_error()}

    def start_training(self, *form: Any, request: gr.Request | None = None) -> dict:
        """Start: everything `train` checks first is checked here, so a bad form starts nothing; then the
        training runs in the background."""
        try:
            model, config, folder, data = self._configs(form)
            RunFolder(folder).check_new_run(overwrite=False)
            preview_run(model, config)  # the data, the device, the memory, as `train` checks them

            def work(job):
                return train(model, config, folder, progress=False, log=job.log, on_metrics=job.on_metrics,
                             should_stop=job.should_stop)

            self.manager.start(folder, client_of(request), work,
                               config.max_steps if config.epochs is None else None, config.max_time,
                               form=form_settings(model, config, form[FORM.index("train_preset")], folder, data))
        except Exception as e:
            return {self.train_error: error_box(e)}
        return {self.train_error: no_error(), self.train_status: self._status_text()}

    def resume_training(self, *form: Any, request: gr.Request | None = None) -> dict:
        """Resume the stopped run of the form's folder, to the form's max steps and time budget."""
        try:
            upload, data_path, *config_form, name = form
            try:  # resuming reads no data: the data only names the folder when the name is blank
                data = str(self.access.check_upload(upload) if upload else self.access.check(data_path))
            except MiniLLMError:
                data = ""
            model, config = form_configs(data, *config_form)
            folder = form_run_dir(self.runs_dir, name, config, model.model_type)
            last = self.manager.status()
            if last is not None and last.state == STOPPED and not (name or "").strip():
                folder = last.run_dir  # the run just stopped (the form's blank name may mean another)
            check_resumable(folder)
            overrides = {"max_steps": config.max_steps, "max_time": config.max_time}
            # What a page opened later shows: the run's own settings, with the limits it now trains to.
            run_config = read_train_config(folder).replace(**overrides)
            run_model = read_model_config(RunFolder(folder).best_config)[0]
            settings = form_settings(run_model, run_config, form[FORM.index("train_preset")], Path(folder),
                                     data_shown(run_config.data or bundled_data_path()))

            def work(job):
                return resume(folder, overrides, progress=False, log=job.log, on_metrics=job.on_metrics,
                              should_stop=job.should_stop)

            self.manager.start(folder, client_of(request), work, config.max_steps, config.max_time, resumed=True,
                               form=settings)
        except Exception as e:
            return {self.train_error: error_box(e)}
        return {self.train_error: no_error(), self.train_status: self._status_text()}

    def stop_training(self) -> str:
        """Stop: the trainer's stop hook (it evaluates, saves and ends). Output: train_status."""
        self.manager.stop()
        return self._status_text()

    def _status_text(self, status: Any = None) -> str:
        return shown_text(status_markdown(status or self.manager.status(), FLAG_LABELS))

    def curve(self, status: Any) -> str:
        """The loss curve of `status`, drawn once per change of its rows whichever tabs ask."""
        key = (status.started, len(status.rows)) if status else None
        drawn_key, drawn = self._curve
        if key != drawn_key:
            drawn = curve_html(status)
            self._curve = (key, drawn)
        return drawn

    def poll(self, seen: tuple | None, picked: str | None) -> dict:
        """A tick of this tab's timer: what changed in the training since the tab last looked (nothing is
        sent when nothing changed; a new or reloaded page has seen nothing, so it gets it all)."""
        status = self.manager.status()
        key = (status.started, status.state, len(status.rows), len(status.log)) if status else None
        if key == seen:
            return gr.skip()
        running = status is not None and not status.ended
        ended_now = status is not None and status.ended and (not seen or seen[:2] != key[:2])
        picker = self.generate.run_picker
        return {
            self.train_status: self._status_text(status),
            self.train_plot: self.curve(status),
            self.train_error: error_box(status.error) if ended_now and status.state == FAILED else gr.skip(),
            self.train_warning: warning_box(shown_text(page_warnings(status, FLAG_LABELS))),
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
