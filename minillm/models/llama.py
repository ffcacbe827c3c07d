"""Our weight names <-> Hugging Face Llama's: the fused projections split into Llama's, and back; and the
ModelConfig options a Llama does not have.

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


def split_fused(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under Llama's names: each fused matrix cut into its parts (views, no copies)."""
    out = {}
    for name, value in state_dict.items():
        suffix = next((s for s in FUSED if name.endswith(s)), None)
        if suffix is None:
            out[name] = value
            continue
        prefix = name[:-len(suffix)]
        for part_name, part in zip(FUSED[suffix], value.chunk(len(FUSED[suffix]), dim=0), strict=True):
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


def options_beyond_llama(config: ModelConfig) -> list[str]:
    """The train options of `config` that change the computation away from Llama's (none: it is a Llama)."""
    options = []
    if config.qk_norm:
        options.append("--qk-norm")
    if config.mlp != "swiglu":
        options.append(f"--mlp {config.mlp}")
    if config.logit_softcap:
        options.append(f"--logit-softcap {config.logit_softcap:g}")
    return options  # zero_init_head is not here: it changes the initialisation, not the model
