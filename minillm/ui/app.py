"""The web UI: load a run's model, then generate from it with the output streaming in.

The handlers only call the library (minillm.checkpoint to find and load runs, minillm.generation to
generate), the same functions the CLI uses, so the page and `minillm generate` give the same text for
the same settings and seed. Every failure becomes a readable message in the page's `error` box and the
app keeps working. Each browser tab has its own `Session` (its loaded model and its stop flag).
"""

from __future__ import annotations

import os

# Before gradio is imported: no analytics or telemetry calls; the UI works offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import html
import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minillm.checkpoint import (
    BEST_CONFIG_FILE,
    BEST_MODEL_FILE,
    TOKENIZER_FILE,
    Run,
    find_runs,
    load_model_files,
    read_run_config,
)
from minillm.config import MODEL_TYPES, TOKENIZER_TYPES
from minillm.errors import MiniLLMError
from minillm.generation import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from minillm.ui import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_RUNS_DIR

try:
    import gradio as gr
except ImportError:  # gradio is the optional "ui" extra
    raise MiniLLMError("the web UI needs gradio: pip install 'mini-llm[ui]'") from None

log = logging.getLogger(__name__)

# Events of all tabs running at once (loads and generations); more would only split the same CPU cores.
CONCURRENCY_LIMIT = 2

# Generation settings: slider ranges; defaults as in the CLI. 0 turns top-k off, 1.0 turns top-p off.
MAX_NEW_TOKENS = 1000
MAX_PROMPT_CHARS = 20_000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
DEFAULT_TOP_P = 1.0
MAX_REPETITION_PENALTY = 2.0
DEFAULT_REPETITION_PENALTY = 1.0
# The page is updated at most this often while tokens stream in: an update per token would cost more
# than a small model takes to make the token. Stop is still checked after every token.
STREAM_INTERVAL_S = 0.05
MAX_SEED = 2**31 - 1  # a blank seed draws one in [0, MAX_SEED] and reports it: any output can be redone

LOAD_LABEL = "Load model"
LOADING_LABEL = "Loading…"
GENERATE_LABEL = "Generate"
GENERATING_LABEL = "Generating…"
TITLE = "Mini LLM"
NO_MODEL_MESSAGE = "no model loaded yet: pick a run or enter its paths, then press Load model"

CSS = """
#error { border: 1px solid var(--error-border-color, #ef4444); border-radius: 8px; padding: 4px 12px;
         background: var(--error-background-fill, #fef2f2); }
#warning { border: 1px solid #f59e0b; border-radius: 8px; padding: 4px 12px; background: #fffbeb; }
#output textarea { font-family: var(--font-mono); }
"""


class Session:
    """One browser tab's state: the run it has loaded and its stop flag. Never shared between tabs."""

    def __init__(self) -> None:
        self.run: Run | None = None
        self.stop = threading.Event()
        self.generating = False  # from the click on Generate (or an API call) until the generation ends

    def __deepcopy__(self, memo: dict) -> Session:
        # Gradio deep-copies a State's initial value for every new tab: each tab gets a fresh session.
        return Session()


# ----------------------------------------------------------------------------- messages


def _message(kind: str, text: str) -> dict[str, Any]:
    """A Markdown box update: shown with `text`, or hidden when `text` is empty."""
    # Escape <, > and & so tokens such as <|eos|> in a message are shown, not swallowed as HTML.
    value = f"**{kind}:** {html.escape(text, quote=False)}" if text else ""
    return gr.update(value=value, visible=bool(text))


def _error(error: BaseException | str) -> dict[str, Any]:
    return _message("Error", _describe(error) if isinstance(error, BaseException) else error)


def _no_error() -> dict[str, Any]:
    return _message("Error", "")


def _warning(text: str) -> dict[str, Any]:
    return _message("Warning", text)


def _describe(error: BaseException) -> str:
    """One readable line for the page: a MiniLLMError's own message, never a traceback."""
    if isinstance(error, MiniLLMError):
        return str(error)
    log.exception("unexpected error in the UI", exc_info=error)
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return f"unexpected {type(error).__name__}: {first_line} (details are in the server log)"


# ----------------------------------------------------------------------------- loading


def _run_choices(runs_dir: str | Path, extra: str | None = None) -> list[str]:
    choices = [str(p) for p in find_runs(runs_dir)]
    if extra and extra not in choices:
        choices.insert(0, extra)
    return choices


def run_paths(run_dir: str | Path) -> tuple[str, str, str, str]:
    """(model path, tokenizer path, model type, tokenizer type) of a run folder, from its config."""
    run_dir = Path(run_dir)
    config, meta = read_run_config(run_dir / BEST_CONFIG_FILE)
    tokenizer_type = meta.get("tokenizer_type")
    if tokenizer_type not in TOKENIZER_TYPES:
        tokenizer_type = TOKENIZER_TYPES[0]
    return str(run_dir / BEST_MODEL_FILE), str(run_dir / TOKENIZER_FILE), config.model_type, tokenizer_type


def pick_run(run_dir: str | None):
    """Run picker changed: fill the two paths and the two types from the run's best_model_config.json.

    Outputs: model_path, tokenizer_path, model_type, tokenizer_type, error.
    """
    if not run_dir:
        return gr.update(), gr.update(), gr.update(), gr.update(), _no_error()
    try:
        model_path, tokenizer_path, model_type, tokenizer_type = run_paths(run_dir)
    except Exception as e:
        return gr.update(), gr.update(), gr.update(), gr.update(), _error(e)
    return model_path, tokenizer_path, model_type, tokenizer_type, _no_error()


def refresh_runs(runs_dir: str, current: str | None):
    """The run picker's choices, re-read from the runs folder (new runs appear without a restart)."""
    return gr.update(choices=_run_choices(runs_dir, current), value=current)


def _resolve_paths(model_path: str, tokenizer_path: str) -> tuple[Path, Path]:
    """Paths: a run folder works as the model path; a blank tokenizer means the one beside it."""
    if not model_path or not model_path.strip():
        raise MiniLLMError(f"enter the path of a model ({BEST_MODEL_FILE}) or a run folder, or pick a run")
    model = Path(model_path.strip()).expanduser()
    if model.is_dir():
        model = model / BEST_MODEL_FILE
    if not model.is_file():
        raise MiniLLMError(f"model file not found: {model}; check the path or pick a run from the list")
    tokenizer_path = (tokenizer_path or "").strip()
    tokenizer = Path(tokenizer_path).expanduser() if tokenizer_path else model.parent / TOKENIZER_FILE
    if tokenizer.is_dir():
        tokenizer = tokenizer / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise MiniLLMError(f"tokenizer file not found: {tokenizer}; use the {TOKENIZER_FILE} of the same run")
    return model, tokenizer


def _type_mismatches(run: Run, model_type: str, tokenizer_type: str) -> str:
    """What the user chose that the files contradict (the files win), as one line; '' when they agree."""
    notes = []
    if model_type and model_type != run.config.model_type:
        notes.append(f"you chose model type {model_type!r} but {run.info['config_path']} describes a "
                     f"{run.config.model_type!r} model")
    if tokenizer_type and tokenizer_type != run.tokenizer.kind:
        notes.append(f"you chose tokenizer type {tokenizer_type!r} but {run.info['tokenizer_path']} is a "
                     f"{run.tokenizer.kind!r} tokenizer")
    if not notes:
        return ""
    return "; ".join(notes) + f"; loaded what the files are ({run.config.model_type}, {run.tokenizer.kind})"


def model_info_markdown(run: Run) -> str:
    """The loaded model, in a small table: size, shape, tokenizer, device and how well it trained."""
    from minillm.models import count_parameters

    c = run.config
    n_params = count_parameters(run.model)
    if c.model_type == "transformer":
        layers = f"{c.n_encoder_layers} encoder + {c.n_decoder_layers} decoder"
    else:
        layers = str(c.n_layers)
    training = run.info.get("training") or {}
    val_loss, step = training.get("val_loss"), training.get("step")
    best = f"{val_loss:.4f}" if isinstance(val_loss, (int, float)) else "unknown"
    if step is not None:
        best += f" (step {step})"
    rows = [
        ("Model type", c.model_type),
        ("File", html.escape(run.info.get("model_path", ""))),
        ("Parameters", f"{n_params:,} ({n_params / 1e6:.2f}M)"),
        ("Layers", layers),
        ("Heads", str(c.n_heads)),
        ("Width (d_model)", str(c.d_model)),
        ("Context length", f"{c.max_seq_len} tokens"),
        ("Vocabulary", f"{run.tokenizer.vocab_size:,} tokens"),
        ("Tokenizer", run.tokenizer.kind),
        ("Device", str(run.device)),
        ("Best validation loss", best),
    ]
    (head_key, head_value), *rows = rows
    return (f"| {head_key} | {head_value} |\n|---|---|\n"
            + "\n".join(f"| {key} | {value} |" for key, value in rows))


def _generation_fields(model_type: str):
    """Prompt and source boxes for a model type: only an encoder-decoder reads a source."""
    if model_type == "transformer":
        return (gr.update(label="Target prefix (optional: the start of the output)"),
                gr.update(visible=True))
    return gr.update(label="Prompt"), gr.update(visible=False)


def start_loading():
    """Before a load: the button says it is working and cannot be pressed again."""
    return gr.update(value=LOADING_LABEL, interactive=False)


def finish_loading():
    return gr.update(value=LOAD_LABEL, interactive=True)


def load_model(session: Session, model_type: str, tokenizer_type: str, model_path: str, tokenizer_path: str):
    """Load a model into this tab's session. The session switches to it only once it is fully loaded.

    Outputs: model_info, model_type, tokenizer_type, prompt, source, error, warning.
    """
    keep = (gr.update(),) * 5
    try:
        model_file, tokenizer_file = _resolve_paths(model_path, tokenizer_path)
        run = load_model_files(model_file, tokenizer_file)
        info = model_info_markdown(run)
    except Exception as e:
        still = " (the model loaded before is still in use)" if session.run is not None else ""
        return (*keep, _error(_describe(e) + still), _warning(""))
    session.run = run  # one assignment: a generation already running keeps the model it started with
    return (info, run.config.model_type, run.tokenizer.kind, *_generation_fields(run.config.model_type),
            _no_error(), _warning(_type_mismatches(run, model_type, tokenizer_type)))


# ----------------------------------------------------------------------------- generation


def _check_settings(prompt: str, max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
                    repetition_penalty: Any, seed: Any) -> dict[str, Any]:
    """Generation settings from the form (or the API), checked; keyword arguments for stream_text."""

    def number(name: str, value: Any, low: float, high: float) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise MiniLLMError(f"{name} must be a number, got {value!r}") from None
        if not low <= value <= high:
            raise MiniLLMError(f"{name} must be between {low:g} and {high:g}, got {value:g}")
        return value

    def integer(name: str, value: Any, low: int, high: int) -> int:
        value = number(name, value, low, high)
        if value != int(value):
            raise MiniLLMError(f"{name} must be a whole number, got {value:g}")
        return int(value)

    if len(prompt or "") > MAX_PROMPT_CHARS:
        raise MiniLLMError(f"the prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    top_k = integer("top-k", top_k, 0, MAX_TOP_K)
    top_p = number("top-p", top_p, 0.0, 1.0)
    if top_p == 0.0:
        raise MiniLLMError("top-p must be above 0 (1 turns it off)")
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        seed = random.randint(0, MAX_SEED)
    return dict(
        max_new_tokens=integer("max new tokens", max_new_tokens, 1, MAX_NEW_TOKENS),
        temperature=number("temperature", temperature, 0.0, MAX_TEMPERATURE),
        top_k=top_k or None,
        top_p=top_p if top_p < 1.0 else None,
        repetition_penalty=number("repetition penalty", repetition_penalty, 1.0, MAX_REPETITION_PENALTY),
        seed=integer("seed", seed, 0, MAX_SEED),
    )


def _stats(n_tokens: int, seconds: float, seed: int, stopped: bool) -> str:
    rate = n_tokens / seconds if seconds > 0 else 0.0
    how = "Stopped after" if stopped else "Generated"
    return f"{how} {n_tokens} tokens in {seconds:.2f} s: **{rate:.1f} tokens/s** (seed {seed})"


def start_generating(session: Session):
    """At the click, before the generation waits in the queue: Generate cannot be pressed again until it
    ends, and a Stop pressed from now on (even while queued) ends it."""
    session.stop.clear()
    session.generating = True
    return gr.update(value=GENERATING_LABEL, interactive=False)


def finish_generating():
    return gr.update(value=GENERATE_LABEL, interactive=True)


def generate(session: Session, prompt: str, source: str, max_new_tokens: Any, temperature: Any, top_k: Any,
             top_p: Any, repetition_penalty: Any, seed: Any) -> Iterator[tuple[Any, Any, Any, Any]]:
    """Stream the output into the page as the tokens arrive; Stop ends it between two tokens.

    Yields (output, stats, error, warning). A decoder-only model's output is the prompt followed by
    the continuation (as `minillm generate` prints it); an encoder-decoder's is the generated target.
    """
    session.generating = True
    try:
        yield from _generation_steps(session, prompt, source, max_new_tokens, temperature, top_k, top_p,
                                     repetition_penalty, seed)
    finally:
        session.generating = False
        session.stop.clear()  # a Stop that came after the end does not carry over to the next generation


def _generation_steps(session: Session, prompt: str, source: str, max_new_tokens: Any, temperature: Any,
                      top_k: Any, top_p: Any, repetition_penalty: Any,
                      seed: Any) -> Iterator[tuple[Any, Any, Any, Any]]:
    from minillm.generation import generation_inputs, stream_tokens, unknown_characters_warning

    run = session.run  # a load during this generation does not change the model under it
    if run is None:
        yield gr.update(), "", _error(NO_MODEL_MESSAGE), gr.update()
        return
    try:
        settings = _check_settings(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                   seed)
        # The source box is hidden for a decoder-only model: what it still holds is not an input.
        visible_source = source if run.config.model_type == "transformer" else None
        prompt, source = generation_inputs(run.config.model_type, prompt, visible_source)
        note = unknown_characters_warning(run.tokenizer, prompt + (source or ""))
    except Exception as e:
        yield gr.update(), "", _error(e), gr.update()
        return

    text = prompt if source is None else ""
    yield text, "Generating…", _no_error(), _warning(note)
    n_tokens, stopped, start = 0, False, time.perf_counter()
    last_update = start
    tokens = None
    try:
        tokens = stream_tokens(run.model, run.tokenizer, prompt, source=source, **settings)
        for token_id, chunk in tokens:  # one item per token (chunk "" while a character is incomplete)
            text += chunk
            n_tokens += token_id is not None
            if time.perf_counter() - last_update >= STREAM_INTERVAL_S:
                yield text, gr.update(), gr.update(), gr.update()
                last_update = time.perf_counter()
            # Checked after every token: Stop (an event of this tab running beside this one) ends it here.
            if session.stop.is_set():
                stopped = True
                break
    except Exception as e:
        elapsed = time.perf_counter() - start
        yield text, _stats(n_tokens, elapsed, settings["seed"], True), _error(e), gr.update()
        return
    finally:
        if tokens is not None:
            tokens.close()  # ends the model's token loop at once when we left early
    elapsed = time.perf_counter() - start
    yield text, _stats(n_tokens, elapsed, settings["seed"], stopped), gr.update(), gr.update()


def stop(session: Session) -> None:
    """Ask this tab's generation, running or queued, to end after its current token (the text so far
    stays). With none under way it does nothing."""
    if session.generating:
        session.stop.set()


# ----------------------------------------------------------------------------- page


def build_demo(run_dir: str | Path | None = None, runs_dir: str | Path = DEFAULT_RUNS_DIR) -> gr.Blocks:
    """The page. With `run_dir` the paths are pre-filled and that run loads when the page opens."""
    runs_dir = str(runs_dir)
    run_dir = str(run_dir) if run_dir else None
    model_path = tokenizer_path = ""
    model_type, tokenizer_type = MODEL_TYPES[0], TOKENIZER_TYPES[0]
    if run_dir:
        model_path, tokenizer_path = str(Path(run_dir) / BEST_MODEL_FILE), str(Path(run_dir) / TOKENIZER_FILE)
        try:
            model_path, tokenizer_path, model_type, tokenizer_type = run_paths(run_dir)
        except MiniLLMError:
            pass  # the load on page open shows what is wrong with it

    with gr.Blocks(title=TITLE) as demo:
        session = gr.State(Session())
        runs_folder = gr.State(runs_dir)
        gr.Markdown(f"# {TITLE}\nLoad a trained run, then generate text from it.")
        error = gr.Markdown(visible=False, elem_id="error")
        warning = gr.Markdown(visible=False, elem_id="warning")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                gr.Markdown("## Model")
                with gr.Row(equal_height=False):
                    run_picker = gr.Dropdown(
                        choices=_run_choices(runs_dir, run_dir), value=run_dir,
                        label=f"Run (from {runs_dir}/)", allow_custom_value=True, elem_id="run_picker",
                        scale=5,
                    )
                    refresh_button = gr.Button("↻ Refresh", elem_id="refresh_runs", size="sm", scale=0,
                                               min_width=90)
                with gr.Row():
                    model_type_box = gr.Dropdown(list(MODEL_TYPES), value=model_type, label="Model type",
                                                 elem_id="model_type")
                    tokenizer_type_box = gr.Dropdown(list(TOKENIZER_TYPES), value=tokenizer_type,
                                                     label="Tokenizer type", elem_id="tokenizer_type")
                model_path_box = gr.Textbox(model_path, label=f"Model path ({BEST_MODEL_FILE})",
                                            elem_id="model_path", max_lines=1)
                tokenizer_path_box = gr.Textbox(tokenizer_path, label=f"Tokenizer path ({TOKENIZER_FILE})",
                                                elem_id="tokenizer_path", max_lines=1)
                load_button = gr.Button(LOAD_LABEL, variant="primary", elem_id="load_button")
                model_info = gr.Markdown("No model loaded yet.", elem_id="model_info")
            with gr.Column(scale=3, min_width=400):
                gr.Markdown("## Generate")
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                    placeholder="The text to continue")
                source = gr.Textbox(label="Source (encoder-decoder models)", lines=3, elem_id="source",
                                    visible=model_type == "transformer")
                with gr.Accordion("Sampling settings", open=True):
                    with gr.Row():
                        max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1,
                                                   label="Max new tokens", elem_id="max_new_tokens")
                        temperature = gr.Slider(0.0, MAX_TEMPERATURE, value=DEFAULT_TEMPERATURE, step=0.05,
                                                label="Temperature", elem_id="temperature")
                        top_k = gr.Slider(0, MAX_TOP_K, value=DEFAULT_TOP_K, step=1, label="Top-k",
                                          elem_id="top_k")
                    with gr.Row():
                        top_p = gr.Slider(0.01, 1.0, value=DEFAULT_TOP_P, step=0.01, label="Top-p",
                                          elem_id="top_p")
                        repetition_penalty = gr.Slider(1.0, MAX_REPETITION_PENALTY,
                                                       value=DEFAULT_REPETITION_PENALTY, step=0.05,
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

        # Events. The short UI-state steps skip the concurrency limit so they never wait behind a generation.
        quick = dict(concurrency_limit=None, show_progress="hidden", queue=True)
        load_inputs = [session, model_type_box, tokenizer_type_box, model_path_box, tokenizer_path_box]
        load_outputs = [model_info, model_type_box, tokenizer_type_box, prompt, source, error, warning]
        load_button.click(start_loading, None, load_button, api_name=False, **quick).then(
            load_model, load_inputs, load_outputs, api_name="load_model",
        ).then(finish_loading, None, load_button, api_name=False, **quick)

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

        if run_dir:  # `minillm ui RUN_DIR`: load that run as soon as the page opens
            demo.load(start_loading, None, load_button, api_name=False, **quick).then(
                load_model, load_inputs, load_outputs, api_name=False,
            ).then(finish_loading, None, load_button, api_name=False, **quick)
        else:
            demo.load(refresh_runs, [runs_folder, run_picker], run_picker, api_name=False, **quick)
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT)
    return demo


def launch(run_dir: str | Path | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
           runs_dir: str | Path = DEFAULT_RUNS_DIR, share: bool = False) -> None:
    """Serve the UI until interrupted: on 127.0.0.1 only, unless `host` or `share` says otherwise."""
    if run_dir and not Path(run_dir).is_dir():
        raise MiniLLMError(f"run folder not found: {run_dir}; train one with `minillm train --out {run_dir}`")
    demo = build_demo(run_dir, runs_dir)
    if share:
        print("note: --share makes a public link: anyone with it can use this model through your machine")
    else:  # Gradio's own banner would suggest share=True; say where it is and how to stop it instead
        print(f"Mini LLM UI on http://{host}:{port} (Ctrl+C to stop)", flush=True)
    demo.launch(server_name=host, server_port=port, share=share, quiet=not share, show_error=False, css=CSS,
                footer_links=["api", "settings"])
