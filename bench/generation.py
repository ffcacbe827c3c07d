"""Generation speed with and without the KV cache, measured in the same run.

Run: .venv/bin/python bench/generation.py [--new-tokens 500] [--repeats 3]
Prints a markdown table of tokens/s for batch-1 sampling on the CPU from a randomly initialised
decoder-only model (4 layers, 4 heads, 128 wide, context 256; the weights do not change the speed).
"Without cache" recomputes the whole context window at every step, like nanoGPT's generate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minillm.config import ModelConfig
from minillm.models import DecoderOnlyTransformer, count_parameters

BENCH_MODEL = dict(model_type="decoder_only", vocab_size=65, d_model=128, n_layers=4, n_heads=4,
                   max_seq_len=256)
SAMPLING = dict(temperature=0.8, top_k=50)  # the defaults of minillm.generation.stream_text
WARMUP_TOKENS = 20


def tokens_per_second(model: DecoderOnlyTransformer, new_tokens: int, use_cache: bool, seed: int) -> float:
    """Wall-clock rate of generating `new_tokens` after a one-token prompt (BOS)."""
    prompt = torch.full((1, 1), model.config.bos_id, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(prompt, new_tokens, generator=generator, use_cache=use_cache, **SAMPLING)
    elapsed = time.perf_counter() - start
    assert out.shape == (1, 1 + new_tokens)
    return new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode; the median is reported")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = ModelConfig(**BENCH_MODEL)
    model = DecoderOnlyTransformer(config).eval()
    for use_cache in (True, False):
        tokens_per_second(model, WARMUP_TOKENS, use_cache, seed=0)

    rates: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(args.repeats):  # interleaved, so background load hits both modes alike
        for use_cache in (True, False):
            rates[use_cache].append(tokens_per_second(model, args.new_tokens, use_cache, seed=repeat))

    cached, uncached = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"Generation, {args.new_tokens} new tokens, batch 1, CPU ({torch.get_num_threads()} threads), "
          f"{count_parameters(model) / 1e6:.2f}M parameters: {BENCH_MODEL}, sampling {SAMPLING}; "
          f"median of {args.repeats} runs\n")
    print("| mode | tokens/s (median) | runs (tokens/s) |")
    print("| --- | --- | --- |")
    for name, use_cache in (("KV cache", True), ("no cache (full recompute)", False)):
        runs = ", ".join(f"{r:,.0f}" for r in rates[use_cache])
        print(f"| {name} | {statistics.median(rates[use_cache]):,.0f} | {runs} |")
    print(f"| **speedup** | **{cached / uncached:.1f}x** | |")


if __name__ == "__main__":
    main()
