"""The one sampler: its settings (`SamplingConfig`, the defaults of the CLI, the UI and the exports) and the
next-token choice from logits, shared by the decoding engine, its compiled fast path and the tests.

Order of operations (each optional): repetition penalty, temperature, top-k, top-p (nucleus), sample.
`temperature == 0` means greedy decoding (argmax after the repetition penalty).

The draw itself is the exponential-race form of sampling from a categorical distribution: with
e_i ~ Exp(1) independent, argmax_i p_i / e_i is distributed exactly as p (what torch.multinomial does for
one sample). Drawing the noise apart from the choice lets the engine draw it outside a compiled decode
step and hand it in, so the compiled step and the eager one choose the same token for the same seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Real

import torch

from minillm.config import option
from minillm.errors import MiniLLMError

# The ranges where sampling stays exact in float32: a temperature below MIN_TEMPERATURE (or a penalty beyond
# its bounds) scales logits past what float32 holds, and the softmax would be NaN.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0
MAX_NEW_TOKENS = 10**9
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**63 - 1
# Exponential noise is clamped away from 0: a 0 would turn a zero probability into 0/0 = NaN, which argmax
# would pick.
_MIN_NOISE = 1e-30


@dataclass(frozen=True)
class SamplingConfig:
    """How to choose each new token, and how many to make; checks itself when made (each field's range is in
    its metadata, as the training configs' are, and `minillm generate` has an option per field).

    top_k: None or 0 = off (the Hugging Face convention; stored as None); larger than the vocabulary keeps
    every token. top_p: None or 1 = off (stored as None). repetition_penalty 1 = off. seed: None draws from
    torch's global generator; a number makes the text reproducible.
    """

    max_new_tokens: int = option(200, "tokens to generate at most (fewer when the model ends the text)", 1,
                                 MAX_NEW_TOKENS)
    temperature: float = option(0.8, "0 = greedy (always the likeliest token); higher = more varied",
                                MIN_TEMPERATURE, MAX_TEMPERATURE)
    top_k: int | None = option(50, "keep the k likeliest tokens (0 or none = off)", 0, MAX_TOP_K)
    top_p: float | None = option(None, "nucleus sampling: keep the likeliest tokens whose probability reaches "
                                       "this (1 or none = off)", 0, 1, low_open=True)
    repetition_penalty: float = option(1.0, "> 1 discourages tokens already in the text (1 = off)",
                                       MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
    seed: int | None = option(None, "same seed, same text (none: a new draw each time)", 0, MAX_SEED)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and "None" in str(f.type):
                continue
            if f.name == "temperature" and _is_number(value) and value == 0:
                continue  # greedy, below the range
            _check_setting(f, value)
            if str(f.type).startswith("int"):
                object.__setattr__(self, f.name, int(value))  # (a whole float, as a slider sends it)
        # One spelling per meaning, so equal settings compare (and cache a compiled step) equal.
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", self.top_k or None)
        object.__setattr__(self, "top_p", float(self.top_p) if self.top_p is not None and self.top_p < 1 else None)
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))

    def replace(self, **changes: object) -> SamplingConfig:
        """A copy with some settings changed (and checked)."""
        return dataclasses.replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def candidates(self, vocab_size: int) -> int:
        """How many tokens the draw chooses among: the noise that `sample_next_token` needs per row."""
        return min(self.top_k, vocab_size) if self.top_k else vocab_size

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A generator seeded with `seed` on `device`, or None (torch's global one) without a seed."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_setting(f: dataclasses.Field, value: object) -> None:
    """Refuse a setting that is not a number in its field's range (a whole one where the field is an int)."""
    meta, whole = f.metadata, str(f.type).startswith("int")
    low, high, low_open, high_open = meta["low"], meta["high"], meta["low_open"], meta["high_open"]
    inside = _is_number(value) and math.isfinite(value) and (low < value if low_open else low <= value) and (
        value < high if high_open else value <= high)
    if inside and (not whole or value == int(value)):
        return
    if whole:
        allowed = f"a whole number from {low:,} to {high:,}"
    elif low_open or high_open:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        allowed = f"between {low:g} and {high:g}"
    greedy = "0 (greedy) or " if f.name == "temperature" else ""
    raise MiniLLMError(f"{f.name} must be {greedy}{allowed}, got {value!r}")


def seen_tokens(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A (B, V) boolean mask of the tokens each row of the (B, T) ids holds: what the penalty looks at."""
    seen = torch.zeros(ids.size(0), vocab_size, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)


def draw_noise(rows: int, candidates: int, generator: torch.Generator | None,
               device: torch.device | str) -> torch.Tensor:
    """(rows, candidates) Exp(1) noise for one draw of `sample_next_token`."""
    return torch.empty(rows, candidates, device=device).exponential_(generator=generator)


def sample_next_token(logits: torch.Tensor, sampling: SamplingConfig, seen: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row from (B, V) logits; returns (B,) int64 ids.

    repetition penalty (CTRL): the logits of the tokens marked in `seen` (B, V) are divided by it when
    positive and multiplied by it when negative, so > 1 discourages repeats (each token once, however often
    it occurred). top_k keeps exactly k tokens (torch.topk's indices: ties at the k-th value are broken,
    not all kept, unlike a threshold compare); top_p then keeps the smallest set of the most likely tokens
    whose probability reaches top_p. `noise`: (B, sampling.candidates(V)) from `draw_noise`, or drawn
    here from `generator`. Traceable by torch.compile (no data-dependent Python branches).
    """
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / sampling.repetition_penalty,
                                logits * sampling.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if sampling.greedy:
        return logits.argmax(dim=-1)
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    # Work on the candidate set only: `values` (B, C) sorted from most to least likely, `indices` their ids.
    if sampling.top_k:
        values, indices = torch.topk(logits, sampling.candidates(logits.size(-1)), dim=-1)  # ties are cut
    elif sampling.top_p is not None:
        values, indices = torch.sort(logits, dim=-1, descending=True)
    else:
        values, indices = logits, None
    probs = values.softmax(dim=-1)
    if sampling.top_p is not None:
        # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= sampling.top_p, 0.0)
    if noise is None:
        noise = draw_noise(probs.size(0), probs.size(1), generator, probs.device)
    choice = (probs / noise.clamp_min(_MIN_NOISE)).argmax(dim=-1, keepdim=True)  # (B, 1)
    return (choice if indices is None else indices.gather(1, choice)).squeeze(1)
