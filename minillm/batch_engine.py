"""Many generations from one model at once, each at its own position, one decode step for all of them: what
a server needs when several clients generate from the same run (minillm.serve.batching drives it).

    batch = BatchEngine(model, max_rows=16)
    row, made = batch.add(Generation([5, 9, 2], SamplingConfig(seed=1), stop_ids=(eos_id,)))  # prefill
    while batch.rows:
        for row, made in batch.step():   # one new token for every row in flight (a row that slid: two)
            ...                          # row.done once it made a stop id or its max_new_tokens

Rows join (`add`: the prompt prefilled into a free slot of the batch's cache) and leave (`remove`, or by
ending) between steps; a step decodes every row in flight in one forward pass over a
minillm.models.decoding.SlotCache, where each row attends over its own positions only. Each row is the
generation `Engine.stream` makes alone for the same prompt and settings: its own random generator (its
noise is its own, not a slice of one batch draw), its own sampling settings and seen tokens, its own
sliding window (the engine's rule: past max_seq_len the row's slot is prefilled again with the last
CONTEXT_KEEP_FRACTION of the window). Only the floating-point rounding of a batched matrix product can differ
from a lone row's, far below what changes a token but at a near tie.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minillm.engine import COMPILED_GRAPHS, CONTEXT_KEEP_FRACTION, compile_step, next_logits
from minillm.errors import MiniLLMError
from minillm.models import is_encoder_decoder
from minillm.models.decoding import DecodingModel, Memory, SlotCache, StaticSlots, eval_mode
from minillm.sampling import SamplingConfig, draw_noise, sample_next_token, seen_tokens

# One background compile at a time in a process: two would only split the same cores (and torch's compiler
# state is shared between threads).
COMPILE_LOCK = threading.Lock()


def row_buckets(max_rows: int) -> list[int]:
    """The batch sizes a compiled step is made for: powers of two below max_rows, and max_rows."""
    sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return [*sizes, max_rows]


@dataclass(frozen=True)
class Generation:
    """What one generation asks for. prompt_ids: the text to continue (decoder-only, at least one id) or the
    target's start after BOS (encoder-decoder, may be empty); source_ids: the encoder-decoder's input.
    stop_ids: ids that end it (not counted as text: the row's `stopped_by`). logprobs: with each token, its
    log-probability and the `logprobs` likeliest alternatives (0: the chosen one's only; None: none).
    prompt_logprobs: each prompt token's log-probability too (after the first), from the prefill."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    source_ids: list[int] | None = None
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class Token:
    """One token a row made: its id and, when its generation asked, its log-probability under the model
    (log-softmax of the model's logits, before any sampling setting) and the top alternatives (id, logprob)."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Row:
    """A generation in flight: its tokens so far, its window, its random generator and its slot."""

    generation: Generation
    tokens: list[int]  # the decoder's context and every token made
    start: int  # the window is tokens[start:]
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (1, V): tokens seen, for the repetition penalty
    slot: int = -1
    made: int = 0
    stopped_by: int | None = None
    done: bool = False
    prompt_logprobs: list[Token] = field(default_factory=list)


class BatchEngine:
    """Decodes up to `max_rows` generations of one model together; not thread-safe (one thread drives it)."""

    def __init__(self, model: DecodingModel, max_rows: int) -> None:
        if not isinstance(model, DecodingModel):
            raise MiniLLMError(f"a {type(model).__name__} cannot generate: it is not a DecodingModel")
        if max_rows < 1:
            raise MiniLLMError(f"a batch holds at least one row, got {max_rows}")
        self.model, self.max_rows = model, max_rows
        self.rows: list[Row] = []  # by slot
        self._cache: SlotCache | None = None  # made at the first row, like that row's cache
        self._keep = max(1, int(model.config.max_seq_len * CONTEXT_KEEP_FRACTION))
        self._compiled: dict[int, Callable[..., torch.Tensor]] = {}  # rows -> compiled step, once ready

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    @property
    def compiled(self) -> bool:
        """Whether every size of batch has its compiled step (compile_steps has finished)."""
        return len(self._compiled) == len(row_buckets(self.max_rows))

    def compile_steps(self) -> None:
        """Compile the decode step for each bucket of rows (1, 2, 4, ... max_rows: a batch of n rows runs the
        smallest bucket that holds it), smallest first; each serves the steps from when it is ready, until
        then they run eagerly. Takes seconds to minutes: call it in a background thread (one compiles at a
        time per process: COMPILE_LOCK)."""
        model = self.model
        with eval_mode(model):
            like = model.new_cache(1, self._dummy_source())
        device = like.slots.device
        for rows in row_buckets(self.max_rows):
            with COMPILE_LOCK, torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS), torch.inference_mode():
                def static_step(tokens: torch.Tensor, lengths: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
                    return next_logits(model, tokens, StaticSlots.over(lengths, *tensors))

                step = compile_step(static_step, device)
                scratch = SlotCache(like, rows)
                tokens = torch.full((rows, 1), model.config.pad_id, device=device)
                with eval_mode(model):
                    step(tokens, scratch.lengths, *scratch.static_tensors(rows))  # compiles
            self._compiled[rows] = step

    def _eval_mode(self) -> contextlib.AbstractContextManager:
        """Eval mode for a forward pass. A served model is in eval mode already: its root module's flag says
        so without the walk over every module that eval_mode makes (a visible part of a small model's step)."""
        return eval_mode(self.model) if self.model.training else contextlib.nullcontext()

    def _dummy_source(self) -> torch.Tensor | None:
        """A one-token source for an encoder-decoder (what its cache is shaped for), else None."""
        return torch.tensor([[self.model.config.bos_id]]) if is_encoder_decoder(self.model.config) else None

    @torch.inference_mode()
    def add(self, generation: Generation) -> tuple[Row, list[Token]]:
        """Prefill a new row into a free slot; returns it with its first token (it may be done already)."""
        if not self.free:
            raise MiniLLMError(f"the batch is full ({self.max_rows} rows); add a row when one has left")
        sampling, model = generation.sampling, self.model
        source = None if generation.source_ids is None else torch.tensor([generation.source_ids])
        context = model.decoder_context(torch.tensor([generation.prompt_ids], dtype=torch.long), source)
        device, vocab = context.device, model.config.vocab_size
        with self._eval_mode():
            like = model.new_cache(1, source)  # (the encoder-decoder encodes its source here)
        if like is None:
            raise MiniLLMError(f"a {type(model).__name__} keeps no KV cache; it cannot decode in a batch")
        if self._cache is None:
            self._cache = SlotCache(like, self.max_rows)
        tokens = context[0].tolist()
        row = Row(generation, tokens, max(0, len(tokens) - model.config.max_seq_len),
                  sampling.generator(device),
                  seen_tokens(context, vocab) if sampling.repetition_penalty != 1.0 else None, slot=len(self.rows))
        self.rows.append(row)
        made = [self._prefill(row, like.memory, generation.prompt_logprobs)]
        if row.done:
            self._leave(row)
        return row, made

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, list[Token]]]:
        """One new token for every row (a row whose window is full slides first, which makes one more);
        rows that end leave. Returns (row, its new tokens) for each row that was in flight."""
        made: dict[int, tuple[Row, list[Token]]] = {id(row): (row, []) for row in self.rows}
        for row in list(self.rows):
            if len(row.tokens) - row.start > self.model.config.max_seq_len:  # the window slid
                row.start = len(row.tokens) - self._keep
                made[id(row)][1].append(self._prefill(row, None, False))
                if row.done:
                    self._leave(row)
        if self.rows:
            with self._eval_mode():
                logits = self._decode()  # (rows, V)
            rows = list(self.rows)
            for row, token in zip(rows, self._sample_rows(rows, logits), strict=True):
                made[id(row)][1].append(token)
                if row.done:
                    self._leave(row)
        return list(made.values())

    def _sample_rows(self, rows: list[Row], logits: torch.Tensor) -> list[Token]:
        """Each row's next token from the (rows, V) logits: rows with the same settings in one call of the
        sampler (its every step works row by row, so a row's token is the one it gets alone), each with the
        noise of its own generator."""
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            sampling = row.generation.sampling
            key = (sampling.temperature, sampling.top_k, sampling.top_p, sampling.repetition_penalty)
            groups.setdefault(key, []).append(i)
        chosen = [0] * len(rows)
        for members in groups.values():
            group = [rows[i] for i in members]
            sampling = group[0].generation.sampling
            noise = None if sampling.greedy else torch.cat([
                draw_noise(1, sampling.candidates(logits.size(-1)), row.generator, logits.device) for row in group])
            seen = None if group[0].seen is None else torch.cat([row.seen for row in group])
            picked = sample_next_token(logits[members], sampling, seen, noise).tolist()
            for i, token_id in zip(members, picked, strict=True):
                chosen[i] = token_id
        scored = [i for i, row in enumerate(rows) if row.generation.logprobs is not None]
        logprobs = dict(zip(scored, torch.log_softmax(logits[scored].float(), dim=-1), strict=True)) if scored else {}
        return [self._take(row, token_id, logprobs.get(i))
                for i, (row, token_id) in enumerate(zip(rows, chosen, strict=True))]

    def _decode(self) -> torch.Tensor:
        """(rows, V) logits after each row's last token, by the compiled step of its bucket once it is ready."""
        n, device = len(self.rows), self._cache.slots.device
        last = [row.tokens[-1] for row in self.rows]
        rows = next(size for size in row_buckets(self.max_rows) if size >= n)
        step = self._compiled.get(rows)
        if step is None:
            return next_logits(self.model, torch.tensor(last, device=device)[:, None], self._cache)
        pad = [self.model.config.pad_id] * (rows - n)
        tokens = torch.tensor(last + pad, device=device)[:, None]
        lengths = torch.tensor(self._cache.row_lengths() + [0] * (rows - n), device=device)
        logits = step(tokens, lengths, *self._cache.static_tensors(rows))[:n]
        self._cache.advance(1)
        return logits

    @torch.inference_mode()  # (the cache's tensors are inference tensors: moving a row writes them)
    def remove(self, row: Row) -> None:
        """Stop a row (its client went away); its slot is free for the next one."""
        if not row.done:
            row.done = True
            self._leave(row)

    def _prefill(self, row: Row, memory: Memory | None, prompt_logprobs: bool) -> Token:
        """Fill the row's slot with its window (its memory: a new row's source) and sample the next token."""
        window = torch.tensor([row.tokens[row.start:]], device=self._cache.slots.device)
        view = self._cache.row_view(row.slot, memory)
        with self._eval_mode():
            logits = self.model(window, cache=view, last_only=not prompt_logprobs)[0][0]  # (T or 1, V)
        self._cache.commit(row.slot, view.length)
        if prompt_logprobs:  # each prompt token after the first, from the logits before it
            logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
            row.prompt_logprobs = [self._scored(int(t), p, row.generation.logprobs or 0)
                                   for t, p in zip(row.tokens[row.start + 1:], logprobs, strict=True)]
        return self._sample(row, logits[-1:])

    def _sample(self, row: Row, logits: torch.Tensor) -> Token:
        """The row's next token from its (1, V) logits (a prefill's)."""
        return self._sample_rows([row], logits)[0]

    def _take(self, row: Row, token_id: int, logprobs: torch.Tensor | None) -> Token:
        """Append a chosen token to its row (its (V,) log-softmax: the row asked for logprobs); end the row
        at a stop id or its max_new_tokens."""
        row.tokens.append(token_id)
        row.made += 1
        if row.seen is not None:
            row.seen[0, token_id] = True
        if token_id in row.generation.stop_ids:
            row.done, row.stopped_by = True, token_id
        elif row.made >= row.generation.sampling.max_new_tokens:
            row.done = True
        return Token(token_id) if logprobs is None else self._scored(token_id, logprobs, row.generation.logprobs)

    @staticmethod
    def _scored(token_id: int, logprobs: torch.Tensor, top: int) -> Token:
        """A token with its log-probability and the `top` likeliest ids', from the (V,) log-softmax."""
        best = torch.topk(logprobs, min(top, logprobs.size(0))) if top else None
        alternatives = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True))
        return Token(token_id, float(logprobs[token_id]), alternatives)

    def _leave(self, row: Row) -> None:
        slot, last = row.slot, self.rows.pop()
        self._cache.release(slot)
        if last is not row:
            self.rows[slot], last.slot = last, slot
        row.slot = -1

