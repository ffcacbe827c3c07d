"""Incremental decoding shared by both models: the KV cache and the token-by-token generation loop."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from minillm.errors import MiniLLMError
from minillm.sampling import check_sampling_settings, sample_next_token

# When the context fills the model's window (max_seq_len), the oldest tokens are dropped so that this
# fraction of the window is kept, and the KV cache is rebuilt over the kept tokens (their positions restart
# at 0, as in training). Keeping less than the whole window means the rebuild, a full forward pass, happens
# once every (1 - fraction) * max_seq_len tokens rather than at every token.
CONTEXT_KEEP_FRACTION = 0.75


class KVCache:
    """Keys and values of every layer's past positions, preallocated to the context length.

    Each decoding step writes its new keys/values in place (no torch.cat, no reallocation). The
    encoder-decoder also keeps here its cross-attention keys/values of the encoder output, computed once.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (n_layers, batch_size, n_heads, max_seq_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._layer_keys, self._layer_values = self.keys.unbind(0), self.values.unbind(0)  # views per layer
        self.length = 0  # positions stored so far
        self.memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per decoder layer
        self.memory_mask: torch.Tensor | None = None  # (B, 1, 1, S) cross-attention mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, Dh) new keys/values after the cached ones; return all of them (B, H, length+T, Dh).

        `length` moves on only in `advance`, once every layer has stored the same new positions.
        """
        end = self.length + k.size(2)
        if end > self.keys.size(3):
            raise MiniLLMError(f"KV cache overflow: {end} positions for a cache of {self.keys.size(3)}")
        keys, values = self._layer_keys[layer], self._layer_values[layer]  # (B, H, max_seq_len, Dh)
        keys.narrow(2, self.length, k.size(2)).copy_(k)
        values.narrow(2, self.length, v.size(2)).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        """Forget the stored positions (the cross-attention keys/values stay: the source is unchanged)."""
        self.length = 0


def check_token_ids(ids: torch.Tensor | list, vocab_size: int, what: str, device: torch.device,
                    allow_empty: bool = False) -> torch.Tensor:
    """Validate a (B, T) batch of token ids and return it as int64 on `device`."""
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.tensor(ids, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as e:
            raise MiniLLMError(f"{what} must be a (batch, time) tensor of token ids: {e}") from None
    if ids.dim() != 2:
        raise MiniLLMError(f"{what} must have shape (batch, time), got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise MiniLLMError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    if ids.size(0) == 0 or (ids.size(1) == 0 and not allow_empty):
        raise MiniLLMError(f"{what} is empty (shape {tuple(ids.shape)}); give at least one token")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise MiniLLMError(
            f"{what} holds token id {int(ids.min()) if int(ids.min()) < 0 else int(ids.max())} outside the "
            f"model's vocabulary [0, {vocab_size}); use the tokenizer the model was trained with"
        )
    return ids.to(device=device, dtype=torch.long)


def window_logits(cache: KVCache | None, forward_cached: Callable[[torch.Tensor, KVCache], torch.Tensor],
                  full_logits: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """The `next_logits(window, restart)` that generate_tokens calls, for either model.

    With a cache: a restart (first call, or the window slid) refills the cache from the whole window;
    otherwise only the newest token is fed. Without one, `full_logits(window)` recomputes the window.
    """
    def next_logits(window: torch.Tensor, restart: bool) -> torch.Tensor:
        if cache is None:
            return full_logits(window)
        if restart:
            cache.reset()
            return forward_cached(window, cache)
        return forward_cached(window[:, -1:], cache)

    return next_logits


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside the block; the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate_tokens(context: torch.Tensor, max_new_tokens: int, max_seq_len: int,
                    next_logits: Callable[[torch.Tensor, bool], torch.Tensor], *, temperature: float,
                    top_k: int | None, top_p: float | None, repetition_penalty: float, eos_id: int | None,
                    pad_id: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Sample up to max_new_tokens after the (B, T) context, yielding one (B,) tensor per new token.

    `next_logits(window, restart)` returns the (B, V) logits after `window`, the (B, <= max_seq_len) context
    the model sees. restart=False means only window[:, -1] is new since the previous call (a KV cache
    feeds just that token); restart=True means the window moved (or this is the first call).
    With eos_id, a row that produced EOS gets pad_id afterwards and generation ends once every row has.
    """
    check_sampling_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    batch, length = context.shape
    # The whole history, written in place; its capacity doubles when full, so a huge max_new_tokens
    # does not allocate up front.
    tokens = context.new_empty((batch, length + min(max_new_tokens, max_seq_len)))
    tokens[:, :length] = context
    start = max(0, length - max_seq_len)  # the window is tokens[:, start:length]
    keep = max(1, int(max_seq_len * CONTEXT_KEEP_FRACTION))
    finished = torch.zeros(batch, dtype=torch.bool, device=context.device) if eos_id is not None else None
    logits = next_logits(tokens[:, start:length], True)
    for step in range(max_new_tokens):
        previous = tokens[:, :length] if repetition_penalty != 1.0 else None
        token = sample_next_token(logits, temperature, top_k, top_p, repetition_penalty, previous, generator)
        if finished is not None:
            token = token.masked_fill(finished, pad_id)
            finished |= token == eos_id
        if length == tokens.size(1):
            tokens = torch.cat([tokens, torch.empty_like(tokens)], dim=1)
        tokens[:, length] = token
        length += 1
        yield token
        if step + 1 == max_new_tokens or (finished is not None and bool(finished.all())):
            return
        restart = length - start > max_seq_len
        if restart:
            start = length - keep
        logits = next_logits(tokens[:, start:length], restart)
