"""Training step time of Mini LLM's model against a nanoGPT-style reference, measured in the same process.

Run: .venv/bin/python bench/train_step.py [--steps 30] [--repeats 5] [--compile]
At nanoGPT's CPU configuration (character vocabulary 65, 4 layers, 4 heads, width 128, context 64, batch 12,
AdamW, no dropout): the median time of a forward + backward + optimizer step, the ratio to the reference,
and model FLOP utilisation against the fp32 matmul rate measured in the same run. The two models alternate
repeat by repeat, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

# Running a file of bench/ puts bench/ first on sys.path, where bench/tokenizers.py would shadow the Hugging
# Face `tokenizers` package: drop it, and load the reference model from its file.
BENCH = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == BENCH:
    sys.path.pop(0)

import torch  # noqa: E402

from minillm.config import ModelConfig, TrainConfig  # noqa: E402
from minillm.models import build_model, count_parameters  # noqa: E402
from minillm.training.optimizer import make_optimizer  # noqa: E402


def load_reference():
    spec = importlib.util.spec_from_file_location("reference_gpt", BENCH / "reference_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ReferenceGPT = load_reference().ReferenceGPT

VOCAB, D, LAYERS, HEADS, CONTEXT, BATCH = 65, 128, 4, 4, 64, 12
WARMUP_STEPS = 5


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """The fp32 matrix-multiply rate of this machine now (the ceiling for training)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def step_function(model: torch.nn.Module, optimizer: torch.optim.Optimizer, minillm: bool):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(VOCAB, (BATCH, CONTEXT), generator=generator)
    y = torch.randint(VOCAB, (BATCH, CONTEXT), generator=generator)

    def step() -> None:
        _, loss = model(x, targets=y) if minillm else model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seconds_per_step(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (counts compile time "
                                                               "separately)")
    args = parser.parse_args()
    torch.manual_seed(0)
    ours = build_model(ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, max_seq_len=CONTEXT))
    reference = ReferenceGPT(VOCAB, D, LAYERS, HEADS, CONTEXT)
    config = TrainConfig(learning_rate=1e-3)
    models = {
        "reference (nanoGPT-style GPT)": (reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), False),
        "Mini LLM": (ours, make_optimizer(ours, config, torch.device("cpu")), True),
    }
    steps, compile_s = {}, {}
    for name, (model, optimizer, is_ours) in models.items():
        start = time.perf_counter()
        forward = torch.compile(model) if args.compile else model
        step = step_function(forward, optimizer, is_ours)
        for _ in range(WARMUP_STEPS):
            step()
        compile_s[name] = time.perf_counter() - start
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(seconds_per_step(step, args.steps))
    peak = matmul_gflops()
    ref_time = statistics.median(times["reference (nanoGPT-style GPT)"])
    print(f"fp32 matmul rate here: {peak:.0f} GFLOP/s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"compile {'on' if args.compile else 'off'}")
    print("| model | parameters | ms/step (median) | speed vs reference | MFU |")
    print("| --- | --- | --- | --- | --- |")
    for name, (model, _, _) in models.items():
        median = statistics.median(times[name])
        flops = 6 * count_parameters(model) * BATCH * CONTEXT  # forward + backward, per step
        print(f"| {name} | {count_parameters(model):,} | {median * 1000:.1f} | {ref_time / median:.2f}x | "
              f"{flops / median / 1e9 / peak:.1%} |")
    if args.compile:
        print("warm-up incl. compile: " + ", ".join(f"{n}: {s:.1f} s" for n, s in compile_s.items()))


if __name__ == "__main__":
    main()
