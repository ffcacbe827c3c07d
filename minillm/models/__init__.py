"""The models: a decoder-only LM and an encoder-decoder transformer, plus helpers to build and place them."""

from __future__ import annotations

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError
from minillm.models.decoder_only import DecoderOnlyTransformer
from minillm.models.transformer import TransformerModel

__all__ = ["DecoderOnlyTransformer", "TransformerModel", "build_model", "count_parameters", "pick_device"]


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised model of config.model_type ("decoder_only" or "transformer")."""
    if not isinstance(config, ModelConfig):
        raise MiniLLMError(f"build_model needs a ModelConfig, got {type(config).__name__}")
    if config.model_type == "decoder_only":
        return DecoderOnlyTransformer(config)
    return TransformerModel(config)


def count_parameters(model: nn.Module) -> int:
    """Number of unique parameters: a tied weight (embedding = LM head) counts once.

    `Module.parameters()` already yields each shared Parameter only once.
    """
    return sum(p.numel() for p in model.parameters())


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run on: `name` if given and available, else CUDA, then Apple MPS, then CPU."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise MiniLLMError(f"unknown device {name!r} ({e}); use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MiniLLMError(f"device {name!r} requested but CUDA is not available here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MiniLLMError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA "
                               "device(s) exist; use cuda:0")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise MiniLLMError(f"device {name!r} requested but Apple MPS is not available here; use cpu")
        return device
    raise MiniLLMError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or mps")
