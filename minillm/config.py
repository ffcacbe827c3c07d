"""Typed, self-validating configuration: the model's shape and the training recipe.

Both dataclasses round-trip through JSON. Unknown keys are an error, not silently ignored,
so a typo in a saved or hand-written config is caught.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from minillm.errors import MiniLLMError

MODEL_TYPES = ("decoder_only", "transformer")
TOKENIZER_TYPES = ("bpe", "char")
SPLIT_MODES = ("paragraph", "line", "separator")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise MiniLLMError(message)


class _JSONConfig:
    """Shared dict/JSON round-trip for the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        if not isinstance(values, dict):
            raise MiniLLMError(f"{cls.__name__} must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        _check(not unknown, f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as e:  # e.g. "0.1" where a number belongs: a comparison in __post_init__ fails
            raise MiniLLMError(f"a {cls.__name__} field has a value of the wrong type ({e})") from None

    def replace(self, **changes):
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)


@dataclass
class ModelConfig(_JSONConfig):
    """The shape of a model. This is what `best_model_config.json` holds under "model"."""

    model_type: str = "decoder_only"  # "decoder_only" (GPT-style) or "transformer" (encoder-decoder)
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4  # decoder-only depth; default depth of each stack of the encoder-decoder
    n_encoder_layers: int | None = None  # encoder-decoder only; None means n_layers
    n_decoder_layers: int | None = None  # encoder-decoder only; None means n_layers
    n_heads: int = 4
    d_ff: int | None = None  # SwiGLU hidden width; None means about 8/3 * d_model, rounded up to 32
    max_seq_len: int = 256  # the context length (block size) in tokens
    dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    # The special token ids of the tokenizer the model was trained with.
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        _check(self.model_type in MODEL_TYPES,
               f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _check(
            self.d_model % self.n_heads == 0,
            f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})",
        )
        _check(self.head_dim % 2 == 0,
               f"d_model / n_heads must be even for rotary embeddings, got {self.head_dim}")
        if self.n_encoder_layers is None:
            self.n_encoder_layers = self.n_layers
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.d_ff is None:
            self.d_ff = 32 * -(-(8 * self.d_model // 3) // 32)
        for name in ("n_encoder_layers", "n_decoder_layers", "d_ff"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        _check(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and 0 <= value < self.vocab_size,
                f"{name} must be a token id below vocab_size ({self.vocab_size}), got {value!r}",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class TrainConfig(_JSONConfig):
    """How to train: data, tokenizer, optimisation, evaluation and budget."""

    # Data
    data: str | None = None  # text file (or TSV/JSONL pairs); None trains on the bundled Tiny Shakespeare
    tokenizer: str = "char"  # "char" or "bpe"
    vocab_size: int = 4096  # BPE only: the target vocabulary, special tokens included
    split_mode: str = "paragraph"  # how the file becomes samples: "paragraph", "line" or "separator"
    separator: str = "<|endoftext|>"  # the sample separator when split_mode == "separator"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    source_fraction: float = 0.5  # encoder-decoder on plain text: share of each window given as the source
    # Optimisation
    batch_size: int = 32
    learning_rate: float = 1e-3
    min_lr: float = 1e-4  # the floor of the cosine decay
    warmup_steps: int = 100
    max_steps: int = 2000
    epochs: float | None = None  # if set, overrides max_steps: one epoch is one pass over the training tokens
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum_steps: int = 1
    # Evaluation, logging and budget
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    patience: int | None = None  # stop after this many evaluations without improvement
    max_time: float | None = None  # wall-clock budget in seconds
    # Runtime
    seed: int = 1337
    device: str | None = None  # None picks cuda, then mps, then cpu
    compile: bool = False
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 elsewhere), "float32", "bfloat16", "float16"

    def __post_init__(self) -> None:
        _check(self.tokenizer in TOKENIZER_TYPES,
               f"tokenizer must be one of {TOKENIZER_TYPES}, got {self.tokenizer!r}")
        _check(self.split_mode in SPLIT_MODES,
               f"split_mode must be one of {SPLIT_MODES}, got {self.split_mode!r}")
        _check(bool(self.separator), "separator must not be empty")
        for name in ("batch_size", "max_steps", "grad_accum_steps", "eval_interval", "eval_batches",
                     "log_interval"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _check(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _check(0.0 < value < 0.5, f"{name} must be between 0 and 0.5, got {value}")
        _check(0.0 < self.source_fraction < 1.0,
               f"source_fraction must be in (0, 1), got {self.source_fraction}")
        _check(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        _check(
            0 <= self.min_lr <= self.learning_rate,
            f"min_lr must be between 0 and learning_rate ({self.learning_rate}), got {self.min_lr}",
        )
        _check(self.epochs is None or self.epochs > 0, f"epochs must be positive, got {self.epochs}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        _check(self.patience is None or self.patience > 0, f"patience must be positive, got {self.patience}")
        _check(self.max_time is None or self.max_time > 0, f"max_time must be positive, got {self.max_time}")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class Preset:
    """A named starting point: model and training overrides, both still overridable by the user."""

    description: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "seconds on any CPU: for tests and smoke runs",
        model=dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=32),
        train=dict(batch_size=8, max_steps=60, warmup_steps=5, eval_interval=20, eval_batches=4,
                   log_interval=5, learning_rate=3e-3, min_lr=3e-4, vocab_size=300),
    ),
    "cpu": Preset(
        "the default: about 5 minutes on a 2-core laptop CPU",
        # Sized by measurement on 2 cores (~24k tokens/s): training here is compute-bound at ~130 GFLOP/s, so
        # in 5 minutes a 0.8M-parameter model seeing ~7M tokens beats a 1.8M one seeing half as many, and
        # small batches (many optimizer steps) beat large ones at equal tokens. max_steps is set so the
        # cosine schedule ends just inside max_time (the safety net) on such a CPU.
        model=dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=64),
        train=dict(batch_size=24, max_steps=4200, warmup_steps=100, eval_interval=300, eval_batches=20,
                   learning_rate=2e-3, min_lr=2e-4, max_time=300.0),
    ),
    "gpu": Preset(
        "a larger model for one GPU (nanoGPT's Shakespeare configuration, Llama-style)",
        model=dict(d_model=384, n_layers=6, n_heads=6, max_seq_len=256, dropout=0.2),
        train=dict(batch_size=64, max_steps=5000, warmup_steps=100, eval_interval=250, eval_batches=50,
                   learning_rate=1e-3, min_lr=1e-4),
    ),
}
DEFAULT_PRESET = "cpu"


def preset_configs(name: str, model_overrides: dict[str, Any] | None = None,
                   train_overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs of a preset, with the user's overrides applied on top."""
    if name not in PRESETS:
        raise MiniLLMError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    model = ModelConfig.from_dict({**preset.model, **(model_overrides or {})})
    train = TrainConfig.from_dict({**preset.train, **(train_overrides or {})})
    return model, train
