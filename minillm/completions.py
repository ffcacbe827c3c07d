"""Whole generations, as a command line or a server gives them: stop strings, several samples of one prompt
decoded as one batch, prompts from a file, and the compile of the decode step announced and timed.

    tokens = with_stop_strings(stream_tokens(model, tokenizer, "ROMEO:", sampling), ["\\n\\n"])
    for _, chunk in tokens: ...                 # stops before the first blank line; tokens.stop_string
    result = complete(model, tokenizer, "ROMEO:", sampling, num_samples=3, stops=["\\n\\n"])
    for sample in result.samples: sample.text, sample.tokens, sample.stop_reason

The samples of one `complete` call are the rows of one batch, each with a seed of its own: sample i (from 0)
is drawn with `sampling.seed` + i, so it is the text a single generation with that seed gives (as the HTTP
API's `n` choices are); with a seed, each prompt of a file gets the same draws. Without a seed every row
draws from torch's global generator.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.engine import COMPILED_BLOCK, Engine
from minillm.errors import MiniLLMError
from minillm.generation import GenerationStop, TokenStream, encode_inputs
from minillm.sampling import MAX_SEED, SamplingConfig
from minillm.stop_strings import StopMatcher, check_stop_strings
from minillm.tokenizers import Tokenizer

MAX_SAMPLES = 1024  # rows of one batch at most (each holds a KV cache of the whole context)
COMPILE_NOTE = "compiling the decode step (once per model and setting)..."


class StopStringStream(TokenStream):
    """A TokenStream that ends at the first stop string of its text, which it leaves out (see
    minillm.stop_strings); `stop_string` says which one it found (None: none). Text that may begin a stop
    string is held back until it is known not to, so an item's text may be "" and a later one longer."""

    def __init__(self, tokens: TokenStream, stops: Iterable[str]) -> None:
        self.matcher = StopMatcher(stops)
        super().__init__(self._until_stop(tokens))

    @property
    def stop_string(self) -> str | None:
        return self.matcher.matched

    def _until_stop(self, tokens: TokenStream) -> Generator[tuple[int | None, str], None, GenerationStop]:
        try:
            for token_id, text in tokens:
                yield token_id, self.matcher.feed(text)
                if self.matcher.stopped:
                    return GenerationStop.STOP_STRING
        finally:
            tokens.close()
        rest = self.matcher.flush()
        if rest:
            yield None, rest
        return tokens.stop_reason


def with_stop_strings(tokens: TokenStream, stops: Iterable[str]) -> TokenStream:
    """`tokens`, ending at the first of `stops` in its text (`tokens` itself when there are none)."""
    stops = check_stop_strings(stops)
    return StopStringStream(tokens, stops) if stops else tokens


def stop_note(reason: GenerationStop | None, tokens: int, stop_string: str | None = None) -> str:
    """Why a generation ended, and after how many tokens: "stopped at end of text after 3 tokens"."""
    made = f"{tokens:,} token{'s' if tokens != 1 else ''}"
    if reason == GenerationStop.END_OF_TEXT:
        return f"stopped at end of text after {made}"
    if reason == GenerationStop.STOP_STRING:
        return f"stopped at the stop string {stop_string!r} after {made}"
    if reason == GenerationStop.MAX_NEW_TOKENS:
        return f"stopped at the limit of {made} (max_new_tokens)"
    return f"stopped early after {made}"


@dataclass
class Completion:
    """One generated sample: its text (without the prompt or a stop string), its tokens (EOS not counted;
    those of a stop string are), and why it ended."""

    text: str
    tokens: int
    stop_reason: GenerationStop
    stop_string: str | None = None


@dataclass
class Completions:
    """The samples of one prompt, the prompt's tokens, and the seconds the batch took."""

    samples: list[Completion]
    prompt_tokens: int
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(sample.tokens for sample in self.samples)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class _Row:
    """One sample being made: its tokens, its text so far, and its stop-string matcher."""

    decoder: Any
    matcher: StopMatcher
    ids: list[int] = field(default_factory=list)
    decoded: list[str] = field(default_factory=list)  # the stream decoder's chunks, before stop strings
    shown: list[str] = field(default_factory=list)
    reason: GenerationStop | None = None

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        chunk = self.decoder.step(token_id) or ""
        self.decoded.append(chunk)
        self.shown.append(self.matcher.feed(chunk))
        if self.matcher.stopped:
            self.reason = GenerationStop.STOP_STRING

    def finish(self, tokenizer: Tokenizer) -> Completion:
        """The sample, with a character still incomplete at the end (shown as U+FFFD, as stream_tokens does)."""
        if self.reason is None:
            self.reason = GenerationStop.MAX_NEW_TOKENS
        text, done = tokenizer.decode(self.ids), "".join(self.decoded)
        if not self.matcher.stopped and len(text) > len(done) and text.startswith(done):
            self.shown.append(self.matcher.feed(text[len(done):]))
        self.shown.append(self.matcher.flush())
        return Completion("".join(self.shown), len(self.ids), self.reason, self.matcher.matched)


def batch_inputs(model: nn.Module, tokenizer: Tokenizer, prompt: str, source: str | None, rows: int,
                 engine: Engine | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt ids, source ids or None), each (rows, T): the same input in every row of a batch."""
    if not isinstance(rows, int) or isinstance(rows, bool) or not 1 <= rows <= MAX_SAMPLES:
        raise MiniLLMError(f"the number of samples must be a whole number from 1 to {MAX_SAMPLES}, got {rows!r}")
    prompt_ids, source_ids = encode_inputs(model, tokenizer, prompt, source, engine)
    # (on the CPU: the model moves them to its device)
    return (torch.tensor([prompt_ids] * rows, dtype=torch.long),
            None if source_ids is None else torch.tensor([source_ids] * rows, dtype=torch.long))


def complete(model: nn.Module, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig | None = None,
             num_samples: int = 1, source: str | None = None, engine: Engine | None = None,
             stops: Iterable[str] = ()) -> Completions:
    """`num_samples` generations from one prompt (and source), decoded as one batch, sample i with seed + i
    (see the module docstring); each ends at EOS, at its first stop string or after max_new_tokens. The prompt
    is encoded as stream_tokens encodes it, and one sample's text equals what stream_tokens would yield for
    that row's tokens."""
    sampling = sampling or SamplingConfig()
    engine = engine or Engine(model)
    stops = check_stop_strings(stops)
    prompt_ids, source_ids = batch_inputs(model, tokenizer, prompt, source, num_samples, engine)
    rows = [_Row(tokenizer.decode_stream(skip_special_tokens=True), StopMatcher(stops)) for _ in range(num_samples)]
    start = time.perf_counter()
    seeds = None if sampling.seed is None else [(sampling.seed + i) % (MAX_SEED + 1) for i in range(num_samples)]
    steps = engine.stream(prompt_ids, sampling, source_ids=source_ids, eos_id=tokenizer.eos_id, row_seeds=seeds)
    try:
        for step in steps:  # (rows,) new ids; a row that ended gets pad ids until all have
            for row, token_id in zip(rows, step.tolist(), strict=True):
                if row.reason is not None:
                    continue
                if token_id == tokenizer.eos_id:
                    row.reason = GenerationStop.END_OF_TEXT
                else:
                    row.add(token_id)
            if all(row.reason is not None for row in rows):
                break
    finally:
        steps.close()
    samples = [row.finish(tokenizer) for row in rows]
    return Completions(samples, prompt_ids.size(1), time.perf_counter() - start)


def compile_decode_step(engine: Engine, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig,
                        num_samples: int = 1, source: str | None = None) -> float:
    """Compile `engine`'s decode steps for this setting and batch (a short throwaway generation that also
    passes a slide of the window when the real one will); returns the seconds it took: about none when it
    already compiled for them, and 0 when the engine does not compile."""
    if not engine.compile:
        return 0.0
    prompt_ids, source_ids = batch_inputs(engine.model, tokenizer, prompt, source, num_samples, engine)
    # Enough tokens for each compiled graph the generation will use: a block, the one-step graph at its end,
    # and the refill after a slide (the window slides after max_seq_len - prompt tokens).
    to_slide = max(0, engine.model.config.max_seq_len - prompt_ids.size(1))
    warm_up = sampling.replace(max_new_tokens=min(sampling.max_new_tokens, to_slide + COMPILED_BLOCK + 3))
    start = time.perf_counter()
    for _ in engine.stream(prompt_ids, warm_up, source_ids=source_ids):  # no EOS: it must not end early
        pass
    return time.perf_counter() - start


def read_prompt_file(path: str | Path) -> list[tuple[int, str]]:
    """(line number, prompt) for each line of a UTF-8 text file that is not blank (a line's own spaces kept;
    a Windows line end is not part of it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MiniLLMError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError:
        raise MiniLLMError(f"{path} is not UTF-8 text; save the prompts as UTF-8, one per line") from None
    except OSError as e:
        raise MiniLLMError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
    prompts = [(number, line.removesuffix("\r")) for number, line in enumerate(text.split("\n"), start=1)
               if line.strip()]
    if not prompts:
        raise MiniLLMError(f"{path} has no prompt: write one prompt per line")
    return prompts


def completion_record(result: Completions, settings: SamplingConfig, stops: Iterable[str],
                      **inputs: Any) -> dict[str, Any]:
    """One prompt's JSON Lines record: its inputs (line, prompt, source), its samples with their token counts
    and stop reasons, the prompt's tokens, the speed, and the settings that made them."""
    return {**inputs, "prompt_tokens": result.prompt_tokens,
            "samples": [{"text": s.text, "tokens": s.tokens, "stop_reason": str(s.stop_reason),
                         "stop_string": s.stop_string} for s in result.samples],
            "tokens_per_second": round(result.tokens_per_second, 1),
            "settings": {**asdict(settings), "num_samples": len(result.samples), "stop": list(stops)}}
