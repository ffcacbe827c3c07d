"""The web UI's page: load a run's model, then generate from it with the output streaming in.

The handlers (loading.py, generating.py) only call the library (minillm.checkpoint to find and load runs,
minillm.generation to generate), the same functions the CLI uses, so the page and `minillm generate` give
the same text for the same settings and seed. Every failure becomes a readable message in the page's
`error` box and the app keeps working. Each browser tab (or API client) has its own `Session` (session.py);
the models live in one RunCache per page, shared read-only by the tabs that load the same files, at most
MAX_LOADED_RUNS of them, and released when the tabs that use them close.
"""

from __future__ import annotations

import sys
from pathlib import Path

from minillm.errors import MiniLLMError
from minillm.ui.settings import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_RUNS_DIR, check_can_serve, network_warning

try:
    import gradio as gr
except ImportError:  # gradio is the optional "ui" extra
    raise MiniLLMError("the web UI needs gradio: pip install 'mini-llm[ui]'") from None

from minillm.models import model_class
from minillm.run_cache import DEFAULT_MAX_RUNS, RunCache
from minillm.run_folder import BEST_MODEL_FILE, TOKENIZER_FILE, RunFolder
from minillm.ui.generating import (
    DEFAULTS,
    GENERATE_LABEL,
    MAX_NEW_TOKENS,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    finish_generating,
    generate,
    start_generating,
    stop,
)
from minillm.ui.loading import (
    HIDDEN,
    LOAD_LABEL,
    LOADING_LABEL,
    PROMPT_LABEL,
    PROMPT_PLACEHOLDER,
    SOURCE_LABEL,
    SOURCE_PLACEHOLDER,
    TARGET_PREFIX_LABEL,
    TARGET_PREFIX_PLACEHOLDER,
    finish_loading,
    load_model,
    pick_run,
    refresh_runs,
    run_choices,
    run_curve,
    run_paths,
    start_loading,
)
from minillm.ui.session import Session
from minillm.ui.train_tab import build_train_tab, load_plan, wire_train_tab
from minillm.ui.training_manager import TrainingManager

__all__ = ["LOADING_LABEL", "MAX_NEW_TOKENS", "Session", "build_demo", "finish_loading", "generate", "launch",
           "load_model", "pick_run", "refresh_runs", "start_generating", "start_loading", "stop"]

# Events of all tabs running at once (loads and generations); more would only split the same CPU cores.
CONCURRENCY_LIMIT = 2
# Distinct models the server keeps loaded (tabs that load the same files share one); least recently used out.
MAX_LOADED_RUNS = DEFAULT_MAX_RUNS
TITLE = "Mini LLM"
CSS = """
#error { border: 1px solid var(--error-border-color, #ef4444); border-radius: 8px; padding: 4px 12px;
         background: var(--error-background-fill, #fef2f2); }
#warning { border: 1px solid #f59e0b; border-radius: 8px; padding: 4px 12px; background: #fffbeb; }
#output textarea { font-family: var(--font-mono); }
#train_error { border: 1px solid var(--error-border-color, #ef4444); border-radius: 8px; padding: 4px 12px;
               background: var(--error-background-fill, #fef2f2); }
#train_warning { border: 1px solid #f59e0b; border-radius: 8px; padding: 4px 12px; background: #fffbeb; }
#train_plan pre, #train_plan code { white-space: pre-wrap !important; font-size: 0.85em; }
"""


def build_demo(run_dir: str | Path | None = None, runs_dir: str | Path = DEFAULT_RUNS_DIR,
               trainings: TrainingManager | None = None) -> gr.Blocks:
    """The page. With `run_dir` the paths are pre-filled and that run loads when the page opens.
    `trainings`: the server's training manager (a new one by default)."""
    runs_dir = str(runs_dir)
    run_dir = str(run_dir) if run_dir else None
    model_path = tokenizer_path = model_type = tokenizer_type = ""
    if run_dir:
        model_path, tokenizer_path = str(RunFolder(run_dir).best_model), str(RunFolder(run_dir).tokenizer)
        try:
            model_path, tokenizer_path, model_type, tokenizer_type = run_paths(run_dir)
        except MiniLLMError:
            pass  # the load on page open shows what is wrong with it

    with gr.Blocks(title=TITLE) as demo:
        runs = RunCache(MAX_LOADED_RUNS)  # the models, shared by the tabs that load the same files
        trainings = trainings or TrainingManager()  # one training at a time on this server, seen by every tab
        session = gr.State(Session(runs))
        runs_folder = gr.State(runs_dir)
        gr.Markdown(f"# {TITLE}\nTrain a model on your text, or load a trained run, and generate text from it.")
        with gr.Tabs(selected="generate") as tabs, gr.Tab("Generate", id="generate", elem_id="generate_tab"):
            error = gr.Markdown(visible=False, elem_id="error")
            warning = gr.Markdown(visible=False, elem_id="warning")
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=320):
                    gr.Markdown("## Model")
                    with gr.Row(equal_height=False):
                        run_picker = gr.Dropdown(
                            choices=run_choices(runs_dir, run_dir), value=run_dir,
                            label=f"Run (from {runs_dir}/)", allow_custom_value=True, elem_id="run_picker",
                            scale=5,
                        )
                        refresh_button = gr.Button("↻ Refresh", elem_id="refresh_runs", size="sm", scale=0,
                                                   min_width=90)
                    with gr.Row():  # read from the run's files, which decide what is loaded: shown, not chosen
                        model_type_box = gr.Textbox(model_type, label="Model type (from the run)", interactive=False,
                                                    elem_id="model_type", max_lines=1)
                        tokenizer_type_box = gr.Textbox(tokenizer_type, label="Tokenizer type (from the run)",
                                                        interactive=False, elem_id="tokenizer_type", max_lines=1)
                    model_path_box = gr.Textbox(model_path, label=f"Model path ({BEST_MODEL_FILE})",
                                                elem_id="model_path", max_lines=1)
                    tokenizer_path_box = gr.Textbox(tokenizer_path, label=f"Tokenizer path ({TOKENIZER_FILE})",
                                                    elem_id="tokenizer_path", max_lines=1)
                    load_button = gr.Button(LOAD_LABEL, variant="primary", elem_id="load_button")
                    model_info = gr.Markdown("No model loaded yet.", elem_id="model_info")
                    curve = gr.Image(label="Loss curve of the run", elem_id="run_curve", visible=HIDDEN,
                                     interactive=False, buttons=[])
                with gr.Column(scale=3, min_width=400):
                    gr.Markdown("## Generate")
                    # An encoder-decoder's input (the source) comes first, then the optional start of its output.
                    encoder_decoder = bool(model_type) and model_class(model_type).is_encoder_decoder
                    source = gr.Textbox(label=SOURCE_LABEL, lines=3, elem_id="source",
                                        placeholder=SOURCE_PLACEHOLDER, visible=encoder_decoder)
                    prompt = gr.Textbox(
                        label=TARGET_PREFIX_LABEL if encoder_decoder else PROMPT_LABEL, lines=3, elem_id="prompt",
                        placeholder=TARGET_PREFIX_PLACEHOLDER if encoder_decoder else PROMPT_PLACEHOLDER)
                    with gr.Accordion("Sampling settings", open=True):
                        with gr.Row():
                            max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULTS.max_new_tokens, step=1,
                                                       label="Max new tokens", elem_id="max_new_tokens")
                            temperature = gr.Slider(0.0, MAX_TEMPERATURE, value=DEFAULTS.temperature, step=0.05,
                                                    label="Temperature", elem_id="temperature")
                            top_k = gr.Slider(0, MAX_TOP_K, value=DEFAULTS.top_k or 0, step=1, label="Top-k",
                                              elem_id="top_k")
                        with gr.Row():
                            top_p = gr.Slider(0.01, 1.0, value=DEFAULTS.top_p or 1.0, step=0.01, label="Top-p",
                                              elem_id="top_p")
                            repetition_penalty = gr.Slider(1.0, MAX_REPETITION_PENALTY,
                                                           value=DEFAULTS.repetition_penalty, step=0.05,
                                                           label="Repetition penalty",
                                                           elem_id="repetition_penalty")
                            # A text box, not gr.Number: a Number cannot be left blank (it shows 0).
                            seed = gr.Textbox("", label="Seed", placeholder="blank = random", max_lines=1,
                                              elem_id="seed")
                        gr.Markdown("Temperature 0 is greedy; top-k 0, top-p 1 and repetition penalty 1 are off; "
                                    "a blank seed draws a new one each time (shown after the run).")
                    with gr.Row():
                        generate_button = gr.Button(GENERATE_LABEL, variant="primary", elem_id="generate_button")
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop_button")
                    output = gr.Textbox(label="Output", lines=12, max_lines=30, interactive=False,
                                        elem_id="output", buttons=["copy"])
                    stats = gr.Markdown(elem_id="stats")
        with tabs, gr.Tab("Train", id="train", elem_id="train_tab"):
            train_tab = build_train_tab(trainings, session, runs_folder)

        # Events. The short UI-state steps skip the concurrency limit so they never wait behind a generation.
        quick = dict(concurrency_limit=None, show_progress="hidden", queue=True)
        load_inputs = [session, model_path_box, tokenizer_path_box]
        load_outputs = [model_info, model_type_box, tokenizer_type_box, prompt, source, error, warning]

        def load_chain(event, api_name: str | bool = False) -> None:
            """After `event`: load the paths' run (the button says so meanwhile), then show its loss curve."""
            event.then(start_loading, None, load_button, api_name=False, **quick).then(
                load_model, load_inputs, load_outputs, api_name=api_name,
            ).then(finish_loading, None, load_button, api_name=False, **quick).then(
                run_curve, model_path_box, curve, api_name=False, **quick)

        load_button.click(start_loading, None, load_button, api_name=False, **quick).then(
            load_model, load_inputs, load_outputs, api_name="load_model",
        ).then(finish_loading, None, load_button, api_name=False, **quick).then(
            run_curve, model_path_box, curve, api_name=False, **quick)
        wire_train_tab(train_tab, tabs, run_picker,
                       [[model_path_box, tokenizer_path_box, model_type_box, tokenizer_type_box], load_chain])

        run_picker.change(pick_run, run_picker,
                          [model_path_box, tokenizer_path_box, model_type_box, tokenizer_type_box, error],
                          api_name="pick_run", **quick)
        refresh_button.click(refresh_runs, [runs_folder, run_picker], run_picker, api_name="refresh_runs",
                             **quick)

        generate_inputs = [session, prompt, source, max_new_tokens, temperature, top_k, top_p,
                           repetition_penalty, seed]
        generate_button.click(start_generating, session, generate_button, api_name=False, **quick).then(
            generate, generate_inputs, [output, stats, error, warning], api_name="generate",
            show_progress="minimal",
        ).then(finish_generating, None, generate_button, api_name=False, **quick)
        stop_button.click(stop, session, None, api_name="stop", **quick)

        def close_session(request: gr.Request) -> None:
            """The tab was closed or reloaded (or an API client went away): its model is released."""
            runs.release(request.session_hash)

        demo.unload(close_session)

        if run_dir:  # `minillm ui RUN_DIR`: load that run as soon as the page opens
            load_chain(demo.load(start_loading, None, load_button, api_name=False, **quick))
        else:
            demo.load(refresh_runs, [runs_folder, run_picker], run_picker, api_name=False, **quick)
        load_plan(demo, train_tab)
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT)
    return demo


def launch(run_dir: str | Path | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
           runs_dir: str | Path = DEFAULT_RUNS_DIR, share: bool = False) -> None:
    """Serve the UI until interrupted: on 127.0.0.1 only, unless `host` or `share` says otherwise."""
    if run_dir and not Path(run_dir).is_dir():
        raise MiniLLMError(f"run folder not found: {run_dir}; train one with `minillm train --out {run_dir}`")
    check_can_serve(host, port)  # before anything is printed: a busy or bad port is one error line
    warning = network_warning(host)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    trainings = TrainingManager()
    demo = build_demo(run_dir, runs_dir, trainings)
    if share:
        print("note: --share makes a public link: anyone with it can use this model through your machine")
    try:
        demo.launch(server_name=host, server_port=port, share=share, quiet=not share, show_error=False, css=CSS,
                    footer_links=["api", "settings"], prevent_thread_lock=True)
    except OSError as e:  # taken between the check and the start
        reason = str(e).split(". ")[0].rstrip(".")
        raise MiniLLMError(f"cannot serve on {host}:{port} ({reason}); choose another port with --port") from None
    if not share:  # Gradio's own banner would suggest share=True; say where it is and how to stop it instead
        print(f"Mini LLM UI on http://{host}:{port} (Ctrl+C to stop)", flush=True)
    demo.block_thread()  # until Ctrl+C
    if trainings.stop():  # a training still running is saved, to be resumed, rather than cut off
        print("stopping the training: it evaluates and saves (Ctrl+C again to quit at once)", flush=True)
        trainings.wait()
