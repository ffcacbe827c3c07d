"""Incremental decoding: the contract a model kind offers the engine (`DecodingModel`), the KV cache it
decodes over, and checks of the ids it is given.

The loop that uses them (prefill, decode steps, sampling, stopping) is `minillm.engine.Engine`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError


@runtime_checkable
class DecodingModel(Protocol):
    """What minillm.engine.Engine needs of a model kind to generate from it (both built-in kinds are one).

    The model's one forward pass trains, prefills and decodes: called on (B, T) ids it returns
    ((B, T, V) logits, loss or None); with `cache`, the ids are the tokens that follow the cache's positions
    and the cache holds them too afterwards (the forward moves it on by T); with `last_only`, the logits of
    the last position only, (B, 1, V). A static cache (`KVCache.static`, the compiled decode step) must be
    read and written at its position tensor, never at the host's count (see KVCache).
    """

    config: ModelConfig  # the engine reads vocab_size, max_seq_len and pad_id

    def __call__(self, ids: torch.Tensor, /, *, cache: KVCache | None = None,
                 last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def decoder_context(self, prompt_ids: torch.Tensor | list | None, source_ids: torch.Tensor | None = None,
                        source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The checked (B, T >= 1) ids that generation continues, on the model's device (a kind that reads a
        (B, S) source checks it here too)."""
        ...

    def new_cache(self, batch_size: int, source_ids: torch.Tensor | None = None,
                  source_mask: torch.Tensor | None = None) -> KVCache | None:
        """An empty cache for `batch_size` rows (holding the encoded source, for a kind that reads one); None
        for a kind that keeps no cache: the engine then runs the whole window for every token."""
        ...

    # The engine generates in eval mode (no dropout) and restores the model's mode afterwards (eval_mode).
    def modules(self) -> Iterator[nn.Module]: ...

    def train(self, mode: bool = True) -> object: ...


@dataclass
class Memory:
    """What an encoder-decoder's decoder reads of the source: each decoder layer's cross-attention keys and
    values of the encoder output, (B, H, S, Dh) each, by layer index, and the (B, 1, 1, S) mask of the
    source positions they may see (None: all)."""

    keys_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    mask: torch.Tensor | None


class KVCache:
    """Keys and values of every layer's past positions, preallocated to the context length (nothing is
    concatenated or reallocated) and written in place at the positions of the new tokens.

    One cache, read two ways. The eager forward (`static` False) knows on the host how many positions are
    stored (`length`) and attends over that filled part. A compiled decode step works on a static view
    (`over(..., static=True)`): it reads the count from the 0-dim tensor `position`, writes there and
    attends over the whole cache under a mask of the filled slots, so its shapes are the same at every
    position and it compiles once (and can be captured as a CUDA graph). `length` and `position` always
    hold the same count. The encoder-decoder also keeps here the source it decodes against (`memory`).
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
        self.static = False
        self.memory: Memory | None = None

    @classmethod
    def over(cls, keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...], position: torch.Tensor,
             slots: torch.Tensor, memory_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None,
             memory_mask: torch.Tensor | None, *, static: bool) -> KVCache:
        """A cache over existing tensors (no allocation): how a compiled function, which takes tensors rather
        than this object (fewer guards to check per call), rebuilds the cache it was handed. A static view
        continues at `position`; the other starts empty (a refill)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.position, cache.slots = keys, values, position, slots
        cache.length, cache.static = 0, static
        cache.memory = None if memory_kv is None else Memory(memory_kv, memory_mask)
        return cache

    def tensors(self) -> tuple:
        """What `over` takes before `static`: the cache's tensors, as a compiled function's arguments."""
        memory = (None, None) if self.memory is None else (self.memory.keys_values, self.memory.mask)
        return self.keys, self.values, self.position, self.slots, *memory

    @property
    def capacity(self) -> int:
        """The positions the cache holds (the model's max_seq_len)."""
        return self.slots.size(0)

    def next_positions(self, n: int) -> torch.Tensor:
        """The (n,) positions of n new tokens: the slots they are written to, and the angles RoPE gives them."""
        if self.static:
            return self.slots[:n] + self.position
        if self.length + n > self.capacity:
            raise MiniLLMError(f"KV cache overflow: {self.length + n} positions for a cache of {self.capacity}")
        return self.slots.narrow(0, self.length, n)

    def attention_mask(self, n: int) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for n new queries over the keys `store` returns."""
        if self.static:  # (n, L): the slots written so far and up to each query's own
            return self.slots <= self.next_positions(n)[:, None], False
        return causal_mask_for_cache(n, self.length, self.slots.device)

    def store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, n, Dh) new keys/values of layer `layer_idx` at their positions; return the keys and
        values the new queries attend over: the filled part (B, H, length + n, Dh), or, static, all of it.

        The count moves on only in `advance`, once every layer has stored the same new positions.
        """
        positions = self.next_positions(k.size(2))
        keys, values = self.keys[layer_idx], self.values[layer_idx]  # (B, H, max_seq_len, Dh)
        # (under autocast the new keys/values may be in the autocast dtype: the cache keeps its own)
        keys.index_copy_(2, positions, k if k.dtype == keys.dtype else k.to(keys.dtype))
        values.index_copy_(2, positions, v if v.dtype == values.dtype else v.to(values.dtype))
        if self.static:
            return keys, values
        end = self.length + k.size(2)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        """Count n more stored positions (called by the forward pass after its last layer)."""
        if self.static:
            self.position.add_(n)
        else:
            self.length += n
            self.position.fill_(self.length)

    def reset(self) -> None:
        """Forget the stored positions (the source's memory stays: the source is unchanged)."""
        self.length = 0
        self.position.zero_()


class SlotCache(KVCache):
    """The KV cache of many generations decoded together (a server's batch), each row at its own position.

    `rows` slots shaped like a one-row cache of the model (`like`: what `new_cache(1, ...)` returns, so its
    layers, heads and memory are the model's own). The generations in flight hold slots 0..active-1: a row
    joins by prefilling its own slot (through `row_view`, a plain one-row cache over the slot) and `commit`,
    and leaves by `release`, which moves the last row into its slot, so the active rows stay one block and
    a decode step reads them as views (no copy). A step's forward sees the cache as any other: the
    positions, the RoPE angles and the attention mask it asks for are each row's own; a row's attention
    never reads another row's slot, so each row's logits are those it would get alone.
    """

    def __init__(self, like: KVCache, rows: int) -> None:
        def zeros(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.new_zeros((rows, *tensor.shape[1:]))

        self.keys, self.values = tuple(map(zeros, like.keys)), tuple(map(zeros, like.values))
        self.slots, self.static, self.rows = like.slots, False, rows
        self.lengths = torch.zeros(rows, dtype=torch.long, device=like.slots.device)  # positions per slot
        self._lengths = [0] * rows  # the same, on the host: the longest row bounds what a step reads
        self._memory = None if like.memory is None else Memory(
            tuple((zeros(k), zeros(v)) for k, v in like.memory.keys_values),
            None if like.memory.mask is None else zeros(like.memory.mask))
        self.active = 0  # rows in flight: slots 0..active-1
        self.length, self.position = 0, torch.zeros((), dtype=torch.long, device=like.slots.device)  # (unused)

    @property
    def memory(self) -> Memory | None:
        """The active rows' encoder-decoder memory (views), or None for a decoder-only model."""
        if self._memory is None:
            return None
        n, mask = self.active, self._memory.mask
        return Memory(tuple((k[:n], v[:n]) for k, v in self._memory.keys_values),
                      None if mask is None else mask[:n])

    def row_view(self, slot: int, memory: Memory | None = None) -> KVCache:
        """A one-row cache over `slot`, empty: prefilling it fills the slot (then `commit`). `memory`: the
        row's own source (a one-row cache's), copied into the slot; None keeps the slot's."""
        if self._memory is not None and memory is not None:
            for (k, v), (row_k, row_v) in zip(self._memory.keys_values, memory.keys_values, strict=True):
                k[slot].copy_(row_k[0])
                v[slot].copy_(row_v[0])
            if self._memory.mask is not None:
                self._memory.mask[slot].copy_(memory.mask[0])
        one = slice(slot, slot + 1)
        mem = None if self._memory is None else (tuple((k[one], v[one]) for k, v in self._memory.keys_values),
                                                 None if self._memory.mask is None else self._memory.mask[one])
        return KVCache.over(tuple(k[one] for k in self.keys), tuple(v[one] for v in self.values),
                            torch.zeros_like(self.position), self.slots, *(mem or (None, None)), static=False)

    def commit(self, slot: int, length: int) -> None:
        """`slot` holds `length` positions now (its row_view was prefilled); a slot past the active ones joins."""
        self._lengths[slot] = length
        self.lengths[slot] = length
        if slot == self.active:
            self.active += 1

    def release(self, slot: int) -> None:
        """The row in `slot` left: the last active row moves into its slot (its caller's rows move alike)."""
        last = self.active - 1
        if slot != last:
            used = self._lengths[last]
            for tensor in (*self.keys, *self.values):
                tensor[slot, :, :used].copy_(tensor[last, :, :used])
            if self._memory is not None:
                for k, v in self._memory.keys_values:
                    k[slot].copy_(k[last])
                    v[slot].copy_(v[last])
                if self._memory.mask is not None:
                    self._memory.mask[slot].copy_(self._memory.mask[last])
            self.commit(slot, used)
        self.active = last

    def next_positions(self, n: int) -> torch.Tensor:
        """(rows, n): each active row's next n positions."""
        if max(self._lengths[:self.active]) + n > self.capacity:
            raise MiniLLMError(f"KV cache overflow: a row needs more than the {self.capacity} positions of a slot")
        return self.lengths[:self.active, None] + self.slots[:n]

    def attention_mask(self, n: int) -> tuple[torch.Tensor, bool]:
        """(rows, 1, n, L) over the keys `store` returns: each row's own filled slots, up to each query."""
        keys = self.slots[:max(self._lengths[:self.active]) + n]
        return keys <= self.next_positions(n)[:, None, :, None], False

    def store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (rows, H, n, Dh) keys/values at each row's positions; return the active rows' keys and values
        up to the longest row's end (rows, H, L, Dh), the positions past a row's own end masked."""
        rows, heads, n, dim = k.shape
        where = self.next_positions(n)[:, None, :, None].expand(rows, heads, n, dim)
        end = max(self._lengths[:rows]) + n
        out = []
        for tensor, new in ((self.keys[layer_idx], k), (self.values[layer_idx], v)):
            tensor[:rows].scatter_(2, where, new)
            out.append(tensor[:rows, :, :end])
        return out[0], out[1]

    def advance(self, n: int) -> None:
        for slot in range(self.active):
            self._lengths[slot] += n
        self.lengths[:self.active] += n

    def reset(self) -> None:
        raise MiniLLMError("a SlotCache's rows are reset one by one (row_view, commit), not all at once")

    def row_lengths(self) -> list[int]:
        """The positions each active row holds."""
        return self._lengths[:self.active]

    def static_tensors(self, rows: int) -> tuple:
        """What StaticSlots.over takes after the lengths: the first `rows` slots' tensors (views)."""
        memory = (None, None) if self._memory is None else (
            tuple((k[:rows], v[:rows]) for k, v in self._memory.keys_values),
            None if self._memory.mask is None else self._memory.mask[:rows])
        return tuple(k[:rows] for k in self.keys), tuple(v[:rows] for v in self.values), self.slots, *memory


class StaticSlots(SlotCache):
    """A SlotCache's first slots as a compiled decode step sees them: one new token per row, each at the
    position its (rows,) `lengths` tensor holds, attending over every position of its slot under a mask of
    its own filled ones, so the step's shapes never change and it compiles once per number of rows. Rows
    past the active ones decode padding at position 0 (their outputs are not read). The caller counts the
    stored positions (SlotCache.advance), not the step."""

    @classmethod
    def over(cls, lengths: torch.Tensor, keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...],
             slots: torch.Tensor, memory_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None,
             memory_mask: torch.Tensor | None) -> StaticSlots:
        view = cls.__new__(cls)
        view.keys, view.values, view.slots, view.lengths = keys, values, slots, lengths
        view.static, view.rows, view.active = True, lengths.size(0), lengths.size(0)
        view._memory = None if memory_kv is None else Memory(memory_kv, memory_mask)
        return view

    def next_positions(self, n: int) -> torch.Tensor:
        return self.lengths[:, None] + self.slots[:n]

    def attention_mask(self, n: int) -> tuple[torch.Tensor, bool]:
        """(rows, 1, 1, L) for the one-query attention of the compiled step (its scores are (rows, Hkv, H / Hkv,
        L)): each row's filled slots and its own."""
        return (self.slots <= self.lengths[:, None])[:, None, None, :], False

    def store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        where = self.next_positions(k.size(2))[:, None, :, None].expand_as(k)
        self.keys[layer_idx].scatter_(2, where, k)
        self.values[layer_idx].scatter_(2, where, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int) -> None:
        pass


def causal_mask_for_cache(length: int, start: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for `length` new queries at positions start.. over start+length cached keys."""
    if length == 1:
        return None, False  # one new token may see everything before it
    if start == 0:
        return None, True  # square: SDPA's own causal mask is right
    # SDPA's is_causal aligns the mask top-left, which is wrong when there are more keys than queries.
    query_pos = torch.arange(start, start + length, device=device)[:, None]
    key_pos = torch.arange(start + length, device=device)[None, :]
    return key_pos <= query_pos, False


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
def eval_mode(model: DecodingModel) -> Iterator[None]:
    """Eval mode (no dropout) inside the block; the model's previous mode afterwards.

    A model already in eval mode is left alone: switching every module there and back is a visible part of
    the time to the first token (bench/generation.py times both)."""
    modules = list(model.modules())  # the model itself first
    if not any(module.training for module in modules):
        yield
        return
    was_training = modules[0].training
    model.train(False)
    try:
        yield
    finally:
        model.train(was_training)
