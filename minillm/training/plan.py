"""What a run is about to do, said before it starts: the model, the data, and how many passes the run
makes over it. The CLI prints it and the web UI shows it, from the same `RunPlan`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from minillm.config import ModelConfig, TrainConfig
from minillm.models import model_class

MANY_EPOCHS = 20.0  # above this many passes over the data, say that the model will likely memorise it
FEW_EPOCHS = 0.05  # below this fraction of one pass, say that the run sees little of the data


def planned_steps(config: TrainConfig, epoch_tokens: int, tokens_per_step: float) -> int:
    """max_steps, or with `epochs` the steps that many passes over the training tokens take."""
    if config.epochs is None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * epoch_tokens / max(1.0, tokens_per_step)))


@dataclass(frozen=True)
class RunPlan:
    model_config: ModelConfig
    config: TrainConfig
    parameters: int
    epoch_tokens: int  # the tokens one pass over the training data trains on
    tokens_per_step: float
    max_steps: int
    device: str
    world_size: int = 1
    data_lines: tuple[str, ...] = ()  # what the data is: tokens per split, format, cut pairs (data.batches)

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.config.grad_accum_steps * self.world_size

    @property
    def epochs(self) -> float:
        return self.epochs_in(self.max_steps)

    def epochs_in(self, steps: float) -> float:
        """Passes over the training data that `steps` optimizer steps make."""
        return steps * self.tokens_per_step / max(1, self.epoch_tokens)

    def lines(self, budget_steps: float | None = None) -> list[str]:
        """The plan as the lines the CLI prints (model, data, plan, and notes when something stands out).

        `budget_steps`: the steps the time budget is expected to allow (a preview's estimate), when fewer
        than max_steps; the notes on epochs count those. Without an estimate, a run with a time budget
        makes *up to* its max_steps' worth of passes, and the notes say so."""
        mc, c = self.model_config, self.config
        layers = model_class(mc.model_type).layers_description(mc)
        grouped = f" over {mc.n_kv_heads} key/value heads" if mc.n_kv_heads != mc.n_heads else ""
        shape = f"d_model {mc.d_model}, {layers}, {mc.n_heads} heads{grouped}, context {mc.max_seq_len}"
        total, epochs = self.max_steps * self.tokens_per_step, self.epochs
        budget = f", or {c.max_time:g} s, whichever comes first" if c.max_time else ""
        if c.patience is not None:
            budget += (f"; early stopping after {c.patience} evaluations ({c.patience * c.eval_interval:,} steps) "
                       "without a better validation loss")
        lines = [
            f"model: {mc.model_type}, {self.parameters / 1e6:.2f}M parameters ({shape}), vocab {mc.vocab_size}, "
            f"device {self.device}",
            *self.data_lines,
            f"plan: {self.max_steps:,} steps x {self.tokens_per_step:,.0f} tokens = {total:,.0f} tokens "
            f"= {epochs:.2f} epochs{budget}",
        ]
        if self.world_size > 1:
            lines.append(f"distributed: {self.world_size} processes ({self.device.split(':')[0]}); global batch "
                         f"{self.global_batch} sequences = {self.world_size} x batch {c.batch_size} x "
                         f"{c.grad_accum_steps} accumulation step(s), {self.tokens_per_step:,.0f} tokens per step")
        return lines + self._epoch_notes(budget_steps)

    def _epoch_notes(self, budget_steps: float | None) -> list[str]:
        """A note when the run makes many passes over the data (it will memorise it) or sees little of it."""
        c = self.config
        if c.max_time and budget_steps is not None and budget_steps < self.max_steps:
            epochs = self.epochs_in(budget_steps)
            passes = (f"about {epochs:.0f} passes (the {budget_steps:,.0f} or so steps the {c.max_time:g} s budget "
                      "allows)")
        else:
            epochs = self.epochs
            unknown = c.max_time and budget_steps is None  # whether the budget stops the run first is not known
            passes = (f"up to {epochs:.0f} passes (all {self.max_steps:,} steps, if the {c.max_time:g} s budget "
                      "allows them)" if unknown else f"{epochs:.0f} passes")
        if epochs > MANY_EPOCHS:
            return [f"note: {passes} over {self.epoch_tokens:,} tokens is many epochs: a "
                    f"{self.parameters / 1e6:.2f}M-parameter model will likely memorise the data "
                    "(val loss rises); early stopping keeps the best model, and more data helps most"]
        if epochs < FEW_EPOCHS:
            return [f"note: the run sees only {epochs:.1%} of one epoch of the data; "
                    "more --max-steps (or --max-time) would use more of it"]
        return []
