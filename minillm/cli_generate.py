"""What `minillm generate` writes (the CLI's generate command; the work is minillm.completions'):

    stdout  the prompt and its continuation (decoder-only), the generated target (encoder-decoder), or the
            answer to the prompt as a user's message (a chat run), streamed; with --num-samples N, the N
            samples one after another, SAMPLE_SEPARATOR between them; with --prompt-file, one JSON Lines
            record a prompt (completions.completion_record)
    stderr  warnings, the compile note and its time, and after the text, on a line of its own, why it
            stopped and its tokens/s
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from minillm.checkpoint import Run, load_run
from minillm.completions import (
    COMPILE_NOTE,
    check_stop_strings,
    compile_decode_step,
    complete,
    completion_record,
    read_prompt_file,
    stop_note,
    with_stop_strings,
)
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.generation import generation_inputs, stream_reply, stream_tokens, task_prompt, unknown_characters_warning
from minillm.models import is_encoder_decoder
from minillm.sampling import SamplingConfig

SAMPLE_SEPARATOR = "-" * 40  # a line between the samples of --num-samples on stdout
MIN_SECONDS = 1e-9  # (a rate over no measurable time)


def generate(run_dir: Path, sampling: SamplingConfig, prompt: str = "", source: str | None = None,
             prompt_file: Path | None = None, num_samples: int = 1, stops: list[str] | tuple[str, ...] = (),
             compile: bool = False, device: str | None = None) -> int:
    """The generate command: load the run, then one prompt (streamed, or N samples) or a file of prompts."""
    run = load_run(run_dir, device)
    stops = check_stop_strings(stops)
    engine = Engine(run.model, compile=compile)
    if prompt_file is not None:
        if prompt or source:
            raise MiniLLMError("--prompt-file gives the prompts (an encoder-decoder's sources): leave out --prompt "
                               "and --source")
        return generate_from_file(run, engine, prompt_file, sampling, num_samples, stops)
    encoder_decoder = is_encoder_decoder(run.config)
    prompt, source = generation_inputs(encoder_decoder, prompt, source)
    warn(unknown_characters_warning(run.tokenizer, prompt + (source or "")))
    if run.tokenizer.chat_template is not None:
        return reply(run, engine, prompt, sampling, num_samples, stops)
    if not encoder_decoder:
        prompt = task_prompt(run, prompt)  # (a pairs run's: the source and the separator, so the answer follows)
    compile_first(engine, run, prompt, sampling, num_samples, source)
    prefix = "" if encoder_decoder else prompt  # stdout = prompt + continuation (decoder-only)
    if num_samples == 1:
        sys.stdout.write(prefix)
        tokens = stream_tokens(run.model, run.tokenizer, prompt, sampling, source, engine)
        write_stream(with_stop_strings(tokens, stops), timed=True)
        return 0
    warn("--temperature 0 is greedy: every sample is the same text" if sampling.greedy else "")
    result = complete(run.model, run.tokenizer, prompt, sampling, num_samples, source, engine, stops)
    for number, sample in enumerate(result.samples, start=1):
        print(f"{SAMPLE_SEPARATOR}\n" if number > 1 else "", prefix, sample.text, sep="", flush=True)
        note = stop_note(sample.stop_reason, sample.tokens, sample.stop_string)
        print(f"(sample {number} of {len(result.samples)}: {note})", file=sys.stderr, flush=True)
    print(f"({result.tokens:,} tokens in {result.seconds:.2f} s: {result.tokens_per_second:,.1f} tokens/s)",
          file=sys.stderr)
    return 0


def reply(run: Run, engine: Engine, prompt: str, sampling: SamplingConfig, num_samples: int,
          stops: tuple[str, ...]) -> int:
    """A chat run's answer to the prompt sent as one user message, streamed to stdout."""
    if num_samples != 1:
        raise MiniLLMError(f"{run.folder.path} is a chat run: it answers one message at a time; leave out "
                           "--num-samples (or use `minillm serve`, whose chat completions take n)")
    print(f"note: {run.folder.path} is a chat run: the prompt is sent as one user message and stdout is the "
          f"answer (`minillm chat {run.folder.path}` for a conversation)", file=sys.stderr)
    tokens = stream_reply(run.model, run.tokenizer, [{"role": "user", "content": prompt}], sampling, engine)
    write_stream(with_stop_strings(tokens, stops), timed=True)
    return 0


def generate_from_file(run: Run, engine: Engine, path: Path, sampling: SamplingConfig, num_samples: int,
                       stops: tuple[str, ...]) -> int:
    """--prompt-file: one JSON Lines record a prompt on stdout, then the totals on stderr."""
    if run.tokenizer.chat_template is not None:
        raise MiniLLMError(f"{run.folder.path} is a chat run: --prompt-file is for text, pair and encoder-decoder "
                           "runs; send the prompts as messages (`minillm chat`, or `minillm serve`)")
    prompts, tokens, seconds = read_prompt_file(path), 0, 0.0
    encoder_decoder = is_encoder_decoder(run.config)
    for index, (line, text) in enumerate(prompts):
        prompt, source = generation_inputs(encoder_decoder, text, None)  # (an encoder-decoder's: the source)
        prompt = prompt if encoder_decoder else task_prompt(run, prompt)
        warning = unknown_characters_warning(run.tokenizer, text)
        warn(f"line {line}: {warning}" if warning else "")
        if index == 0:
            compile_first(engine, run, prompt, sampling, num_samples, source)
        result = complete(run.model, run.tokenizer, prompt, sampling, num_samples, source, engine, stops)
        inputs = {"line": line, "prompt": prompt, **({"source": source} if encoder_decoder else {})}
        print(json.dumps(completion_record(result, sampling, stops, **inputs), ensure_ascii=False), flush=True)
        tokens, seconds = tokens + result.tokens, seconds + result.seconds
    print(f"({len(prompts)} prompt{'s' if len(prompts) != 1 else ''}, {tokens:,} tokens in {seconds:.2f} s: "
          f"{tokens / max(seconds, MIN_SECONDS):,.1f} tokens/s)", file=sys.stderr)
    return 0


def write_stream(tokens: Any, timed: bool = False) -> None:
    """Write a TokenStream's chunks to stdout as they come, then a newline; then on stderr, on its own line,
    why it stopped and its tokens/s (`timed`), or else a note when the model ended the text itself (EOS)."""
    start = time.perf_counter()
    try:
        for _, chunk in tokens:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    finally:
        tokens.close()
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    sys.stdout.flush()
    if timed:
        note = stop_note(tokens.stop_reason, tokens.n_tokens, getattr(tokens, "stop_string", None))
        print(f"({note}; {tokens.n_tokens / max(seconds, MIN_SECONDS):,.1f} tokens/s)", file=sys.stderr)
    elif tokens.end_note():
        print(f"({tokens.end_note()})", file=sys.stderr)


def warn(warning: str) -> None:
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def compile_first(engine: Engine, run: Run, prompt: str, sampling: SamplingConfig, num_samples: int,
                  source: str | None) -> None:
    """With --compile: compile the decode step before the text starts, saying so and how long it took."""
    if engine.compile:
        print(COMPILE_NOTE, file=sys.stderr, flush=True)
        seconds = compile_decode_step(engine, run.tokenizer, prompt, sampling, num_samples, source)
        print(f"(compiled in {seconds:.1f} s)", file=sys.stderr, flush=True)
