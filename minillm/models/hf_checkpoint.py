"""A local Hugging Face checkpoint folder of the architectures Mini LLM exports, read as one of our models:
its config.json as a ModelConfig, its safetensors weights under our names (models/llama.py's map, used
backwards: Llama's q/k/v and gate/up stacked into our fused projections).

    FOLDER/config.json                      LlamaForCausalLM or Qwen3ForCausalLM
    FOLDER/model.safetensors                the weights (float32, float16 or bfloat16), or
    FOLDER/model.safetensors.index.json     the index of sharded weights, with its shards
    FOLDER/tokenizer.json                   the fast tokenizer (read by minillm.tokenizers, as it is)
    FOLDER/tokenizer_config.json            its chat_template, when it has one (or chat_template.jinja)

Both architectures compute what our decoder-only model computes: pre-norm RMSNorm blocks, RoPE in the
"rotate half" layout (ours), SwiGLU, grouped-query attention, no biases; Qwen3 adds an RMSNorm over each
head's queries and keys (our qk_norm). Anything else (another model_type, RoPE scaling, sliding windows,
biases) is refused, in one line that says what is read. Nothing is downloaded. safetensors (the `export`
extra) is imported when weights are read, and nowhere else outside minillm/export (tests/test_structure.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError
from minillm.files import read_json
from minillm.models.llama import FUSED

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves a tokenizer's template
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# model_type -> (the transformers class, whether it RMS-normalises each head's queries and keys: qk_norm)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", False), "qwen3": ("Qwen3ForCausalLM", True)}
SUPPORTED = ("Mini LLM reads LlamaForCausalLM and Qwen3ForCausalLM checkpoints (grouped-query attention, any RoPE "
             "theta and RMSNorm eps, tied or untied head, safetensors weights in float32, float16 or bfloat16) "
             "without RoPE scaling, sliding windows or biases")
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FINGERPRINT_CHARS = 16  # hex digits of the weights' sha256 kept in a run's record of where it started
HASH_CHUNK = 1 << 24  # bytes read at a time to hash the weights
IGNORED_WEIGHTS = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints saved: derived from the config
EXTRA_HINT = "pip install 'mini-llm[export]'"


@dataclass(frozen=True)
class HFCheckpoint:
    """A checked checkpoint folder: its architecture, our ModelConfig of it, and where its weights are."""

    path: Path
    architecture: str  # the transformers class, e.g. "Qwen3ForCausalLM"
    config: ModelConfig  # its shape; vocab_size is its embedding's rows, the special ids Mini LLM's defaults
    context: int  # max_position_embeddings: the longest window it was trained for
    weight_files: tuple[Path, ...]

    @classmethod
    def open(cls, path: str | Path) -> HFCheckpoint:
        """Read and check config.json and find the weights (none is read yet): one MiniLLMError naming what is
        wrong, for an architecture Mini LLM does not compute or a folder without weights or tokenizer."""
        path = Path(path)
        raw = read_json(path / CONFIG_FILE, "Hugging Face config")
        if not isinstance(raw, dict):
            raise MiniLLMError(f"{path / CONFIG_FILE} is not a JSON object; is {path} a Hugging Face checkpoint?")
        architecture = _architecture(raw, path)
        config, context = _model_config(raw, path)
        if not (path / TOKENIZER_FILE).is_file():
            raise MiniLLMError(f"{path} has no {TOKENIZER_FILE} (the fast tokenizer, which Mini LLM uses as it is); "
                               "download the whole checkpoint folder")
        return cls(path, architecture, config, context, _weight_files(path))

    def chat_template(self) -> str | None:
        """The tokenizer's chat template (tokenizer_config.json's "chat_template", or chat_template.jinja)."""
        if (self.path / CHAT_TEMPLATE_FILE).is_file():
            return (self.path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if not (self.path / TOKENIZER_CONFIG_FILE).is_file():
            return None
        template = read_json(self.path / TOKENIZER_CONFIG_FILE, "tokenizer config").get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None

    def fingerprint(self) -> str:
        """A short sha256 of the weight files' bytes (what a run records of the weights it started from)."""
        return weights_fingerprint(self.weight_files)

    def load_into(self, model: nn.Module, base_rows: int) -> None:
        """Copy the weights into `model` (built from self.config with the run's vocabulary), as float32 or
        whatever the model holds, one tensor at a time (no second copy of the model in memory).

        The embedding and an untied head keep the checkpoint's rows for the tokenizer's first `base_rows` ids
        (rows past them, which no token has, are left out); the rows of the ids a run added after them (a
        missing pad, bos or eos) start at the mean of the kept rows.
        """
        ours = dict(model.named_parameters())
        with _open_weights(self.weight_files) as stored:
            unknown = sorted(set(stored) - set(_expected_names(ours, self.config.tie_embeddings))
                             - {name for name in stored if name.endswith(IGNORED_WEIGHTS)})
            if unknown:
                raise MiniLLMError(f"{self.path} holds weights a {self.architecture} without biases has no place for "
                                   f"({', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}); {SUPPORTED}")
            for name, parameter in ours.items():
                parts = [_stored_name(part) for part in _parts(name)]
                missing = [part for part in parts if part not in stored]
                if missing:
                    raise MiniLLMError(f"{self.path} lacks the weight {missing[0]}; download the checkpoint again")
                value = torch.cat([stored[part] for part in parts], dim=0) if len(parts) > 1 else stored[parts[0]]
                with torch.no_grad():
                    if name in ("embed_tokens.weight", "lm_head.weight"):
                        _copy_rows(parameter, value, base_rows, name, self.path)
                    elif value.shape != parameter.shape:
                        raise MiniLLMError(f"the weight {parts[0]} in {self.path} has shape {tuple(value.shape)} but "
                                           f"its config.json says {tuple(parameter.shape)}; the folder is damaged")
                    else:
                        parameter.copy_(value)


def weights_fingerprint(files: Iterable[Path]) -> str:
    """A short sha256 of the bytes of weight files, in order: which weights a run started from."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def _architecture(raw: dict[str, Any], path: Path) -> str:
    """The transformers class of a supported config.json, or the one-line refusal of anything else."""
    model_type = raw.get("model_type")
    classes = raw.get("architectures") or []
    if model_type not in ARCHITECTURES or any(c != ARCHITECTURES[model_type][0] for c in classes):
        what = f"model_type {model_type!r}" + (f" ({', '.join(map(str, classes))})" if classes else "")
        raise MiniLLMError(f"cannot start from {path}: it is a {what}; {SUPPORTED}")
    return ARCHITECTURES[model_type][0]


def _rope_theta(raw: dict[str, Any], path: Path) -> float:
    """RoPE's base from transformers 4.x's rope_theta / rope_scaling or 5.x's rope_parameters; scaled RoPE
    (Llama 3.1's "llama3", YaRN, ...) is refused: our rotary embedding does not scale."""
    parameters = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    kind = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise MiniLLMError(f"cannot start from {path}: it scales RoPE ({kind!r}); {SUPPORTED}")
    return float(raw.get("rope_theta") or parameters.get("rope_theta") or ModelConfig().rope_theta)


def _model_config(raw: dict[str, Any], path: Path) -> tuple[ModelConfig, int]:
    """Our ModelConfig of a checked config.json, and its context (max_position_embeddings)."""
    biases = [name for name in ("attention_bias", "mlp_bias") if raw.get(name)]
    windows = raw.get("use_sliding_window") or any(kind != "full_attention" for kind in raw.get("layer_types") or [])
    activation = raw.get("hidden_act", "silu")
    refused = (f"biases ({', '.join(biases)})" if biases else "sliding-window attention" if windows
               else f"the activation {activation!r}" if activation != "silu" else None)
    if refused:
        raise MiniLLMError(f"cannot start from {path}: it has {refused}; {SUPPORTED}")
    theta = _rope_theta(raw, path)
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings")
    absent = [name for name in needed if not isinstance(raw.get(name), int)]
    if absent:
        raise MiniLLMError(f"{path / CONFIG_FILE} lacks {', '.join(absent)} (whole numbers); is it a complete "
                           "Hugging Face config?")
    heads = raw["num_attention_heads"]
    try:
        config = ModelConfig(
            vocab_size=raw["vocab_size"], d_model=raw["hidden_size"], d_ff=raw["intermediate_size"],
            n_layers=raw["num_hidden_layers"], n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, rope_theta=theta,
            norm_eps=float(raw.get("rms_norm_eps", ModelConfig().norm_eps)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)), qk_norm=ARCHITECTURES[raw["model_type"]][1],
            max_seq_len=raw["max_position_embeddings"])
    except MiniLLMError as e:
        raise MiniLLMError(f"cannot start from {path}: its config.json gives {e}") from None
    return config, raw["max_position_embeddings"]


def _weight_files(path: Path) -> tuple[Path, ...]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index lists (all present)."""
    if (path / INDEX_FILE).is_file():
        index = read_json(path / INDEX_FILE, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise MiniLLMError(f"{path / INDEX_FILE} has no weight_map; download the checkpoint again")
        files = tuple(path / name for name in sorted(set(weight_map.values())))
        absent = [file.name for file in files if not file.is_file()]
        if absent:
            raise MiniLLMError(f"{path} lacks {len(absent)} of the {len(files)} weight shards its index lists "
                               f"({absent[0]}, ...); download the whole checkpoint folder")
        return files
    if (path / WEIGHTS_FILE).is_file():
        return (path / WEIGHTS_FILE,)
    pickled = [name for name in PICKLED_WEIGHTS if (path / name).is_file()]
    if pickled:
        raise MiniLLMError(f"{path} holds its weights as {pickled[0]} (a pickle, which can run code when read); "
                           "Mini LLM reads safetensors: download the checkpoint's model.safetensors instead")
    raise MiniLLMError(f"{path} has no weights ({WEIGHTS_FILE}, or {INDEX_FILE} with its shards); download the "
                       "whole checkpoint folder")


class _StoredWeights:
    """The tensors of open safetensors files by name, read one at a time on demand."""

    def __init__(self, handles: dict[str, Any]) -> None:
        self._handles = handles  # name -> the open file that holds it

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __contains__(self, name: object) -> bool:
        return name in self._handles

    def __getitem__(self, name: str) -> torch.Tensor:
        handle = self._handles[name]
        dtype = handle.get_slice(name).get_dtype()
        if dtype not in DTYPES:
            raise MiniLLMError(f"the weight {name} is stored as {dtype}; Mini LLM reads float32, float16 and "
                               "bfloat16 checkpoints (not quantized ones)")
        return handle.get_tensor(name)


@contextlib.contextmanager
def _open_weights(files: tuple[Path, ...]) -> Iterator[_StoredWeights]:
    """The safetensors files open for reading, their tensors by name (read one at a time on demand)."""
    try:
        safetensors = importlib.import_module("safetensors")
    except ImportError:
        raise MiniLLMError(f"reading a Hugging Face checkpoint needs safetensors, which is not installed: "
                           f"{EXTRA_HINT}") from None
    with contextlib.ExitStack() as stack:
        by_name = {}
        for file in files:
            try:
                handle = stack.enter_context(safetensors.safe_open(str(file), framework="pt"))
            except Exception as e:  # the Rust library's SafetensorError: a damaged or truncated file
                raise MiniLLMError(f"{file} is not a readable safetensors file ({str(e)[:200]}); download it "
                                   "again") from None
            by_name.update(dict.fromkeys(handle.keys(), handle))
        yield _StoredWeights(by_name)


def _parts(name: str) -> tuple[str, ...]:
    """Our parameter name -> the Llama names it is made of (one, or the parts of a fused projection)."""
    suffix = next((s for s in FUSED if name.endswith(s)), None)
    return (name,) if suffix is None else tuple(name[:-len(suffix)] + part for part in FUSED[suffix])


def _stored_name(name: str) -> str:
    """A Llama name as LlamaForCausalLM stores it: `model.` in front of everything but the head."""
    return name if name == "lm_head.weight" else f"model.{name}"


def _expected_names(ours: dict[str, nn.Parameter], tied: bool) -> list[str]:
    """The stored names a checkpoint for our parameters holds (a tied checkpoint may also hold the head)."""
    names = [_stored_name(part) for name in ours for part in _parts(name)]
    return names + ["lm_head.weight"] if tied else names


def _copy_rows(parameter: nn.Parameter, value: torch.Tensor, base_rows: int, name: str, path: Path) -> None:
    """An embedding or head: the first base_rows rows from the checkpoint, the rows after them its mean."""
    if value.shape[1:] != parameter.shape[1:] or value.size(0) < base_rows:
        raise MiniLLMError(f"the weight {name} in {path} has shape {tuple(value.shape)}, too small for the "
                           f"tokenizer's {base_rows:,} ids; the tokenizer.json does not belong to these weights")
    kept = value[:base_rows]
    parameter[:base_rows].copy_(kept)
    parameter[base_rows:].copy_(kept.float().mean(dim=0).to(parameter.dtype))
