"""Export a decoder-only run with a byte-level BPE tokenizer as one GGUF file for llama.cpp (and the tools
built on it: Ollama, LM Studio), written with the `gguf` package that llama.cpp publishes.

The file holds Llama architecture metadata (Qwen3's, llama.cpp's "qwen3", for a run with QK-norm), the
tensors under llama.cpp's names, the tokenizer as its "gpt2" model (byte-level vocabulary, merges, special
ids) and the sampling defaults. Two layout changes: llama.cpp's Llama rotates adjacent pairs of a head's
dimensions where ours (and Hugging Face's) rotate its two halves, so the query and key rows are permuted
(`permute_for_rope`, as llama.cpp's own converter does; its qwen3 rotates halves as we do, unpermuted); and
norms stay float32 whatever --dtype, as llama.cpp expects.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.checkpoint import Run
from minillm.export.base import ExportFormat, not_llama, require, torch_dtype
from minillm.files import reporting_full_disk
from minillm.models.llama import split_fused, standard_architecture
from minillm.sampling import SamplingConfig
from minillm.version import __version__

# llama.cpp's architectures that rotate adjacent pairs (its "normal" RoPE), for which q and k are permuted.
PAIRWISE_ROPE = ("llama",)
TOKENIZER_MODEL = "gpt2"  # llama.cpp's byte-level BPE
PRE_TOKENIZER = "gpt-2"  # GPT-2's split regex: what pre_tokenizers.ByteLevel(use_regex=True) applies
EXPORT_KEY = "minillm.version"  # the marker of a Mini LLM export (llama.cpp ignores keys it does not know)
GGUF_MAGIC = b"GGUF"
# Our names -> llama.cpp's ({i}: the layer).
TENSOR_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",  # qwen3
    "layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
ROTATED = ("attn_q.weight", "attn_k.weight")


def permute_for_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(H * Dh, D) q or k rows from rotate-half order (pairs i, i + Dh/2) to adjacent pairs (2i, 2i + 1)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_for_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_for_rope (to check a file against the run)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(name: str) -> str:
    """llama.cpp's name of one of our weights."""
    if name in TENSOR_NAMES:
        return TENSOR_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return TENSOR_NAMES[f"layers.{{i}}.{rest}"].format(i=layer)


def gguf_tensors(run: Run, dtype: str) -> dict[str, np.ndarray]:
    """llama.cpp's name -> the array it stores (q/k permuted, matrices in `dtype`, vectors float32)."""
    tensors, permute = {}, standard_architecture(run.config) in PAIRWISE_ROPE
    for name, tensor in split_fused(run.model.state_dict(), run.config).items():  # Llama's separate q, k, v, gate, up
        if name == "lm_head.weight" and run.config.tie_embeddings:
            continue  # llama.cpp uses token_embd.weight when the file has no output.weight
        target = gguf_name(name)
        tensor = tensor.detach().cpu().float()
        if permute and target.endswith(ROTATED):  # (grouped-query attention: the keys have n_kv_heads heads)
            heads = run.config.n_heads if target.endswith(ROTATED[0]) else run.config.n_kv_heads
            tensor = permute_for_rope(tensor, heads)
        tensor = tensor.to(torch_dtype(dtype)) if tensor.dim() > 1 else tensor
        tensors[target] = tensor.contiguous().numpy()
    return tensors


def byte_level_refusal(tokenizer_json: dict[str, Any]) -> str | None:
    """Why llama.cpp's "gpt2" tokenizer would not split text as this tokenizer does (None: it would)."""
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") == "WordLevel":
        return ("llama.cpp has no character-level tokenizer: its models are SentencePiece, byte-level BPE, "
                "WordPiece and a few others, and none maps every character to one id with an unknown token "
                "for unseen ones; train with --tokenizer bpe to run the model in llama.cpp, or export --format hf")
    byte_level = (model.get("type") == "BPE" and tokenizer_json.get("normalizer") is None
                  and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space", False)
                  and pre.get("use_regex", True))
    if not byte_level:
        return ("its tokenizer is not GPT-2-style byte-level BPE (no normalizer, a ByteLevel pre-tokenizer with "
                "GPT-2's split), the one kind llama.cpp's 'gpt2' tokenizer is known to reproduce here; "
                "export --format hf, or train with --tokenizer bpe")
    return None


def gguf_refusal(run: Run) -> str | None:
    """Why llama.cpp could not run this run as the same model (None: it can)."""
    return not_llama(run) or byte_level_refusal(run.tokenizer.hugging_face_json())


def vocabulary(tokenizer_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their llama.cpp token types, merges as "left right") of a byte-level BPE tokenizer.json."""
    (gguf,) = require("gguf")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for token, token_id in tokenizer_json["model"]["vocab"].items():
        tokens[token_id] = token
    for added in tokenizer_json.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    for token_id, token in enumerate(tokens):
        if token is None:  # an id no token has (a foreign file's gap): llama.cpp needs every id named
            tokens[token_id], types[token_id] = f"[PAD{token_id}]", int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"].get("merges", [])]
    return tokens, types, merges


def write_gguf(run: Run, out: Path, dtype: str) -> None:
    """Write the GGUF file `out`: metadata, tokenizer, sampling defaults, then the tensors."""
    (gguf,) = require("gguf")
    c = run.config
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), standard_architecture(c))  # the metadata keys' prefix, too
    writer.add_name(run.folder.path.name)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)  # grouped-query attention: fewer key/value heads
    writer.add_key_length(c.head_dim)  # (needed where head_dim is not d_model / n_heads, as in Qwen3-0.6B)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16)
    tokens, types, merges = vocabulary(run.tokenizer.hugging_face_json(), c.vocab_size)
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(c.bos_id)
    writer.add_eos_token_id(c.eos_id)
    writer.add_pad_token_id(c.pad_id)
    writer.add_add_bos_token(True)  # samples began with BOS in training
    writer.add_add_eos_token(False)
    if run.folder.chat_template.is_file():  # the chat template of the model the run started from
        writer.add_chat_template(run.folder.chat_template.read_text(encoding="utf-8"))
    defaults = SamplingConfig()
    writer.add_sampling_temp(defaults.temperature)
    writer.add_sampling_top_k(defaults.top_k)
    writer.add_string(EXPORT_KEY, __version__)
    for name, array in gguf_tensors(run, dtype).items():
        writer.add_tensor(name, array)
    with reporting_full_disk(out):
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except BaseException:
            with contextlib.suppress(Exception):
                writer.close()  # (gives the file back; the first error is the one to report)
            raise
        writer.close()


def is_gguf_export(path: Path) -> bool:
    """Whether `path` is a GGUF file that Mini LLM exported (it has the EXPORT_KEY)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                return False
        (gguf,) = require("gguf")
        return EXPORT_KEY in gguf.GGUFReader(path).fields
    except Exception:  # unreadable, or not a GGUF file after all: not ours
        return False


GGUF_FORMAT = ExportFormat(
    name="gguf", description="one GGUF file for llama.cpp, Ollama, LM Studio (Llama or Qwen3 architecture)",
    write=write_gguf, refusal=gguf_refusal, folder=False, is_export=is_gguf_export)
