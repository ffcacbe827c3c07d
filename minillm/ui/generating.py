"""Generate and Stop handlers: the settings from the form, streaming the output, stopping between tokens."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from minillm.errors import MiniLLMError
from minillm.generation import generation_inputs, stream_tokens, unknown_characters_warning
from minillm.models import is_encoder_decoder
from minillm.sampling import SamplingConfig
from minillm.ui.session import Session, error_box, no_error, warning_box

# Generation settings: the sliders' ranges (SamplingConfig checks the values; its defaults are the CLI's).
# 0 turns top-k off, 1.0 turns top-p off. MAX_NEW_TOKENS and MAX_PROMPT_CHARS are this server's limits.
DEFAULTS = SamplingConfig()
MAX_NEW_TOKENS = 1000
MAX_PROMPT_CHARS = 20_000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
MAX_REPETITION_PENALTY = 2.0
# The page is updated at most this often while tokens stream in: an update per token would cost more
# than a small model takes to make the token. Stop is still checked after every token.
STREAM_INTERVAL_S = 0.05
# Generations one session (a tab, an API client) may run at once; beyond it a request is refused at once.
# One, below the server's CONCURRENCY_LIMIT: a client that queues many long generations holds one worker
# and leaves the other to everyone else.
MAX_GENERATIONS_PER_SESSION = 1
MAX_SEED = 2**31 - 1  # a blank seed draws one in [0, MAX_SEED] and reports it: any output can be redone

GENERATE_LABEL = "Generate"
GENERATING_LABEL = "Generating…"
NO_MODEL_MESSAGE = "no model loaded yet: pick a run or enter its paths, then press Load model"
BUSY_MESSAGE = ("this session is already generating: wait for that generation to end, or press Stop "
                f"(a session runs at most {MAX_GENERATIONS_PER_SESSION} at a time)")


def _sampling(prompt: str, max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
              repetition_penalty: Any, seed: Any) -> SamplingConfig:
    """The form's (or the API's) settings as a SamplingConfig, which checks their ranges; a blank seed
    draws one. Here only what a form sends is turned into numbers, and the server's own limits apply."""

    def number(name: str, value: Any) -> float | int:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise MiniLLMError(f"{name} must be a number, got {value!r}") from None
        return int(value) if value.is_integer() else value  # sliders send 3.0 for 3

    if len(prompt or "") > MAX_PROMPT_CHARS:
        raise MiniLLMError(f"the prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        seed = random.randint(0, MAX_SEED)
    sampling = SamplingConfig(
        max_new_tokens=number("max_new_tokens", max_new_tokens), temperature=number("temperature", temperature),
        top_k=number("top_k", top_k), top_p=number("top_p", top_p),
        repetition_penalty=number("repetition_penalty", repetition_penalty), seed=number("seed", seed))
    if sampling.max_new_tokens > MAX_NEW_TOKENS:
        raise MiniLLMError(f"max_new_tokens is at most {MAX_NEW_TOKENS} on this server, got {sampling.max_new_tokens}")
    return sampling


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
             top_p: Any, repetition_penalty: Any, seed: Any,
             request: gr.Request | None = None) -> Iterator[tuple[Any, Any, Any, Any]]:
    """Stream the output into the page as the tokens arrive; Stop ends it between two tokens.

    Yields (output, stats, error, warning). A decoder-only model's output is the prompt followed by
    the continuation (as `minillm generate` prints it); an encoder-decoder's is the generated target.
    A session runs at most MAX_GENERATIONS_PER_SESSION at once: one more is refused at once, so a client
    that queues many cannot hold the server's few workers while other sessions wait.
    """
    session.bind(request)
    if not session.begin_generation(MAX_GENERATIONS_PER_SESSION):
        yield gr.update(), gr.update(), error_box(BUSY_MESSAGE), gr.update()
        return
    try:
        yield from _generation_steps(session, prompt, source, max_new_tokens, temperature, top_k, top_p,
                                     repetition_penalty, seed)
    finally:
        session.end_generation()


def _generation_steps(session: Session, prompt: str, source: str, max_new_tokens: Any, temperature: Any,
                      top_k: Any, top_p: Any, repetition_penalty: Any,
                      seed: Any) -> Iterator[tuple[Any, Any, Any, Any]]:
    # An error before the first token clears the output: what it showed came from other inputs.
    try:
        run = session.run  # a load during this generation does not change the model under it
        if run is None:
            raise MiniLLMError(NO_MODEL_MESSAGE)
        sampling = _sampling(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        # The source box is hidden for a decoder-only model: what it still holds is not an input.
        encoder_decoder = is_encoder_decoder(run.config)
        visible_source = source if encoder_decoder else None
        prompt, source = generation_inputs(encoder_decoder, prompt, visible_source)
        note = unknown_characters_warning(run.tokenizer, prompt + (source or ""))
    except Exception as e:
        yield "", "", error_box(e), warning_box("")
        return

    text = prompt if source is None else ""
    yield text, "Generating…", no_error(), warning_box(note)
    n_tokens, stopped, start = 0, False, time.perf_counter()
    last_update = start
    tokens = None
    try:
        tokens = stream_tokens(run.model, run.tokenizer, prompt, sampling, source=source)
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
        yield text, _stats(n_tokens, elapsed, sampling.seed, True), error_box(e), gr.update()
        return
    finally:
        if tokens is not None:
            tokens.close()  # ends the model's token loop at once when we left early
    elapsed = time.perf_counter() - start
    end_note = tokens.end_note().capitalize() + ". " if tokens.end_note() else ""  # the model ended the text
    yield text, end_note + _stats(n_tokens, elapsed, sampling.seed, stopped), gr.update(), gr.update()


def stop(session: Session) -> None:
    """Ask this tab's generation, running or queued, to end after its current token (the text so far
    stays). With none under way it does nothing."""
    if session.generating:
        session.stop.set()
