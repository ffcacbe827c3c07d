"""An encoder-decoder transformer (the original seq2seq shape, with Llama's blocks).

The encoder reads the source bidirectionally; the decoder predicts the target causally, each block also
cross-attending over the encoder output. Encoder and decoder share one token embedding (one tokenizer,
one vocabulary), which is also the LM head when tie_embeddings is set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError
from minillm.models.decoding import KVCache, check_token_ids
from minillm.models.layers import (
    Block,
    CachedDecoding,
    RMSNorm,
    RotaryEmbedding,
    cap_logits,
    init_weights,
    lm_loss,
    memory_attention_mask,
    padding_attention_mask,
)


class TransformerModel(CachedDecoding, nn.Module):
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

        Masks are (B, S) / (B, T), True/1 = real token; loss skips targets equal to IGNORE_INDEX.
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
        loss = None if targets is None else lm_loss(logits, targets)
        return logits, loss

    # ---- incremental decoding: the interface minillm.engine.Engine drives ------------------------------

    def decoder_context(self, prompt_ids: torch.Tensor | list | None, source_ids: torch.Tensor | None = None,
                        source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The checked (B, 1 + P) decoder input that generation continues: BOS, then the optional (B, P)
        target prefix `prompt_ids`. Checks the (B, S) source too."""
        device = self.embed_tokens.weight.device
        if source_ids is None:
            raise MiniLLMError("this is an encoder-decoder model: give source ids to generate from")
        src = check_token_ids(source_ids, self.config.vocab_size, "source ids", device)
        self._check_length(src, "source")
        start = torch.full((src.size(0), 1), self.config.bos_id, dtype=torch.long, device=device)
        if prompt_ids is None:
            return start
        prefix = check_token_ids(prompt_ids, self.config.vocab_size, "target prefix", device, allow_empty=True)
        if prefix.size(0) != src.size(0):
            raise MiniLLMError(f"the target prefix has {prefix.size(0)} rows but the source has {src.size(0)}")
        return torch.cat([start, prefix], dim=1)

    def new_cache(self, batch_size: int, source_ids: torch.Tensor | None = None,
                  source_mask: torch.Tensor | None = None) -> KVCache:
        """A KV cache for decoding against this (B, S) source: encoded and projected to cross-attention
        keys/values once, padded to max_seq_len (masked) so the decode step's shapes do not depend on S."""
        weight, c = self.embed_tokens.weight, self.config
        src = source_ids.to(weight.device)
        cache = KVCache(c.n_decoder_layers, batch_size, c.n_heads, c.max_seq_len, c.head_dim,
                        weight.dtype, weight.device)
        real = torch.ones_like(src, dtype=torch.bool) if source_mask is None else source_mask.to(src.device).bool()
        pad = c.max_seq_len - src.size(1)
        cache.memory_kv = [(F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)))
                           for k, v in self.memory_keys_values(self.encode(src, real))]
        cache.memory_mask = memory_attention_mask(F.pad(real, (0, pad)))
        return cache

    def window_logits(self, window: torch.Tensor, source_ids: torch.Tensor | None = None,
                      source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) logits after the (B, T) decoder window, recomputed from nothing, the encoder included."""
        mask = None if source_mask is None else source_mask.to(window.device)
        return self(source_ids.to(window.device), window, src_mask=mask)[0][:, -1]

    def decoder_stack(self) -> tuple[nn.ModuleList, nn.Module]:
        """The blocks and final norm that CachedDecoding's forward_cached and decode_step run."""
        return self.decoder_layers, self.decoder_norm
