"""The one sampler: next-token choice from logits, shared by the CLI, the UI, generation and the tests.

Order of operations (each optional): temperature, repetition penalty, top-k, top-p (nucleus), sample.
`temperature == 0` means greedy decoding (argmax after the repetition penalty).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from minillm.errors import MiniLLMError

# The ranges where sampling stays exact in float32: a temperature below MIN_TEMPERATURE (or a penalty beyond
# its bounds) scales logits past what float32 holds, and the softmax would be NaN.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0
MAX_NEW_TOKENS = 10**9
MAX_TOP_K = 2**31 - 1


def check_sampling_settings(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                            repetition_penalty: float) -> None:
    """Raise MiniLLMError for a setting that cannot work, naming the value and the valid range.

    top_k: None or 0 disables it (the Hugging Face convention); a negative top_k is an error; a top_k
    larger than the vocabulary is clamped to the vocabulary size by `sample_next_token`.
    """
    if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
            or not 0 < max_new_tokens <= MAX_NEW_TOKENS):
        raise MiniLLMError(f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, "
                           f"got {max_new_tokens!r}")
    if not _is_number(temperature) or not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise MiniLLMError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, "
                           f"got {temperature!r}")
    if top_k is not None and (not _is_number(top_k) or not math.isfinite(top_k) or top_k != int(top_k)
                              or not 0 <= top_k <= MAX_TOP_K):
        raise MiniLLMError(f"top_k must be a whole number >= 0 (0 or None = off), got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise MiniLLMError(f"top_p must be in (0, 1] (1 or None = off), got {top_p!r}")
    if not _is_number(repetition_penalty) or not (
            MIN_REPETITION_PENALTY <= repetition_penalty <= MAX_REPETITION_PENALTY):
        raise MiniLLMError(f"repetition_penalty must be between {MIN_REPETITION_PENALTY:g} and "
                           f"{MAX_REPETITION_PENALTY:g} (1 = off), got {repetition_penalty!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, repetition_penalty: float = 1.0,
                      previous_ids: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row from (B, V) logits; returns (B,) int64 ids.

    repetition_penalty (CTRL): the logits of tokens in `previous_ids` (B, T) are divided by it when
    positive and multiplied by it when negative, so > 1 discourages repeats. top_k keeps exactly k tokens
    (torch.topk's indices: ties at the k-th value are broken, not all kept, unlike a threshold compare);
    top_p then keeps the smallest set of the most likely tokens whose probability reaches top_p.
    Settings are assumed checked by `check_sampling_settings`. A `generator` makes the draw reproducible.
    """
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if repetition_penalty != 1.0 and previous_ids is not None and previous_ids.numel() > 0:
        seen = logits.gather(1, previous_ids)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(1, previous_ids, seen)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Work on the candidate set only: `values` (B, C) sorted from most to least likely, `indices` their ids.
    if top_k:
        k = min(int(top_k), logits.size(-1))  # a k beyond the vocabulary keeps everything
        values, indices = torch.topk(logits, k, dim=-1)  # exactly k: ties at the k-th value are cut
    elif top_p is not None and top_p < 1.0:
        values, indices = torch.sort(logits, dim=-1, descending=True)
    else:
        values, indices = logits, None
    if top_p is not None and top_p < 1.0:
        probs = values.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
        values = values.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, -math.inf)
    choice = torch.multinomial(values.softmax(dim=-1), num_samples=1, generator=generator)  # (B, 1)
    return (choice if indices is None else indices.gather(1, choice)).squeeze(1)
