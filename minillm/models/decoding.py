"""Incremental decoding shared by both models: the KV cache, and checks of the ids they are given.

The loop that uses them (prefill, decode steps, sampling, stopping) is `minillm.engine.Engine`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from minillm.errors import MiniLLMError


class KVCache:
    """Keys and values of every layer's past positions, preallocated to the context length.

    Each decoding step writes its new keys/values in place (no torch.cat, no reallocation). The
    encoder-decoder also keeps here its cross-attention keys/values of the encoder output, computed once.

    Two ways in: `update` (prefill and the eager path: the host knows `length` and attends over the
    filled part) and `write` (the static decode step: the position is the 0-dim tensor `position` and
    attention covers the whole cache under `key_mask`, so shapes never change and the step can be
    compiled or captured as a CUDA graph). `sync_position` hands the host's length to the tensor.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch_size, n_heads, max_seq_len, head_dim)
        # One tensor per layer, not views of one: a compiled step then updates each in place, where a view's
        # update would make it rewrite the whole shared tensor at every token.
        self.keys = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers))
        self.values = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers))
        self.length = 0  # positions stored so far
        self.position = torch.zeros((), dtype=torch.long, device=device)  # the same, as a tensor
        self.slots = torch.arange(max_seq_len, device=device)
        self.memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per decoder layer
        self.memory_mask: torch.Tensor | None = None  # (B, 1, 1, S) cross-attention mask

    @classmethod
    def over(cls, keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...], position: torch.Tensor,
             slots: torch.Tensor, memory_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None,
             memory_mask: torch.Tensor | None = None) -> KVCache:
        """A cache over existing tensors (no allocation): how a compiled decode step, which takes tensors
        rather than this object (fewer guards to check per call), rebuilds the cache it was handed."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.position, cache.slots = keys, values, position, slots
        cache.length = 0  # a refill starts from position 0; the decode step reads `position` instead
        cache.memory_kv = None if memory_kv is None else list(memory_kv)
        cache.memory_mask = memory_mask
        return cache

    @property
    def capacity(self) -> int:
        """The positions the cache holds (the model's max_seq_len)."""
        return self.slots.size(0)

    def tensors(self) -> tuple:
        """What `over` takes: the arguments of a compiled decode step."""
        memory = None if self.memory_kv is None else tuple(self.memory_kv)
        return self.keys, self.values, self.position, self.slots, memory, self.memory_mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, Dh) new keys/values after the cached ones; return all of them (B, H, length+T, Dh).

        `length` moves on only in `advance`, once every layer has stored the same new positions.
        """
        end = self.length + k.size(2)
        if end > self.capacity:
            raise MiniLLMError(f"KV cache overflow: {end} positions for a cache of {self.capacity}")
        keys, values = self.keys[layer], self.values[layer]  # (B, H, max_seq_len, Dh)
        keys.narrow(2, self.length, k.size(2)).copy_(k)
        values.narrow(2, self.length, v.size(2)).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def write(self, layer: int, position: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, 1, Dh) keys/values at the 0-dim `position`; return the layer's whole cache."""
        keys, values = self.keys[layer], self.values[layer]
        index = position.view(1)
        keys.index_copy_(2, index, k)
        values.index_copy_(2, index, v)
        return keys, values

    def key_mask(self, position: torch.Tensor) -> torch.Tensor:
        """(1, L) True for the slots a query at `position` may see: those written so far and its own."""
        return (self.slots <= position).view(1, -1)

    def advance(self, n: int) -> None:
        self.length += n

    def sync_position(self) -> None:
        """Set `position` to `length`, before static decode steps continue what `update` filled."""
        self.position.fill_(self.length)

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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside the block; the model's previous mode afterwards.

    A model already in eval mode is left alone: switching every module there and back took 0.3 ms, about
    5% of the time to the first token after a 200-token prompt."""
    if not any(module.training for module in model.modules()):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
