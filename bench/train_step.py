"""Training step time of Mini LLM's model against a nanoGPT-style reference, measured in the same process.

Run: .venv/bin/python bench/train_step.py [--steps 30] [--repeats 5] [--compile] [--device cuda]
At nanoGPT's CPU configuration (character vocabulary 65, 4 layers, 4 heads, width 128, context 64, batch 12,
AdamW, no dropout), or with --device cuda at its Shakespeare GPU configuration (6 layers, 6 heads, 384 wide,
context 256, batch 64, bf16 autocast): the median time of a forward + backward + optimizer step, the ratio
to the reference, and model FLOP utilisation against the matmul rate (fp32 on the CPU, bf16 on a GPU)
measured in the same run. The models alternate repeat by repeat, so a busy machine slows them alike. A third
row is Mini LLM with its RMSNorms on F.rms_norm and autograd rather than models.layers' hand-written backward
(what that backward is worth).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import torch
import torch.nn.functional as F
from reference_gpt import ReferenceGPT

from minillm.config import ModelConfig, TrainConfig
from minillm.models import build_model, count_parameters
from minillm.models.layers import RMSNorm
from minillm.training.optimizer import make_optimizers
from minillm.training.precision import autocast

VOCAB = 65
# nanoGPT's configurations: (d_model, layers, heads, context, batch)
SHAPES = {"cpu": (128, 4, 4, 64, 12), "cuda": (384, 6, 6, 256, 64)}
WARMUP_STEPS = 5


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    """The matrix-multiply rate of this machine now (the ceiling for training)."""
    size = size * 4 if device.type == "cuda" else size
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def with_autograd_rms_norm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose RMSNorms run F.rms_norm (autograd's backward, not the hand-written one)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.forward = types.MethodType(lambda self, x: F.rms_norm(x, (x.size(-1),), self.weight, self.eps),
                                              module)
    return model


def step_function(model: torch.nn.Module, optimizer: torch.optim.Optimizer, minillm: bool, device: torch.device,
                  context: int, batch: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(VOCAB, (batch, context), generator=generator).to(device)
    y = torch.randint(VOCAB, (batch, context), generator=generator).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step() -> None:
        with autocast(device, dtype):
            _, loss = model(x, targets=y) if minillm else model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seconds_per_step(step, steps: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (counts compile time "
                                                               "separately)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device(args.device)
    d_model, layers, heads, context, batch = SHAPES[device.type]
    torch.manual_seed(0)
    ours = build_model(ModelConfig(vocab_size=VOCAB, d_model=d_model, n_layers=layers, n_heads=heads,
                                   max_seq_len=context)).to(device)
    reference = ReferenceGPT(VOCAB, d_model, layers, heads, context).to(device)
    config = TrainConfig(learning_rate=1e-3, optimizer="adamw")  # nanoGPT's optimizer: AdamW alone
    (ours_optimizer,) = make_optimizers(ours, config, device)
    fused = {"fused": True} if device.type == "cuda" else {}  # nanoGPT's train.py fuses AdamW on CUDA
    plain = with_autograd_rms_norm(ours)
    models = {
        "reference (nanoGPT-style GPT)": (reference, torch.optim.AdamW(reference.parameters(), lr=1e-3, **fused),
                                          False),
        "Mini LLM": (ours, ours_optimizer, True),
        "Mini LLM, RMSNorm by F.rms_norm": (plain, make_optimizers(plain, config, device)[0], True),
    }
    steps, compile_s = {}, {}
    for name, (model, optimizer, is_ours) in models.items():
        start = time.perf_counter()
        forward = torch.compile(model) if args.compile else model
        step = step_function(forward, optimizer, is_ours, device, context, batch)
        for _ in range(WARMUP_STEPS):
            step()
        compile_s[name] = time.perf_counter() - start
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(seconds_per_step(step, args.steps, device))
    matmul_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_gflops(device, matmul_dtype)
    ref_time = statistics.median(times["reference (nanoGPT-style GPT)"])
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{str(matmul_dtype).removeprefix('torch.')} matmul rate here: {peak:.0f} GFLOP/s; torch "
          f"{torch.__version__}, {where}, shape {SHAPES[device.type]}, compile {'on' if args.compile else 'off'}")
    print("| model | parameters | ms/step (median) | speed vs reference | MFU |")
    print("| --- | --- | --- | --- | --- |")
    for name, (model, _, _) in models.items():
        median = statistics.median(times[name])
        flops = 6 * count_parameters(model) * batch * context  # forward + backward, per step
        print(f"| {name} | {count_parameters(model):,} | {median * 1000:.1f} | {ref_time / median:.2f}x | "
              f"{flops / median / 1e9 / peak:.1%} |")
    if args.compile:
        print("warm-up incl. compile: " + ", ".join(f"{n}: {s:.1f} s" for n, s in compile_s.items()))


if __name__ == "__main__":
    main()
