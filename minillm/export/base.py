"""What every export format is: the ExportFormat record, and the import of the optional `export` extra."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from minillm.checkpoint import Run
from minillm.errors import MiniLLMError
from minillm.models import is_encoder_decoder
from minillm.models.llama import options_beyond_qwen3

FLOAT_DTYPES = ("float32", "float16")
# GGUF's block quantizations (8-bit and 4-bit weights with one float16 scale per block of 32), which only
# llama.cpp's formats hold.
QUANTIZED_DTYPES = ("q8_0", "q4_0")
EXPORT_DTYPES = FLOAT_DTYPES + QUANTIZED_DTYPES
EXTRA_HINT = "pip install 'mini-llm[export]'"


@dataclass(frozen=True)
class ExportFormat:
    """One export format: how it writes a run, and what it refuses."""

    name: str
    description: str
    write: Callable[[Run, Path, str], None]  # (run, out, dtype): writes `out` (a folder or a file)
    refusal: Callable[[Run], str | None]  # why this run cannot be exported so (None: it can)
    folder: bool  # True: `out` is a folder of files; False: one file
    dtypes: tuple[str, ...] = FLOAT_DTYPES  # the --dtype values it writes
    # A one-file format: whether a file is one of its exports (by a marker it writes in it): an --overwrite
    # replaces nothing else. A folder format's exports are recognised by export.target's marker file.
    is_export: Callable[[Path], bool] = lambda path: False


def require(*modules: str) -> list[ModuleType]:
    """Import the export extra's modules, or say in one line what to install."""
    found, missing = [], []
    for name in modules:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise MiniLLMError(f"exporting needs {' and '.join(missing)}, which are not installed: {EXTRA_HINT}")
    return found


def not_decoder_only(run: Run) -> str | None:
    """The refusal of formats that only describe a decoder-only (Llama) model."""
    if is_encoder_decoder(run.config):
        return ("it is an encoder-decoder, and neither transformers nor llama.cpp has a standard architecture "
                "that computes the same model (ours: Llama blocks with rotary self-attention and cross-attention; "
                "T5 and BART differ in positions, norms and feed-forward); export it with --format safetensors")
    return None


def not_llama(run: Run) -> str | None:
    """The refusal of formats that describe a Llama, or a Qwen3 for a Llama with QK-norm (transformers'
    LlamaForCausalLM / Qwen3ForCausalLM, llama.cpp's llama / qwen3)."""
    beyond = options_beyond_qwen3(run.config)
    if beyond and not is_encoder_decoder(run.config):  # (an encoder-decoder has the weightier reason)
        listed = " and ".join(beyond) if len(beyond) < 3 else f"{', '.join(beyond[:-1])} and {beyond[-1]}"
        return (f"it was trained with {listed}, which neither Llama nor Qwen3 has (the exported model would "
                f"compute something else); retrain without {'it' if len(beyond) == 1 else 'them'}, or export it "
                "with --format safetensors")
    return not_decoder_only(run)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16}[name]
