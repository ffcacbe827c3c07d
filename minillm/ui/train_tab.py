"""The Train tab's components and events (the handlers are training.py's)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from minillm.config import DEFAULT_PRESET, PRESETS, TOKENIZER_TYPES, ModelConfig, TrainConfig
from minillm.data.prepare import bundled_data_path
from minillm.models import model_kinds
from minillm.ui.training import (
    FORM,
    POLL_INTERVAL_S,
    RESUME_LABEL,
    START_LABEL,
    curve_frame,
    pick_preset,
    pick_trained_run,
    poll,
    preset_values,
    resume_training,
    show_plan,
    start_training,
    status_markdown,
    stop_training,
    use_upload,
)
from minillm.ui.training_manager import TrainingManager

LABELS = {"train_d_model": "Width (d_model)", "train_n_layers": "Layers", "train_n_heads": "Heads",
          "train_context": "Context length (tokens)", "train_dropout": "Dropout",
          "train_vocab_size": "BPE vocabulary size", "train_batch_size": "Batch size",
          "train_learning_rate": "Learning rate", "train_max_steps": "Max steps",
          "train_max_time": "Time budget (s)"}
FLOAT_FIELDS = ("train_dropout", "train_learning_rate")


def build_train_tab(manager: TrainingManager, session: gr.State, runs_folder: gr.State) -> SimpleNamespace:
    """The tab's form, buttons and progress (call inside a gr.Tab); returns the components by name."""
    c = SimpleNamespace()
    values = dict(zip(FORM[4:-1], preset_values(DEFAULT_PRESET), strict=True))
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            gr.Markdown("## Data and model")
            c.train_file = gr.File(label="Upload a text file (or TSV/JSONL pairs)", type="filepath",
                                   elem_id="train_file", height=120)
            c.train_data_path = gr.Textbox(str(bundled_data_path()), label="Data file (a path on the server)",
                                           elem_id="train_data_path", max_lines=1)
            with gr.Row():
                c.train_tokenizer = gr.Dropdown(list(TOKENIZER_TYPES), value=TrainConfig().tokenizer,
                                                label="Tokenizer", elem_id="train_tokenizer")
                c.train_model_type = gr.Dropdown(list(model_kinds()), value=ModelConfig().model_type,
                                                 label="Model type", elem_id="train_model_type")
                c.train_preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Preset",
                                             elem_id="train_preset")
            with gr.Row():
                for elem_id in ("train_d_model", "train_n_layers", "train_n_heads", "train_context"):
                    setattr(c, elem_id, _number(elem_id, values[elem_id]))
            with gr.Row():
                for elem_id in ("train_vocab_size", "train_batch_size", "train_learning_rate", "train_dropout"):
                    setattr(c, elem_id, _number(elem_id, values[elem_id]))
            with gr.Row():
                c.train_max_steps = _number("train_max_steps", values["train_max_steps"])
                c.train_max_time = gr.Textbox(values["train_max_time"], label=LABELS["train_max_time"],
                                              elem_id="train_max_time", max_lines=1, placeholder="blank = none")
                c.train_out = gr.Textbox("", label="Run folder name", elem_id="train_out", max_lines=1,
                                         placeholder="blank = DATA-MODEL-TOKENIZER")
            c.train_plan = gr.Markdown(elem_id="train_plan")
            with gr.Row():
                c.train_start = gr.Button(START_LABEL, variant="primary", elem_id="train_start")
                c.train_stop = gr.Button("Stop", variant="stop", elem_id="train_stop", interactive=False)
                c.train_resume = gr.Button(RESUME_LABEL, elem_id="train_resume")
        with gr.Column(scale=3, min_width=400):
            gr.Markdown("## Progress")
            c.train_error = gr.Markdown(visible=False, elem_id="train_error")
            c.train_warning = gr.Markdown(visible=False, elem_id="train_warning")
            c.train_status = gr.Markdown(status_markdown(None), elem_id="train_status")
            c.train_plot = gr.LinePlot(curve_frame(None), x="step", y="loss", color="curve", elem_id="train_plot",
                                       label="Loss curve", x_title="step", y_title="loss (nats per token)",
                                       color_map={"train": "#1f77b4", "validation": "#ff7f0e"},
                                       colors_in_legend=["train", "validation"],
                                       caption="no points yet", height=320)
            c.train_load = gr.Button("Load this run in the Generate tab", elem_id="train_load", visible=False)
    c.seen = gr.State(None)
    c.timer = gr.Timer(POLL_INTERVAL_S)
    c.manager = gr.State(manager)
    c.session, c.runs_folder = session, runs_folder
    return c


def _number(elem_id: str, value) -> gr.Number:
    return gr.Number(value, label=LABELS[elem_id], elem_id=elem_id, precision=None if elem_id in FLOAT_FIELDS else 0,
                     min_width=100)


def wire_train_tab(c: SimpleNamespace, tabs: gr.Tabs, run_picker: gr.Dropdown, loading: list) -> None:
    """The tab's events. `loading`: the Generate tab's [model_path, tokenizer_path, model_type, tokenizer_type]
    and the load chain to run after "Load this run" (a function taking the click's event)."""
    quick = dict(concurrency_limit=None, show_progress="hidden", queue=True)
    form = [getattr(c, name) for name in FORM]
    plan_event = dict(fn=show_plan, inputs=[c.runs_folder, *form], outputs=[c.train_plan, c.train_error],
                      api_name=False, concurrency_limit=1, concurrency_id="train_plan", trigger_mode="always_last",
                      show_progress="minimal")
    for component in form:
        (component.change if isinstance(component, gr.Dropdown) else component.blur)(**plan_event)
    c.train_data_path.submit(**plan_event)
    c.train_preset.change(pick_preset, c.train_preset, form[4:-1], api_name=False, **quick).then(**plan_event)
    c.train_file.upload(use_upload, c.train_file, c.train_data_path, api_name=False, **quick).then(**plan_event)
    c.train_file.clear(use_upload, c.train_file, c.train_data_path, api_name=False, **quick).then(**plan_event)

    started = [c.train_error, c.train_status]
    c.train_start.click(start_training, [c.manager, c.session, c.runs_folder, *form], started,
                        api_name="train_start", **quick)
    c.train_resume.click(resume_training, [c.manager, c.session, c.runs_folder, *form], started,
                         api_name="train_resume", **quick)
    c.train_stop.click(stop_training, c.manager, c.train_status, api_name="train_stop", **quick)
    polled = [c.train_status, c.train_plot, c.train_error, c.train_warning, c.train_start, c.train_stop,
              c.train_resume, c.train_load, run_picker, c.seen]
    c.timer.tick(poll, [c.manager, c.seen, c.runs_folder, run_picker], polled, api_name="train_status", **quick)
    model_fields, load_chain = loading
    picked = c.train_load.click(pick_trained_run, [c.manager, c.runs_folder], [run_picker, *model_fields, tabs],
                                api_name=False, **quick)
    load_chain(picked)


def load_plan(demo: gr.Blocks, c: SimpleNamespace) -> None:
    """When the page opens: the plan of the default form, and the progress of a training already running."""
    demo.load(show_plan, [c.runs_folder, *(getattr(c, name) for name in FORM)], [c.train_plan, c.train_error],
              api_name=False, concurrency_limit=1, concurrency_id="train_plan")
