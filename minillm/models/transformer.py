"""An encoder-decoder transformer (the original seq2seq shape, with Llama's blocks).

The encoder reads the source bidirectionally; the decoder predicts the target causally, each block also
cross-attending over the encoder output. Encoder and decoder share one token embedding (one tokenizer,
one vocabulary), which is also the LM head when tie_embeddings is set.

    logits, loss = model(tgt_ids, src_ids=src_ids, targets=targets)   # training: the target's ids first
    cache = model.new_cache(batch_size, src_ids)                       # decoding: the source, encoded once
    logits, _ = model(tgt_ids, cache=cache, last_only=True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError
from minillm.models.decoding import KVCache, Memory, check_token_ids
from minillm.models.layers import (
    Block,
    RMSNorm,
    RotaryEmbedding,
    cap_logits,
    init_weights,
    lm_loss,
    memory_attention_mask,
    padding_attention_mask,
    run_blocks,
)


class TransformerModel(nn.Module):
    """Encoder-decoder: forward(tgt_ids, src_ids=...) gives the next target token's logits at each position.

    A DecodingModel (minillm.models.decoding): its forward trains, prefills and decodes; its cache holds the
    encoded source.
    """

    is_encoder_decoder = True

    @staticmethod
    def layers_description(config: ModelConfig) -> str:
        return f"{config.n_encoder_layers} encoder + {config.n_decoder_layers} decoder layers"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.encoder_layers = nn.ModuleList(Block(config, i, causal=False) for i in range(config.n_encoder_layers))
        self.encoder_norm = RMSNorm(config.d_model, config.norm_eps)
        self.decoder_layers = nn.ModuleList(
            Block(config, i, cross_attention=True) for i in range(config.n_decoder_layers))
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
        mask = None if src_mask is None else padding_attention_mask(src_mask.bool(), causal=False)
        x = run_blocks(self.encoder_layers, self.embed_tokens(src_ids), self.rotary(src_ids.size(1)), mask)
        return self.encoder_norm(x)

    def memory(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None, pad_to: int | None = None) -> Memory:
        """What the decoder reads of a (B, S) source: its encoding as each decoder layer's cross-attention
        keys/values, and the mask of its real positions. pad_to: keys/values padded (masked) to this many
        positions, so that a decode step's shapes do not depend on S."""
        real = torch.ones_like(src_ids, dtype=torch.bool) if src_mask is None else src_mask.bool()
        encoded = self.encode(src_ids, None if src_mask is None else real)
        keys_values = tuple(layer.cross_attn.memory_keys_values(encoded) for layer in self.decoder_layers)
        if pad_to is None:
            return Memory(keys_values, None if src_mask is None else memory_attention_mask(real))
        pad = pad_to - src_ids.size(1)
        keys_values = tuple((F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))) for k, v in keys_values)
        return Memory(keys_values, memory_attention_mask(F.pad(real, (0, pad))))

    def forward(self, tgt_ids: torch.Tensor, *, src_ids: torch.Tensor | None = None,
                src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) decoder input (BOS + target[:-1]) and the (B, S) source -> ((B, T, V) logits, loss or None).

        Masks are (B, S) / (B, T), True/1 = real token; loss skips targets equal to IGNORE_INDEX.
        cache (from new_cache, which encoded the source): no src_ids; the ids follow the cache's positions,
        and the cache holds them too afterwards. last_only: the last position's logits only, (B, 1, V).
        """
        if cache is None:
            if src_ids is None:
                raise MiniLLMError("this is an encoder-decoder model: give src_ids (or a cache made from them)")
            self._check_length(tgt_ids, "target")
            memory = self.memory(src_ids, src_mask)
        else:
            if src_ids is not None or tgt_mask is not None:
                raise MiniLLMError("with a KV cache, the source is the cache's (new_cache) and the target unpadded")
            memory = cache.memory
        mask = None if tgt_mask is None else padding_attention_mask(tgt_mask.bool(), causal=True)
        x = run_blocks(self.decoder_layers, self.embed_tokens(tgt_ids), self.rotary(tgt_ids.size(1), cache), mask,
                       cache, memory, last_only)
        logits = cap_logits(self.lm_head(self.decoder_norm(x)), self.config.logit_softcap)
        loss = None if targets is None else lm_loss(logits, targets)
        return logits, loss

    # ---- the rest of the decoding contract (DecodingModel) ---------------------------------------------

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
        cache = KVCache(c.n_decoder_layers, batch_size, c.n_kv_heads, c.max_seq_len, c.head_dim,
                        weight.dtype, weight.device)
        src = source_ids.to(weight.device)
        real = torch.ones_like(src, dtype=torch.bool) if source_mask is None else source_mask.to(src.device).bool()
        cache.memory = self.memory(src, real, pad_to=c.max_seq_len)
        return cache
