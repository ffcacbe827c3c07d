"""The models, as a registry of kinds: a kind's name (ModelConfig.model_type) -> its class.

Code that must treat the kinds differently asks the class what it can do (`is_encoder_decoder`,
`layers_description`), never compares kind names, so a third kind is a new file plus one
`register_model_kind` line. A model class takes a ModelConfig; its forward returns (logits, loss) for
training, and to generate from it (minillm.engine.Engine) it is a decoding.DecodingModel: that forward also
runs over a KV cache, plus `decoder_context` and `new_cache`. A kind that only trains is refused by the
engine with one clear error."""

from __future__ import annotations

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError
from minillm.models.decoder_only import DecoderOnlyTransformer
from minillm.models.transformer import TransformerModel

__all__ = ["DecoderOnlyTransformer", "TransformerModel", "build_model", "count_parameters", "is_encoder_decoder",
           "model_class", "model_kinds", "pick_device", "register_model_kind"]

_MODEL_KINDS: dict[str, type[nn.Module]] = {}


def register_model_kind(name: str, cls: type[nn.Module]) -> None:
    """Make `cls` buildable as ModelConfig(model_type=name); it needs `is_encoder_decoder` and
    `layers_description(config)` besides the model interface."""
    for attribute in ("is_encoder_decoder", "layers_description"):
        if not hasattr(cls, attribute):
            raise TypeError(f"model class {cls.__name__} has no {attribute!r}")
    _MODEL_KINDS[name] = cls


register_model_kind("decoder_only", DecoderOnlyTransformer)
register_model_kind("transformer", TransformerModel)


def model_kinds() -> tuple[str, ...]:
    """The names of the known model kinds, the default first."""
    return tuple(_MODEL_KINDS)


def model_class(kind: str) -> type[nn.Module]:
    """The class of a model kind; an unknown kind is refused with the list of known ones."""
    if kind not in _MODEL_KINDS:
        raise MiniLLMError(f"unknown model type {kind!r}; choose one of {list(_MODEL_KINDS)}")
    return _MODEL_KINDS[kind]


def is_encoder_decoder(config: ModelConfig) -> bool:
    """True when the model reads a separate source (encoder) and generates a target (decoder)."""
    return model_class(config.model_type).is_encoder_decoder


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised model of the kind config.model_type."""
    if not isinstance(config, ModelConfig):
        raise MiniLLMError(f"build_model needs a ModelConfig, got {type(config).__name__}")
    return model_class(config.model_type)(config)


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
