"""The model card (README.md) of an exported folder: what the model is, what it was trained on, how well it
does, a sample with the settings that made it, and how to use the export."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minillm.checkpoint import Run
from minillm.data.split_record import read_split_record
from minillm.errors import MiniLLMError
from minillm.files import read_json
from minillm.generation import showcase
from minillm.models import count_parameters
from minillm.version import LICENSE, __version__

CARD_SAMPLE_TOKENS = 120  # the card's showcase sample
CARD_PROMPT_TOKENS = 16  # ... its prompt's tokens at most (and at most half the context)


def model_card(run: Run, usage: str, library: str = "transformers") -> str:
    """README.md text for an export of `run`; `usage` is the format's own how-to (markdown), `library` the
    model hub's name for what loads it."""
    folder = run.folder
    training = run.info.get("training", {})
    split = _optional(lambda: read_split_record(folder.path), None)
    test = _optional(lambda: read_json(folder.test_metrics, "test metrics"), {})
    data = Path((split and split.source) or training.get("data") or "unknown data")
    size = f"{data.stat().st_size:,} bytes" if data.is_file() else "size unknown (the file has moved)"
    tokens = split.tokens if split else {}
    c = run.config
    lines = [
        "---", f"library_name: {library}", f"license: {LICENSE.lower()}", "pipeline_tag: text-generation",
        "tags: [minillm]", "---", "",
        f"# {folder.path.name}", "",
        f"A small {c.model_type} language model trained {_origin(run.info.get('init_from'))} with Mini LLM "
        f"{__version__}: "
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


def _origin(init_from: dict[str, Any] | None) -> str:
    """Where the model started: "from scratch", or the run or checkpoint it was tuned from (--init-from)."""
    if not init_from:
        return "from scratch"
    what = "the run" if init_from.get("kind") == "run" else f"the {init_from.get('architecture', '')} checkpoint"
    step = f"step {init_from['step']}, " if init_from.get("step") is not None else ""
    return (f"from {what} `{Path(init_from.get('path', '?')).name}` ({step}weights {init_from.get('fingerprint')}, "
            f"validation loss {_loss(init_from.get('val_loss'))} before training)")


def _loss(loss: float | None) -> str:
    return "unknown" if loss is None else f"{loss:.4f} (perplexity {math.exp(loss):.2f})"


def example_prompt(run: Run) -> str:
    """A prompt in the style of the run's data (the showcase's: the start of its test split; "" when the run
    folder lacks it): the card's sample and its how-to begin with it."""
    sample = _optional(lambda: showcase(run, CARD_SAMPLE_TOKENS, CARD_PROMPT_TOKENS), None)
    return "" if sample is None else sample.prompt


def _sample(run: Run) -> list[str]:
    """The run's showcase sample (generation.showcase), or a line saying why there is none."""
    sample = _optional(lambda: showcase(run, CARD_SAMPLE_TOKENS, CARD_PROMPT_TOKENS), None)
    if sample is None:
        return ["No sample: the run folder this model was exported from no longer holds its test split."]
    text = _optional(lambda: "".join(chunk for _, chunk in sample.tokens(run)), "")
    sampling = sample.sampling
    described = (f"max_new_tokens {sampling.max_new_tokens}, temperature {sampling.temperature}, "
                 f"top_k {sampling.top_k}, seed {sampling.seed}")
    shown = f"source {sample.source!r}" if sample.source is not None else f"prompt {sample.prompt!r}"
    return [f"From the {shown}; {described} (Mini LLM's sampler):", "", "```text", sample.prefix + text, "```"]


def _optional(read: Callable[[], Any], default: Any) -> Any:
    """What `read()` returns, or `default` when the run folder lacks what it needs (a card is still written)."""
    try:
        return read()
    except (MiniLLMError, OSError):
        return default
