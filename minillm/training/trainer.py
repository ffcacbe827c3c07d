"""The training loop: the run's optimizers (AdamW, or Muon for the hidden matrices: optimizer.py) on its
learning-rate schedule (warmup, then cosine or warm-down), gradient clipping and accumulation, AMP, periodic
evaluation with best-model and resume checkpoints, early stopping, a time budget, a stop hook, and a final
test-set evaluation.

    from minillm.training import train
    result = train(model_config, train_config, "runs/mine")   # -> TrainResult

Everything a run writes goes into its folder (minillm.run_folder names the files); the data steps are in
minillm.data, scoring in evaluation.py. Only rank 0 writes files or prints (see distributed.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minillm.checkpoint import clean_state_dict, save_best
from minillm.config import ModelConfig, TrainConfig
from minillm.data.batches import Batches, scored_tokens
from minillm.data.split_record import SplitRecord
from minillm.data.tasks import task_for
from minillm.errors import MiniLLMError
from minillm.files import load_torch, save_torch, write_json
from minillm.models import build_model, count_parameters, is_encoder_decoder, pick_device
from minillm.run_folder import RunFolder
from minillm.tokenizers import load_tokenizer
from minillm.training import distributed
from minillm.training.answers import describe_answers
from minillm.training.distributed import is_main_process
from minillm.training.evaluation import (
    describe_score,
    honest_bits_per_byte,
    is_overfitting,
    mean_loss,
    overfitting_warning,
    target_bytes,
    task_scores,
)
from minillm.training.loggers import RunRecords
from minillm.training.memory import check_memory
from minillm.training.metrics import plot_loss_curve, prepare_plotting
from minillm.training.optimizer import lr_at, make_optimizers
from minillm.training.outcome import LogFn, MetricsCallback, StopHook, StopReason, TrainResult, default_log
from minillm.training.plan import RunPlan, planned_steps
from minillm.training.precision import autocast, autocast_dtype
from minillm.training.samples import TrainingSamples
from minillm.training.state import TrainState, restore_trainer_state, trainer_state
from minillm.training.threads import ThroughputWatch, leave_busy_cores

EVAL_SEED_OFFSET = 1  # the fixed evaluation windows come from their own generator, seeded seed + this
BUDGET_EVALS = 5  # with a time budget, also evaluate each time another 1/BUDGET_EVALS of it has passed
# With a time budget the bar leaves out tqdm's own ETA (steps left at its rate): "ends in" is the one ETA.
BUDGET_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"

# ---------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Owns the model, optimizer, data and state of one run; `fit()` runs the loop."""

    _eval_bytes: int | None = None  # UTF-8 bytes of the validation batches' targets
    started_from: dict[str, Any] | None = None  # where the run started (init_from's record), saved with the model

    def __init__(self, run_dir: Path, model_config: ModelConfig, config: TrainConfig, split_record: SplitRecord,
                 log: LogFn = default_log, progress: bool = True, on_metrics: MetricsCallback | None = None,
                 after_save: Callable[[Trainer], None] | None = None):
        self.run_dir, self.files = run_dir, RunFolder(run_dir)
        self.model_config, self.config = model_config, config
        self.log, self.progress, self.on_metrics = log, progress, on_metrics
        self.after_save = after_save  # called on every rank after each evaluation's checkpoints are saved
        self.main = is_main_process()
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.device = distributed.setup(pick_device(config.device))
        self.amp_dtype = autocast_dtype(config.dtype, self.device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA; no effect on CPU
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        elif self.device.type == "cpu":
            self._leave_busy_cores()

        check_memory(model_config, config, self.device)  # (again: now the vocabulary is known)
        torch.manual_seed(config.seed)
        self.model = build_model(model_config).to(self.device)
        self.n_params = count_parameters(self.model)
        self.optimizers = make_optimizers(self.model, config, self.device)
        self.optimizer = self.optimizers[0]  # AdamW (the only one unless --optimizer muon)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda")
        # Several processes: DDP averages the gradients (its first act: rank 0's weights to every rank), and
        # each rank's dropout draws its own numbers. Compiled for speed, but weights are always saved from
        # the plain module (no `module.` or `_orig_mod.` prefixes).
        self.ddp = None
        if self.world_size > 1:
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if
                                               self.device.type == "cuda" else None)
            torch.manual_seed(config.seed + self.rank)
        train_model = self.ddp or self.model
        self.forward_model = torch.compile(train_model) if config.compile else train_model
        self.eval_model = self.model if self.ddp else self.forward_model  # the same windows on every rank

        self.split_record = split_record
        self.task = task_for(split_record.task, is_encoder_decoder(model_config))  # how its data is batched
        self.tokenizer = load_tokenizer(self.files.tokenizer)  # for bits per byte
        self.tokenizer_fingerprint = self.tokenizer.fingerprint()  # saved with the model
        self.train_data = self.open_split("train")
        val_data = self.open_split("val")
        self.batch_generator = torch.Generator().manual_seed(config.seed)
        # The same validation windows at every evaluation, so evaluations are comparable.
        eval_generator = torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET)
        self.eval_batches = []
        for _ in range(config.eval_batches):
            batch = val_data.batch_at(val_data.sample_starts(config.batch_size, eval_generator), self.device)
            self.eval_batches.append((batch, scored_tokens(batch)))

        self.epoch_tokens = self.task.epoch_tokens(self.train_data, split_record)
        self.tokens_per_step = self.task.step_tokens(self.global_batch, self.epoch_tokens,
                                                     split_record.samples["train"], model_config.max_seq_len)
        self.max_steps = planned_steps(config, self.epoch_tokens, self.tokens_per_step)
        self.state = TrainState()
        self.last_saved_step = 0
        self.metrics = RunRecords(self.files, config.log, {"model": model_config.to_dict(), "train": config.to_dict()},
                                  enabled=self.main)  # metrics.jsonl, samples.jsonl, the experiment log
        self.samples = TrainingSamples(run_dir, self.tokenizer, model_config, config, self.log, self.metrics, self.main)
        self.budget_evals = 0  # evaluations made for the time budget (see _budget_eval_due)
        self.throughput = ThroughputWatch()
        if self.main:
            prepare_plotting()  # (the first evaluation's plot: before the clock starts)

    def move_to(self, run_dir: Path) -> None:
        """Go on in `run_dir`, where this run's files have just been moved (from the staging folder it was
        trained in until its first model; see training.start.train)."""
        self.run_dir, self.files = run_dir, RunFolder(run_dir)
        self.metrics.move_to(self.files)

    def _leave_busy_cores(self) -> None:
        """Without --threads: if other processes keep cores busy, train on the others (see threads.py)."""
        if note := leave_busy_cores():
            self.log(note)

    def open_split(self, split: str) -> Batches:
        return self.task.open_batches(self.run_dir, split, self.split_record, self.model_config,
                                      self.config.source_fraction)

    # -- planning ------------------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, over all accumulation steps and all processes."""
        return self.config.batch_size * self.config.grad_accum_steps * self.world_size

    def plan(self) -> RunPlan:
        data = self.task.data_notes(self.split_record, self.train_data, self.open_split("test"),
                                    self.config.test_tokens)
        return RunPlan(self.model_config, self.config, self.n_params, self.epoch_tokens, self.tokens_per_step,
                       self.max_steps, str(self.device), self.world_size, tuple(data))

    def describe(self) -> None:
        """Say what the run is about to do: model size, data size, and how many passes over the data."""
        for line in self.plan().lines():
            self.log(line)

    # -- the loop ------------------------------------------------------------------------------------

    def fit(self, should_stop: StopHook | None = None) -> StopReason:
        """Train until max_steps, the time budget, early stopping or `should_stop()`; returns why it stopped.

        `should_stop` is asked after every step; once it says True the run evaluates, saves its checkpoints
        and returns, and can be continued with `resume`. A KeyboardInterrupt ends it at once instead (the
        last checkpoint is the one saved at the last evaluation).
        """
        config = self.config
        bar = tqdm(total=self.max_steps, initial=self.state.step, unit="step", dynamic_ncols=True, desc="training",
                   disable=not (self.progress and self.main), bar_format=BUDGET_BAR if config.max_time else None)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)  # summed on device: no sync per step
        eval_loss_sum = torch.zeros((), device=self.device)
        n_log = n_eval = tokens_since_log = 0
        session_start = last_log = time.monotonic()
        elapsed_before = self.state.elapsed
        stop_reason = StopReason.MAX_STEPS
        try:
            while self.state.step < self.max_steps:
                lr = lr_at(self.scheduled_step(), config, self.max_steps)
                for group in (g for optimizer in self.optimizers for g in optimizer.param_groups):
                    group["lr"] = lr
                loss = self._train_step()
                self.state.step += 1
                loss_sum += loss
                eval_loss_sum += loss
                n_log += 1
                n_eval += 1
                tokens_since_log += self.tokens_per_step
                self.state.tokens_seen += self.tokens_per_step
                bar.update(1)
                self.state.elapsed = elapsed_before + time.monotonic() - session_start

                if self.state.step % config.log_interval == 0:
                    now = time.monotonic()
                    train_loss = distributed.mean_over_ranks(loss_sum).item() / n_log
                    tokens_per_s = tokens_since_log / max(now - last_log, 1e-9)
                    self._record({"kind": "train", "step": self.state.step, "train_loss": train_loss, "lr": lr,
                                  "tokens_per_s": tokens_per_s, "tokens_seen": self.state.tokens_seen,
                                  "elapsed": self.state.elapsed})
                    if warning := self.throughput.check(tokens_per_s):
                        self.log(warning)
                    bar.set_postfix(self._postfix(train_loss, lr, tokens_per_s, now - last_log), refresh=False)
                    loss_sum.zero_()
                    n_log = tokens_since_log = 0
                    last_log = now

                # Every rank must take the same branch (an evaluation is collective): the time budget runs on
                # rank 0's clock, and a stop asked on any rank counts for all.
                out_of_time, stop_asked, budget_eval = distributed.any_rank(
                    [self.main and config.max_time is not None and self.state.elapsed >= config.max_time,
                     should_stop is not None and bool(should_stop()), self.main and self._budget_eval_due()],
                    self.device)
                evaluating = (self.state.step % config.eval_interval == 0 or self.state.step == self.max_steps
                              or out_of_time or stop_asked or budget_eval)
                if self.samples.due(self.state.step, evaluating, self.state.elapsed, self.max_steps):
                    last_log += self.samples.make(self.model, self.state.step)  # (not training time: tok/s)
                if evaluating:
                    self._evaluate_and_save(distributed.mean_over_ranks(eval_loss_sum).item() / max(1, n_eval))
                    eval_loss_sum.zero_()
                    n_eval = 0
                    if config.patience is not None and self.state.evals_since_best >= config.patience:
                        stop_reason = StopReason.EARLY_STOPPING
                        self.log(f"early stopping: no improvement in {config.patience} evaluations; "
                                 f"best val loss {self.state.best_val_loss:.4f} at step {self.state.best_step}")
                        break
                    if stop_asked:
                        stop_reason = StopReason.STOPPED
                        self.log(f"stopped at step {self.state.step} as asked; the run is saved: continue it "
                                 "with --resume")
                        break
                    if out_of_time:
                        stop_reason = StopReason.MAX_TIME
                        self.log(f"time budget of {config.max_time:g} s reached at step {self.state.step}")
                        break
        except KeyboardInterrupt:
            bar.close()
            self.log(f"interrupted at step {self.state.step}; the last checkpoint is step {self.last_saved_step}: "
                     "continue with --resume")
            raise
        finally:
            bar.close()  # before any error line, which then starts a line of its own
        return stop_reason

    def scheduled_step(self) -> float:
        """Where the learning-rate schedule is: the step, or with a time budget the share of the budget
        spent (in steps) if that is further, so that warmup and decay fit the budget on a slow machine."""
        if self.config.max_time is None:
            return self.state.step
        return max(self.state.step, self.state.elapsed / self.config.max_time * self.max_steps)

    def _budget_eval_due(self) -> bool:
        """With a time budget: another 1/BUDGET_EVALS of it passed since the last such evaluation."""
        if self.config.max_time is None:
            return False
        passed = int(self.state.elapsed / (self.config.max_time / BUDGET_EVALS))
        due = passed > self.budget_evals
        self.budget_evals = max(self.budget_evals, passed)
        return due

    def _postfix(self, train_loss: float, lr: float, tokens_per_s: float, seconds: float) -> dict[str, str]:
        """What the progress bar shows beside the step count; with a time budget, when the run will end."""
        postfix = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.1e}", "tok/s": f"{tokens_per_s:,.0f}"}
        if self.state.best_val_loss < math.inf:
            postfix["val"] = f"{self.state.best_val_loss:.3f}"
            postfix["val bpb"] = f"{self.best_val_bpb:.3f}"
        if self.config.max_time is not None:
            step_seconds = seconds / self.config.log_interval
            left = min((self.max_steps - self.state.step) * step_seconds, self.config.max_time - self.state.elapsed)
            postfix["ends in"] = tqdm.format_interval(max(0.0, left))
        if self.state.overfitting:
            postfix["warn"] = "overfitting"
        return postfix

    def _train_step(self) -> torch.Tensor:
        """One optimizer step (with gradient accumulation); returns this rank's mean loss, still on device.

        Every rank draws the same global batch (the batch generator is seeded alike everywhere) and takes
        its own micro-batches of it: micro-batch `j * world_size + rank` at accumulation step j. So the
        data of a step, and the averaged gradient, do not depend on how the batch is split over processes
        and accumulation steps (2 processes x 1 step = 1 process x 2 steps).
        """
        config, size = self.config, self.config.batch_size
        starts = self.train_data.sample_starts(self.global_batch, self.batch_generator)
        total = torch.zeros((), device=self.device)
        for j in range(config.grad_accum_steps):
            first = (j * self.world_size + self.rank) * size
            batch = self.train_data.batch_at(starts[first:first + size], self.device)
            last = j == config.grad_accum_steps - 1
            # DDP all-reduces the gradients on the last micro-step only.
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            with sync, autocast(self.device, self.amp_dtype):
                _, loss = self.forward_model(**batch)
                loss = loss / config.grad_accum_steps
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if config.grad_clip > 0:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        return total

    def _record(self, row: dict[str, Any]) -> None:
        self.metrics.append(row)
        if self.on_metrics is not None:
            self.on_metrics(row)

    # -- evaluation and checkpoints ------------------------------------------------------------------

    def _evaluate_and_save(self, train_loss: float) -> None:
        val_loss, val_tokens = mean_loss(self.eval_model, self.eval_batches, self.device, self.amp_dtype)
        val_loss = distributed.mean_over_ranks(torch.tensor(val_loss, device=self.device)).item()
        val_bpb = self._val_bits_per_byte(val_loss, val_tokens)
        rank_rng = distributed.gather_to_all(torch.get_rng_state()) if self.ddp else None
        if not math.isfinite(val_loss):
            raise MiniLLMError(
                f"training diverged at step {self.state.step} (validation loss is {val_loss}); "
                f"lower --learning-rate (now {self.config.learning_rate:g}) or keep --grad-clip on"
            )
        improved = val_loss < self.state.best_val_loss
        if improved:
            self.state.best_val_loss, self.state.best_step, self.state.evals_since_best = val_loss, self.state.step, 0
            if self.main:
                summary = {"step": self.state.step, "val_loss": val_loss, "val_bits_per_byte": val_bpb,
                           "train_loss": train_loss, "tokens_seen": self.state.tokens_seen,
                           "elapsed": self.state.elapsed, "parameters": self.n_params,
                           "data": self.split_record.source}
                save_best(self.run_dir, self.model, self.model_config, self.config.tokenizer, summary,
                          tokenizer_fingerprint=self.tokenizer_fingerprint, init_from=self.started_from)
        else:
            self.state.evals_since_best += 1
        self.state.history.append({"step": self.state.step, "train_loss": train_loss, "val_loss": val_loss,
                             "val_bits_per_byte": val_bpb})
        if not self.state.overfitting and is_overfitting(self.state.history):  # (said once)
            self.state.overfitting = True
            self.log(overfitting_warning(self.n_params, self.split_record.tokens["train"], self.state.best_step,
                                         self.state.best_val_loss))
        self._record({"kind": "eval", "step": self.state.step, "val_loss": val_loss, "val_bits_per_byte": val_bpb,
                      "train_loss": train_loss,
                      "best_val_loss": self.state.best_val_loss, "best_step": self.state.best_step,
                      "tokens_seen": self.state.tokens_seen, "elapsed": self.state.elapsed,
                      "overfitting": self.state.overfitting})
        self.last_saved_step = self.state.step
        if self.main:
            self.save_last(rank_rng)
        if self.after_save is not None:
            self.after_save(self)
        if self.main:
            plot_loss_curve(self.files.metrics, self.files.loss_curve,
                            title=f"{self.run_dir.name}: {self.model_config.model_type}, "
                                  f"{self.n_params / 1e6:.2f}M parameters")

    @property
    def best_val_bpb(self) -> float:
        """Validation bits per byte of the best model so far (nan before the first evaluation)."""
        return next((row.get("val_bits_per_byte", math.nan) for row in reversed(self.state.history)
                     if row["step"] == self.state.best_step), math.nan)

    def _val_bits_per_byte(self, val_loss: float, tokens: int) -> float:
        if self._eval_bytes is None:  # the validation batches are fixed: their bytes are counted once
            self._eval_bytes = target_bytes(self.eval_batches, self.tokenizer, self.device)
        return honest_bits_per_byte(val_loss, tokens, self._eval_bytes, self.split_record.unspelled_share("val"))

    def save_last(self, rank_rng: list[torch.Tensor] | None = None) -> None:
        save_torch(self.files.last_checkpoint, trainer_state(self, rank_rng))
        self.last_saved_step = self.state.step

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a last.pt written by save_last()."""
        restore_trainer_state(self, state)
        self.last_saved_step = self.state.step
        if self.config.max_time is not None:  # the budget evaluations already made count as made
            self.budget_evals = int(self.state.elapsed / (self.config.max_time / BUDGET_EVALS))

    # -- the end -------------------------------------------------------------------------------------

    def test(self) -> dict[str, Any]:
        """Loss, perplexity and bits per byte of the best model on the test split (at most about --test-tokens
        of it), on pairs its greedy answers' scores (--test-pairs of them); written to test_metrics.json."""
        best = load_torch(self.files.best_model, map_location=self.device)
        self.model.load_state_dict(clean_state_dict(best))
        c = self.config
        metrics = task_scores(self.task, self.model, self.open_split("test"), c.batch_size, self.device,
                              self.amp_dtype, self.tokenizer, c.test_tokens, c.test_pairs, c.seed,
                              self.progress and self.main, self.split_record.unspelled_share("test"))
        metrics.update(best_step=self.state.best_step, best_val_loss=self.state.best_val_loss)
        if self.main:
            write_json(self.files.test_metrics, metrics)
        self.log(f"test: {describe_score(metrics)} "
                 f"(best model: step {self.state.best_step}, val loss {self.state.best_val_loss:.4f})")
        if describe_answers(metrics):
            self.log(f"test: {describe_answers(metrics)}")
        return metrics

    def result(self, stop_reason: StopReason, test_metrics: dict[str, Any]) -> TrainResult:
        return TrainResult(run_dir=self.run_dir, steps=self.state.step, best_step=self.state.best_step,
                           best_val_loss=self.state.best_val_loss, test_metrics=test_metrics,
                           stop_reason=stop_reason, parameters=self.n_params, history=list(self.state.history))
