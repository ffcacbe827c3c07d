"""Building blocks shared by both models (Llama family): RMSNorm, RoPE, attention, SwiGLU, blocks.

No layer has a bias. The projections that read the same input are fused, as in nanoGPT and litgpt: one
`qkv_proj` (3D, D) for self-attention, `q_proj` + `kv_proj` (2D, D) for cross-attention, one `gate_up_proj`
(2F, D) for the feed-forward, so training and decoding run a few large matrix products. Otherwise names and
shapes are Hugging Face Llama's (`o_proj`, `down_proj`, `input_layernorm`, `post_attention_layernorm`; an
`nn.Linear` stores (out_features, in_features)); models/llama.py splits the fused weights where a format
needs Llama's own names (the Hugging Face export).

Options beyond Llama (ModelConfig fields, off by default; the cpu preset turns QK-norm on): QK-norm
(`Attention.rotated_qk`, `Attention.memory_keys_values`, `Attention.cross`), the relu2 feed-forward (`MLPS`),
logit soft-capping (`cap_logits`, called by the models wherever they make logits).

Every layer runs the same code to train, to prefill and to decode: with a KVCache, a self-attention layer
writes its new keys/values into the cache at the new tokens' positions and attends over what the cache
returns (see KVCache); a layer finds its own slot by its `layer_idx`, set when the model is built. Two
second paths stay, where the benchmark (bench/generation.py --choices) shows they pay: one token over a
static cache (the compiled decode step) attends by `one_query_attention` rather than SDPA, and the eager
decode step's RMSNorm of one position per row is `one_position_rms_norm` rather than F.rms_norm.

Shapes: B batch, T query time, S key time, D d_model, H heads, Hkv key/value heads (H unless grouped-query
attention), Dh head_dim (D = H * Dh unless head_dim is set).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import IGNORE_INDEX, ModelConfig
from minillm.models.decoding import KVCache, Memory

INIT_STD = 0.02  # GPT-2 / Llama initialisation of every weight matrix and of the embedding


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its backward written out: on the CPU, F.rms_norm is a composite of small kernels whose
    autograd graph costs more than these few ops (bench/train_step.py times a step with each)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True).add_(eps))  # (..., 1)
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, rstd, weight = ctx.saved_tensors
        grad_normed = grad * weight
        grad_x = (grad_normed - normed * (grad_normed * normed).mean(dim=-1, keepdim=True)) * rstd
        grad_weight = (grad * normed).sum(dim=tuple(range(grad.dim() - 1)))
        return grad_x, grad_weight, None


def one_position_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMSNorm of (B, 1, D), one position per row (an eager decode step on the CPU): a batched dot product
    gives mean(x^2) + eps in one op, where F.rms_norm runs several small kernels (bench/generation.py
    --choices times the eager step without it)."""
    mean_square = torch.baddbmm(eps, x, x.transpose(1, 2), alpha=1.0 / x.size(-1))
    return x * mean_square.rsqrt_() * weight


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no mean subtraction, no bias), as in Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("eps_tensor", torch.full((1, 1, 1), eps), persistent=False)  # (one_position_...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        if x.device.type == "cpu" and x.dtype == torch.float32:
            if torch.is_grad_enabled():
                return _RMSNormFunction.apply(x, self.weight, self.eps)  # training on the CPU
            if x.dim() == 3 and x.size(1) == 1 and not torch.compiler.is_compiling():
                return one_position_rms_norm(x, self.weight, self.eps_tensor)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotary position embeddings (RoPE).

    Uses Hugging Face Llama's "rotate half" layout (the two halves of each head are the pairs being
    rotated), so exported q/k weights need no permutation. The tables are buffers that are not saved in the
    state_dict: they are a pure function of the config.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (P, Dh/2)
        angles = torch.cat((angles, angles), dim=-1)  # (P, Dh): the same angle for both halves of a pair
        sin = angles.sin()
        sin[:, :head_dim // 2] *= -1  # signed for apply_rotary: (-sin, +sin) over the two halves
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, length: int, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, each (length, Dh), for `length` new tokens: at positions 0.. without a cache,
        else at the positions that follow the cache's; (B, 1, length, Dh) where the cache's rows are each at
        their own position (a SlotCache: its positions are (B, length))."""
        if cache is None:
            return self.cos[:length], self.sin[:length]
        positions = cache.next_positions(length)
        if positions.dim() == 2:
            return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, Dh) queries or keys by their positions' angles; cos/sin are (T, Dh), sin signed.

    Llama's x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1): rolling x by half a head
    gives (x2, x1) and the signed sin supplies the minus, in fewer ops than split, negate and concatenate.
    """
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


def padding_attention_mask(key_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """A (B, 1, T, T) boolean mask (True = may attend) from a (B, T) padding mask (True = real token)."""
    T = key_mask.size(1)
    allowed = key_mask[:, None, None, :]  # (B, 1, 1, T): no query looks at padding
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=key_mask.device).tril()
    # Every position may attend to itself, so a query at a padding position never has all of its keys
    # masked: softmax over nothing is NaN, and a NaN value would leak into real positions of the next
    # layer (attention weight 0 times NaN is still NaN). Outputs at padding positions are ignored anyway.
    return allowed | torch.eye(T, dtype=torch.bool, device=key_mask.device)


def memory_attention_mask(src_mask: torch.Tensor) -> torch.Tensor:
    """A (B, 1, 1, S) cross-attention mask from a (B, S) source padding mask (True = real token)."""
    # A source row that is all padding would leave its queries nothing to attend to (NaN); let it see
    # every position instead: the output is garbage but finite, and such a row carries no information.
    empty = ~src_mask.any(dim=1, keepdim=True)
    return (src_mask | empty)[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention on F.scaled_dot_product_attention: self-attention (causal or bidirectional,
    optionally over a KV cache) or cross-attention over an encoder's output. `layer_idx` is the layer's
    place in its stack: its slot in a KVCache, its entry in a Memory.

    Grouped-query attention (n_kv_heads < n_heads, as Llama 3, Qwen3, SmolLM2): each key/value head serves a
    group of n_heads / n_kv_heads query heads, so the k/v projections and the KV cache shrink by that factor;
    SDPA pairs the groups itself (enable_gqa), without copying keys or values per query head."""

    def __init__(self, config: ModelConfig, layer_idx: int, causal: bool = True, cross: bool = False) -> None:
        super().__init__()
        self.layer_idx, self.causal = layer_idx, causal
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.grouped = self.n_kv_heads != self.n_heads
        self.dropout = config.dropout
        d, q_width, kv_width = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        if cross:  # queries from the decoder, keys and values from the encoder's output
            self.q_proj = nn.Linear(d, q_width, bias=False)
            self.kv_proj = nn.Linear(d, 2 * kv_width, bias=False)
        else:
            self.qkv_proj = nn.Linear(d, q_width + 2 * kv_width, bias=False)  # q rows, then k, then v
        self.o_proj = nn.Linear(q_width, d, bias=False)
        if config.qk_norm:
            # One learned (Dh,) scale each for queries and keys, shared by the heads (as Qwen3 and OLMo 2):
            # unit-RMS q and k bound the attention logits, so no head's softmax saturates early in training.
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H * Dh) -> (B, H, T, Dh)."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool) -> torch.Tensor:
        """Attention of (B, H, T, Dh) queries over (B, Hkv, S, Dh) keys/values, then the output projection."""
        B, _, T, _ = q.shape
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.grouped)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Self-attention of (B, T, D) x at the positions whose (T, Dh) cos and sin `rope` holds.

        mask: a padding mask (B, 1, T, T) (True = may attend), without a cache. With a cache, x holds the new
        positions only: their keys/values go into the cache, and they attend over the cached ones too (one
        token over a static cache, the compiled decode step, by one_query_attention). last_only: every
        position's keys and values, but only the last position's output (B, 1, D).
        """
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.head_dim).transpose(1, 2)  # (B, H + 2 Hkv, T, Dh)
        # split, not indexing: its backward is one cat, where each slice's backward zero-fills a tensor of
        # qkv's size and adds them.
        qk, v = qkv.split((H + Hkv, Hkv), dim=1)
        q, k = self.rotated_qk(qk, *rope)
        is_causal = self.causal and mask is None
        if cache is not None:
            mask, is_causal = cache.attention_mask(T)
            k, v = cache.store(self.layer_idx, k, v)  # (B, Hkv, S, Dh): S = what the new queries attend over
        if last_only:  # the last query: every key it may see is in k and v already
            q, is_causal = q[:, :, -1:], False
            mask = None if mask is None else mask[..., -1:, :]
        if cache is not None and cache.static and q.size(2) == 1:  # the compiled decode step
            return self.o_proj(one_query_attention(q, k, v, mask).reshape(B, 1, -1))
        return self._attend(q, k, v, mask, is_causal)

    def rotated_qk(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, H, T, Dh) queries and (B, Hkv, T, Dh) keys of a (B, H + Hkv, T, Dh) q/k slab, QK-normed (with
        qk_norm) then rotated."""
        if self.qk_norm:  # the norm comes first: RoPE is a rotation, so the vectors stay unit-RMS
            q, k = qk.split((self.n_heads, self.n_kv_heads), dim=1)
            return apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        q, k = apply_rotary(qk, cos, sin).split((self.n_heads, self.n_kv_heads), dim=1)  # rotated together: one op
        return q, k

    def memory_keys_values(self, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of the (B, S, D) encoder output, each (B, Hkv, S, Dh).

        Computed once per forward pass, or per generation (the source does not change while the target grows).
        """
        B, S, _ = encoded.shape
        k, v = self.kv_proj(encoded).view(B, S, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return (self.k_norm(k) if self.qk_norm else k), v

    def cross(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Cross-attention of (B, T, D) decoder states over the encoder output, this layer's keys/values in
        `memory` (no positions: the source and target position spaces are unrelated, and self-attention
        already encoded both)."""
        k, v = memory.keys_values[self.layer_idx]
        q = self._heads(self.q_proj(x))
        return self._attend(self.q_norm(q) if self.qk_norm else q, k, v, memory.mask, False)


def one_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        key_mask: torch.Tensor) -> torch.Tensor:
    """Attention of one (B, H, 1, Dh) query over (B, Hkv, L, Dh) keys/values where `key_mask` (1, L) is True
    (each key/value head serving H / Hkv query heads); returns (B, H, Dh). The compiled decode step's
    attention: written as products and sums, which inductor fuses into the step's own loops, where SDPA stays
    a kernel call of its own (bench/generation.py --choices times the step both ways)."""
    B, H, _, Dh = q.shape
    groups = q.view(B, keys.size(1), H // keys.size(1), 1, Dh)  # (B, Hkv, H / Hkv, 1, Dh)
    scores = (groups * keys.unsqueeze(2)).sum(dim=-1) * Dh ** -0.5  # (B, Hkv, H / Hkv, L)
    weights = scores.masked_fill(~key_mask, -math.inf).softmax(dim=-1)
    return (weights.unsqueeze(-1) * values.unsqueeze(2)).sum(dim=3).view(B, H, Dh)


class SwiGLU(nn.Module):
    """Llama's gated feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)  # gate rows, then up rows
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class ReLU2(nn.Module):
    """The nanoGPT speedrun's feed-forward: down(relu(up(x))^2), not gated (two matrices, not three)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.down_proj(F.relu(self.up_proj(x)).square())


# The feed-forward kinds by ModelConfig.mlp (config.MLP_KINDS names them).
MLPS: dict[str, type[nn.Module]] = {"swiglu": SwiGLU, "relu2": ReLU2}


class Block(nn.Module):
    """A pre-norm residual block: x + attn(norm(x)) [+ cross_attn(norm(x))] + mlp(norm(x)).

    Pre-norm keeps a clean residual path from the embedding to the output, which is what lets deep stacks
    train without warmup tricks. `causal=False` makes it an encoder block; `cross_attention=True` an
    encoder-decoder's decoder block.
    """

    def __init__(self, config: ModelConfig, layer_idx: int, causal: bool = True,
                 cross_attention: bool = False) -> None:
        super().__init__()
        self.dropout = config.dropout
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_idx, causal)
        if cross_attention:
            self.cross_attn_layernorm = RMSNorm(config.d_model, config.norm_eps)
            self.cross_attn = Attention(config, layer_idx, cross=True)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLPS[config.mlp](config)

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                cache: KVCache | None = None, memory: Memory | None = None, last_only: bool = False) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); see Attention.forward. memory: the encoder output's keys/values (a decoder
        block of the encoder-decoder). last_only: (B, 1, D), the last position only, as the last layer of a
        prefill, whose other positions are needed only as keys and values."""
        h = self.self_attn(self.input_layernorm(x), rope, mask, cache, last_only)
        x = (x[:, -1:] if last_only else x) + self._residual(h)
        if memory is not None:
            x = x + self._residual(self.cross_attn.cross(self.cross_attn_layernorm(x), memory))
        return x + self._residual(self.mlp(self.post_attention_layernorm(x)))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               mask: torch.Tensor | None = None, cache: KVCache | None = None, memory: Memory | None = None,
               last_only: bool = False) -> torch.Tensor:
    """(B, T, D) embeddings through a stack of blocks; the cache, if any, then counts the T new positions.

    last_only: (B, 1, D), the last position only. Only the last block computes its output for the last position
    alone: before it, every position's output is the next block's keys and values. In a 4-layer model's
    prefill for the next token, that is about a fifth less arithmetic (bench/generation.py times the first
    token both ways).
    """
    T, last = x.size(1), len(blocks) - 1
    for i, block in enumerate(blocks):
        x = block(x, rope, mask, cache, memory, last_only and i == last)
    if cache is not None:
        cache.advance(T)
    return x


def init_weights(model: nn.Module, stacks: dict[str, int], zero_head: bool = False) -> None:
    """Llama/GPT-2 initialisation: every Linear and Embedding weight ~ N(0, 0.02), norms at 1.

    The projections that write into the residual stream (`o_proj`, `down_proj`) are scaled down by
    1/sqrt(number of residual branches in their stack), so the residual stream's variance at the output
    does not grow with depth. `stacks` maps a parameter-name prefix to its number of residual branches
    (2 per decoder-only or encoder layer: attention and MLP; 3 per encoder-decoder decoder layer).
    zero_head starts `lm_head` at zero.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    for name, param in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            branches = next(n for prefix, n in stacks.items() if name.startswith(prefix))
            nn.init.normal_(param, mean=0.0, std=INIT_STD / math.sqrt(branches))
    if zero_head:  # ModelConfig.zero_init_head: an untied head only (tied, it is the embedding)
        nn.init.zeros_(model.lm_head.weight)


def cap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Soft-capped logits, cap * tanh(logits / cap): smooth, near the identity for |logits| << cap, never
    past +-cap (so no logit runs away). cap 0 leaves them as they are. Any shape."""
    return logits if not cap else cap * torch.tanh(logits / cap)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, T, V) logits against (B, T) targets, skipping targets equal to IGNORE_INDEX."""
    flat_logits = logits.reshape(-1, logits.size(-1)).float()  # (B*T, V)
    return F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX)
