"""The model card (README.md) of an exported folder: what the model is, what it was trained on, how well it
does, a sample with the settings that made it, and how to use the export."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minillm.checkpoint import Run
from minillm.data.prepare import read_split_record, sample_prompt
from minillm.errors import MiniLLMError
from minillm.files import read_json
from minillm.generation import generate_text, generation_inputs
from minillm.models import count_parameters, is_encoder_decoder
from minillm.run_folder import RunFolder
from minillm.sampling import SamplingConfig
from minillm.version import __version__

CARD_SAMPLE_TOKENS = 120
CARD_SAMPLE_SEED = 0
CARD_PROMPT_TOKENS = 16  # at most, and at most half the context


def model_card(run: Run, usage: str, library: str = "transformers") -> str:
    """README.md text for an export of `run`; `usage` is the format's own how-to (markdown), `library` the
    model hub's name for what loads it."""
    folder = RunFolder(Path(run.info["model_path"]).parent)
    training = run.info.get("training", {})
    split = _optional(lambda: read_split_record(folder.path), {})
    test = _optional(lambda: read_json(folder.test_metrics, "test metrics"), {})
    data = Path(split.get("source") or training.get("data") or "unknown data")
    size = f"{data.stat().st_size:,} bytes" if data.is_file() else "size unknown (the file has moved)"
    tokens = split.get("tokens", {})
    c = run.config
    lines = [
        "---", f"library_name: {library}", "pipeline_tag: text-generation", "tags: [minillm]", "---", "",
        f"# {folder.path.name}", "",
        f"A small {c.model_type} language model trained from scratch with Mini LLM {__version__}: "
        f"{count_parameters(run.model):,} parameters, {c.n_layers} layers, {c.n_heads} heads, width {c.d_model}, "
        f"context {c.max_seq_len} tokens, a {run.tokenizer.kind} tokenizer of {run.tokenizer.vocab_size:,} ids.", "",
        "## Training", "",
        f"- data: `{data.name}` ({size}); {tokens.get('train', 0):,} training, {tokens.get('val', 0):,} "
        f"validation and {tokens.get('test', 0):,} test tokens",
        f"- {training.get('tokens_seen', 0):,} tokens seen in {training.get('step', '?')} steps "
        f"({training.get('elapsed', 0):.0f} s of training)",
        f"- validation loss {_loss(training.get('val_loss'))}; test loss {_loss(test.get('loss'))} "
        f"over {test.get('tokens', 0):,} tokens", "",
        "## A sample", "",
        *_sample(run), "",
        "## Use it", "", usage.strip(), "",
    ]
    return "\n".join(lines)


def _loss(loss: float | None) -> str:
    return "unknown" if loss is None else f"{loss:.4f} (perplexity {math.exp(loss):.2f})"


def example_prompt(run: Run) -> str:
    """A prompt in the style of the run's data (the start of its test split; "" when the run folder lacks
    it): the card's sample and its how-to begin with it."""
    folder = Path(run.info["model_path"]).parent
    return _optional(lambda: sample_prompt(folder, run.tokenizer,
                                           min(CARD_PROMPT_TOKENS, run.config.max_seq_len // 2)), "")


def _sample(run: Run) -> list[str]:
    sampling = SamplingConfig(max_new_tokens=CARD_SAMPLE_TOKENS, seed=CARD_SAMPLE_SEED)
    prompt = example_prompt(run)
    prefix, source = generation_inputs(is_encoder_decoder(run.config), prompt, None) if prompt.strip() else (
        prompt, None)
    text = _optional(lambda: generate_text(run.model, run.tokenizer, prefix, sampling, source=source), "")
    described = (f"max_new_tokens {sampling.max_new_tokens}, temperature {sampling.temperature}, "
                 f"top_k {sampling.top_k}, seed {sampling.seed}")
    shown = f"source {source!r}" if source is not None else f"prompt {prompt!r}"
    return [f"From the {shown}; {described} (Mini LLM's sampler):", "", "```text", prefix + text, "```"]


def _optional(read: Callable[[], Any], default: Any) -> Any:
    """What `read()` returns, or `default` when the run folder lacks what it needs (a card is still written)."""
    try:
        return read()
    except (MiniLLMError, OSError):
        return default
