"""Typed, self-validating configuration: the model's shape and the training recipe.

Both dataclasses round-trip through JSON. Unknown keys are an error, not silently ignored,
so a typo in a saved or hand-written config is caught.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

from minillm.errors import MiniLLMError

# The names of the kinds a config chooses among (its fields' `choices`). The ground floor owns the names; the
# registry that builds each kind lives above it, and tests/test_config.py holds every registry to these names.
TOKENIZER_TYPES = ("bpe", "char")  # minillm.tokenizers.TOKENIZER_KINDS
SPLIT_MODES = ("paragraph", "line", "separator")  # minillm.data.corpus.SPLITTERS
HOLDOUTS = ("shuffled", "tail")
OPTIMIZERS = ("adamw", "muon")  # minillm.training.optimizer.OPTIMIZER_RECIPES
SCHEDULES = ("cosine", "warmdown")  # minillm.training.optimizer.SCHEDULE_SHAPES
DTYPES = ("auto", "float32", "bfloat16", "float16")  # "auto" and minillm.training.precision.AUTOCAST_DTYPES
MLP_KINDS = ("swiglu", "relu2")  # minillm.models.layers.MLPS
DATA_FORMATS = ("auto", "text", "tsv", "jsonl", "parquet", "arrow")  # "auto" and minillm.data.corpus.FILE_FORMAT_NAMES
TASKS = ("auto", "text", "pairs", "chat")  # "auto" and minillm.data.tasks.TASKS
LOGGERS = ("none", "tensorboard", "wandb")  # "none" and minillm.training.loggers.LOGGERS
# The default feed-forward width per MLP kind, as a multiple of d_model: both give about 8 * d_model^2
# weights per layer (SwiGLU has three matrices of d_ff x d_model, relu2 two).
MLP_WIDTHS = {"swiglu": Fraction(8, 3), "relu2": Fraction(4)}
MAX_THREADS = 1024
MAX_VOCAB_SIZE = 2**20  # token ids must fit the uint32 token files and the embedding comfortably
MAX_STEPS = 10**12
MAX_COLUMN = 10**6  # a TSV column number (from 1) beyond any real file's
# ModelConfig fields a run takes from its tokenizer, never from the user (no option, not in a recipe).
TOKENIZER_FIELDS = ("vocab_size", "pad_id", "bos_id", "eos_id")
# The target id the loss skips (padding, a prompt's tokens, a window's already-scored tokens): PyTorch's and
# Hugging Face's value, never a token id.
IGNORE_INDEX = -100


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise MiniLLMError(message)


class _JSONConfig:
    """Shared dict/JSON round-trip for the config dataclasses."""

    # Old field name -> new one: configs saved before a rename still load.
    RENAMED_FIELDS: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        if not isinstance(values, dict):
            raise MiniLLMError(f"{cls.__name__} must be a JSON object, got {type(values).__name__}")
        values = {cls.RENAMED_FIELDS.get(k, k): v for k, v in values.items()}
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


def option(default: Any, help: str, low: float | None = None, high: float | None = None, *,
           choices: tuple[str, ...] | None = None, low_open: bool = False, high_open: bool = False,
           none_word: str | None = None) -> Any:
    """A config field with its help text (shown by `--help`) and what a value must be, kept next to the field:
    for a number the sane range it must lie in (inclusive, unless `low_open` / `high_open`; numbers must also
    be finite), for a kind the names it may take (`choices`). `check_fields` enforces them all. `none_word`:
    how None is spelled on the command line when it does not mean "none" or "off" (e.g. "auto")."""
    bounds = {"low": low, "high": high, "low_open": low_open, "high_open": high_open}
    return field(default=default, metadata={"help": help, "choices": choices, "none_word": none_word, **bounds})


def field_none_word(cls: type, name: str) -> str | None:
    """How None is spelled for this field on the command line, when not "none" / "off" (see `option`)."""
    return _field(cls, name).metadata.get("none_word")


def field_choices(cls: type, name: str) -> tuple[str, ...] | None:
    """The names a config field may take (None: it is not a choice among names)."""
    return _field(cls, name).metadata.get("choices")


def field_help(cls: type, name: str) -> str:
    """The help text of a config field, with its range when it has one."""
    f = _field(cls, name)
    low, high = f.metadata.get("low"), f.metadata.get("high")
    if low is None or high is None:
        return f.metadata.get("help", name)
    opening = "(" if f.metadata.get("low_open") else "["
    closing = ")" if f.metadata.get("high_open") else "]"
    return f"{f.metadata.get('help', name)} {opening}{_number(low)}..{_number(high)}{closing}"


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _number(value: float) -> str:
    """A bound as people write it: 1,000,000 rather than 1e+06, 0.001 rather than 1e-03."""
    if float(value).is_integer() and abs(value) < 2**64:
        return f"{int(value):,}"
    return f"{value:g}"


def _range(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """A range in words: "between 1 and 10", "above 0 and below 0.5", ..."""
    if not low_open and not high_open:
        return f"between {_number(low)} and {_number(high)}"
    start = f"above {_number(low)}" if low_open else f"at least {_number(low)}"
    end = f"below {_number(high)}" if high_open else f"at most {_number(high)}"
    return f"{start} and {end}"


def check_fields(config: Any) -> None:
    """Refuse a value of the wrong type, a number not finite or outside its field's range, or a name that is
    not one of its field's choices (see `option`). None passes where the annotation allows it."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        annotation = str(f.type)
        if value is None and "None" in annotation:
            continue
        base = annotation.replace(" | None", "").strip()
        if base == "str":
            _check(isinstance(value, str), f"{f.name} must be text, got {value!r}")
        elif base == "bool":
            _check(isinstance(value, bool), f"{f.name} must be true or false, got {value!r}")
        elif base in ("int", "float"):
            whole = base == "int"
            ok_type = isinstance(value, int) if whole else isinstance(value, (int, float))
            _check(ok_type and not isinstance(value, bool),
                   f"{f.name} must be {'a whole number' if whole else 'a number'}, got {value!r}")
        low, high = meta.get("low"), meta.get("high")
        if low is not None:
            inside = (low < value if meta["low_open"] else low <= value) and (
                value < high if meta["high_open"] else value <= high)
            _check(math.isfinite(value) and inside,
                   f"{f.name} must be {_range(low, high, meta['low_open'], meta['high_open'])}, got {value!r}")
        choices = meta.get("choices")
        if choices is not None:
            _check(value in choices, f"{f.name} must be one of {choices}, got {value!r}")


@dataclass
class ModelConfig(_JSONConfig):
    """The shape of a model. This is what `best_model_config.json` holds under "model"."""

    model_type: str = option("decoder_only", "the model kind, a name in minillm.models' registry")
    vocab_size: int = option(256, "token ids the model knows; set from the trained tokenizer", 1, MAX_VOCAB_SIZE)
    d_model: int = option(128, "width of the model (embedding size)", 1, 65536)
    n_layers: int = option(4, "number of transformer blocks (each stack, for the encoder-decoder)", 1, 1024)
    n_encoder_layers: int | None = option(None, "encoder depth of the encoder-decoder (default: --n-layers)", 1,
                                          1024)
    n_decoder_layers: int | None = option(None, "decoder depth of the encoder-decoder (default: --n-layers)", 1,
                                          1024)
    n_heads: int = option(4, "attention heads (must divide --d-model, unless --head-dim is set)", 1, 4096)
    n_kv_heads: int | None = option(None, "key/value heads (grouped-query attention: each serves n_heads / "
                                          "n_kv_heads query heads, and the KV cache holds this many; must divide "
                                          "--n-heads; default: --n-heads, plain multi-head attention)", 1, 4096)
    head_dim: int | None = option(None, "width of each attention head (default: --d-model / --n-heads; "
                                        "Qwen3-0.6B's is 128 with d_model 1024 and 16 heads)", 2, 65536)
    d_ff: int | None = option(None, "hidden width of the feed-forward layers (default: about 8/3 of --d-model for "
                                    "swiglu, 4 x --d-model for relu2: the same number of weights)", 1, 2**20)
    max_seq_len: int = option(256, "context length in tokens (the training window, block size)", 1, 2**20)
    dropout: float = option(0.0, "dropout probability (0 to 0.3 fights overfitting on small data)", 0, 0.99)
    rope_theta: float = option(10000.0, "base of the rotary position embedding", 1, 1e9)
    tie_embeddings: bool = option(True, "share the input embedding and the output layer")
    norm_eps: float = option(1e-5, "epsilon of the RMS norms", 1e-12, 1)
    # Architecture options beyond Llama (off by default: the default model is a Llama and exports as one).
    qk_norm: bool = option(False, "RMS-normalise each head's queries and keys before RoPE (QK-norm, as in the "
                                  "nanoGPT speedrun, nanochat and Qwen3); --format hf and gguf export it as Qwen3")
    mlp: str = option("swiglu", "feed-forward: swiglu (Llama's gated down(silu(x W_g) * x W_u)) or relu2 (the "
                                "speedrun's down(relu(x W_u)^2), not gated); relu2 exports --format safetensors only",
                      choices=MLP_KINDS)
    logit_softcap: float = option(0.0, "soft-cap the output logits at +-this, cap * tanh(logits / cap), in training "
                                       "and generation (0 = off; the speedrun uses 15); export --format safetensors "
                                       "only", 0, 1e4)
    zero_init_head: bool = option(False, "start an untied LM head at zero (every token equally likely at step 0, as "
                                         "in the speedrun); needs --no-tie-embeddings")
    # The special token ids of the tokenizer the model was trained with.
    pad_id: int = option(0, "padding token id (from the tokenizer)", 0, MAX_VOCAB_SIZE - 1)
    bos_id: int = option(1, "beginning-of-sample token id (from the tokenizer)", 0, MAX_VOCAB_SIZE - 1)
    eos_id: int = option(2, "end-of-sample token id (from the tokenizer)", 0, MAX_VOCAB_SIZE - 1)

    def __post_init__(self) -> None:
        check_fields(self)  # types, ranges and kinds; what follows relates fields to each other
        # Which model kinds exist is the models' registry's to say (build_model refuses an unknown one).
        _check(bool(self.model_type), f"model_type must be the name of a model kind, got {self.model_type!r}")
        if self.head_dim is None:
            _check(
                self.d_model % self.n_heads == 0,
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})",
            )
            self.head_dim = self.d_model // self.n_heads
        _check(self.head_dim % 2 == 0,
               f"the head width (d_model / n_heads, or head_dim) must be even for rotary embeddings, got "
               f"{self.head_dim}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check(self.n_heads % self.n_kv_heads == 0,
               f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}): each key/value head serves "
               "the same number of query heads")
        if self.n_encoder_layers is None:
            self.n_encoder_layers = self.n_layers
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        _check(not (self.zero_init_head and self.tie_embeddings),
               "zero_init_head would zero the input embedding too (it is tied to the head); "
               "pass --no-tie-embeddings with it, or drop it")
        if self.d_ff is None:  # rounded up to a multiple of 32
            self.d_ff = 32 * -(-int(MLP_WIDTHS[self.mlp] * self.d_model) // 32)
        check_fields(self)  # again, with the defaults filled in
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            _check(value < self.vocab_size,
                   f"{name} must be a token id below vocab_size ({self.vocab_size}), got {value!r}")

    # Fields that default to a value derived from others (None = derive it), filled in by __post_init__.
    DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ("n_encoder_layers", "n_decoder_layers", "n_kv_heads", "head_dim",
                                                 "d_ff")

    def replace(self, **changes):
        """A copy with some fields changed, validated again. A derived field that holds its derived value is
        derived again from the new values (replace(d_model=64) gives the head width and feed-forward width of
        d_model 64, not the old ones); one set to something else is kept."""
        derived = dataclasses.replace(self, **{name: None for name in self.DERIVED_FIELDS})
        for name in self.DERIVED_FIELDS:
            if name not in changes and getattr(self, name) == getattr(derived, name):
                changes[name] = None
        return dataclasses.replace(self, **changes)


@dataclass
class TrainConfig(_JSONConfig):
    """How to train: data, tokenizer, optimisation, evaluation and budget."""

    RENAMED_FIELDS: ClassVar[dict[str, str]] = {"vocab_size": "bpe_vocab_size"}  # before 0.2

    # Data
    data: str | list[str] | None = option(None, "the data: a text file (or TSV/JSONL pairs), a folder or a glob of "
                                                "them, a parquet or arrow file, a folder saved by datasets' "
                                                "save_to_disk, or a list of these; none trains on the bundled Tiny "
                                                "Shakespeare")
    tokenizer: str = option("char", "byte-level BPE or characters", choices=TOKENIZER_TYPES)
    tokenizer_file: str | None = option(None, "an existing tokenizer.json to use instead of training one: a Hugging "
                                              "Face BPE tokenizer (GPT-2's, Llama's) or another run's; the "
                                              "vocabulary comes from it")
    init_from: str | None = option(None, "start from another model's weights: a run folder (its best model, "
                                         "shape and tokenizer), or a local Hugging Face checkpoint folder of a "
                                         "Llama or Qwen3 (its tokenizer as it is); the optimizer and schedule "
                                         "start fresh ('none': from random weights)")
    bpe_vocab_size: int = option(4096, "BPE vocabulary size, special tokens included (ignored by the char "
                                       "tokenizer)", 1, MAX_VOCAB_SIZE)
    data_format: str = option("auto", "how to read the data files: auto (by the extension: .tsv, .jsonl, "
                                      ".parquet, .arrow; else by the content), text, tsv, jsonl, parquet or arrow",
                              choices=DATA_FORMATS)
    task: str = option("auto", "what the model learns: text (continue text; a pair is the text "
                               "\"source\\ntarget\"), pairs (source in, target out: the loss on the target "
                               "only; a decoder-only model reads \"source\\n\" and learns the target after it) "
                               "or chat (conversations, JSONL {\"messages\": [...]}: the loss on the assistant's "
                               "turns only, with the run's chat template); auto: chat for a conversation file, "
                               "pairs for a TSV/JSONL pair file, text otherwise", choices=TASKS)
    skip_bad_lines: bool = option(False, "leave out the bad lines of a JSONL file (not JSON, a message without a "
                                         "role or content, an unknown role, no assistant message) and count "
                                         "them, instead of stopping at the first")
    text_column: str | None = option(None, "JSONL, parquet, arrow: the column that holds the texts (default: "
                                           "\"text\"), one sample per row")
    source_column: str | None = option(None, "the column that holds the sources: a number for a TSV file (1 = "
                                             "first; default 1), a name for JSONL, parquet or arrow (default "
                                             "\"input\")")
    target_column: str | None = option(None, "the column that holds the targets: a number for a TSV file (default "
                                             "2; with more than two columns the rest are left out, with a warning), "
                                             "a name for JSONL, parquet or arrow (default \"output\")")
    split_mode: str = option("paragraph", "how the file becomes samples: blank-line paragraphs, lines, or a "
                                          "separator string", choices=SPLIT_MODES)
    separator: str = option("<|endoftext|>", "sample separator for --split-mode separator")
    holdout: str = option("shuffled", "which samples are held out for validation and test: shuffled ones, or the "
                                      "tail of the file (as nanoGPT: text after all the training text)",
                      choices=HOLDOUTS)
    val_fraction: float = option(0.05, "share of samples held out for validation", 0, 0.5, low_open=True,
                                 high_open=True)
    test_fraction: float = option(0.05, "share of samples held out for the final test", 0, 0.5, low_open=True,
                                  high_open=True)
    source_fraction: float = option(0.5, "encoder-decoder on plain text: share of each window given as the source",
                                    0, 1, low_open=True, high_open=True)
    # Optimisation
    batch_size: int = option(32, "sequences per optimizer step (per accumulation step)", 1, 10**6)
    learning_rate: float = option(1e-3, "peak learning rate (after warmup)", 1e-12, 1e9)
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay", 0, 1e9)
    optimizer: str = option("adamw", "adamw, or muon: Muon for the hidden matrices (AdamW for the embedding, head "
                                     "and norms)", choices=OPTIMIZERS)
    schedule: str = option("cosine", "after warmup: cosine decay to --min-lr, or warmdown: constant, then linear "
                                     "to --min-lr over the last --warmdown-fraction", choices=SCHEDULES)
    warmdown_fraction: float = option(0.3, "warmdown: the share of the steps after warmup spent decaying", 0.0, 1.0)
    warmup_steps: int = option(100, "steps of linear learning-rate warmup", 0, MAX_STEPS)
    max_steps: int = option(2000, "optimizer steps to train for", 1, MAX_STEPS)
    epochs: float | None = option(None, "train for this many passes over the training tokens instead of "
                                        "--max-steps", 1e-6, 1e6)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)", 0, 100)
    beta1: float = option(0.9, "AdamW beta1", 0, 1, high_open=True)
    beta2: float = option(0.99, "AdamW beta2", 0, 1, high_open=True)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 turns clipping off)", 0, 1e6)
    grad_accum_steps: int = option(1, "batches per optimizer step, their gradients averaged (batch_size x N)", 1,
                                   10**6)
    # Evaluation, logging and budget
    eval_interval: int = option(250, "evaluate on the validation set (and save checkpoints) every N steps", 1,
                                MAX_STEPS)
    eval_batches: int = option(20, "validation batches per evaluation", 1, 10**6)
    log_interval: int = option(10, "log the training loss every N steps", 1, MAX_STEPS)
    test_tokens: int | None = option(200_000, "score at most about this many test tokens at the end: a larger "
                                              "test split gives an estimate from a random sample of it, with "
                                              "its 95% confidence ('none': all)", 1, MAX_STEPS)
    test_pairs: int | None = option(500, "a pair task's test also answers at most this many test pairs greedily "
                                         "(a seeded random sample of a larger split) and scores the answers: "
                                         "exact match, character error rate, chrF ('none': all)", 1, MAX_STEPS)
    patience: int | None = option(None, "stop after N evaluations without improvement ('none': never)", 1, 10**9)
    max_time: float | None = option(None, "wall-clock budget in seconds; the learning-rate schedule fits it "
                                           "('none': no budget)", 1e-6, 1e9)
    sample_interval: int | None = option(None, "print a short sample from a fixed prompt every N steps, kept in "
                                               "samples.jsonl (0: never; 'auto': at each evaluation while the run "
                                               "is expected to take under an hour)", 0, MAX_STEPS, none_word="auto")
    log: str = option("none", "an experiment log beside metrics.jsonl: tensorboard (event files in the run's logs/; "
                              "pip install 'mini-llm[logs]') or wandb (Weights & Biases; WANDB_MODE=offline needs no "
                              "account)", choices=LOGGERS)
    # Runtime
    seed: int = option(1337, "random seed (same seed, same run on CPU)", 0, 2**63 - 1)
    device: str | None = option(None, "cpu, cuda, cuda:1, mps (default: the best available)")
    threads: int | None = option(None, "CPU threads (default: PyTorch's, one per core); on a machine shared with "
                                       "another job, 1 is often faster", 1, MAX_THREADS)
    compile: bool = option(False, "torch.compile the model (faster on GPU after a slow first step)")
    dtype: str = option("auto", "auto = bf16 autocast on CUDA, fp32 elsewhere; or float32, bfloat16, float16",
                        choices=DTYPES)

    def __post_init__(self) -> None:
        for name in ("source_column", "target_column"):  # a number before 0.3 (TSV columns only)
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, str(value))
        check_fields(self)  # types, ranges and kinds; what follows relates fields to each other
        _check(self.data is None or isinstance(self.data, str) or (
            isinstance(self.data, list) and self.data and all(isinstance(p, str) and p for p in self.data)),
            f"data must be a path, a list of paths or none, got {self.data!r}")
        for name in ("text_column", "source_column", "target_column"):
            _check(getattr(self, name) != "", f"{name} must name a column, got ''")
        _check(bool(self.separator), "separator must not be empty")
        _check(self.tokenizer_file != "", "tokenizer_file must be the path of a tokenizer.json, got ''")
        _check(self.init_from != "", "init_from must be the path of a run or checkpoint folder, got ''")
        _check(self.min_lr <= self.learning_rate,
               f"min_lr must be between 0 and learning_rate ({self.learning_rate}), got {self.min_lr}")


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
                   log_interval=5, learning_rate=3e-3, min_lr=3e-4, bpe_vocab_size=300),
    ),
    "cpu": Preset(
        "the default: about 5 minutes on a 2-core laptop CPU",
        # Sized for 2 cores, where training is compute-bound (bench/train_step.py prints the rate): in a few
        # minutes a smaller model that sees more tokens beats a larger one that sees fewer, and small batches
        # (many optimizer steps) beat large ones at equal tokens. Muon for the hidden matrices, a constant rate
        # with a linear warm-down, and QK-norm on top of them each won at equal wall-clock on the held-out tail
        # (bench/recipes.py prints the comparison; the README keeps its table), and QK-norm exports as Qwen3;
        # squared ReLU and logit soft-capping lost. The schedule follows the time budget when the steps do not
        # fit in it.
        model=dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=64, qk_norm=True),
        train=dict(batch_size=24, max_steps=4200, warmup_steps=100, eval_interval=300, eval_batches=20,
                   learning_rate=2e-3, min_lr=2e-4, max_time=300.0, optimizer="muon", schedule="warmdown"),
    ),
    "gpu": Preset(
        "a larger model for one GPU (nanoGPT's Shakespeare configuration, Llama-style)",
        model=dict(d_model=384, n_layers=6, n_heads=6, max_seq_len=256, dropout=0.2),
        # On Tiny Shakespeare 5,000 steps are about 81 epochs, and a model this size overfits long before the
        # end: early stopping ends such a run 4 evaluations (1,000 steps) after its best model.
        train=dict(batch_size=64, max_steps=5000, warmup_steps=100, eval_interval=250, eval_batches=50,
                   learning_rate=1e-3, min_lr=1e-4, patience=4),
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
