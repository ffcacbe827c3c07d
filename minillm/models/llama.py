"""Our weight names <-> Hugging Face Llama's: the fused projections split into Llama's, and back; and the
ModelConfig options a Llama does not have (and which of them Qwen3, Llama's closest standard relative, has).

Only formats need Llama's own names (the Hugging Face export, the equivalence test, checkpoints saved
before the projections were fused); the models themselves always run fused.
"""

from __future__ import annotations

import torch

from minillm.config import ModelConfig

# our fused weight (name suffix) -> the Llama weights it stacks, in row order
FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "cross_attn.kv_proj.weight": ("cross_attn.k_proj.weight", "cross_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def fused_rows(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our fused weight (name suffix) -> the rows of each of its parts (FUSED's order): with grouped-query
    attention the key and value projections have fewer rows than the query projection."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {"self_attn.qkv_proj.weight": (q, kv, kv), "cross_attn.kv_proj.weight": (kv, kv),
            "mlp.gate_up_proj.weight": (config.d_ff, config.d_ff)}


def split_fused(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The same weights under Llama's names: each fused matrix cut into its parts (views, no copies)."""
    out, rows = {}, fused_rows(config)
    for name, value in state_dict.items():
        suffix = next((s for s in FUSED if name.endswith(s)), None)
        if suffix is None:
            out[name] = value
            continue
        prefix = name[:-len(suffix)]
        for part_name, part in zip(FUSED[suffix], value.split(rows[suffix], dim=0), strict=True):
            out[prefix + part_name] = part
    return out


def fuse_split(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of split_fused: Llama's separate projections stacked into our fused ones."""
    out = dict(state_dict)
    for fused, parts in FUSED.items():
        for name in [n for n in state_dict if n.endswith(parts[0])]:
            prefix = name[:-len(parts[0])]
            if all(prefix + part in state_dict for part in parts):
                out[prefix + fused] = torch.cat([out.pop(prefix + part) for part in parts], dim=0)
    return out


# The options beyond Llama that Qwen3 has as well: Qwen3 is Llama plus a learned RMSNorm over each head's queries
# and keys before RoPE (one (head_dim,) scale for all heads), which is exactly qk_norm.
QWEN3_OPTIONS = ("qk_norm",)


def options_beyond_llama(config: ModelConfig) -> dict[str, str]:
    """The fields of `config` that change the computation away from Llama's -> the train option that set each
    (empty: it is a Llama). zero_init_head is not one: it changes the initialisation, not the model."""
    options = {}
    if config.qk_norm:
        options["qk_norm"] = "--qk-norm"
    if config.mlp != "swiglu":
        options["mlp"] = f"--mlp {config.mlp}"
    if config.logit_softcap:
        options["logit_softcap"] = f"--logit-softcap {config.logit_softcap:g}"
    return options


def options_beyond_qwen3(config: ModelConfig) -> list[str]:
    """The train options of `config` that neither Llama nor Qwen3 has (none: one of them computes this model)."""
    return [option for name, option in options_beyond_llama(config).items() if name not in QWEN3_OPTIONS]


def standard_architecture(config: ModelConfig) -> str:
    """"llama", or "qwen3" for a Llama with QK-norm: the architecture the Hugging Face and GGUF exports write
    (for a config that options_beyond_qwen3 finds nothing in)."""
    return "qwen3" if any(name in QWEN3_OPTIONS for name in options_beyond_llama(config)) else "llama"
