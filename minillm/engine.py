"""The decoding engine: one generation loop for every model kind, token ids in, token ids out.

    engine = Engine(model)                       # Engine(model, compile=True): the fast decode step
    for token in engine.stream(prompt_ids, SamplingConfig(max_new_tokens=50, seed=1)):
        ...                                      # one (B,) tensor of new ids per step
    new_ids = engine.generate(prompt_ids, SamplingConfig(temperature=0))   # (B, n)

The engine owns the KV cache, the loop, the sliding window, the stop conditions and the random draws; a
model is a minillm.models.decoding.DecodingModel: `decoder_context` (the checked ids to continue),
`new_cache`, and its one forward pass, which the engine calls with the cache for the logits of the last
position (a prefill: many tokens into the cache; a step: one). Three ways to make each token, the same
tokens for the same seed:
  eager      the forward over the filled part of the cache: always correct, the default
  compiled   COMPILED_BLOCK forward steps over a static view of the cache, each with the sampler, as one
             torch.compile'd graph whose shapes never change, so it is compiled once (the refill after a
             slide, always the same length, is a second graph) and, on CUDA, captured as a CUDA graph
             (mode "reduce-overhead"); on the CPU inductor's C++-wrapped code. A block's tokens stream one
             by one as usual; where fewer than a block's tokens are left before the window slides or the
             generation ends, a third graph of one step makes them (compiled at its first use). Compiling
             takes seconds to a minute (cached on disk by torch afterwards), so it pays off for long
             generations only. The graphs read the model's weights as they are at each call
  recompute  use_cache=False, or a kind with no cache: the whole window through the model at each token
             (slow; for tests)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from minillm.errors import MiniLLMError
from minillm.models.decoding import DecodingModel, KVCache, eval_mode
from minillm.sampling import SamplingConfig, draw_noise, sample_next_token, seen_tokens

# When the context fills the model's window (max_seq_len), the oldest tokens are dropped so that this
# fraction of the window is kept, and the KV cache is rebuilt over the kept tokens (their positions restart
# at 0, as in training). Keeping less than the whole window means the rebuild, a full forward pass, happens
# once every (1 - fraction) * max_seq_len tokens rather than at every token.
CONTEXT_KEEP_FRACTION = 0.75

# Tokens per call of the compiled decode graph. A call has a fixed cost (torch's guard checks, the wrapper,
# the engine's Python) that one token's arithmetic, for a small model, does not dwarf, while compiling the
# graph, unrolled, takes about as many times as long as one step's (torch's disk cache then makes it
# seconds). bench/generation.py --choices times blocks of 1, 4 and 8 steps.
COMPILED_BLOCK = 4

# How many compiled graphs torch may keep for the decode functions (torch's default is 8 per function, and
# all engines share them): one per model shape, sampling setting, batch size and block length, so the
# fifth sampling setting in one process would otherwise fail to compile.
COMPILED_GRAPHS = 128

Refill = Callable[..., torch.Tensor]  # (window (B, keep), cache, seen, noise) -> (B,) next token
Block = Callable[..., tuple[torch.Tensor, ...]]  # (token (B, 1), cache, seen, noises) -> the next tokens, (B,) each
Compilable = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]  # a Block or a Refill, before compiling


class Engine:
    """Generates from one model; keeps its compiled decode steps (one per sampling setting) between calls."""

    def __init__(self, model: DecodingModel, compile: bool = False) -> None:
        if not isinstance(model, DecodingModel):
            raise MiniLLMError(f"a {type(model).__name__} cannot generate: it is not a DecodingModel (it needs "
                               "decoder_context, new_cache and a forward that takes a cache; see "
                               "minillm.models.decoding)")
        self.model = model
        self.compile = compile
        self._compiled: dict[tuple, tuple[dict[int, Block], Refill]] = {}

    def generate(self, prompt_ids: torch.Tensor | list | None = None, sampling: SamplingConfig | None = None,
                 **options: object) -> torch.Tensor:
        """The new tokens (B, n), n <= max_new_tokens (fewer when every row ended with EOS); see `stream`."""
        return torch.stack(list(self.stream(prompt_ids, sampling, **options)), dim=1)

    def stream(self, prompt_ids: torch.Tensor | list | None = None, sampling: SamplingConfig | None = None, *,
               source_ids: torch.Tensor | None = None, source_mask: torch.Tensor | None = None,
               eos_id: int | Sequence[int] | None = None, use_cache: bool = True,
               row_seeds: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """Yield one (B,) tensor of new token ids per step.

        prompt_ids (B, T): the text to continue (decoder-only, T >= 1) or the target's start after BOS
        (encoder-decoder, optional); source_ids (B, S) and its (B, S) padding mask: the encoder-decoder's
        input. Stops after sampling.max_new_tokens, or once every row has produced eos_id (or one of several
        ids: a chat's end-of-turn and end-of-text tokens; finished rows yield pad_id). A context longer than
        max_seq_len slides (see CONTEXT_KEEP_FRACTION). The model is in eval mode while generating; closing the
        iterator stops the work. row_seeds: a seed for each row (in place of sampling.seed), each row then
        drawing from its own generator, so that row i is the generation sampling.replace(seed=row_seeds[i])
        makes alone.
        """
        sampling = SamplingConfig() if sampling is None else sampling
        if not isinstance(sampling, SamplingConfig):
            raise MiniLLMError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        context = self.model.decoder_context(prompt_ids, source_ids, source_mask)
        if row_seeds is not None and len(row_seeds) != context.size(0):
            raise MiniLLMError(f"{len(row_seeds)} row seeds for a batch of {context.size(0)} rows")
        return self._steps(context, sampling, source_ids, source_mask, eos_id, use_cache, row_seeds)

    @torch.inference_mode()
    def _steps(self, context: torch.Tensor, sampling: SamplingConfig, source_ids: torch.Tensor | None,
               source_mask: torch.Tensor | None, eos_id: int | Sequence[int] | None,
               use_cache: bool, row_seeds: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        model, config = self.model, self.model.config
        device, (batch, length) = context.device, context.shape
        max_seq_len, vocab = config.max_seq_len, config.vocab_size
        candidates = sampling.candidates(vocab)
        if row_seeds is None:
            generator = sampling.generator(device)

            def noise() -> torch.Tensor | None:
                return None if sampling.greedy else draw_noise(batch, candidates, generator, device)
        else:
            generators = [sampling.replace(seed=int(seed)).generator(device) for seed in row_seeds]

            def noise() -> torch.Tensor | None:
                return None if sampling.greedy else torch.cat(
                    [draw_noise(1, candidates, row_generator, device) for row_generator in generators])

        # The whole history, written in place; its capacity doubles when full, so a huge max_new_tokens
        # does not allocate up front.
        tokens = context.new_empty((batch, length + min(sampling.max_new_tokens, max_seq_len)))
        tokens[:, :length] = context
        seen = seen_tokens(context, vocab) if sampling.repetition_penalty != 1.0 else None
        # Rows that produced a stop id (batch > 1; one row just stops, from the id it has to read anyway).
        stops = [] if eos_id is None else [int(i) for i in eos_id] if isinstance(eos_id, Sequence) else [int(eos_id)]
        stop_ids = torch.tensor(stops, dtype=context.dtype, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device) if stops and batch > 1 else None
        single_stops = stops if batch == 1 else []
        start = max(0, length - max_seq_len)  # the window is tokens[:, start:length]
        keep = max(1, int(max_seq_len * CONTEXT_KEEP_FRACTION))
        with eval_mode(model):
            # Recomputing still makes a cache (a kind that reads a source keeps it there) and refills it per token.
            cache = model.new_cache(batch, source_ids, source_mask)
            recompute = cache is None or not use_cache
            block, refill = self._compiled_steps(sampling, cache) if self.compile and not recompute else (None, None)

            def first_token(slid: bool) -> torch.Tensor:
                """Prefill the window into the cache (or run it, without one) and sample the token after it."""
                window = tokens[:, start:length]
                if slid and refill is not None:  # always `keep` tokens: the compiled refill's one shape
                    return refill(window.clone(memory_format=torch.contiguous_format), cache, seen, noise())
                return self._refill(window, cache, seen, noise(), sampling)

            pending = [first_token(slid=False)]  # made, not yet yielded
            for n in range(sampling.max_new_tokens):
                token = pending.pop()
                if finished is not None:
                    token = token.masked_fill(finished, config.pad_id)
                    finished |= torch.isin(token, stop_ids)
                if length == tokens.size(1):
                    tokens = torch.cat([tokens, torch.empty_like(tokens)], dim=1)
                tokens[:, length] = token
                length += 1
                if seen is not None:
                    seen.scatter_(1, token[:, None], True)
                yield token
                if (n + 1 == sampling.max_new_tokens or (finished is not None and bool(finished.all()))
                        or (single_stops and int(token) in single_stops)):
                    return
                if pending:
                    continue
                if length - start > max_seq_len:  # the window slid: rebuild the cache over the kept tokens
                    start = length - keep
                    pending.append(first_token(slid=True))
                elif recompute:
                    pending.append(first_token(slid=False))
                elif block is None:
                    pending.append(self._eager_step(token.view(batch, 1), cache, seen, noise(), sampling))
                else:  # a block when its tokens fit before the window slides and the generation ends, else one
                    room = min(max_seq_len - (length - start) + 1, sampling.max_new_tokens - n - 1)
                    steps = COMPILED_BLOCK if room >= COMPILED_BLOCK else 1
                    made = block(token.view(batch, 1), cache, seen, [noise() for _ in range(steps)])
                    pending.extend(reversed(made))  # pop() takes them in order

    def _eager_step(self, token: torch.Tensor, cache: KVCache, seen: torch.Tensor | None,
                    noise: torch.Tensor | None, sampling: SamplingConfig) -> torch.Tensor:
        """The token after the (B, 1) `token`, over the filled part of the cache (eager)."""
        return sample_next_token(next_logits(self.model, token, cache), sampling, seen, noise)

    def _refill(self, window: torch.Tensor, cache: KVCache | None, seen: torch.Tensor | None,
                noise: torch.Tensor | None, sampling: SamplingConfig) -> torch.Tensor:
        """Empty the cache, prefill it with the (B, T) window (without a cache: run the window) and sample the
        token after it (eager)."""
        if cache is not None:
            cache.reset()
        return sample_next_token(next_logits(self.model, window, cache), sampling, seen, noise)

    def _compiled_steps(self, sampling: SamplingConfig, cache: KVCache) -> tuple[Block, Refill]:
        """The compiled block ((B, 1) last token, cache, seen mask, COMPILED_BLOCK or 1 noises -> as many
        next tokens) and the compiled refill after a slide ((B, keep) window, cache, seen, noise -> (B,)
        next token)."""
        model = self.model
        device = cache.position.device
        if device.type == "cuda":  # CUDA graphs may update only tensors at fixed addresses
            for tensor in (*cache.keys, *cache.values, cache.position):
                torch._dynamo.mark_static_address(tensor)
        key = (sampling.temperature, sampling.top_k, sampling.top_p, sampling.repetition_penalty)
        if key not in self._compiled:
            # The compiled functions take the cache's tensors rather than the object: fewer guards for
            # torch to check at every call.
            def fast_block(token: torch.Tensor, seen: torch.Tensor | None, noises: list[torch.Tensor | None],
                           *cache_tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
                view, made = KVCache.over(*cache_tensors, static=True), []
                with BatchedProducts() if device.type == "cpu" else contextlib.nullcontext():
                    for noise in noises:  # unrolled: COMPILED_BLOCK steps
                        made.append(sample_next_token(next_logits(model, token, view), sampling, seen, noise))
                        token = made[-1].view(-1, 1)
                        if seen is not None:
                            seen.scatter_(1, token, True)
                return tuple(made)

            def fast_refill(window: torch.Tensor, seen: torch.Tensor | None, noise: torch.Tensor | None,
                            *cache_tensors: torch.Tensor) -> torch.Tensor:
                view = KVCache.over(*cache_tensors, static=False)  # empty: the window refills it from 0
                return sample_next_token(next_logits(model, window, view), sampling, seen, noise)

            compiled_block = compile_step(fast_block, device)  # a graph per block length: 1, COMPILED_BLOCK
            self._compiled[key] = ({steps: _checked_first_call(compiled_block) for steps in (1, COMPILED_BLOCK)},
                                   _checked_first_call(compile_step(fast_refill, device)))
        blocks, compiled_refill = self._compiled[key]
        blocks = {steps: _guards_checked_once(graph) for steps, graph in blocks.items()}
        compiled_refill = _guards_checked_once(compiled_refill)

        def block(token: torch.Tensor, cache: KVCache, seen: torch.Tensor | None,
                  noises: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
            # The position tensor is the host's count already: the prefill set it, and each graph moves it.
            made = blocks[len(noises)](token, seen, noises, *cache.tensors())
            cache.advance(len(made))  # the graph moved the position tensor; the host's count follows
            # A CUDA graph's outputs are overwritten by its next run: the tokens the caller keeps are copies.
            return tuple(t.clone() for t in made) if device.type == "cuda" else made

        def refill(window: torch.Tensor, cache: KVCache, seen: torch.Tensor | None,
                   noise: torch.Tensor | None) -> torch.Tensor:
            out = compiled_refill(window, seen, noise, *cache.tensors())
            cache.length = window.size(1)
            return out

        return block, refill


def next_logits(model: DecodingModel, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """(B, V) logits of the token after the (B, T) ids, which follow the cache's positions (if any)."""
    return model(ids, cache=cache, last_only=True)[0][:, -1]


class BatchedProducts(TorchFunctionMode):
    """Linear layers as batched matrix products, while a CPU decode step is traced for compiling.

    Inductor hands a one-row input (batch 1: one token) to the library's matrix product with a stride of
    0 over its size-1 dimension, and the product then copies it before every call; a batched product
    takes it as it is (bench/generation.py --choices times the step without it).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, weight = args[:2]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        rows = x.reshape(1, -1, x.size(-1))
        out = torch.bmm(rows, weight.t().unsqueeze(0)).view(*x.shape[:-1], weight.size(0))
        return out if bias is None else out + bias


def compile_step(step: Compilable, device: torch.device) -> Compilable:
    """torch.compile a static-shape decode step for `device` (see the module docstring)."""
    if device.type == "cuda":
        return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    # The C++ wrapper calls the kernels without a Python line per op (bench/generation.py --choices times
    # the step without it). Not autotuning: without freezing, its only choice for the matrix products is
    # the library call it would make anyway, after a longer compile. Not freezing, which would let
    # inductor use its own kernels for the products: the graph would keep serving the old weights after a
    # change.
    return torch.compile(step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})


def _guards_checked_once(step: Compilable) -> Compilable:
    """`step` for one generation: torch checks its guards (shapes, dtypes, which compiled graph serves the
    inputs) at the first call only. Within a generation the inputs keep their shapes and the model its
    weights' shapes, so later calls would pass the same checks, whose cost a small model's step does not
    dwarf (bench/generation.py --choices times the step with them). Inputs no compiled graph was made for
    still raise rather than run the wrong graph (torch keeps the checks that tell its graphs apart, and a
    graph checks its inputs' sizes)."""
    checked = False

    def call(*args: object) -> torch.Tensor | tuple[torch.Tensor, ...]:
        nonlocal checked
        if not checked:  # where a new graph is compiled, if one is needed
            with torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS):
                out = step(*args)
            checked = True
            return out
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return step(*args)

    return call


def _checked_first_call(step: Compilable) -> Compilable:
    """`step`, whose first call turns a compiler failure into one clear error."""
    compiled = False

    def call(*args: object) -> torch.Tensor | tuple[torch.Tensor, ...]:
        nonlocal compiled
        if compiled:
            return step(*args)
        try:
            out = step(*args)
        except Exception as e:  # a missing C++ compiler, an unsupported op: torch's own long report
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise MiniLLMError(f"compiling the decode step failed ({first_line}); generate without "
                               "compile (the eager path gives the same tokens)") from None
        compiled = True
        return out

    return call
