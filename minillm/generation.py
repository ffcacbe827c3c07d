"""Text in, text out: the one generation entry point that the CLI and the UI both call.

    for chunk in stream_text(run.model, run.tokenizer, "ROMEO:", SamplingConfig(max_new_tokens=200, seed=1)):
        print(chunk, end="", flush=True)
    reply = stream_reply(run.model, run.tokenizer, [{"role": "user", "content": "2+3?"}])  # a chat run's answer

A chat run's answer (`stream_reply`) is the model's continuation of the conversation rendered by the run's
chat template with the generation prompt; it stops at the template's end-of-turn token, and a history longer
than the context loses its oldest turns first (`fit_history`; the stream's `dropped` says how many).

Token ids in, token ids out is `minillm.engine.Engine` (or anything that streams like it: a server's batch
scheduler, minillm.serve.batching, which decodes many clients' generations together); the sampling settings
and their defaults are `minillm.sampling.SamplingConfig`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch
from torch import nn

from minillm.checkpoint import Run
from minillm.data.prepare import run_task, sample_prompt, sample_prompt_ids
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.models import is_encoder_decoder
from minillm.sampling import SamplingConfig
from minillm.tokenizers import Tokenizer
from minillm.tokenizers.chat_template import Message, check_messages

# A chat's prompt (the history) may fill the context but for room for the answer: max_new_tokens, or this
# share of the context when that is more.
ANSWER_ROOM_SHARE = 0.5


class TokenEngine(Protocol):
    """What the functions here generate with: an Engine, or a server's BatchScheduler (minillm.serve.batching),
    which streams a generation of one row the way Engine.stream does."""

    model: nn.Module

    def stream(self, prompt_ids: torch.Tensor, sampling: SamplingConfig, *, source_ids: torch.Tensor | None = None,
               eos_id: int | Sequence[int] | None = None) -> Iterator[torch.Tensor]: ...


def generation_inputs(encoder_decoder: bool, prompt: str | None, source: str | None) -> tuple[str, str | None]:
    """(prompt, source) for stream_text from what the user typed; the CLI and the UI both read input so.

    Decoder-only: the prompt, and no source. Encoder-decoder: the source is the text to transform and the
    prompt an optional start of the target; with no source, the prompt is taken as the source (a model
    trained on plain text continues its source).
    """
    prompt, source = prompt or "", source or ""
    if not encoder_decoder:
        if source.strip():
            raise MiniLLMError("this is a decoder-only model: it takes no source text; put the text in the prompt")
        return prompt, None
    if not source.strip():
        prompt, source = "", prompt
    if not source.strip():
        raise MiniLLMError("this is an encoder-decoder model: give a source text to generate from")
    return prompt, source


def task_prompt(run: Run, prompt: str) -> str:
    """What the user's prompt becomes for the run's task: for a decoder-only run trained on pairs, the source
    with the separator after it, so that the answer follows (as-is when the run folder has no split.json)."""
    try:
        task = run_task(run.folder.path, is_encoder_decoder(run.config))
    except MiniLLMError:
        return prompt
    return task.prompt_for(prompt)


def unknown_characters_warning(tokenizer: Tokenizer, text: str) -> str:
    """A warning when `text` has characters the run's tokenizer cannot spell ("" when none): a character
    tokenizer never saw them, or an imported BPE without byte fallback drops them or makes them unknown."""
    unknown = tokenizer.count_unknown(text)
    if not unknown:
        return ""
    becomes = ("drops them" if tokenizer.unk_id is None else
               f"makes them its unknown token {tokenizer.token_text(tokenizer.unk_id)}")
    return (f"{unknown} character(s) of the input are not in this run's vocabulary; the tokenizer {becomes}, and "
            "the model has never seen them")


def stream_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig | None = None,
                source: str | None = None, engine: TokenEngine | None = None) -> Iterator[str]:
    """Yield the generated continuation as text chunks, never a broken character; stops at EOS.

    Decoder-only: continues `prompt` (which is not yielded again); an empty prompt starts from the BOS
    token, which begins every sample in the training data, so the model writes a new sample.
    Encoder-decoder: `source` is the encoder input, encoded as plain tokens like the training sources
    (no special tokens); `prompt`, if any, is a prefix of the target that the model continues.
    The concatenated chunks equal tokenizer.decode(new token ids). Same seed -> same text (on one device).
    Closing the iterator stops the model's token loop. `engine`: one made for `model` with options
    (Engine(model, compile=True)); by default a plain one.
    """
    tokens = stream_tokens(model, tokenizer, prompt, sampling, source, engine)
    try:
        for _, chunk in tokens:
            if chunk:
                yield chunk
    finally:
        tokens.close()


class GenerationStop(str, Enum):
    """Why a generation ended (TokenStream.stop_reason; None while it runs, or when it was closed early)."""

    END_OF_TEXT = "end_of_text"  # the model chose EOS: it ended the text itself
    END_OF_TURN = "end_of_turn"  # a chat's model chose its end-of-turn token: it ended its answer
    MAX_NEW_TOKENS = "max_new_tokens"  # it made SamplingConfig.max_new_tokens tokens
    STOP_STRING = "stop_string"  # its text reached a stop string (see minillm.completions)

    def __str__(self) -> str:
        return self.value


class TokenStream:
    """An iterator of (token_id, text), as stream_tokens describes; once it is used up, `stop_reason` says
    why it ended (a GenerationStop) and `n_tokens` how many tokens it gave."""

    def __init__(self, steps: Generator[tuple[int | None, str], None, GenerationStop]):
        self._steps = steps
        self.n_tokens = 0
        self.stop_reason: GenerationStop | None = None
        self.dropped = 0  # a chat's oldest messages left out to fit the context (stream_reply, fit_history)

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> tuple[int | None, str]:
        try:
            token_id, text = next(self._steps)
        except StopIteration as end:
            self.stop_reason = end.value
            raise StopIteration from None
        self.n_tokens += token_id is not None
        return token_id, text

    def close(self) -> None:
        """Stop the model's token loop now (also when the caller stopped early)."""
        self._steps.close()

    def end_note(self) -> str:
        """"stopped at end of text after 3 tokens" when the model ended the text (or its turn) itself, else ""."""
        what = {GenerationStop.END_OF_TEXT: "text", GenerationStop.END_OF_TURN: "turn"}.get(self.stop_reason)
        if what is None:
            return ""
        return f"stopped at end of {what} after {self.n_tokens} token{'s' if self.n_tokens != 1 else ''}"


def stream_tokens(model: nn.Module, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig | None = None,
                  source: str | None = None, engine: TokenEngine | None = None) -> TokenStream:
    """Yield (token_id, text) for each generated token; text is "" while a character is incomplete.

    The same stream as stream_text (which joins the texts), one item per token, for callers that count
    tokens or stop between any two tokens (the UI). A last item (None, text) carries a character still
    incomplete at the end, so the texts always add up to tokenizer.decode(new token ids). After the last
    item, the stream's `stop_reason` and `end_note()` say whether the model ended the text (EOS).
    """
    return TokenStream(_token_steps(model, tokenizer, prompt, sampling or SamplingConfig(), source,
                                    engine or Engine(model)))


def encode_inputs(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], source: str | None,
                  engine: TokenEngine | None = None) -> tuple[list[int], list[int] | None]:
    """(prompt ids, source ids or None): what the engine continues for a prompt (text, or ids that may hold
    special tokens: a chat template's) and source, as stream_tokens describes; bad input (not text, no source
    for an encoder-decoder, an engine of another model) refused."""
    if not isinstance(prompt, (str, list)) or (source is not None and not isinstance(source, str)):
        raise MiniLLMError("prompt and source must be text")
    if engine is not None and engine.model is not model:
        raise MiniLLMError("the engine was made for another model")
    if is_encoder_decoder(model.config):
        if isinstance(prompt, list):
            raise MiniLLMError("this is an encoder-decoder model: it generates from a source text, not from ids")
        if source is None or not source.strip():
            raise MiniLLMError("this is an encoder-decoder model: give a source text to generate from")
        return tokenizer.encode(prompt), tokenizer.encode(source)  # (too long a source: the model's own error)
    return (list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)) or [tokenizer.bos_id], None


def stream_from_ids(model: nn.Module, tokenizer: Tokenizer, prompt_ids: list[int],
                    sampling: SamplingConfig | None = None, engine: TokenEngine | None = None,
                    stop_ids: list[int] | None = None) -> TokenStream:
    """stream_tokens from token ids (a decoder-only model): the continuation of `prompt_ids`, which may hold
    special tokens (a chat template's); it stops at any of `stop_ids` (default: EOS)."""
    if is_encoder_decoder(model.config):
        raise MiniLLMError("this is an encoder-decoder model: it generates from a source text, not from ids")
    return TokenStream(_token_steps(model, tokenizer, list(prompt_ids), sampling or SamplingConfig(), None,
                                    engine or Engine(model), stop_ids))


def fit_history(tokenizer: Tokenizer, messages: list[Message], context: int,
                max_new_tokens: int) -> tuple[list[Message], int]:
    """(the messages whose prompt fits the context with room for the answer, how many were left out): the
    oldest turns after the leading system messages go first, and the kept ones begin with a user's. A last
    message that does not fit even alone is a MiniLLMError."""
    room = context - min(max_new_tokens, int(context * ANSWER_ROOM_SHARE))
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    system, turns = messages[:n_system], messages[n_system:]
    dropped = 0
    while turns and len(tokenizer.apply_chat_template([*system, *turns], add_generation_prompt=True)) > room:
        turns, dropped = turns[1:], dropped + 1
        while turns and turns[0]["role"] != "user" and len(turns) > 1:
            turns, dropped = turns[1:], dropped + 1
    if not turns and messages[n_system:]:
        size = len(tokenizer.apply_chat_template([*system, messages[-1]], add_generation_prompt=True))
        raise MiniLLMError(f"the last message (with the system message) is {size:,} tokens, more than the {room:,} "
                           f"that the model's {context}-token context leaves for a prompt; shorten it")
    return [*system, *turns], dropped


def stream_reply(model: nn.Module, tokenizer: Tokenizer, messages: list[Message],
                 sampling: SamplingConfig | None = None, engine: TokenEngine | None = None) -> TokenStream:
    """The assistant's next turn after `messages` ({"role", "content"} dicts), streamed as stream_tokens'
    items: the conversation rendered by the tokenizer's chat template with the generation prompt (cut from its
    oldest turns to fit the context: the stream's `dropped`), stopped at the end of the turn."""
    sampling = sampling or SamplingConfig()
    kept, dropped = fit_history(tokenizer, check_messages(messages), model.config.max_seq_len,
                                sampling.max_new_tokens)
    ids = tokenizer.apply_chat_template(kept, add_generation_prompt=True)
    stream = stream_from_ids(model, tokenizer, ids, sampling, engine, tokenizer.chat_stop_ids())
    stream.dropped = dropped
    return stream


def _token_steps(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], sampling: SamplingConfig,
                 source: str | None, engine: TokenEngine,
                 stop_ids: list[int] | None = None) -> Generator[tuple[int | None, str], None, GenerationStop]:
    """stream_tokens' items (a list `prompt`: ids, for stream_from_ids); returns why it ended."""
    prompt_ids, source_ids = encode_inputs(model, tokenizer, prompt, source, engine)
    stops = stop_ids or [tokenizer.eos_id]
    tokens = engine.stream(torch.tensor([prompt_ids], dtype=torch.long), sampling,
                           source_ids=None if source_ids is None else torch.tensor([source_ids], dtype=torch.long),
                           eos_id=stops[0] if len(stops) == 1 else stops)  # (the engine takes one id, or several)

    decoder = tokenizer.decode_stream(skip_special_tokens=True)
    new_ids: list[int] = []
    emitted: list[str] = []
    reason = GenerationStop.MAX_NEW_TOKENS
    try:
        for token in tokens:
            token_id = int(token[0])
            if token_id in stops:
                reason = GenerationStop.END_OF_TEXT if token_id == tokenizer.eos_id else GenerationStop.END_OF_TURN
                break
            new_ids.append(token_id)
            chunk = decoder.step(token_id) or ""
            emitted.append(chunk)
            yield token_id, chunk
    finally:
        tokens.close()  # stops the model's loop now, also when our caller stopped early
    # A character still incomplete at the end (e.g. half of an emoji's bytes) was held back by the
    # stream decoder; the full decode shows it (as U+FFFD), so the chunks add up to decode(new_ids).
    text, done = tokenizer.decode(new_ids), "".join(emitted)
    if len(text) > len(done) and text.startswith(done):
        yield None, text[len(done):]
    return reason


SHOWCASE_SEED = 0  # a showcase sample is the same text every time for the same run


@dataclass(frozen=True)
class Showcase:
    """A sample from a run's model in the style of its data, with the settings that make it: what `minillm
    train` prints at its end and an export's model card shows (`showcase` makes it)."""

    prompt: str  # from the run's test split (see data.prepare.sample_prompt)
    prefix: str  # the text the model continues, which the sample starts with ("" for an encoder-decoder)
    source: str | None  # the encoder-decoder's source (the prompt), or None
    sampling: SamplingConfig
    prompt_ids: list[int] | None = None  # a chat run's: the test conversation up to its answer (as `prompt`)

    def tokens(self, run: Run, engine: TokenEngine | None = None) -> TokenStream:
        """The sample's tokens, streamed (see stream_tokens); the text after `prefix`."""
        if self.prompt_ids is not None:
            return stream_from_ids(run.model, run.tokenizer, self.prompt_ids, self.sampling, engine,
                                   run.tokenizer.chat_stop_ids())
        return stream_tokens(run.model, run.tokenizer, self.prefix, self.sampling, self.source, engine)


def showcase(run: Run, max_new_tokens: int, prompt_tokens: int) -> Showcase:
    """The showcase sample of `run`: its prompt is the start of the run's test split (a pair file: the first
    test source; a chat run: the first test conversation up to its answer), at most `prompt_tokens` tokens and
    half the context (a chat run's: the context); sampling with the default settings and SHOWCASE_SEED. A run
    folder without its split data is a MiniLLMError."""
    encoder_decoder = is_encoder_decoder(run.config)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, seed=SHOWCASE_SEED)
    ids = sample_prompt_ids(run.folder.path, encoder_decoder)
    if ids is not None:
        ids = ids[-run.config.max_seq_len:]
        return Showcase(run.tokenizer.decode(ids, skip_special_tokens=False), "", None, sampling, ids)
    prompt = sample_prompt(run.folder.path, run.tokenizer, min(prompt_tokens, run.config.max_seq_len // 2),
                           encoder_decoder)
    prefix, source = generation_inputs(encoder_decoder, prompt, None)
    return Showcase(prompt, prefix, source, sampling)


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig | None = None,
                  source: str | None = None, engine: TokenEngine | None = None) -> str:
    """The whole continuation as one string (stream_text, joined)."""
    return "".join(stream_text(model, tokenizer, prompt, sampling, source, engine))
