"""The training loop: AdamW, warmup + cosine learning rate, gradient clipping and accumulation, AMP,
periodic evaluation with best-model and resume checkpoints, early stopping, a time budget, and a final
test-set evaluation.

    from minillm.training import train
    result = train(model_config, train_config, "runs/mine")   # -> TrainResult

Everything a run writes goes into its folder (see minillm/checkpoint.py for the layout). Only rank 0
(env RANK) writes files or prints, so the loop can later run under torchrun.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from minillm import __version__
from minillm.checkpoint import (
    BEST_CONFIG_FILE,
    BEST_MODEL_FILE,
    LAST_CHECKPOINT_FILE,
    TOKENIZER_FILE,
    check_compatible,
    clean_state_dict,
    load_run,
    load_torch,
    read_json,
    save_best,
    save_torch,
    write_json,
)
from minillm.config import ModelConfig, TrainConfig
from minillm.errors import MiniLLMError
from minillm.training import data_utils
from minillm.training.data_utils import PAIRS, SPLIT_FILE, Batch
from minillm.training.metrics import LOSS_CURVE_FILE, METRICS_FILE, MetricsLog, plot_loss_curve

TRAIN_CONFIG_FILE = "train_config.json"
TEST_METRICS_FILE = "test_metrics.json"
# Files that mark a folder as holding a run (refuse to overwrite them by accident).
RUN_MARKERS = (BEST_MODEL_FILE, LAST_CHECKPOINT_FILE, TRAIN_CONFIG_FILE, METRICS_FILE, SPLIT_FILE)
EVAL_SEED_OFFSET = 1  # the fixed evaluation windows come from their own generator, seeded seed + this
OVERFIT_EVALS = 3  # val loss rising this many evaluations in a row (train loss falling) = overfitting
MANY_EPOCHS = 20.0  # above this many passes over the data, say that the model will likely memorise it
FEW_EPOCHS = 0.05  # below this fraction of one pass, say that the run sees little of the data
CHECKPOINT_FORMAT = 1
MAX_LOG_PERPLEXITY = 700.0  # exp(700) is near the float64 limit

LogFn = Callable[[str], None]
MetricsCallback = Callable[[dict[str, Any]], None]


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun): only it writes files and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def default_log(message: str) -> None:
    """Print above the progress bar; warnings go to stderr."""
    if is_main_process():
        tqdm.write(message, file=sys.stderr if message.startswith("warning:") else sys.stdout)


def bundled_data_path() -> Path:
    """The bundled Tiny Shakespeare text (used when no data file is given)."""
    return Path(str(resources.files("minillm").joinpath("data", "tinyshakespeare.txt")))


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged loss reads as a huge number rather than an overflow."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def lr_at(step: int, config: TrainConfig, max_steps: int) -> float:
    """Learning rate for `step` (0-based): linear warmup to learning_rate, then cosine decay to min_lr."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    decay_steps = max(1, max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def is_overfitting(history: list[dict[str, float]], evals: int = OVERFIT_EVALS) -> bool:
    """Val loss rose at each of the last `evals` evaluations while train loss fell over them."""
    recent = history[-(evals + 1):]
    if len(recent) < evals + 1:
        return False
    val_rising = all(b["val_loss"] > a["val_loss"] for a, b in zip(recent, recent[1:], strict=False))
    return val_rising and recent[-1]["train_loss"] < recent[0]["train_loss"]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms or biases); fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), **extra)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. "auto": bf16 on CUDA (if supported), fp32 elsewhere
    (bf16 matmuls are slower than fp32 on CPUs without AMX)."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[tuple[Batch, int]], device: torch.device,
              dtype: torch.dtype | None) -> tuple[float, int]:
    """Token-weighted mean loss over (batch, target tokens) pairs, and the tokens counted."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for batch, n_tokens in batches:
        with autocast(device, dtype):
            _, loss = model(**batch)
        total += loss.double() * n_tokens
        tokens += n_tokens
    model.train(was_training)
    return (total.item() / tokens if tokens else float("nan")), tokens


# ---------------------------------------------------------------------------------------------------------
# Random number generator state as plain types (so last.pt loads with weights_only=True)


def rng_state(batch_generator: torch.Generator) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "batches": batch_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], batch_generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    batch_generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# The run folder


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    best_step: int
    best_val_loss: float
    test_metrics: dict[str, Any]
    stop_reason: str
    parameters: int
    history: list[dict[str, float]] = field(default_factory=list)


def run_files(run_dir: Path) -> list[Path]:
    """The files a run writes (those that exist)."""
    names = [*RUN_MARKERS, BEST_CONFIG_FILE, TOKENIZER_FILE, LOSS_CURVE_FILE, TEST_METRICS_FILE]
    patterns = ["*.bin", "*.offsets.npy", f".{BEST_MODEL_FILE}.*.tmp", f".{LAST_CHECKPOINT_FILE}.*.tmp"]
    found = [run_dir / name for name in names if (run_dir / name).exists()]
    for pattern in patterns:
        found += sorted(run_dir.glob(pattern))
    return found


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the folder; refuse to replace an existing run unless `overwrite` (then clear its files)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MiniLLMError(f"output path {run_dir} is a file, not a folder; pick another --out")
    if run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_MARKERS):
        if not overwrite:
            raise MiniLLMError(
                f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or --out to pick another folder"
            )
        if is_main_process():
            for path in run_files(run_dir):
                path.unlink()
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)


def _tokenizer_class(kind: str):
    from minillm.tokenizers import BPETokenizer, CharacterTokenizer

    return BPETokenizer if kind == "bpe" else CharacterTokenizer


def train_tokenizer(kind: str, splits: dict[str, list], fmt: str, vocab_size: int):
    """A tokenizer trained on the training split only, streamed sample by sample."""
    def texts():
        for sample in splits["train"]:
            if fmt == PAIRS:
                yield from sample
            else:
                yield sample

    if kind == "bpe":
        return _tokenizer_class(kind).train(texts(), vocab_size=vocab_size)
    return _tokenizer_class(kind).train(texts())


def prepare_data(run_dir: Path, config: TrainConfig, model_type: str, progress: bool, log: LogFn):
    """Read, split, train the tokenizer, tokenize into the run folder; returns (tokenizer, split record)."""
    data_path = Path(config.data) if config.data else bundled_data_path()
    fmt, samples = data_utils.load_samples(data_path, model_type, config.split_mode, config.separator)
    splits, record = data_utils.split_data(fmt, samples, data_path, config.val_fraction, config.test_fraction,
                                           config.seed)
    del samples
    if record["contiguous"]:
        log(f"only {record['n_samples']} sample(s) in {data_path}: splitting the text into contiguous "
            f"train/val/test stretches instead of by sample")
    tokenizer = train_tokenizer(config.tokenizer, splits, fmt, config.vocab_size)
    tokenizer.save(run_dir / TOKENIZER_FILE)
    bar = (lambda **kw: tqdm(unit="sample", leave=False, **kw)) if progress and is_main_process() else None
    spec = data_utils.write_splits(run_dir, fmt, splits, tokenizer, record["contiguous"], bar)
    return tokenizer, data_utils.save_split_record(run_dir, spec, record, str(data_path.resolve()))


def with_tokenizer(model_config: ModelConfig, tokenizer) -> ModelConfig:
    """The model config with the vocabulary and special ids of the trained tokenizer."""
    return model_config.replace(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)


# ---------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Owns the model, optimizer, data and state of one run; `fit()` runs the loop."""

    def __init__(self, run_dir: Path, model_config: ModelConfig, config: TrainConfig, split_record: dict,
                 log: LogFn = default_log, progress: bool = True, on_metrics: MetricsCallback | None = None):
        from minillm.models import build_model, count_parameters, pick_device

        self.run_dir, self.model_config, self.config = run_dir, model_config, config
        self.log, self.progress, self.on_metrics = log, progress, on_metrics
        self.main = is_main_process()
        self.device = pick_device(config.device)
        self.amp_dtype = autocast_dtype(config.dtype, self.device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA; no effect on CPU

        torch.manual_seed(config.seed)
        self.model = build_model(model_config).to(self.device)
        self.n_params = count_parameters(self.model)
        self.optimizer = make_optimizer(self.model, config, self.device)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda")
        # Compiled for speed, but weights are always saved from the uncompiled module (no `_orig_mod.`).
        self.forward_model = torch.compile(self.model) if config.compile else self.model

        self.split_record = split_record
        fmt, dtype = split_record["format"], split_record["dtype"]
        self.train_data = data_utils.open_prepared(run_dir, "train", fmt, dtype, model_config,
                                                   config.source_fraction)
        val_data = data_utils.open_prepared(run_dir, "val", fmt, dtype, model_config, config.source_fraction)
        self.batch_generator = torch.Generator().manual_seed(config.seed)
        # The same validation windows at every evaluation, so evaluations are comparable.
        eval_generator = torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET)
        self.eval_batches = []
        for _ in range(config.eval_batches):
            batch = val_data.batch_at(val_data.sample_starts(config.batch_size, eval_generator), self.device)
            self.eval_batches.append((batch, int((batch["targets"] != model_config.pad_id).sum())))

        self.tokens_per_step = self._tokens_per_step()
        self.max_steps = self._planned_steps()
        self.step = 0
        self.best_val_loss = math.inf
        self.best_step = 0
        self.evals_since_best = 0
        self.history: list[dict[str, float]] = []  # one row per evaluation: step, train_loss, val_loss
        self.elapsed = 0.0  # training seconds, summed over resumed sessions
        self.tokens_seen = 0
        self.overfitting = False
        self.last_saved_step = 0
        self.metrics = MetricsLog(run_dir / METRICS_FILE, enabled=self.main)

    # -- planning ------------------------------------------------------------------------------------

    def _tokens_per_step(self) -> float:
        rows = self.config.batch_size * self.config.grad_accum_steps
        if self.split_record["format"] == PAIRS:
            pairs = max(1, self.split_record["samples"]["train"])
            return rows * self.split_record["tokens"]["train"] / pairs
        return rows * self.train_data.block_size

    def _planned_steps(self) -> int:
        if self.config.epochs is None:
            return self.config.max_steps
        epoch_steps = self.split_record["tokens"]["train"] / max(1.0, self.tokens_per_step)
        return max(1, math.ceil(self.config.epochs * epoch_steps))

    def describe(self) -> None:
        """Say what the run is about to do: model size, data size, and how many passes over the data."""
        mc, tokens = self.model_config, self.split_record["tokens"]
        shape = f"d_model {mc.d_model}, {mc.n_layers} layers, {mc.n_heads} heads, context {mc.max_seq_len}"
        if mc.model_type == "transformer":
            shape = (f"d_model {mc.d_model}, {mc.n_encoder_layers}+{mc.n_decoder_layers} encoder+decoder "
                     f"layers, {mc.n_heads} heads, context {mc.max_seq_len}")
        self.log(f"model: {mc.model_type}, {self.n_params / 1e6:.2f}M parameters ({shape}), "
                 f"vocab {mc.vocab_size}, device {self.device}")
        self.log(f"data: {tokens['train']:,} training tokens "
                 f"({tokens['val']:,} validation, {tokens['test']:,} test)")
        total = self.max_steps * self.tokens_per_step
        epochs = total / max(1, tokens["train"])
        budget = f", or {self.config.max_time:g} s, whichever comes first" if self.config.max_time else ""
        self.log(f"plan: {self.max_steps:,} steps x {self.tokens_per_step:,.0f} tokens = {total:,.0f} tokens "
                 f"= {epochs:.2f} epochs{budget}")
        if epochs > MANY_EPOCHS:
            self.log(f"note: {epochs:.0f} passes over {tokens['train']:,} tokens is many epochs: a "
                     f"{self.n_params / 1e6:.2f}M-parameter model will likely memorise the data "
                     "(val loss rises); early stopping keeps the best model, and more data helps most")
        elif epochs < FEW_EPOCHS:
            self.log(f"note: the run sees only {epochs:.1%} of one epoch of the data; "
                     "more --max-steps (or --max-time) would use more of it")

    # -- the loop ------------------------------------------------------------------------------------

    def fit(self) -> str:
        """Train until max_steps, the time budget, or early stopping; returns why it stopped."""
        config = self.config
        bar = tqdm(total=self.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.main), desc="training")
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)  # summed on device: no sync per step
        eval_loss_sum = torch.zeros((), device=self.device)
        n_log = n_eval = tokens_since_log = 0
        session_start = last_log = time.monotonic()
        elapsed_before = self.elapsed
        stop_reason = "max_steps"
        try:
            while self.step < self.max_steps:
                lr = lr_at(self.step, config, self.max_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss = self._train_step()
                self.step += 1
                loss_sum += loss
                eval_loss_sum += loss
                n_log += 1
                n_eval += 1
                tokens_since_log += self.tokens_per_step
                self.tokens_seen += self.tokens_per_step
                bar.update(1)
                self.elapsed = elapsed_before + time.monotonic() - session_start

                if self.step % config.log_interval == 0:
                    now = time.monotonic()
                    train_loss = loss_sum.item() / n_log
                    tokens_per_s = tokens_since_log / max(now - last_log, 1e-9)
                    self._record({"kind": "train", "step": self.step, "train_loss": train_loss, "lr": lr,
                                  "tokens_per_s": tokens_per_s, "tokens_seen": self.tokens_seen,
                                  "elapsed": self.elapsed})
                    postfix = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.1e}",
                               "tok/s": f"{tokens_per_s:,.0f}"}
                    if self.best_val_loss < math.inf:
                        postfix["val"] = f"{self.best_val_loss:.3f}"
                    if self.overfitting:
                        postfix["warn"] = "overfitting"
                    bar.set_postfix(postfix, refresh=False)
                    loss_sum.zero_()
                    n_log = tokens_since_log = 0
                    last_log = now

                out_of_time = config.max_time is not None and self.elapsed >= config.max_time
                if self.step % config.eval_interval == 0 or self.step == self.max_steps or out_of_time:
                    self._evaluate_and_save(eval_loss_sum.item() / max(1, n_eval))
                    eval_loss_sum.zero_()
                    n_eval = 0
                    if config.patience is not None and self.evals_since_best >= config.patience:
                        stop_reason = "early_stopping"
                        self.log(f"early stopping: no improvement in {config.patience} evaluations; "
                                 f"best val loss {self.best_val_loss:.4f} at step {self.best_step}")
                        break
                    if out_of_time:
                        stop_reason = "max_time"
                        self.log(f"time budget of {config.max_time:g} s reached at step {self.step}")
                        break
        except KeyboardInterrupt:
            bar.close()
            self.log(f"interrupted at step {self.step}; the last checkpoint is step {self.last_saved_step}: "
                     "continue with --resume")
            raise
        bar.close()
        return stop_reason

    def _train_step(self) -> torch.Tensor:
        """One optimizer step (with gradient accumulation); returns the mean loss, still on device."""
        config = self.config
        total = torch.zeros((), device=self.device)
        for _ in range(config.grad_accum_steps):
            batch = self.train_data.sample(config.batch_size, self.batch_generator, self.device)
            with autocast(self.device, self.amp_dtype):
                _, loss = self.forward_model(**batch)
            loss = loss / config.grad_accum_steps
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _record(self, row: dict[str, Any]) -> None:
        self.metrics.append(row)
        if self.on_metrics is not None:
            self.on_metrics(row)

    # -- evaluation and checkpoints ------------------------------------------------------------------

    def _evaluate_and_save(self, train_loss: float) -> None:
        val_loss, _ = mean_loss(self.forward_model, self.eval_batches, self.device, self.amp_dtype)
        if not math.isfinite(val_loss):
            raise MiniLLMError(
                f"training diverged at step {self.step} (validation loss is {val_loss}); "
                f"lower --learning-rate (now {self.config.learning_rate:g}) or keep --grad-clip on"
            )
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step, self.evals_since_best = val_loss, self.step, 0
            if self.main:
                save_best(self.run_dir, self.model, self.model_config, self.config.tokenizer, {
                    "step": self.step, "val_loss": val_loss, "train_loss": train_loss,
                    "tokens_seen": self.tokens_seen, "elapsed": self.elapsed, "parameters": self.n_params,
                    "data": self.split_record.get("source"),
                })
        else:
            self.evals_since_best += 1
        self.history.append({"step": self.step, "train_loss": train_loss, "val_loss": val_loss})
        self._check_overfitting()
        self._record({"kind": "eval", "step": self.step, "val_loss": val_loss, "train_loss": train_loss,
                      "best_val_loss": self.best_val_loss, "best_step": self.best_step,
                      "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                      "overfitting": self.overfitting})
        if self.main:
            self.save_last()
            plot_loss_curve(self.run_dir / METRICS_FILE, self.run_dir / LOSS_CURVE_FILE,
                            title=f"{self.run_dir.name}: {self.model_config.model_type}, "
                                  f"{self.n_params / 1e6:.2f}M parameters")

    def _check_overfitting(self) -> None:
        """Warn once when val loss has risen OVERFIT_EVALS evaluations in a row while train loss fell."""
        if not self.overfitting and is_overfitting(self.history):
            self.overfitting = True
            self.log(
                f"warning: overfitting: validation loss rose for {OVERFIT_EVALS} evaluations while training "
                f"loss fell; the model ({self.n_params:,} parameters) is memorising its "
                f"{self.split_record['tokens']['train']:,} training tokens. What usually helps: a smaller "
                "model (--d-model, --n-layers), dropout (--dropout 0.1-0.3), or more data. Early stopping "
                f"keeps the best model (step {self.best_step}, val loss {self.best_val_loss:.4f})."
            )

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: tensors and plain Python types only."""
        return {
            "format": CHECKPOINT_FORMAT,
            "minillm_version": __version__,
            "model": clean_state_dict(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "history": self.history,
            "elapsed": self.elapsed,
            "tokens_seen": self.tokens_seen,
            "overfitting": self.overfitting,
            "rng": rng_state(self.batch_generator),
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
        }

    def save_last(self) -> None:
        save_torch(self.run_dir / LAST_CHECKPOINT_FILE, self.checkpoint_state())
        self.last_saved_step = self.step

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a last.pt written by checkpoint_state()."""
        self.model.load_state_dict(clean_state_dict(state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for name in ("step", "best_val_loss", "best_step", "evals_since_best", "elapsed", "tokens_seen",
                     "overfitting"):
            setattr(self, name, state[name])
        self.history = list(state["history"])
        self.last_saved_step = self.step
        restore_rng_state(state["rng"], self.batch_generator)

    # -- the end -------------------------------------------------------------------------------------

    def test(self) -> dict[str, Any]:
        """Loss and perplexity of the best model on the test split; written to test_metrics.json."""
        best = load_torch(self.run_dir / BEST_MODEL_FILE, map_location=self.device)
        self.model.load_state_dict(clean_state_dict(best))
        fmt, dtype = self.split_record["format"], self.split_record["dtype"]
        test_data = data_utils.open_prepared(self.run_dir, "test", fmt, dtype, self.model_config,
                                             self.config.source_fraction)
        loss, tokens = mean_loss(self.model, test_data.sequential(self.config.batch_size, self.device),
                                 self.device, self.amp_dtype)
        metrics = {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens,
                   "best_step": self.best_step, "best_val_loss": self.best_val_loss}
        if self.main:
            write_json(self.run_dir / TEST_METRICS_FILE, metrics)
        self.log(f"test: loss {loss:.4f}, perplexity {metrics['perplexity']:.2f} over {tokens:,} tokens "
                 f"(best model: step {self.best_step}, val loss {self.best_val_loss:.4f})")
        return metrics

    def result(self, stop_reason: str, test_metrics: dict[str, Any]) -> TrainResult:
        return TrainResult(run_dir=self.run_dir, steps=self.step, best_step=self.best_step,
                           best_val_loss=self.best_val_loss, test_metrics=test_metrics,
                           stop_reason=stop_reason, parameters=self.n_params, history=list(self.history))


# ---------------------------------------------------------------------------------------------------------
# Entry points


def train(model_config: ModelConfig, config: TrainConfig, run_dir: str | Path, *, overwrite: bool = False,
          progress: bool = True, log: LogFn = default_log,
          on_metrics: MetricsCallback | None = None) -> TrainResult:
    """Train a new model into `run_dir` (its vocabulary comes from the tokenizer trained here)."""
    from minillm.models import pick_device

    run_dir = Path(run_dir)
    pick_device(config.device)  # an unavailable device fails now, before any file is touched
    prepare_run_dir(run_dir, overwrite)
    tokenizer, split_record = prepare_data(run_dir, config, model_config.model_type, progress, log)
    model_config = with_tokenizer(model_config, tokenizer)
    write_train_config(run_dir, model_config, config)
    trainer = Trainer(run_dir, model_config, config, split_record, log, progress, on_metrics)
    trainer.describe()
    stop_reason = trainer.fit()
    return trainer.result(stop_reason, trainer.test())


# Settings that may change when a run is resumed (the rest would change what is being trained).
RESUMABLE_FIELDS = ("max_steps", "epochs", "max_time", "patience", "eval_interval", "log_interval", "device",
                    "compile", "dtype")


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None, *,
           model_overrides: dict[str, Any] | None = None, progress: bool = True, log: LogFn = default_log,
           on_metrics: MetricsCallback | None = None) -> TrainResult:
    """Continue an interrupted run from its last.pt, exactly where the checkpoint left off.

    `overrides` may change RESUMABLE_FIELDS (e.g. a longer max_time); any other field, of the training
    or (`model_overrides`) the model config, must equal what the run was trained with.
    """
    run_dir = Path(run_dir)
    last_path = run_dir / LAST_CHECKPOINT_FILE
    if not last_path.is_file():
        raise MiniLLMError(
            f"nothing to resume in {run_dir}: it has no {LAST_CHECKPOINT_FILE} (training saves one at the "
            "first evaluation); start again with --overwrite"
        )
    state = load_torch(last_path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MiniLLMError(f"{last_path} is not a Mini LLM resume checkpoint; start again with --overwrite")
    overrides, model_overrides = dict(overrides or {}), dict(model_overrides or {})
    saved_train, saved_model = state["train_config"], state["model_config"]
    changed = [k for k, v in overrides.items() if k not in RESUMABLE_FIELDS and saved_train.get(k) != v]
    changed += [k for k, v in model_overrides.items() if saved_model.get(k) != v]
    if changed:
        raise MiniLLMError(
            f"cannot change {sorted(changed)} when resuming {run_dir} (it was trained with other values); "
            f"only {list(RESUMABLE_FIELDS)} may change; start a new run with --overwrite to change the rest"
        )
    model_config = ModelConfig.from_dict(saved_model)
    allowed = {k: v for k, v in overrides.items() if k in RESUMABLE_FIELDS}
    config = TrainConfig.from_dict({**saved_train, **allowed})
    from minillm.tokenizers import load_tokenizer

    check_compatible(model_config, load_tokenizer(run_dir / TOKENIZER_FILE), f" ({run_dir})")
    split_record = data_utils.read_split_record(run_dir)
    trainer = Trainer(run_dir, model_config, config, split_record, log, progress, on_metrics)
    trainer.load_state(state)
    del state
    if is_main_process():
        trainer.metrics.truncate_after(trainer.step)
    write_train_config(run_dir, model_config, config)
    log(f"resuming {run_dir} at step {trainer.step} of {trainer.max_steps}")
    stop_reason = trainer.fit()
    return trainer.result(stop_reason, trainer.test())


def write_train_config(run_dir: Path, model_config: ModelConfig, config: TrainConfig) -> None:
    if is_main_process():
        write_json(run_dir / TRAIN_CONFIG_FILE, {"minillm_version": __version__,
                                                 "model": model_config.to_dict(), "train": config.to_dict()})


def sample_prompt(run_dir: str | Path, tokenizer: Any, max_tokens: int) -> str:
    """A prompt in the style of the data: the start of the test split (up to its first line end), or the
    first test source of a pair file; at most `max_tokens` tokens."""
    run_dir = Path(run_dir)
    record = data_utils.read_split_record(run_dir)
    if record["format"] == PAIRS:
        offsets = np.load(run_dir / "test.offsets.npy")
        ids = data_utils.read_stream(run_dir / "test.src.bin", record["dtype"])[offsets[0, 0]:offsets[0, 1]]
    else:
        ids = data_utils.read_stream(run_dir / "test.bin", record["dtype"])
    ids = ids[:max_tokens].tolist()
    while ids:
        text = tokenizer.decode(ids)
        if record["format"] != PAIRS:
            text = text.lstrip("\n")
            line_end = text.find("\n")
            text = text[:line_end + 1] if line_end > 0 else text
        if len(tokenizer.encode(text)) <= max_tokens:  # BPE may split decoded text differently
            return text
        ids = ids[:-1]
    return ""


def read_train_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was trained with (train_config.json)."""
    path = Path(run_dir) / TRAIN_CONFIG_FILE
    raw = read_json(path, "training config")
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict):
        raise MiniLLMError(f"{path} has no \"train\" section; retrain the run")
    try:
        return TrainConfig.from_dict(raw["train"])
    except MiniLLMError as e:
        raise MiniLLMError(f"training config {path}: {e}") from None


def evaluate_run(run_dir: str | Path, data: str | Path | None = None,
                 device: str | None = None) -> dict[str, Any]:
    """Loss and perplexity of a run's best model on its test split, or on every sample of another file."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, device)
    config = read_train_config(run_dir)
    dtype = autocast_dtype(config.dtype, run.device)

    def score(batches) -> dict[str, Any]:
        windows = batches.sequential(config.batch_size, run.device)
        loss, tokens = mean_loss(run.model, windows, run.device, dtype)
        return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}

    if data is None:
        batches = data_utils.open_split(run_dir, "test", run.config, config.source_fraction)
        return {**score(batches), "data": f"{run_dir} test split"}
    fmt, samples = data_utils.load_samples(data, run.config.model_type, config.split_mode, config.separator)
    with tempfile.TemporaryDirectory(prefix="minillm-eval-") as tmp:
        folder = Path(tmp)
        spec = data_utils.write_splits(folder, fmt, {"test": samples}, run.tokenizer, contiguous=False)
        batches = data_utils.open_prepared(folder, "test", fmt, spec.dtype, run.config,
                                           config.source_fraction)
        metrics = score(batches)
        del batches  # release the memmaps before the folder goes
    return {**metrics, "data": str(data)}
