"""Export a decoder-only BPE run as one GGUF file for llama.cpp (and the tools built on it: Ollama, LM
Studio), written with the `gguf` package that llama.cpp publishes.

The file holds Llama architecture metadata (Qwen3's, llama.cpp's "qwen3", for a run with QK-norm), the
tensors under llama.cpp's names, the tokenizer and the sampling defaults. A byte-level BPE tokenizer (ours,
GPT-2's) is llama.cpp's "gpt2" model (vocabulary, merges, special ids); a SentencePiece-style one with byte
fallback (Llama-2's, Mistral's) is its "llama" model (vocabulary, scores that replay the merges in order,
byte tokens, the space prefix; checked in llama.cpp by scripts/check_gguf.py --tokenizer-file); a chat run's
template is tokenizer.chat_template, its end-of-turn id the eot id. llama.cpp
always adds its space prefix, where a Metaspace pre-tokenizer (Mistral's) adds none before a leading space:
such a text's first tokens differ there. Two layout changes: llama.cpp's Llama rotates adjacent pairs of a head's
dimensions where ours (and Hugging Face's) rotate its two halves, so the query and key rows are permuted
(`permute_for_rope`, as llama.cpp's own converter does; its qwen3 rotates halves as we do, unpermuted); and
norms stay float32 whatever --dtype, as llama.cpp expects.

--dtype q8_0 and q4_0 store the matrices in llama.cpp's blocks of 32 weights with one float16 scale each
(8 or 4 bits a weight; quantized by the `gguf` package's own implementation of ggml's). q4_0 keeps the
matrix that makes the logits (output.weight, or token_embd.weight when the embeddings are tied) in q8_0,
as llama.cpp's quantizer keeps it above 4 bits (its q6_K, which the `gguf` package cannot write). A matrix
whose rows are not a whole number of blocks is stored float16, as llama.cpp's converter does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.checkpoint import Run
from minillm.export.base import ExportFormat, not_llama, require
from minillm.files import reporting_full_disk
from minillm.models.llama import split_fused, standard_architecture
from minillm.sampling import SamplingConfig
from minillm.tokenizers.spelling import BYTE_ALPHABET_SIZE, BYTE_TOKEN, SENTENCEPIECE_SPACE, space_marker, steps
from minillm.version import LICENSE, __version__

# llama.cpp's architectures that rotate adjacent pairs (its "normal" RoPE), for which q and k are permuted.
PAIRWISE_ROPE = ("llama",)
TOKENIZER_MODEL = "gpt2"  # llama.cpp's byte-level BPE
PRE_TOKENIZER = "gpt-2"  # GPT-2's split regex: what pre_tokenizers.ByteLevel(use_regex=True) applies
SENTENCEPIECE_MODEL = "llama"  # llama.cpp's SentencePiece tokenizer (merges by score, byte fallback)
UNMERGED_SCORE = -1e9  # a multi-character token no merge makes: llama.cpp's "llama" model must never merge into it
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
LOGITS_MATRICES = ("output.weight", "token_embd.weight")  # the first of them in the file makes the logits


@dataclass(frozen=True)
class GGUFDtype:
    """How one --dtype is stored: ggml's type of the matrices, of the matrix that makes the logits, and of a
    matrix that cannot be quantized (rows not a whole number of blocks); and llama.cpp's file type. Names of
    the `gguf` package's enums (it is imported only when a file is written)."""

    matrices: str
    logits: str
    fallback: str
    file_type: str


GGUF_DTYPES = {
    "float32": GGUFDtype("F32", "F32", "F32", "ALL_F32"),
    "float16": GGUFDtype("F16", "F16", "F16", "MOSTLY_F16"),
    "q8_0": GGUFDtype("Q8_0", "Q8_0", "F16", "MOSTLY_Q8_0"),
    "q4_0": GGUFDtype("Q4_0", "Q8_0", "F16", "MOSTLY_Q4_0"),
}


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


def float_tensors(run: Run) -> dict[str, np.ndarray]:
    """llama.cpp's name -> the float32 array it stores, before any conversion (q/k permuted; with tied
    embeddings no output.weight: llama.cpp then uses token_embd.weight)."""
    tensors, permute = {}, standard_architecture(run.config) in PAIRWISE_ROPE
    for name, tensor in split_fused(run.model.state_dict(), run.config).items():  # Llama's separate q, k, v, gate, up
        if name == "lm_head.weight" and run.config.tie_embeddings:
            continue
        target = gguf_name(name)
        tensor = tensor.detach().cpu().float()
        if permute and target.endswith(ROTATED):  # (grouped-query attention: the keys have n_kv_heads heads)
            heads = run.config.n_heads if target.endswith(ROTATED[0]) else run.config.n_kv_heads
            tensor = permute_for_rope(tensor, heads)
        tensors[target] = tensor.contiguous().numpy()
    return tensors


def gguf_tensors(run: Run, dtype: str) -> dict[str, tuple[np.ndarray, Any]]:
    """llama.cpp's name -> (the array it stores, its GGMLQuantizationType): vectors float32, matrices as
    GGUF_DTYPES[dtype] says (a quantized one as its bytes, (rows, bytes per row))."""
    (gguf,) = require("gguf")
    kinds = GGUF_DTYPES[dtype]
    tensors = float_tensors(run)
    logits = next(name for name in LOGITS_MATRICES if name in tensors)
    stored = {}
    for name, array in tensors.items():
        if array.ndim == 1:
            stored[name] = (array, gguf.GGMLQuantizationType.F32)
            continue
        kind = gguf.GGMLQuantizationType[kinds.logits if name == logits else kinds.matrices]
        block, _ = gguf.GGML_QUANT_SIZES[kind]
        if array.shape[-1] % block:
            kind = gguf.GGMLQuantizationType[kinds.fallback]
        stored[name] = (gguf.quants.quantize(array, kind), kind)
    return stored


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
    if not byte_level and not is_sentencepiece_style(tokenizer_json):
        return ("its tokenizer is neither GPT-2-style byte-level BPE (no normalizer, a ByteLevel pre-tokenizer "
                "with GPT-2's split) nor SentencePiece-style BPE with byte fallback (Llama-2's, Mistral's), the "
                "kinds llama.cpp's 'gpt2' and 'llama' tokenizers reproduce; export --format hf, or train with "
                "--tokenizer bpe")
    return None


def is_sentencepiece_style(tokenizer_json: dict[str, Any]) -> bool:
    """A BPE that writes the space as "▁" and falls back to <0x00>..<0xFF> (Llama-2, Mistral): what llama.cpp's
    "llama" tokenizer model does, with nothing else in its pipeline (no ByteLevel, no other normalizer)."""
    model = tokenizer_json.get("model") or {}
    vocab = model.get("vocab") or {}
    normalizers = [step.get("type") for step in steps(tokenizer_json.get("normalizer"))]
    pre = [step.get("type") for step in steps(tokenizer_json.get("pre_tokenizer"))]
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and space_marker(tokenizer_json) == SENTENCEPIECE_SPACE
            and all(f"<0x{b:02X}>" in vocab for b in range(BYTE_ALPHABET_SIZE))
            and set(normalizers) <= {"Prepend", "Replace"} and set(pre) <= {"Metaspace"})


def adds_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (Llama-2's Prepend normalizer, or a
    Metaspace pre-tokenizer that prepends): llama.cpp's add_space_prefix."""
    for step in steps(tokenizer_json.get("normalizer")):
        if step.get("type") == "Prepend":
            return True
    for step in steps(tokenizer_json.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


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


def merge_scores(tokenizer_json: dict[str, Any], tokens: list[str]) -> list[float]:
    """llama.cpp's "llama" scores for a BPE tokenizer.json: it merges the adjacent pair whose joined token
    scores highest, so a merge's token scores minus one more than its rank (the first merge highest, below
    the single characters and bytes, which score 0), and the merges replay in their order. A longer token that
    no merge makes scores UNMERGED_SCORE: never merged into."""
    rank: dict[str, int] = {}
    for n, merge in enumerate(tokenizer_json["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, n)
    return [-float(rank[token] + 1) if token in rank else 0.0 if len(token) == 1 or BYTE_TOKEN.fullmatch(token)
            else UNMERGED_SCORE for token in tokens]


def add_tokenizer(writer: Any, run: Run) -> None:
    """The run's tokenizer, as llama.cpp's "gpt2" model (byte level) or its "llama" model (SentencePiece style)."""
    (gguf,) = require("gguf")
    c = run.config
    tokenizer_json = run.tokenizer.hugging_face_json()
    tokens, types, merges = vocabulary(tokenizer_json, c.vocab_size)
    if is_sentencepiece_style(tokenizer_json):
        unknown = tokenizer_json["model"].get("unk_token")
        for token_id, token in enumerate(tokens):
            if BYTE_TOKEN.fullmatch(token) and types[token_id] == gguf.TokenType.NORMAL:
                types[token_id] = int(gguf.TokenType.BYTE)
            elif token == unknown:
                types[token_id] = int(gguf.TokenType.UNKNOWN)
                writer.add_unk_token_id(token_id)
        writer.add_tokenizer_model(SENTENCEPIECE_MODEL)
        writer.add_token_list(tokens)
        writer.add_token_scores(merge_scores(tokenizer_json, tokens))
        writer.add_token_types(types)
        writer.add_add_space_prefix(adds_space_prefix(tokenizer_json))
    else:
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
    if run.tokenizer.chat_template is not None:  # tokenizer.chat_template, and the end-of-turn token
        writer.add_chat_template(run.tokenizer.chat_template.source)
        end_of_turn = [i for i in run.tokenizer.chat_stop_ids() if i != c.eos_id]
        if end_of_turn:
            writer.add_eot_token_id(end_of_turn[0])


def write_gguf(run: Run, out: Path, dtype: str) -> None:
    """Write the GGUF file `out`: metadata, tokenizer, sampling defaults, then the tensors."""
    (gguf,) = require("gguf")
    c = run.config
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), standard_architecture(c))  # the metadata keys' prefix, too
    writer.add_name(run.folder.path.name)
    writer.add_license(LICENSE)
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
    writer.add_file_type(gguf.LlamaFileType[GGUF_DTYPES[dtype].file_type])
    add_tokenizer(writer, run)
    defaults = SamplingConfig()
    writer.add_sampling_temp(defaults.temperature)
    writer.add_sampling_top_k(defaults.top_k)
    writer.add_string(EXPORT_KEY, __version__)
    for name, (array, kind) in gguf_tensors(run, dtype).items():
        writer.add_tensor(name, array, raw_dtype=kind)
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
    write=write_gguf, refusal=gguf_refusal, folder=False, dtypes=tuple(GGUF_DTYPES), is_export=is_gguf_export)
