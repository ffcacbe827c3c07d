"""The Generate tab: pick a run (or name its files), load it, then generate from it with the output
streaming in; Stop ends a generation between two tokens. A run trained on conversations also shows a chat
view (ui/chat_view.py) above the plain generation box.

The handlers only call the library, as the CLI does (minillm.checkpoint to find runs, the run cache's
`ServedRun.stream` to generate, through the same stream_tokens), so the page and `minillm generate` give the
same text for the same settings and seed. Generations go through the run's one batch scheduler, as the HTTP
API's do; with `minillm ui --compile` its decode steps compile in the background when the run loads
(generating eagerly, the same text, until they are ready), and a note under the model says how far it is.
Each client (tab or API client) has its own Session, looked up by the request's session hash; the runs are
the server's, shared read-only (minillm.serve.run_cache).
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from minillm.checkpoint import Run, read_model_config
from minillm.config import TOKENIZER_TYPES
from minillm.errors import MiniLLMError, describe_error
from minillm.files import read_json
from minillm.generation import generation_inputs, task_prompt, unknown_characters_warning
from minillm.models import count_parameters, is_encoder_decoder, model_class
from minillm.run_folder import BEST_MODEL_FILE, TOKENIZER_FILE, RunFolder, find_runs
from minillm.sampling import SamplingConfig
from minillm.serve.access import run_folder
from minillm.serve.batching import CompileState
from minillm.serve.limits import ServerLimits
from minillm.serve.run_cache import ServedRun, model_files
from minillm.serve.sessions import Session, Sessions
from minillm.ui.chat_view import ChatView
from minillm.ui.shared import client_of, error_box, no_error, warning_box

LOAD_LABEL, LOADING_LABEL = "Load model", "Loading…"
GENERATE_LABEL, GENERATING_LABEL = "Generate", "Generating…"
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
# The sliders' ranges (the form's, for a human; SamplingConfig checks what any request sends, and the
# server's caps are ServerLimits'). 0 turns top-k off, 1.0 turns top-p off; defaults are the CLI's.
DEFAULTS = SamplingConfig()
SLIDER_MAX_TEMPERATURE = 2.0
SLIDER_MAX_TOP_K = 200
SLIDER_MAX_REPETITION_PENALTY = 2.0
# The page is updated at most this often while tokens stream in: an update per token would cost more
# than a small model takes to make the token. Stop is still checked after every token.
STREAM_INTERVAL_S = 0.05
NO_MODEL_MESSAGE = "no model loaded yet: pick a run or enter its paths, then press Load model"
# With --compile: how often an open page asks whether its run's compiled decode step is ready, and what it says.
COMPILE_POLL_S = 5.0
COMPILE_NOTES = {
    CompileState.COMPILING: "Decode step: **compiling in the background** (generating eagerly until it is "
                            "ready: the same text, slower)",
    CompileState.COMPILED: "Decode step: **compiled**",
    CompileState.FAILED: "Decode step: eager (compiling it failed: {error})",
}

WHOLE_NUMBER = re.compile(r"[+-]?\d+")


def busy_message(limits: ServerLimits) -> str:
    return ("this session is already generating: wait for that generation to end, or press Stop "
            f"(a session runs at most {limits.generations_per_client} at a time)")


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


def model_info_markdown(run: Run) -> str:
    """The loaded model, in a small table: size, shape, tokenizer, device and how well it trained."""
    c = run.config
    n_params = count_parameters(run.model)
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
        ("Layers", model_class(c.model_type).layers_description(c)),
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


def decode_step_note(served: ServedRun | None) -> dict:
    """The note on the run's decode step (compiling, compiled, failed), hidden without --compile or a run."""
    if served is None or not served.batch.compile:
        return gr.update(value="", visible=False)
    scheduler = served.scheduler()
    note = COMPILE_NOTES[scheduler.compile_state].format(error=html.escape(scheduler.compile_error or ""))
    return gr.update(value=note, visible=True)


def form_sampling(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any, repetition_penalty: Any,
                  seed: Any) -> SamplingConfig:
    """The form's (or the API's) settings as a SamplingConfig, which checks their ranges. Here only what a
    form sends is turned into numbers (sliders send 3.0 for 3); a blank seed is None."""

    def number(name: str, value: Any) -> float | int:
        if isinstance(value, str) and WHOLE_NUMBER.fullmatch(value.strip()):
            return int(value)  # exactly as typed: through a float, a seed past 2**53 would become another number
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise MiniLLMError(f"{name} must be a number, got {value!r}") from None
        return int(value) if value.is_integer() else value

    blank_seed = seed is None or (isinstance(seed, str) and not seed.strip())
    return SamplingConfig(
        max_new_tokens=number("max_new_tokens", max_new_tokens), temperature=number("temperature", temperature),
        top_k=number("top_k", top_k), top_p=number("top_p", top_p),
        repetition_penalty=number("repetition_penalty", repetition_penalty),
        seed=None if blank_seed else number("seed", seed))


def _stats(n_tokens: int, seconds: float, seed: int, stopped: bool) -> str:
    rate = n_tokens / seconds if seconds > 0 else 0.0
    how = "Stopped after" if stopped else "Generated"
    return f"{how} {n_tokens} tokens in {seconds:.2f} s: **{rate:.1f} tokens/s** (seed {seed})"


class GenerateTab:
    """The tab's components (made inside a gr.Tab) and its handlers, which close over the server's sessions
    (and through them its run cache), its limits and its runs folder. `run_dir`: a run to pre-fill.
    `compile`: the runs' decode steps compile in the background (the run cache's settings): show how far."""

    def __init__(self, sessions: Sessions, limits: ServerLimits, runs_dir: str, run_dir: str | None,
                 compile: bool = False) -> None:
        self.sessions, self.limits, self.runs_dir = sessions, limits, runs_dir
        self.compile_timer = gr.Timer(COMPILE_POLL_S) if compile else None
        model_path, tokenizer_path, model_type, tokenizer_type = "", "", "", ""
        if run_dir:
            model_path, tokenizer_path = str(RunFolder(run_dir).best_model), str(RunFolder(run_dir).tokenizer)
            try:
                model_path, tokenizer_path, model_type, tokenizer_type = run_paths(run_dir)
            except MiniLLMError:
                pass  # the load on page open shows what is wrong with it
        self.error = gr.Markdown(visible=False, elem_id="error")
        self.warning = gr.Markdown(visible=False, elem_id="warning")
        with gr.Row(equal_height=False, elem_id="generate_columns"):  # (a phone reorders its parts: app.CSS)
            with gr.Column(scale=2, min_width=320):
                self._model_column(run_dir, model_path, tokenizer_path, model_type, tokenizer_type)
            with gr.Column(scale=3, min_width=400):
                self._generate_column(bool(model_type) and model_class(model_type).is_encoder_decoder)

    def _model_column(self, run_dir: str | None, model_path: str, tokenizer_path: str, model_type: str,
                      tokenizer_type: str) -> None:
        gr.Markdown("## Model")
        with gr.Row(equal_height=False):
            self.run_picker = gr.Dropdown(choices=run_choices(self.runs_dir, run_dir), value=run_dir,
                                          label=f"Run (from {self.runs_dir}/)", allow_custom_value=True,
                                          elem_id="run_picker", scale=5)
            self.refresh_button = gr.Button("↻ Refresh", elem_id="refresh_runs", size="sm", scale=0, min_width=90)
        with gr.Row():  # read from the run's files, which decide what is loaded: shown, not chosen
            self.model_type = gr.Textbox(model_type, label="Model type (from the run)", interactive=False,
                                         elem_id="model_type", max_lines=1)
            self.tokenizer_type = gr.Textbox(tokenizer_type, label="Tokenizer type (from the run)",
                                             interactive=False, elem_id="tokenizer_type", max_lines=1)
        self.model_path = gr.Textbox(model_path, label=f"Model path ({BEST_MODEL_FILE})", elem_id="model_path",
                                     max_lines=1)
        self.tokenizer_path = gr.Textbox(tokenizer_path, label=f"Tokenizer path ({TOKENIZER_FILE})",
                                         elem_id="tokenizer_path", max_lines=1)
        self.load_button = gr.Button(LOAD_LABEL, variant="primary", elem_id="load_button")
        self.model_info = gr.Markdown("No model loaded yet.", elem_id="model_info")
        self.decode_step = gr.Markdown(visible=False, elem_id="decode_step")
        self.curve = gr.Image(label="Loss curve of the run", elem_id="run_curve", visible=HIDDEN, interactive=False,
                              buttons=[])

    def _generate_column(self, encoder_decoder: bool) -> None:
        self.chat = ChatView(self.sessions, self.limits, form_sampling, self.error, STREAM_INTERVAL_S)
        gr.Markdown("## Generate")
        # An encoder-decoder's input (the source) comes first, then the optional start of its output.
        self.source = gr.Textbox(label=SOURCE_LABEL, lines=3, elem_id="source", placeholder=SOURCE_PLACEHOLDER,
                                 visible=encoder_decoder)
        self.prompt = gr.Textbox(label=TARGET_PREFIX_LABEL if encoder_decoder else PROMPT_LABEL, lines=3,
                                 elem_id="prompt",
                                 placeholder=TARGET_PREFIX_PLACEHOLDER if encoder_decoder else PROMPT_PLACEHOLDER)
        with gr.Accordion("Sampling settings", open=True):
            with gr.Row():
                self.max_new_tokens = gr.Slider(1, self.limits.max_new_tokens, value=DEFAULTS.max_new_tokens,
                                                step=1, label="Max new tokens", elem_id="max_new_tokens")
                self.temperature = gr.Slider(0.0, SLIDER_MAX_TEMPERATURE, value=DEFAULTS.temperature, step=0.05,
                                             label="Temperature", elem_id="temperature")
                self.top_k = gr.Slider(0, SLIDER_MAX_TOP_K, value=DEFAULTS.top_k or 0, step=1, label="Top-k",
                                       elem_id="top_k")
            with gr.Row():
                self.top_p = gr.Slider(0.01, 1.0, value=DEFAULTS.top_p or 1.0, step=0.01, label="Top-p",
                                       elem_id="top_p")
                self.repetition_penalty = gr.Slider(1.0, SLIDER_MAX_REPETITION_PENALTY,
                                                    value=DEFAULTS.repetition_penalty, step=0.05,
                                                    label="Repetition penalty", elem_id="repetition_penalty")
                # A text box, not gr.Number: a Number cannot be left blank (it shows 0).
                self.seed = gr.Textbox("", label="Seed", placeholder="blank = random", max_lines=1, elem_id="seed")
            gr.Markdown("Temperature 0 is greedy; top-k 0, top-p 1 and repetition penalty 1 are off; "
                        "a blank seed draws a new one each time (shown after the run).")
        with gr.Row():
            self.generate_button = gr.Button(GENERATE_LABEL, variant="primary", elem_id="generate_button")
            self.stop_button = gr.Button("Stop", variant="stop", elem_id="stop_button")
        self.output = gr.Textbox(label="Output", lines=12, max_lines=30, interactive=False, elem_id="output",
                                 buttons=["copy"])
        self.stats = gr.Markdown(elem_id="stats")

    @property
    def run_fields(self) -> list[gr.Component]:
        """What picking a run fills: its two paths and its two types."""
        return [self.model_path, self.tokenizer_path, self.model_type, self.tokenizer_type]

    # ---- events ---------------------------------------------------------------------------------------

    def wire(self, quick: dict[str, Any]) -> None:
        """The tab's events. `quick`: the options of the short UI-state steps."""
        self.load_after(self.load_button.click(self.start_loading, None, self.load_button, api_name=False, **quick),
                        quick, api_name="load_model")
        self.run_picker.change(self.pick_run, self.run_picker, [*self.run_fields, self.error], api_name="pick_run",
                               **quick)
        self.refresh_button.click(self.refresh_runs, self.run_picker, self.run_picker, api_name="refresh_runs",
                                  **quick)
        settings = [self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed]
        inputs = [self.prompt, self.source, *settings]
        self.generate_button.click(self.start_generating, None, self.generate_button, api_name=False, **quick).then(
            self.generate, inputs, [self.output, self.stats, self.error, self.warning], api_name="generate",
            show_progress="minimal",
        ).then(self.finish_generating, None, self.generate_button, api_name=False, **quick)
        self.stop_button.click(self.stop, None, None, api_name="stop", **quick)
        self.chat.wire(quick, settings)
        if self.compile_timer is not None:
            self.compile_timer.tick(self.decode_step_status, None, self.decode_step, api_name=False, **quick)

    def load_after(self, loading: Any, quick: dict[str, Any], api_name: str | bool = False) -> None:
        """After `loading` (an event of `start_loading`: the button says it is working): load the paths' run,
        then show its loss curve."""
        loading.then(
            self.load_model, [self.model_path, self.tokenizer_path],
            [self.model_info, self.decode_step, self.model_type, self.tokenizer_type, self.prompt, self.source,
             self.error, self.warning, self.chat.column, self.chat.chatbot], api_name=api_name,
        ).then(self.finish_loading, None, self.load_button, api_name=False, **quick).then(
            self.run_curve, self.model_path, self.curve, api_name=False, **quick)

    # ---- handlers -------------------------------------------------------------------------------------

    def pick_run(self, run_dir: str | None) -> dict:
        """Run picker changed: fill the two paths and the two types from the run's best_model_config.json."""
        if not run_dir:
            return {self.error: no_error()}
        try:
            paths = run_paths(run_folder(run_dir))
        except Exception as e:
            return {self.error: error_box(e)}
        return {**dict(zip(self.run_fields, paths, strict=True)), self.error: no_error()}

    def refresh_runs(self, current: str | None) -> dict:
        """The run picker's choices, re-read from the runs folder (new runs appear without a restart)."""
        return gr.update(choices=run_choices(self.runs_dir, current), value=current)

    def run_curve(self, model_path: str) -> dict:
        """The loss curve of the run a model path is in (loss_curve.png beside it), or hidden."""
        try:
            model, _ = model_files(model_path)
        except MiniLLMError:
            return gr.update(value=None, visible=HIDDEN)
        curve = RunFolder(model.parent).loss_curve
        return gr.update(value=str(curve), visible=True) if curve.is_file() else gr.update(value=None, visible=HIDDEN)

    def start_loading(self) -> dict:
        """Before a load: the button says it is working and cannot be pressed again."""
        return gr.update(value=LOADING_LABEL, interactive=False)

    def finish_loading(self) -> dict:
        return gr.update(value=LOAD_LABEL, interactive=True)

    def load_model(self, model_path: str, tokenizer_path: str, request: gr.Request | None = None) -> dict:
        """Load a run into this client's session (shared with the sessions that loaded the same files). The
        session switches to it only once it is fully loaded; what kind of model and tokenizer it is comes
        from the files."""
        session = self.sessions.get(client_of(request))
        try:
            served = session.load(*model_files(model_path, tokenizer_path))
            run, info = served.run, model_info_markdown(served.run)
        except Exception as e:
            still = " (the model loaded before is still in use)" if session.has_run else ""
            return {self.error: error_box(describe_error(e) + still), self.warning: warning_box("")}
        if is_encoder_decoder(run.config):  # only an encoder-decoder reads a source (shown above)
            prompt = gr.update(label=TARGET_PREFIX_LABEL, placeholder=TARGET_PREFIX_PLACEHOLDER)
        else:
            prompt = gr.update(label=PROMPT_LABEL, placeholder=PROMPT_PLACEHOLDER)
        return {self.model_info: info, self.decode_step: decode_step_note(served),
                self.model_type: run.config.model_type, self.tokenizer_type: run.tokenizer.kind,
                self.prompt: prompt, self.source: gr.update(visible=is_encoder_decoder(run.config)),
                self.error: no_error(), self.warning: warning_box(""),
                self.chat.column: gr.update(visible=run.tokenizer.chat_template is not None), self.chat.chatbot: []}

    def decode_step_status(self, request: gr.Request | None = None) -> dict:
        """The note on the decode step of this client's run, as it is now (the page asks every few seconds)."""
        return decode_step_note(self.sessions.get(client_of(request)).loaded_run)

    def start_generating(self, request: gr.Request | None = None) -> dict:
        """At the click, before the generation waits in the queue: Generate cannot be pressed again until it
        ends, and a Stop pressed from now on (even while queued) ends it."""
        session = self.sessions.get(client_of(request))
        session.stop.clear()
        session.generating = True
        return gr.update(value=GENERATING_LABEL, interactive=False)

    def finish_generating(self) -> dict:
        return gr.update(value=GENERATE_LABEL, interactive=True)

    def stop(self, request: gr.Request | None = None) -> None:
        """Ask this client's generation, running or queued, to end after its current token (the text so far
        stays). With none under way it does nothing."""
        session = self.sessions.get(client_of(request))
        if session.generating:
            session.stop.set()

    def generate(self, prompt: str, source: str, max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
                 repetition_penalty: Any, seed: Any, request: gr.Request | None = None) -> Iterator[dict]:
        """Stream the output into the page as the tokens arrive; Stop ends it between two tokens.

        A decoder-only model's output is the prompt followed by the continuation (as `minillm generate`
        prints it); an encoder-decoder's is the generated target. A session runs at most the limits'
        generations_per_client at once: one more is refused at once, so a client that queues many cannot
        hold the server's few workers while other sessions wait.
        """
        session = self.sessions.get(client_of(request))
        if not session.begin_generation(self.limits.generations_per_client):
            yield {self.error: error_box(busy_message(self.limits))}
            return
        try:
            yield from self._generation_steps(session, prompt, source,
                                              (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed))
        finally:
            session.end_generation()

    def _generation_steps(self, session: Session, prompt: str, source: str, settings: tuple) -> Iterator[dict]:
        # An error before the first token clears the output: what it showed came from other inputs.
        try:
            served = session.run  # a load during this generation does not change the model under it
            if served is None:
                raise MiniLLMError(NO_MODEL_MESSAGE)
            sampling = form_sampling(*settings)
            # The source box is hidden for a decoder-only model: what it still holds is not an input.
            encoder_decoder = is_encoder_decoder(served.run.config)
            prompt, source = generation_inputs(encoder_decoder, prompt, source if encoder_decoder else None)
            sampling = self.limits.check_generation(prompt, source, sampling)
            note = unknown_characters_warning(served.run.tokenizer, prompt + (source or ""))
            chat = served.run.tokenizer.chat_template is not None  # (the prompt is a user's message: the answer)
            if not encoder_decoder and not chat:
                prompt = task_prompt(served.run, prompt)  # (a pairs run's source and separator)
        except Exception as e:
            yield {self.output: "", self.stats: "", self.error: error_box(e), self.warning: warning_box("")}
            return

        text = prompt if source is None and not chat else ""
        yield {self.output: text, self.stats: "Generating…", self.error: no_error(), self.warning: warning_box(note)}
        stopped, start = False, time.perf_counter()
        last_update = start
        tokens = None
        try:
            tokens = (served.reply([{"role": "user", "content": prompt}], sampling) if chat
                      else served.stream(prompt, sampling, source))
            for _, chunk in tokens:  # one item per token (chunk "" while a character is incomplete)
                text += chunk
                if time.perf_counter() - last_update >= STREAM_INTERVAL_S:
                    yield {self.output: text}
                    last_update = time.perf_counter()
                # Checked after every token: Stop (an event of this client running beside this one) ends it here.
                if session.stop.is_set():
                    stopped = True
                    break
        except Exception as e:
            n_tokens = tokens.n_tokens if tokens is not None else 0
            yield {self.output: text, self.stats: _stats(n_tokens, time.perf_counter() - start, sampling.seed, True),
                   self.error: error_box(e)}
            return
        finally:
            if tokens is not None:
                tokens.close()  # ends the model's token loop at once when we left early
        elapsed = time.perf_counter() - start
        end_note = tokens.end_note().capitalize() + ". " if tokens.end_note() else ""  # the model ended the text
        yield {self.output: text, self.stats: end_note + _stats(tokens.n_tokens, elapsed, sampling.seed, stopped)}
