"""An encoder-decoder transformer (the original seq2seq shape, with Llama's blocks).

The encoder reads the source bidirectionally; the decoder predicts the target causally, each block also
cross-attending over the encoder output. Encoder and decoder share one token embedding (one tokenizer,
one vocabulary), which is also the LM head when tie_embeddings is set.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError
from minillm.models.decoding import KVCache, check_token_ids, eval_mode, generate_tokens, window_logits
from minillm.models.layers import (
    Block,
    RMSNorm,
    RotaryEmbedding,
    cap_logits,
    causal_mask_for_cache,
    init_weights,
    lm_loss,
    memory_attention_mask,
    padding_attention_mask,
)


class TransformerModel(nn.Module):
    """Encoder-decoder: forward(src_ids, tgt_ids) gives the next target token's logits at each position."""

    is_encoder_decoder = True

    @staticmethod
    def layers_description(config: ModelConfig) -> str:
        return f"{config.n_encoder_layers} encoder + {config.n_decoder_layers} decoder layers"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.encoder_layers = nn.ModuleList(Block(config) for _ in range(config.n_encoder_layers))
        self.encoder_norm = RMSNorm(config.d_model, config.norm_eps)
        self.decoder_layers = nn.ModuleList(
            Block(config, cross_attention=True) for _ in range(config.n_decoder_layers))
        self.decoder_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Residual branches per stack: attention + MLP per encoder layer; self-, cross-attention + MLP per
        # decoder layer (the 1/sqrt(2 * n_layers) scaling of GPT-2, counted per stack).
        init_weights(self, {"encoder_layers.": 2 * config.n_encoder_layers,
                            "decoder_layers.": 3 * config.n_decoder_layers}, config.zero_init_head)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # why: see DecoderOnlyTransformer

    def _check_length(self, ids: torch.Tensor, what: str) -> None:
        if ids.size(1) > self.config.max_seq_len:
            raise MiniLLMError(f"{what} of {ids.size(1)} tokens is longer than the model's max_seq_len "
                               f"({self.config.max_seq_len}); shorten it")

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) source ids -> (B, S, D) encoder output. src_mask: (B, S), True/1 = real token."""
        self._check_length(src_ids, "source")
        cos, sin = self.rotary(0, src_ids.size(1))
        mask = None if src_mask is None else padding_attention_mask(src_mask.bool(), causal=False)
        x = self.embed_tokens(src_ids)
        for layer in self.encoder_layers:
            x = layer(x, cos, sin, attn_mask=mask)
        return self.encoder_norm(x)

    def memory_keys_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys/values of the (B, S, D) encoder output."""
        return [layer.cross_attn.memory_keys_values(memory) for layer in self.decoder_layers]

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S) source and (B, T) decoder input (BOS + target[:-1]) -> ((B, T, V) logits, loss or None).

        Masks are (B, S) / (B, T), True/1 = real token; loss ignores targets equal to config.pad_id.
        """
        self._check_length(tgt_ids, "target")
        memory = self.encode(src_ids, src_mask)
        memory_mask = None if src_mask is None else memory_attention_mask(src_mask.bool())
        memory_kv = self.memory_keys_values(memory)
        cos, sin = self.rotary(0, tgt_ids.size(1))
        mask = None if tgt_mask is None else padding_attention_mask(tgt_mask.bool(), causal=True)
        x = self.embed_tokens(tgt_ids)
        for layer, kv in zip(self.decoder_layers, memory_kv, strict=True):
            x = layer(x, cos, sin, attn_mask=mask, is_causal=mask is None, memory_kv=kv,
                      memory_mask=memory_mask)
        logits = cap_logits(self.lm_head(self.decoder_norm(x)), self.config.logit_softcap)
        loss = None if targets is None else lm_loss(logits, targets, self.config.pad_id)
        return logits, loss

    # ---- incremental decoding -------------------------------------------------------------------------

    def new_cache(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> KVCache:
        """A KV cache for decoding against this source: encoded and projected to cross-attention K/V once.
        """
        weight, c = self.embed_tokens.weight, self.config
        cache = KVCache(c.n_decoder_layers, src_ids.size(0), c.n_heads, c.max_seq_len, c.head_dim,
                        weight.dtype, weight.device)
        cache.memory_kv = self.memory_keys_values(self.encode(src_ids, src_mask))
        cache.memory_mask = None if src_mask is None else memory_attention_mask(src_mask.bool())
        return cache

    def forward_cached(self, tgt_ids: torch.Tensor, cache: KVCache,
                       all_positions: bool = False) -> torch.Tensor:
        """Logits for (B, T) new decoder tokens after the cache's positions; the cache then holds them too.

        Returns (B, V) for the last position, or (B, T, V) with all_positions=True.
        """
        T, start = tgt_ids.size(1), cache.length
        cos, sin = self.rotary(start, T)
        mask, is_causal = causal_mask_for_cache(T, start, tgt_ids.device)
        x = self.embed_tokens(tgt_ids)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, cos, sin, attn_mask=mask, is_causal=is_causal, cache=cache, layer=i,
                      memory_kv=cache.memory_kv[i], memory_mask=cache.memory_mask)
        cache.advance(T)
        x = x if all_positions else x[:, -1:]
        logits = cap_logits(self.lm_head(self.decoder_norm(x)), self.config.logit_softcap)
        return logits if all_positions else logits[:, 0]

    @torch.inference_mode()
    def iter_generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                      eos_id: int | None = None, generator: torch.Generator | None = None,
                      tgt_prefix: torch.Tensor | None = None, src_mask: torch.Tensor | None = None,
                      use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield one (B,) tensor of new target ids per step, given (B, S) source ids `input_ids`.

        The decoder starts from BOS followed by the optional (B, P) `tgt_prefix`. Stopping, EOS, the sliding
        target window and use_cache work as in DecoderOnlyTransformer.iter_generate.
        """
        device = self.embed_tokens.weight.device
        src = check_token_ids(input_ids, self.config.vocab_size, "source ids", device)
        self._check_length(src, "source")
        if src_mask is not None:
            src_mask = src_mask.to(device=device, dtype=torch.bool)
        start = torch.full((src.size(0), 1), self.config.bos_id, dtype=torch.long, device=device)
        if tgt_prefix is not None:
            prefix = check_token_ids(tgt_prefix, self.config.vocab_size, "tgt_prefix", device,
                                     allow_empty=True)
            if prefix.size(0) != src.size(0):
                raise MiniLLMError(f"tgt_prefix has {prefix.size(0)} rows but the source has {src.size(0)}")
            start = torch.cat([start, prefix], dim=1)  # (B, 1 + P): the decoder's first input
        with eval_mode(self):
            cache = self.new_cache(src, src_mask) if use_cache else None
            # Without a cache, each step recomputes everything, the encoder included.
            next_logits = window_logits(cache, self.forward_cached,
                                        lambda window: self(src, window, src_mask=src_mask)[0][:, -1])
            yield from generate_tokens(
                start, max_new_tokens, self.config.max_seq_len, next_logits, temperature=temperature,
                top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, eos_id=eos_id,
                pad_id=self.config.pad_id, generator=generator)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 eos_id: int | None = None, generator: torch.Generator | None = None,
                 tgt_prefix: torch.Tensor | None = None, src_mask: torch.Tensor | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """The new target tokens (B, n), n <= max_new_tokens, no BOS or tgt_prefix (see iter_generate)."""
        new = list(self.iter_generate(input_ids, max_new_tokens, temperature, top_k, top_p,
                                      repetition_penalty, eos_id, generator, tgt_prefix, src_mask, use_cache))
        return torch.stack(new, dim=1)
