"""Will a training fit in memory? An estimate made before anything is allocated, so that a configuration
that cannot fit is refused with its figures instead of growing until the system kills the process.

The estimate is deliberately a floor (float32, no allocator overhead): a run refused here would certainly
not have fit; one that passes may still be tight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.config import ModelConfig, TrainConfig
from minillm.errors import MiniLLMError
from minillm.models import build_model, count_parameters, is_encoder_decoder
from minillm.training.optimizer import optimizer_state_floats

BYTES_PER_FLOAT = 4
# Per parameter: the weight and its gradient; the optimizers' state comes on top (optimizer.STATE_FLOATS:
# AdamW's two moments, Muon's one momentum buffer, for the parameters each of them steps).
FLOATS_PER_PARAMETER = 2
# Kept for the backward pass, per token and layer, in units of d_model (norms, q/k/v, attention output,
# projections, residuals) plus 4 of the feed-forward width (gate, up, their activation and product). Of the
# d_model widths, ATTENTION_WIDTHS are q, k, v and the attention output: the width of all the heads' queries
# (n_heads * head_dim) for q and the output, of the key/value heads' (n_kv_heads * head_dim) for k and v.
ACTIVATION_WIDTHS_PER_LAYER = 9
ATTENTION_WIDTHS = 4
FF_WIDTHS_PER_LAYER = 4
LOGIT_COPIES = 3  # logits, their log-softmax and its gradient, each (batch, time, vocab)


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    weights_and_optimizer: int  # bytes: weights, gradients, the optimizers' state
    activations: int  # bytes, one micro-batch

    @property
    def total(self) -> int:
        return self.weights_and_optimizer + self.activations

    def describe(self) -> str:
        return (f"about {gib(self.total)} ({self.parameters:,} parameters with gradients and optimizer state "
                f"{gib(self.weights_and_optimizer)}, activations of one batch {gib(self.activations)})")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**28 else f"{n_bytes / 2**20:.0f} MiB"


def estimate_training_memory(model_config: ModelConfig, config: TrainConfig) -> MemoryEstimate:
    """The memory a training of this shape needs at least (weights, optimizer, activations)."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = build_model(model_config)
    parameters = count_parameters(model)
    floats = parameters * FLOATS_PER_PARAMETER + optimizer_state_floats(model, config)
    c = model_config
    layers = c.n_encoder_layers + c.n_decoder_layers if is_encoder_decoder(c) else c.n_layers
    tokens = config.batch_size * c.max_seq_len
    attention = 2 * (c.n_heads + c.n_kv_heads) * c.head_dim  # q and its output; k and v
    per_token = layers * ((ACTIVATION_WIDTHS_PER_LAYER - ATTENTION_WIDTHS) * c.d_model + attention
                          + FF_WIDTHS_PER_LAYER * c.d_ff)
    per_token += LOGIT_COPIES * c.vocab_size
    return MemoryEstimate(parameters=parameters,
                          weights_and_optimizer=floats * BYTES_PER_FLOAT,
                          activations=tokens * per_token * BYTES_PER_FLOAT)


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`, or None where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def check_memory(model_config: ModelConfig, config: TrainConfig, device: torch.device,
                 vocab_size: int | None = None, fixed_shape: bool = False) -> MemoryEstimate:
    """Refuse, with the estimate, a training that cannot fit in the device's free memory. `fixed_shape`: the
    model is another's (--init-from), so only the batch and the window can shrink."""
    if vocab_size is not None:
        model_config = model_config.replace(vocab_size=vocab_size)
    estimate = estimate_training_memory(model_config, config)
    free = available_memory(device)
    if free is not None and estimate.total > free:
        factor = math.ceil(estimate.total / max(free, 1))
        if fixed_shape:
            raise MiniLLMError(
                f"training this model ({model_config.n_layers} layers, width {model_config.d_model}) needs "
                f"{estimate.describe()} but {device.type} has {gib(free)} free; a smaller --batch-size (now "
                f"{config.batch_size}) or --block-size (now {model_config.max_seq_len}) may make it fit, unless its "
                "weights and optimizer state alone are too much: then start from a smaller model")
        raise MiniLLMError(
            f"this training needs {estimate.describe()} but {device.type} has {gib(free)} free; make it smaller: "
            f"--batch-size (now {config.batch_size}; --grad-accum-steps keeps the global batch), --block-size "
            f"(now {model_config.max_seq_len}) or the model (--d-model {model_config.d_model}, --n-layers "
            f"{model_config.n_layers}), by about {factor}x in all"
        )
    return estimate
