"""A decoder-only (GPT / Llama-style) language model: embedding, causal pre-norm blocks, norm, LM head."""

from __future__ import annotations

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError
from minillm.models.decoding import KVCache, check_token_ids
from minillm.models.layers import (
    Block,
    RMSNorm,
    RotaryEmbedding,
    cap_logits,
    init_weights,
    lm_loss,
    padding_attention_mask,
    run_blocks,
)


class DecoderOnlyTransformer(nn.Module):
    """Predicts each next token from the tokens before it (causal self-attention, RoPE positions).

    A DecodingModel (minillm.models.decoding): its forward trains, prefills and decodes.
    """

    is_encoder_decoder = False

    @staticmethod
    def layers_description(config: ModelConfig) -> str:
        return f"{config.n_layers} layers"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, {"layers.": 2 * config.n_layers}, config.zero_init_head)
        if config.tie_embeddings:
            # One matrix both reads tokens in and scores them out: a token's input and output meanings
            # agree, and at small sizes it saves vocab_size * d_model parameters (often a large share).
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) ids -> ((B, T, V) logits, loss or None). attention_mask: (B, T), True/1 = real token.

        loss is the mean cross-entropy against (B, T) targets, skipping targets equal to IGNORE_INDEX (-100).
        cache: the ids follow the cache's positions, and the cache holds them too afterwards (no padding
        mask then). last_only: the last position's logits only, (B, 1, V) (targets must match).
        """
        T = input_ids.size(1)
        if cache is None and T > self.config.max_seq_len:
            raise MiniLLMError(f"sequence of {T} tokens is longer than the model's max_seq_len "
                               f"({self.config.max_seq_len}); cut it into windows")
        if cache is not None and attention_mask is not None:
            raise MiniLLMError("a padding mask cannot be used with a KV cache; decode unpadded rows")
        mask = None if attention_mask is None else padding_attention_mask(attention_mask.bool(), causal=True)
        x = run_blocks(self.layers, self.embed_tokens(input_ids), self.rotary(T, cache), mask, cache,
                       last_only=last_only)  # (B, T, D)
        logits = cap_logits(self.lm_head(self.norm(x)), self.config.logit_softcap)  # (B, T, V)
        loss = None if targets is None else lm_loss(logits, targets)
        return logits, loss

    # ---- the rest of the decoding contract (DecodingModel) ---------------------------------------------

    def decoder_context(self, prompt_ids: torch.Tensor | list, source_ids: torch.Tensor | None = None,
                        source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The checked (B, T >= 1) ids that generation continues: the prompt itself."""
        if source_ids is not None or source_mask is not None:
            raise MiniLLMError("this is a decoder-only model: it takes no source; put the text in the prompt")
        return check_token_ids(prompt_ids, self.config.vocab_size, "input_ids", self.embed_tokens.weight.device)

    def new_cache(self, batch_size: int, source_ids: torch.Tensor | None = None,
                  source_mask: torch.Tensor | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows and up to max_seq_len positions."""
        weight, c = self.embed_tokens.weight, self.config
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, c.max_seq_len, c.head_dim, weight.dtype, weight.device)
