"""Load-model handlers: the run picker, the paths, loading a run into a tab's session, the model's info."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from minillm.checkpoint import Run, read_model_config
from minillm.config import TOKENIZER_TYPES
from minillm.errors import MiniLLMError
from minillm.files import read_json
from minillm.models import count_parameters, is_encoder_decoder, model_class
from minillm.run_folder import BEST_MODEL_FILE, TOKENIZER_FILE, RunFolder, find_runs
from minillm.ui.session import Session, describe_error, error_box, no_error, warning_box

LOAD_LABEL = "Load model"
LOADING_LABEL = "Loading…"
# The text boxes of the Generate column: a decoder-only model continues a prompt; an encoder-decoder reads a
# source (its input, shown first) and may be given the start of its output.
PROMPT_LABEL = "Prompt"
PROMPT_PLACEHOLDER = "The text to continue"
SOURCE_LABEL = "Source (the input: the text the model transforms)"
SOURCE_PLACEHOLDER = "The text to generate from"
TARGET_PREFIX_LABEL = "Target prefix (optional: the start of the output)"
TARGET_PREFIX_PLACEHOLDER = "Leave blank to let the model write the whole output"
# Hidden but kept in the page: showing a component that was visible=False re-creates its neighbours.
HIDDEN = "hidden"


def run_choices(runs_dir: str | Path, extra: str | None = None) -> list[str]:
    choices = [str(p) for p in find_runs(runs_dir)]
    if extra and extra not in choices:
        choices.insert(0, extra)
    return choices


def run_paths(run_dir: str | Path) -> tuple[str, str, str, str]:
    """(model path, tokenizer path, model type, tokenizer type) of a run folder, from its config."""
    files = RunFolder(run_dir)
    config, meta = read_model_config(files.best_config)
    tokenizer_type = meta.get("tokenizer_type")
    if tokenizer_type not in TOKENIZER_TYPES:
        tokenizer_type = TOKENIZER_TYPES[0]
    return str(files.best_model), str(files.tokenizer), config.model_type, tokenizer_type


def pick_run(run_dir: str | None):
    """Run picker changed: fill the two paths and the two types from the run's best_model_config.json.

    Outputs: model_path, tokenizer_path, model_type, tokenizer_type, error.
    """
    if not run_dir:
        return gr.update(), gr.update(), gr.update(), gr.update(), no_error()
    try:
        model_path, tokenizer_path, model_type, tokenizer_type = run_paths(run_dir)
    except Exception as e:
        return gr.update(), gr.update(), gr.update(), gr.update(), error_box(e)
    return model_path, tokenizer_path, model_type, tokenizer_type, no_error()


def refresh_runs(runs_dir: str, current: str | None):
    """The run picker's choices, re-read from the runs folder (new runs appear without a restart)."""
    return gr.update(choices=run_choices(runs_dir, current), value=current)


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


def model_info_markdown(run: Run) -> str:
    """The loaded model, in a small table: size, shape, tokenizer, device and how well it trained."""
    c = run.config
    n_params = count_parameters(run.model)
    layers = model_class(c.model_type).layers_description(c)
    training = run.info.get("training") or {}
    val_loss, step = training.get("val_loss"), training.get("step")
    best = f"{val_loss:.4f}" if isinstance(val_loss, (int, float)) else "unknown"
    if isinstance(training.get("val_bits_per_byte"), (int, float)):  # comparable across tokenizers
        best += f", {training['val_bits_per_byte']:.3f} bits per byte"
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
        *_test_rows(Path(run.info.get("model_path", "")).parent),
    ]
    (head_key, head_value), *rows = rows
    return (f"| {head_key} | {head_value} |\n|---|---|\n"
            + "\n".join(f"| {key} | {value} |" for key, value in rows))


def _test_rows(run_dir: Path) -> list[tuple[str, str]]:
    """The final test of the run the model comes from (test_metrics.json), when it has one."""
    try:
        test = read_json(RunFolder(run_dir).test_metrics, "test metrics")
        return [("Test loss", f"{test['loss']:.4f} (perplexity {test['perplexity']:.2f}, "
                              f"{test['bits_per_byte']:.3f} bits per byte)")]
    except (MiniLLMError, KeyError, TypeError, ValueError):
        return []


def run_curve(model_path: str):
    """The loss curve of the run a model path is in (loss_curve.png beside it), or hidden. Output: run_curve."""
    try:
        model, _ = _resolve_paths(model_path, "")
    except MiniLLMError:
        return gr.update(value=None, visible=HIDDEN)
    curve = RunFolder(model.parent).loss_curve
    return gr.update(value=str(curve), visible=True) if curve.is_file() else gr.update(value=None, visible=HIDDEN)


def _generation_fields(encoder_decoder: bool):
    """Prompt and source boxes for a model kind: only an encoder-decoder reads a source (shown above)."""
    if encoder_decoder:
        return (gr.update(label=TARGET_PREFIX_LABEL, placeholder=TARGET_PREFIX_PLACEHOLDER),
                gr.update(visible=True))
    return gr.update(label=PROMPT_LABEL, placeholder=PROMPT_PLACEHOLDER), gr.update(visible=False)


def start_loading():
    """Before a load: the button says it is working and cannot be pressed again."""
    return gr.update(value=LOADING_LABEL, interactive=False)


def finish_loading():
    return gr.update(value=LOAD_LABEL, interactive=True)


def load_model(session: Session, model_path: str, tokenizer_path: str, request: gr.Request | None = None):
    """Load a run into this tab's session (shared with the tabs that loaded the same files). The session
    switches to it only once it is fully loaded; what kind of model and tokenizer it is comes from the files.

    Outputs: model_info, model_type, tokenizer_type, prompt, source, error, warning.
    """
    session.bind(request)
    keep = (gr.update(),) * 5
    try:
        model_file, tokenizer_file = _resolve_paths(model_path, tokenizer_path)
        run = session.load(model_file, tokenizer_file)
        info = model_info_markdown(run)
    except Exception as e:
        still = " (the model loaded before is still in use)" if session.has_run else ""
        return (*keep, error_box(describe_error(e) + still), warning_box(""))
    return (info, run.config.model_type, run.tokenizer.kind, *_generation_fields(is_encoder_decoder(run.config)),
            no_error(), warning_box(""))
