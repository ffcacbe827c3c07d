"""Samples during training, as nanoGPT users expect: every --sample-interval steps (by default at each
evaluation, for a run expected to take under an hour) a short continuation of one fixed prompt, printed above
the progress bar, kept in samples.jsonl and sent to the experiment log (loggers.RunRecords).

The prompt is the start of the run's test split (a pair run: its first test source), as the showcase sample's
at the end of `minillm train`; every sample is drawn with the same seed, so two samples differ only by what
the model learned in between. The library's generation (minillm.generation) makes it on the training model,
in eval mode for the sample only and in the training's precision (the engine's own seeded generator: the
training's random state is untouched).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from minillm.config import ModelConfig, TrainConfig
from minillm.data.prepare import sample_prompt
from minillm.errors import MiniLLMError
from minillm.generation import generate_text, generation_inputs
from minillm.models import is_encoder_decoder
from minillm.sampling import SamplingConfig
from minillm.tokenizers import Tokenizer
from minillm.training.loggers import RunRecords
from minillm.training.precision import autocast, autocast_dtype

SAMPLE_TOKENS = 48  # new tokens per sample: a glance at what the model writes, cheap next to an evaluation
SAMPLE_PROMPT_TOKENS = 16  # the prompt's tokens at most (and at most half the context)
SAMPLE_SEED = 0
AUTO_SAMPLES_SECONDS = 3600.0  # sample_interval "auto": samples at each evaluation for a run shorter than this


class TrainingSamples:
    """The periodic samples of one run (made on the main process only: `enabled`)."""

    def __init__(self, run_dir: Path, tokenizer: Tokenizer, model_config: ModelConfig, config: TrainConfig,
                 log: Callable[[str], None], records: RunRecords, enabled: bool = True) -> None:
        self.interval, self.max_time, self.dtype = config.sample_interval, config.max_time, config.dtype
        self.enabled = enabled and self.interval != 0
        self.tokenizer, self.log, self.records = tokenizer, log, records
        self.encoder_decoder = is_encoder_decoder(model_config)
        self.prompt, self.prefix, self.source = "", "", None
        if self.enabled:
            try:
                self.prompt = sample_prompt(run_dir, tokenizer, min(SAMPLE_PROMPT_TOKENS,
                                                                    model_config.max_seq_len // 2),
                                            self.encoder_decoder)
                self.prefix, self.source = generation_inputs(self.encoder_decoder, self.prompt, None)
            except MiniLLMError as e:  # (an empty test source, say): the run trains on without samples
                self.enabled = False
                log(f"warning: no samples during training: {e}")
        self.sampling = SamplingConfig(max_new_tokens=SAMPLE_TOKENS, seed=SAMPLE_SEED)

    def due(self, step: int, evaluating: bool, elapsed: float, max_steps: int) -> bool:
        """Whether this step makes a sample: every `interval` steps, or ("auto") at each evaluation while the
        run is expected to end within AUTO_SAMPLES_SECONDS (its time budget, or its pace so far)."""
        if not self.enabled:
            return False
        if self.interval is not None:
            return step % self.interval == 0
        expected = elapsed / max(step, 1) * max_steps
        return evaluating and min(expected, self.max_time or math.inf) < AUTO_SAMPLES_SECONDS

    def make(self, model: nn.Module, step: int) -> float:
        """Sample from `model` (the training one, in eval mode meanwhile), say it and record it; returns the
        seconds it took (which are not training's: the trainer leaves them out of its tokens/s)."""
        start = time.monotonic()
        device = next(model.parameters()).device
        try:
            with autocast(device, autocast_dtype(self.dtype, device)):  # (the training's precision)
                text = generate_text(model, self.tokenizer, self.prefix, self.sampling, self.source)
        except (MiniLLMError, AttributeError, NotImplementedError) as e:  # (a model kind that cannot generate)
            self.enabled = False
            self.log(f"warning: no more samples during training: the model cannot generate ({type(e).__name__}: "
                     f"{e})")
            return time.monotonic() - start
        shown = f"{self.source} -> {text}" if self.encoder_decoder else f"{self.prefix}{text}"
        self.log(f"sample at step {step:,}:\n{shown}")
        self.records.sample({"step": step, "prompt": self.prompt, "text": text, "seed": SAMPLE_SEED,
                             "max_new_tokens": SAMPLE_TOKENS}, shown)
        return time.monotonic() - start
