"""The training loop: AdamW, warmup + cosine learning rate, gradient clipping and accumulation, AMP,
periodic evaluation with best-model and resume checkpoints, early stopping, a time budget, a stop hook,
and a final test-set evaluation.

    from minillm.training import train
    result = train(model_config, train_config, "runs/mine")   # -> TrainResult

Everything a run writes goes into its folder (minillm.run_folder names the files); the data steps are in
minillm.data, scoring in evaluation.py. Only rank 0 writes files or prints (see distributed.py).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from minillm.checkpoint import clean_state_dict, save_best
from minillm.config import ModelConfig, TrainConfig
from minillm.data.batches import data_notes, open_split
from minillm.data.corpus import PAIRS
from minillm.errors import MiniLLMError
from minillm.files import load_torch, save_torch, write_json
from minillm.models import build_model, count_parameters, is_encoder_decoder, model_class, pick_device
from minillm.run_folder import RunFolder
from minillm.tokenizers import Tokenizer, load_tokenizer
from minillm.training.distributed import is_main_process
from minillm.training.evaluation import bits_per_unit, describe_score, mean_loss, score, target_bytes
from minillm.training.metrics import MetricsLog, plot_loss_curve
from minillm.training.precision import autocast, autocast_dtype
from minillm.training.rng import restore_rng_state, rng_state
from minillm.version import __version__

EVAL_SEED_OFFSET = 1  # the fixed evaluation windows come from their own generator, seeded seed + this
OVERFIT_EVALS = 3  # val loss rising this many evaluations in a row (train loss falling) = overfitting
MANY_EPOCHS = 20.0  # above this many passes over the data, say that the model will likely memorise it
FEW_EPOCHS = 0.05  # below this fraction of one pass, say that the run sees little of the data
CHECKPOINT_FORMAT = 1

LogFn = Callable[[str], None]
MetricsCallback = Callable[[dict[str, Any]], None]
StopHook = Callable[[], bool]  # asked after every step; True = evaluate, save and return (e.g. Event.is_set)


def default_log(message: str) -> None:
    """Print above the progress bar; warnings go to stderr."""
    if is_main_process():
        tqdm.write(message, file=sys.stderr if message.startswith("warning:") else sys.stdout)


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


# ---------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Owns the model, optimizer, data and state of one run; `fit()` runs the loop."""

    _run_tokenizer: Tokenizer | None = None  # loaded when first needed (bits per byte)
    _eval_bytes: int | None = None  # UTF-8 bytes of the validation batches' targets

    def __init__(self, run_dir: Path, model_config: ModelConfig, config: TrainConfig, split_record: dict,
                 log: LogFn = default_log, progress: bool = True, on_metrics: MetricsCallback | None = None):
        self.run_dir, self.files = run_dir, RunFolder(run_dir)
        self.model_config, self.config = model_config, config
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
        self.train_data = self.open_split("train")
        val_data = self.open_split("val")
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
        self.metrics = MetricsLog(self.files.metrics, enabled=self.main)

    def open_split(self, split: str):
        return open_split(self.run_dir, split, self.model_config, is_encoder_decoder(self.model_config),
                          self.config.source_fraction)

    # -- planning ------------------------------------------------------------------------------------

    def _tokens_per_step(self) -> float:
        rows = self.config.batch_size * self.config.grad_accum_steps
        if self.split_record["format"] == PAIRS:
            return rows * self._epoch_tokens() / max(1, self.train_data.n_pairs)
        return rows * self.train_data.seq_len

    def _epoch_tokens(self) -> int:
        """The tokens one pass over the training data trains on: for pairs, target + EOS within the context
        (what a cut pair loses beyond it is never seen)."""
        if self.split_record["format"] == PAIRS:
            return self.train_data.fit().kept_target_tokens
        return self.split_record["tokens"]["train"]

    def _planned_steps(self) -> int:
        if self.config.epochs is None:
            return self.config.max_steps
        epoch_steps = self._epoch_tokens() / max(1.0, self.tokens_per_step)
        return max(1, math.ceil(self.config.epochs * epoch_steps))

    def describe(self) -> None:
        """Say what the run is about to do: model size, data size, and how many passes over the data."""
        mc = self.model_config
        layers = model_class(mc.model_type).layers_description(mc)
        shape = f"d_model {mc.d_model}, {layers}, {mc.n_heads} heads, context {mc.max_seq_len}"
        self.log(f"model: {mc.model_type}, {self.n_params / 1e6:.2f}M parameters ({shape}), "
                 f"vocab {mc.vocab_size}, device {self.device}")
        for line in data_notes(self.split_record, self.train_data, self.open_split("test"), self.config.test_tokens):
            self.log(line)
        epoch_tokens = self._epoch_tokens()
        total = self.max_steps * self.tokens_per_step
        epochs = total / max(1, epoch_tokens)
        budget = f", or {self.config.max_time:g} s, whichever comes first" if self.config.max_time else ""
        self.log(f"plan: {self.max_steps:,} steps x {self.tokens_per_step:,.0f} tokens = {total:,.0f} tokens "
                 f"= {epochs:.2f} epochs{budget}")
        if epochs > MANY_EPOCHS:
            self.log(f"note: {epochs:.0f} passes over {epoch_tokens:,} tokens is many epochs: a "
                     f"{self.n_params / 1e6:.2f}M-parameter model will likely memorise the data "
                     "(val loss rises); early stopping keeps the best model, and more data helps most")
        elif epochs < FEW_EPOCHS:
            self.log(f"note: the run sees only {epochs:.1%} of one epoch of the data; "
                     "more --max-steps (or --max-time) would use more of it")

    # -- the loop ------------------------------------------------------------------------------------

    def fit(self, should_stop: StopHook | None = None) -> str:
        """Train until max_steps, the time budget, early stopping or `should_stop()`; returns why it stopped
        ("max_steps", "max_time", "early_stopping" or "stopped").

        `should_stop` is asked after every step; once it says True the run evaluates, saves its checkpoints
        and returns, and can be continued with `resume`. A KeyboardInterrupt ends it at once instead (the
        last checkpoint is the one saved at the last evaluation).
        """
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
                        postfix["val bpb"] = f"{self.best_val_bpb:.3f}"
                    if self.overfitting:
                        postfix["warn"] = "overfitting"
                    bar.set_postfix(postfix, refresh=False)
                    loss_sum.zero_()
                    n_log = tokens_since_log = 0
                    last_log = now

                out_of_time = config.max_time is not None and self.elapsed >= config.max_time
                stop_asked = should_stop is not None and bool(should_stop())
                if (self.step % config.eval_interval == 0 or self.step == self.max_steps or out_of_time
                        or stop_asked):
                    self._evaluate_and_save(eval_loss_sum.item() / max(1, n_eval))
                    eval_loss_sum.zero_()
                    n_eval = 0
                    if config.patience is not None and self.evals_since_best >= config.patience:
                        stop_reason = "early_stopping"
                        self.log(f"early stopping: no improvement in {config.patience} evaluations; "
                                 f"best val loss {self.best_val_loss:.4f} at step {self.best_step}")
                        break
                    if stop_asked:
                        stop_reason = "stopped"
                        self.log(f"stopped at step {self.step} as asked; the run is saved: continue it "
                                 "with --resume")
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
        val_loss, val_tokens = mean_loss(self.forward_model, self.eval_batches, self.device, self.amp_dtype)
        val_bpb = self._val_bits_per_byte(val_loss, val_tokens)
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
                    "step": self.step, "val_loss": val_loss, "val_bits_per_byte": val_bpb, "train_loss": train_loss,
                    "tokens_seen": self.tokens_seen, "elapsed": self.elapsed, "parameters": self.n_params,
                    "data": self.split_record.get("source"),
                })
        else:
            self.evals_since_best += 1
        self.history.append({"step": self.step, "train_loss": train_loss, "val_loss": val_loss,
                             "val_bits_per_byte": val_bpb})
        self._check_overfitting()
        self._record({"kind": "eval", "step": self.step, "val_loss": val_loss, "val_bits_per_byte": val_bpb,
                      "train_loss": train_loss,
                      "best_val_loss": self.best_val_loss, "best_step": self.best_step,
                      "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                      "overfitting": self.overfitting})
        if self.main:
            self.save_last()
            plot_loss_curve(self.files.metrics, self.files.loss_curve,
                            title=f"{self.run_dir.name}: {self.model_config.model_type}, "
                                  f"{self.n_params / 1e6:.2f}M parameters")

    @property
    def best_val_bpb(self) -> float:
        """Validation bits per byte of the best model so far (nan before the first evaluation)."""
        return next((row.get("val_bits_per_byte", math.nan) for row in reversed(self.history)
                     if row["step"] == self.best_step), math.nan)

    def _val_bits_per_byte(self, val_loss: float, tokens: int) -> float:
        if self._eval_bytes is None:  # the validation batches are fixed: their bytes are counted once
            self._eval_bytes = target_bytes(self.eval_batches, self._tokenizer(), self.device)
        return bits_per_unit(val_loss, tokens, self._eval_bytes)

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
        save_torch(self.files.last_checkpoint, self.checkpoint_state())
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
        """Loss, perplexity and bits per byte of the best model on the test split (at most about
        --test-tokens of it, with a progress bar); written to test_metrics.json."""
        best = load_torch(self.files.best_model, map_location=self.device)
        self.model.load_state_dict(clean_state_dict(best))
        metrics = score(self.model, self.open_split("test"), self.config.batch_size, self.device, self.amp_dtype,
                        self._tokenizer(), self.config.test_tokens, self.config.seed, self.progress and self.main)
        metrics.update(best_step=self.best_step, best_val_loss=self.best_val_loss)
        if self.main:
            write_json(self.files.test_metrics, metrics)
        self.log(f"test: {describe_score(metrics)} "
                 f"(best model: step {self.best_step}, val loss {self.best_val_loss:.4f})")
        return metrics

    def _tokenizer(self) -> Tokenizer:
        self._run_tokenizer = self._run_tokenizer or load_tokenizer(self.files.tokenizer)
        return self._run_tokenizer

    def result(self, stop_reason: str, test_metrics: dict[str, Any]) -> TrainResult:
        return TrainResult(run_dir=self.run_dir, steps=self.step, best_step=self.best_step,
                           best_val_loss=self.best_val_loss, test_metrics=test_metrics,
                           stop_reason=stop_reason, parameters=self.n_params, history=list(self.history))
