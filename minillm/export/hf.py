"""Export a decoder-only run as a Hugging Face Llama model folder (Qwen3 for a run with QK-norm):
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it with no custom code.

    DIR/config.json             LlamaConfig or Qwen3Config (sizes, RoPE theta, RMSNorm eps, vocabulary, tying,
                                special ids)
    DIR/model.safetensors       the weights, named as in LlamaForCausalLM (Qwen3ForCausalLM)
    DIR/generation_config.json  Mini LLM's sampling defaults, and a length that stays within the context
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json   a fast tokenizer (both kinds); a chat
                                run's template is tokenizer_config.json's "chat_template", so that
                                apply_chat_template gives Mini LLM's ids
    DIR/README.md               the model card
    DIR/minillm_export.json     the marker of an export (export.target)

Our layers already have Llama's names, shapes and RoPE layout (rotate-half), so the weights are copied as
they are: `model.` in front of every name but the LM head, which is left out when it is the embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minillm.checkpoint import Run
from minillm.export.base import ExportFormat, not_llama, require, torch_dtype
from minillm.export.card import example_prompt, model_card
from minillm.files import atomic_write, reporting_full_disk, write_json
from minillm.models.llama import split_fused, standard_architecture
from minillm.sampling import SamplingConfig

HF_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md")

USAGE = """
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{out}")
model = AutoModelForCausalLM.from_pretrained("{out}")
inputs = tokenizer({prompt!r}, return_tensors="pt")  # BOS first, as in training
output = model.generate(**inputs)  # sampling and length (the {context}-token context): generation_config.json
print(tokenizer.decode(output[0], skip_special_tokens=True))
```
"""

CHAT_USAGE = """
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{out}")
model = AutoModelForCausalLM.from_pretrained("{out}")
messages = {messages!r}
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
output = model.generate(**inputs)  # stops at the end of the turn (generation_config.json's eos_token_id)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""
EXAMPLE_MESSAGES = [{"role": "user", "content": "Hello!"}]  # a chat run's how-to (Mini LLM keeps no test messages)


def llama_state_dict(run: Run, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights under LlamaForCausalLM's names, as contiguous `dtype` tensors on the CPU."""
    state = {}
    for name, tensor in split_fused(run.model.state_dict(), run.config).items():  # Llama's separate q, k, v, gate, up
        if name == "lm_head.weight" and run.config.tie_embeddings:
            continue  # it is model.embed_tokens.weight; transformers ties it again (tie_word_embeddings)
        hf_name = name if name == "lm_head.weight" else f"model.{name}"
        state[hf_name] = tensor.detach().to("cpu", dtype).contiguous()
    return state


# Our standard architecture (models.llama.standard_architecture) -> transformers' config class and model class.
HF_ARCHITECTURES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def llama_config(run: Run, dtype: str) -> dict:
    """config.json for LlamaForCausalLM (Qwen3ForCausalLM with QK-norm: the same fields and weight names, plus
    q_norm/k_norm), readable by transformers 4.x (rope_theta, torch_dtype) and 5.x."""
    (transformers,) = require("transformers")
    c = run.config
    config_class, model_class = HF_ARCHITECTURES[standard_architecture(c)]
    extra = {"mlp_bias": False} if config_class == "LlamaConfig" else {"use_sliding_window": False}
    config = getattr(transformers, config_class)(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, hidden_act="silu",
        bos_token_id=c.bos_id, eos_token_id=c.eos_id, pad_token_id=c.pad_id,
        architectures=[model_class], **extra).to_dict()
    return {**config, "rope_theta": c.rope_theta, "torch_dtype": dtype, "dtype": dtype}


def generation_config(run: Run) -> dict:
    """generation_config.json: the sampling defaults of `minillm generate` and the UI, and a length within
    the context: transformers has no sliding window, so past max_length the model would see positions it
    was never trained on (and the text degenerate). max_length counts the prompt: no max_new_tokens, which
    would take precedence."""
    c = run.config
    defaults = SamplingConfig()
    # A chat run's answers end at the end-of-turn token too (transformers takes a list).
    eos = run.tokenizer.chat_stop_ids() if run.tokenizer.chat_template is not None else c.eos_id
    return {"do_sample": True, "temperature": defaults.temperature, "top_k": defaults.top_k,
            "max_length": c.max_seq_len, "bos_token_id": c.bos_id, "eos_token_id": eos,
            "pad_token_id": c.pad_id}


def write_tokenizer(run: Run, out: Path) -> None:
    """tokenizer.json (the tokenizer's Hugging Face form), tokenizer_config.json (with a chat run's template)
    and special_tokens_map.json."""
    tokenizer = run.tokenizer
    special = {f"{role}_token": token for role, (token, _) in tokenizer.role_tokens().items()}
    write_json(out / "tokenizer.json", tokenizer.hugging_face_json())
    write_json(out / "special_tokens_map.json", special)
    template = {"chat_template": tokenizer.chat_template.source} if tokenizer.chat_template is not None else {}
    # clean_up_tokenization_spaces would delete the space before punctuation: decoding must give the text.
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False,
        "model_max_length": run.config.max_seq_len, **template})


def write_hf(run: Run, out: Path, dtype: str) -> None:
    """Write the Hugging Face folder `out` (see the module docstring for its files)."""
    (safetensors_torch,) = require("safetensors.torch")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", llama_config(run, dtype))
    weights = llama_state_dict(run, torch_dtype(dtype))
    with reporting_full_disk(out / "model.safetensors"):
        safetensors_torch.save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "generation_config.json", generation_config(run))
    write_tokenizer(run, out)
    if run.tokenizer.chat_template is not None:
        usage = CHAT_USAGE.format(out=out.name, messages=EXAMPLE_MESSAGES)
    else:
        usage = USAGE.format(out=out.name, prompt=example_prompt(run), context=run.config.max_seq_len)
    atomic_write(out / "README.md", lambda f: f.write(model_card(run, usage)), mode="w")


HF_FORMAT = ExportFormat(
    name="hf", description="a Hugging Face transformers folder (Llama or Qwen3 architecture, safetensors)",
    write=write_hf, refusal=not_llama, folder=True)
