"""One API request's generations on a run: its prompts tokenized and checked, one Generation per choice
submitted to the run's batch scheduler, and the choices' text as it arrives (stop strings cut, logprobs
kept with their tokens). Framework-free: minillm.serve.http turns the pieces into OpenAI's JSON and events.

    job = Job.completion(served, request, limits)     # or Job.chat(...); APIError for a bad prompt
    job.submit()                                      # APIError 429 when the run's queue is full
    async for index, piece, finish_reason in job.pieces(): ...
    job.cancel()                                      # the client went away: its rows leave the batch
"""

from __future__ import annotations

import asyncio
import random
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

from minillm.batch_engine import Generation, Token
from minillm.models import is_encoder_decoder
from minillm.sampling import MAX_SEED, SamplingConfig
from minillm.serve.api_requests import APIError, ChatRequest, CompletionRequest, GenerationRequest, bad
from minillm.serve.batching import QueueFull, Ticket, Update
from minillm.serve.chat import chat_prompt
from minillm.serve.limits import MAX_DRAWN_SEED, ServerLimits
from minillm.serve.run_cache import ServedRun
from minillm.serve.text import ChoiceText, Piece
from minillm.tokenizers import Tokenizer

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass
class Choice:
    """One choice of the request: what it submits and the text it has received."""

    index: int
    generation: Generation
    text: ChoiceText
    prompt_piece: Piece  # an echoed prompt: its text, and its tokens when logprobs are asked for
    scored_tokens: bool  # whether its tokens carry logprobs
    ticket: Ticket | None = None
    finish_reason: str | None = None
    generate: bool = True  # False: max_tokens 0 (echo only): the generated token is not used


class Job:
    """A request's choices on one run."""

    def __init__(self, served: ServedRun, request: GenerationRequest, choices: list[Choice],
                 prompt_tokens: int) -> None:
        self.served, self.request, self.choices = served, request, choices
        self.prompt_tokens = prompt_tokens
        self._updates: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()

    @classmethod
    def completion(cls, served: ServedRun, request: CompletionRequest, limits: ServerLimits) -> Job:
        run, seed = served.run, first_seed(request)
        tokenizer, encoder_decoder = run.tokenizer, is_encoder_decoder(run.config)
        if encoder_decoder and request.echo:
            raise bad("echo", "echo is not supported for an encoder-decoder model: its prompt is its source, "
                              "not the start of its output")
        choices, prompt_tokens = [], 0
        for p, prompt in enumerate(request.prompts):
            if encoder_decoder:
                ids, source = [], tokenizer.encode(prompt)
                if not source:
                    raise bad("prompt", "an encoder-decoder model needs a non-empty prompt: its source text")
            else:
                ids, source = tokenizer.encode(prompt) or [tokenizer.bos_id], None
            read = source if encoder_decoder else ids
            check_length(read, run.config.max_seq_len, request.model, "prompt")
            prompt_tokens += len(read)
            scored = request.logprobs is not None
            prompt_piece = echo_piece(tokenizer, prompt, ids, scored) if request.echo else Piece()
            for j in range(request.n):
                index = p * request.n + j
                generation = Generation(ids, sampling_for(request, seed, index, limits), source,
                                        () if request.ignore_eos else (tokenizer.eos_id,), request.logprobs,
                                        request.echo and scored)
                choices.append(Choice(index, generation, ChoiceText(tokenizer, request.stops, prompt_piece.text),
                                      prompt_piece, scored, generate=request.max_tokens > 0))
        return cls(served, request, choices, prompt_tokens)

    @classmethod
    def chat(cls, served: ServedRun, request: ChatRequest, limits: ServerLimits) -> Job:
        run, seed = served.run, first_seed(request)
        ids, stop_ids = chat_prompt(run, request.model, list(request.messages))
        stop_ids = () if request.ignore_eos else stop_ids
        check_length(ids, run.config.max_seq_len, request.model, "messages")
        choices = [Choice(i, Generation(ids, sampling_for(request, seed, i, limits), None, stop_ids, request.logprobs),
                          ChoiceText(run.tokenizer, request.stops), Piece(), request.logprobs is not None)
                   for i in range(request.n)]
        return cls(served, request, choices, len(ids))

    def submit(self) -> None:
        mailbox = Mailbox.of(asyncio.get_running_loop())

        def deliver(index: int):
            return lambda update: mailbox.post(self._updates, (index, update))

        try:
            tickets = self.served.scheduler().submit([c.generation for c in self.choices],
                                                     [deliver(c.index) for c in self.choices])
        except QueueFull as e:
            raise APIError(429, str(e), None, "server_busy") from None
        for choice, ticket in zip(self.choices, tickets, strict=True):
            choice.ticket = ticket

    def cancel(self) -> None:
        for choice in self.choices:
            if choice.ticket is not None:
                choice.ticket.cancel()

    @property
    def completion_tokens(self) -> int:
        return sum(choice.text.n_tokens for choice in self.choices)

    async def pieces(self) -> AsyncIterator[tuple[Choice, Piece]]:
        """(choice, its new piece) as the choices' tokens arrive, until every choice has its finish_reason
        (set before its last piece). Updates that arrived together make one piece per choice, so a client
        that falls behind gets fewer, larger pieces rather than a growing backlog. APIError 500 when the
        generation failed."""
        choices = {choice.index: choice for choice in self.choices}
        left = len(choices)
        while left:
            arrived = [await self._updates.get()]
            while not self._updates.empty():
                arrived.append(self._updates.get_nowait())
            changed: dict[int, Choice] = {}
            for index, update in arrived:
                choice = choices[index]
                if choice.finish_reason is None:  # (else: tokens made after a stop string, before its row left)
                    self._receive(choice, update)
                    left -= choice.finish_reason is not None
                    changed[index] = choice
            for choice in changed.values():
                piece = choice.text.take()
                if choice.prompt_piece.text or choice.prompt_piece.tokens:  # the echo comes first, whole
                    piece = Piece(piece.text, [*choice.prompt_piece.tokens, *piece.tokens],
                                  [*choice.prompt_piece.offsets, *piece.offsets])
                    choice.prompt_piece = Piece()
                if piece.text or piece.tokens or choice.finish_reason is not None:
                    yield choice, piece

    def _receive(self, choice: Choice, update: Update) -> None:
        """Add an update's tokens to the choice's text; end the choice at its end or a stop string."""
        if update.error is not None:
            self.cancel()
            raise APIError(500, f"the generation failed: {update.error}")
        if update.prompt_logprobs and choice.scored_tokens:
            choice.prompt_piece.tokens[1:] = update.prompt_logprobs  # the first prompt token has none
        for token in update.tokens if choice.generate else []:
            choice.text.add(token)
        if choice.text.stopped or not choice.generate:
            choice.ticket.cancel()
        if choice.text.stopped or update.done or not choice.generate:
            choice.finish_reason = FINISH_STOP if choice.text.stopped or update.stopped_by is not None \
                else FINISH_LENGTH
            choice.text.finish()


class Mailbox:
    """Updates from a scheduler's thread to an event loop's queues, with one wake-up of the loop for all the
    updates of a decode step (a wake-up per update, 16 per step, cost a visible share of a small model's step)."""

    _of_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Mailbox:
        mailbox = cls._of_loop.get(loop)
        if mailbox is None:
            mailbox = cls._of_loop[loop] = cls(loop)
        return mailbox

    def post(self, queue: asyncio.Queue, item: object) -> None:
        """Put `item` on `queue` (from any thread)."""
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:
                return  # a wake-up is on its way
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


def first_seed(request: GenerationRequest) -> int:
    """The request's seed, or one drawn for it; choice i uses this plus i."""
    return request.sampling.seed if request.sampling.seed is not None else random.randint(0, MAX_DRAWN_SEED)


def sampling_for(request: GenerationRequest, seed: int, index: int, limits: ServerLimits) -> SamplingConfig:
    tokens = request.max_tokens if request.max_tokens is not None else limits.max_new_tokens
    return request.sampling.replace(max_new_tokens=max(1, tokens), seed=(seed + index) % (MAX_SEED + 1))


def check_length(ids: list[int], context: int, model: str, param: str) -> None:
    if len(ids) > context:
        raise bad(param, f"the {param} is {len(ids):,} tokens; model {model!r} reads at most {context:,} "
                         "(its context length): shorten it")


def echo_piece(tokenizer: Tokenizer, prompt: str, ids: list[int], scored: bool) -> Piece:
    """The echoed prompt: its text as sent and, `scored`, its tokens (the first without a logprob) at their
    offsets (their logprobs come with the generation's first update)."""
    if not scored:
        return Piece(prompt)
    decoder, offsets, at = tokenizer.decode_stream(skip_special_tokens=True), [], 0
    for token_id in ids:
        offsets.append(at)
        at += len(decoder.step(token_id) or "")
    return Piece(prompt, [Token(token_id) for token_id in ids], offsets)
