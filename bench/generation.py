"""Generation speed: Mini LLM with its KV cache, Mini LLM recomputing the window, and a nanoGPT-style
reference's full-recompute `generate`, measured in the same run.

Run: .venv/bin/python bench/generation.py [--new-tokens 200] [--repeats 3]
Randomly initialised decoder-only models of nanoGPT's CPU shape (4 layers, 4 heads, 128 wide; the weights
do not change the speed), contexts 64 and 256, batch 1 and 8, top-k 50 sampling. Context 64 is the honest
test of per-token overhead (recomputing a short window is cheap); at 256 recomputation grows with the
window. Also the time to the first new token after a 200-token prompt. Modes alternate repeat by repeat,
so background load hits them alike. Prints markdown tables.
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

from minillm.config import ModelConfig  # noqa: E402
from minillm.models import DecoderOnlyTransformer, count_parameters  # noqa: E402

VOCAB, D, LAYERS, HEADS = 65, 128, 4, 4
SAMPLING = dict(temperature=0.8, top_k=50)  # the defaults of minillm.generation.stream_text
PROMPT_TOKENS = 200  # for the time to first token
WARMUP_TOKENS = 10


def load_reference():
    spec = importlib.util.spec_from_file_location("reference_gpt", BENCH / "reference_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReferenceGPT


def rate(generate, batch: int, new_tokens: int, seed: int) -> float:
    """Tokens per second (new tokens of all rows) after a one-token prompt."""
    prompt = torch.ones((batch, 1), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    out = generate(prompt, new_tokens, generator)
    elapsed = time.perf_counter() - start
    assert out.shape == (batch, 1 + new_tokens)
    return batch * new_tokens / elapsed


def modes(context: int):
    torch.manual_seed(0)
    ours = DecoderOnlyTransformer(ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS,
                                              max_seq_len=context)).eval()
    reference = load_reference()(VOCAB, D, LAYERS, HEADS, context).eval()
    return ours, reference, {
        "Mini LLM, KV cache": lambda p, n, g: ours.generate(p, n, generator=g, use_cache=True, **SAMPLING),
        "Mini LLM, full recompute": lambda p, n, g: ours.generate(p, n, generator=g, use_cache=False, **SAMPLING),
        "reference, full recompute (nanoGPT's generate)": lambda p, n, g: reference.generate(
            p, n, generator=g, **SAMPLING),
    }


def first_token_seconds(ours: DecoderOnlyTransformer, reference, repeats: int) -> dict[str, float]:
    prompt = torch.randint(3, VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"Mini LLM (prefill into the cache)": [], "reference (one forward)": []}
    for _ in range(repeats + 1):
        start = time.perf_counter()
        steps = ours.iter_generate(prompt, 1, **SAMPLING)
        next(steps)
        steps.close()
        times["Mini LLM (prefill into the cache)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        reference.generate(prompt, 1, **SAMPLING)
        times["reference (one forward)"].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}  # the first run warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode; the median is reported")
    args = parser.parse_args()
    print(f"Generation on the CPU ({torch.get_num_threads()} threads), {args.new_tokens} new tokens, sampling "
          f"{SAMPLING}, median of {args.repeats} runs\n")
    print("| context | batch | mode | tokens/s | vs reference |")
    print("| --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for context in (64, 256):
            ours, reference, generators = modes(context)
            for batch in (1, 8):
                for generate in generators.values():
                    rate(generate, batch, WARMUP_TOKENS, seed=0)
                rates: dict[str, list[float]] = {name: [] for name in generators}
                for repeat in range(args.repeats):
                    for name, generate in generators.items():
                        rates[name].append(rate(generate, batch, args.new_tokens, seed=repeat))
                baseline = statistics.median(rates["reference, full recompute (nanoGPT's generate)"])
                for name, values in rates.items():
                    median = statistics.median(values)
                    print(f"| {context} | {batch} | {name} | {median:,.0f} | {median / baseline:.1f}x |")
        print(f"\nTime to the first new token after a {PROMPT_TOKENS}-token prompt (context 256, "
              f"{count_parameters(ours) / 1e6:.2f}M parameters):\n")
        print("| model | ms |")
        print("| --- | --- |")
        for name, seconds in first_token_seconds(ours, reference, args.repeats).items():
            print(f"| {name} | {seconds * 1000:.1f} |")


if __name__ == "__main__":
    main()
