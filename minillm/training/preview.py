"""What a run will be, said before it starts and before any file is written: the CLI's plan lines (from the
same RunPlan), with the token counts estimated from a sample of the data and the time estimated from a few
timed training steps of the real model on this device.

The web UI's Train tab shows it under its form; it checks what `train` would check first (the data file,
the options, the memory), so a bad form gets the same one-line MiniLLMError as the CLI.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minillm.config import ModelConfig, TrainConfig
from minillm.data.batches import LMBatches
from minillm.data.prepare import SplitData, bundled_data_path, read_data
from minillm.data.sources import data_files_key
from minillm.models import build_model, count_parameters, is_encoder_decoder, model_class, pick_device
from minillm.tokenizers import import_tokenizer, train_tokenizer
from minillm.training.init_from import starting_configs
from minillm.training.memory import check_memory
from minillm.training.optimizer import make_optimizers
from minillm.training.plan import RunPlan, planned_steps
from minillm.training.precision import autocast, autocast_dtype
from minillm.training.start import with_tokenizer

SAMPLE_CHARS = 200_000  # the tokens per character are measured on at most this much of the training text
TIMED_STEPS = 3  # timed after one untimed warm-up step; the fastest counts (the others met a busy CPU)
# A timed step does at most this many FLOPs: a bigger batch is timed on fewer rows and scaled up, so that a
# large model's plan does not take a large model's step to show.
MAX_TIMED_FLOPS = 2e10
EVAL_COST = 1 / 3  # an evaluation batch (forward only) costs about a third of a training step

# What a plan reads of a data file is kept for the next plan of the same file and settings (the form
# asks for a plan at every change): at most this many files' worth.
MAX_KEPT_READS = 2
DATA_FIELDS = ("data", "tokenizer", "tokenizer_file", "bpe_vocab_size", "data_format", "task", "skip_bad_lines",
               "text_column", "source_column",
               "target_column", "split_mode", "separator", "val_fraction", "test_fraction", "seed", "holdout")
_reads: dict[str, tuple] = {}
_read_lock = threading.Lock()
_step_times: dict[str, float] = {}  # measured seconds per step, by shape and device
_step_times_lock = threading.Lock()


@dataclass(frozen=True)
class RunPreview:
    plan: RunPlan
    seconds_per_step: float  # measured here (an estimate of the run's own)
    timed_rows: int  # rows of the timed batch (fewer than the batch when it was scaled up)

    @property
    def seconds(self) -> float:
        """The estimated training time: the steps, the evaluations, capped by the time budget."""
        c = self.plan.config
        evals = self.plan.max_steps / c.eval_interval + 1
        seconds = self.seconds_per_step * (self.plan.max_steps + evals * c.eval_batches * EVAL_COST)
        return min(seconds, c.max_time) if c.max_time else seconds

    @property
    def steps(self) -> float:
        """The optimizer steps the run is expected to make: max_steps, or fewer when the time budget ends it
        first (each step with its share of the evaluations)."""
        c = self.plan.config
        step_cost = self.seconds_per_step * (1 + c.eval_batches * EVAL_COST / c.eval_interval)
        return min(self.plan.max_steps, c.max_time / step_cost) if c.max_time and step_cost > 0 else self.plan.max_steps

    def lines(self) -> list[str]:
        """The CLI's plan lines (their notes counting the steps the time budget allows), then the estimated
        time."""
        scaled = (f", timed on {self.timed_rows} of the {self.plan.config.batch_size} rows and scaled"
                  if self.timed_rows < self.plan.config.batch_size else "")
        budget = " (the time budget)" if self.plan.config.max_time and self.seconds >= self.plan.config.max_time \
            else ""
        return [*self.plan.lines(self.steps),
                f"estimated time: about {describe_seconds(self.seconds)}{budget} on {self.plan.device} "
                f"(an estimate: {self.seconds_per_step * 1000:,.1f} ms per step measured here{scaled}; a busy "
                "machine is slower)"]


def describe_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def preview_run(model_config: ModelConfig, config: TrainConfig,
                model_overrides: dict[str, Any] | None = None) -> RunPreview:
    """The plan of a training of these configs, without writing anything (see the module's docstring).
    With config.init_from, of the model it starts from (`model_overrides`: as `train` takes them)."""
    start, model_config, config = starting_configs(model_config, config, model_overrides)
    model_class(model_config.model_type)
    device = pick_device(config.device)
    notes, data, tokenizer, per_char, sample_chars, whole = _read_tokens(config, is_encoder_decoder(model_config))
    model_config = with_tokenizer(model_config, tokenizer)  # (the vocabulary of the sample's tokenizer)
    check_memory(model_config, config, device, fixed_shape=start is not None)
    with torch.device("meta"):
        parameters = count_parameters(build_model(model_config))

    task, context = data.task, model_config.max_seq_len
    n_separator = len(task.separator_ids(tokenizer))
    counts = {split: task.estimated_tokens(samples, per_char, context, data.record.contiguous, n_separator)
              for split, samples in data.splits.items()}
    tokens_per_step = task.step_tokens(config.batch_size * config.grad_accum_steps, counts["train"],
                                       len(data.splits["train"]), context)
    seq_len = task.timed_length(context, counts["train"])
    how = "counted" if whole else f"estimated from the first {sample_chars:,} characters"
    data_lines = (*notes, f"data: task {task.name}: about {counts['train']:,} training tokens ({counts['val']:,} "
                          f"validation, {counts['test']:,} test; {per_char:.3f} tokens per character, {how})")
    plan = RunPlan(model_config, config, parameters, counts["train"], tokens_per_step,
                   planned_steps(config, counts["train"], tokens_per_step), str(device), 1, data_lines)
    seconds, timed_rows = step_seconds(model_config, config, device, seq_len, parameters)
    return RunPreview(plan, seconds, timed_rows)


def _read_tokens(config: TrainConfig, encoder_decoder: bool) -> tuple:
    """(notes, data, tokenizer, tokens per character, sample characters, whether the sample is all of it):
    the data read and split, and a tokenizer trained on its sample; kept for the same file and settings."""
    files = data_files_key(config.data or str(bundled_data_path()))
    key = None if files is None else json.dumps([files, encoder_decoder, {  # (None: read_data says what is wrong)
        k: v for k, v in config.to_dict().items() if k in DATA_FIELDS}])
    with _read_lock:
        if key is not None and key in _reads:
            return _reads[key]
    notes: list[str] = []
    data = read_data(config, encoder_decoder, notes.append)
    samples = _first_samples(data)
    if config.tokenizer_file:  # an existing tokenizer (--tokenizer-file, or the one of --init-from's model)
        tokenizer = import_tokenizer(config.tokenizer_file)[0]
    else:
        tokenizer = train_tokenizer(config.tokenizer, data.task.training_texts(samples), config.bpe_vocab_size)
    sample = [text for one in samples for text in data.task.sample_texts(one)]
    sample_chars = sum(len(text) for text in sample)
    per_char = sum(len(ids) for ids in tokenizer.encode_batch(sample)) / max(1, sample_chars)
    found = (tuple(notes), data, tokenizer, per_char, sample_chars, len(samples) == len(data.splits["train"]))
    with _read_lock:
        if key is not None:
            _reads[key] = found
            while len(_reads) > MAX_KEPT_READS:
                del _reads[next(iter(_reads))]  # the oldest
    return found


def _first_samples(data: SplitData) -> list:
    """The first training samples, of SAMPLE_CHARS or so (both sides of a pair counted)."""
    samples, size = [], 0
    for sample in data.splits["train"]:
        if size >= SAMPLE_CHARS:
            break
        samples.append(sample)
        size += sum(len(text) for text in data.task.sample_texts(sample))
    return samples


def step_seconds(model_config: ModelConfig, config: TrainConfig, device: torch.device, seq_len: int,
                 parameters: int) -> tuple[float, int]:
    """(seconds per optimizer step, rows timed): a few steps of the model on random tokens, on `device`.

    The global random generators are left alone (a training may be running in another thread): the weights
    and tokens come from local generators, and dropout is off while timing."""
    timed_rows = max(1, min(config.batch_size, int(MAX_TIMED_FLOPS // max(1, 6 * parameters * seq_len))))
    key = json.dumps([model_config.to_dict(), timed_rows, seq_len, str(device), config.dtype, config.optimizer],
                     sort_keys=True)
    with _step_times_lock:
        if key not in _step_times:
            _step_times[key] = _time_steps(model_config.replace(dropout=0.0), config, device, seq_len, timed_rows)
        seconds = _step_times[key]
    return seconds * config.batch_size / timed_rows * config.grad_accum_steps, timed_rows


def timing_setup(model_config: ModelConfig, config: TrainConfig, device: torch.device, seq_len: int,
                 rows: int) -> tuple[torch.nn.Module, list[torch.optim.Optimizer], dict[str, torch.Tensor]]:
    """(model, its optimizers, a batch of `rows` windows of random tokens): what a timed step runs. The
    optimizers are the run's own (make_optimizers, as the trainer makes them: Muon with --optimizer muon)."""
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = build_model(model_config)
    model = _on_device(model, device)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    tokens = np.random.default_rng(0).integers(3, model_config.vocab_size, size=rows * (seq_len + 1) + 1)
    batches = LMBatches(tokens, seq_len, is_encoder_decoder(model_config), config.source_fraction,
                        model_config.bos_id)
    batch = batches.batch_at(torch.arange(rows) * (seq_len + 1), device)
    return model, make_optimizers(model, config, device), batch


def _on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A meta-device model's uninitialised copy on `device`, with its tied weights still one parameter
    (Module.to_empty gives each name of a shared parameter its own tensor: the head would come untied)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    model = model.to_empty(device=device)
    for first, *aliases in names.values():
        for alias in aliases:
            owner, _, attribute = alias.rpartition(".")
            setattr(model.get_submodule(owner), attribute, model.get_parameter(first))
    return model


def _time_steps(model_config: ModelConfig, config: TrainConfig, device: torch.device, seq_len: int,
                rows: int) -> float:
    model, optimizers, batch = timing_setup(model_config, config, device, seq_len, rows)
    dtype = autocast_dtype(config.dtype, device)
    model.train()
    times = []
    for _ in range(TIMED_STEPS + 1):  # the first step (allocations, kernel choice) is not counted
        _synchronize(device)
        start = time.perf_counter()
        with autocast(device, dtype):
            _, loss = model(**batch)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
