"""Generation speed: the decoding engine's compiled fast path, its eager path, Mini LLM recomputing the
window, and a nanoGPT-style reference's full-recompute `generate`, measured in the same run.

Run: .venv/bin/python bench/generation.py [--new-tokens 200] [--repeats 3] [--device cuda]
Randomly initialised decoder-only models (the weights do not change the speed): on the CPU nanoGPT's CPU
shape (4 layers, 4 heads, 128 wide, fp32), on a GPU its Shakespeare GPU shape (6 layers, 6 heads, 384 wide,
bf16). Contexts 64 and 256, batch 1 and 8, top-k 50 sampling. Context 64 is the honest test of per-token
overhead (recomputing a short window is cheap); at 256 recomputation grows with the window. Also the time
to the first new token after a 200-token prompt, and how long compiling took (once per shape; torch keeps
it on disk, so a second run of this script compiles faster), and whether the fast path gave the eager
path's tokens for the same seed. Modes alternate repeat by repeat, so background load hits them alike.
The first-token table also times the prefill without its last-position saving and with the model left
in training mode (the engine then switches it to eval mode and back).

--choices (CPU) adds what each choice of the compiled path is worth, at batch 1, contexts 64 and 256: the
path as it is against the same path with one choice undone (4 decode steps per graph call rather than 1
or 8, linear layers as batched products, guards checked at a generation's first call only, the C++
wrapper, the decode step's one-query attention rather than SDPA). Each undone choice compiles its own
graphs (tens of seconds each, cold). It also times the eager path with its one choice undone (the RMSNorm
of one position per row by a batched dot product rather than F.rms_norm).
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from reference_gpt import ReferenceGPT

from minillm import engine as engine_module
from minillm.config import ModelConfig
from minillm.engine import Engine
from minillm.models import DecoderOnlyTransformer, count_parameters, layers
from minillm.sampling import SamplingConfig

VOCAB = 65
SHAPES = {"cpu": dict(d_model=128, n_layers=4, n_heads=4), "cuda": dict(d_model=384, n_layers=6, n_heads=6)}
SAMPLING = dict(temperature=0.8, top_k=50)  # the defaults of SamplingConfig
PROMPT_TOKENS = 200  # for the time to first token
WARMUP_TOKENS = 10
FAST, EAGER, RECOMPUTE, REFERENCE = ("engine, compiled fast path", "engine, eager", "Mini LLM, full recompute",
                                     "reference, full recompute (nanoGPT's generate)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(generate, batch: int, new_tokens: int, seed: int, device: torch.device) -> float:
    """Tokens per second (new tokens of all rows) after a one-token prompt."""
    prompt = torch.ones((batch, 1), dtype=torch.long, device=device)
    synchronize(device)
    start = time.perf_counter()
    out = generate(prompt, new_tokens, seed)
    synchronize(device)
    elapsed = time.perf_counter() - start
    assert out.size(0) == batch and out.size(1) >= new_tokens
    return batch * new_tokens / elapsed


def models(context: int, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    shape = SHAPES[device.type]
    ours = DecoderOnlyTransformer(ModelConfig(vocab_size=VOCAB, max_seq_len=context, **shape))
    reference = ReferenceGPT(VOCAB, shape["d_model"], shape["n_layers"], shape["n_heads"], context)
    return ours.to(device, dtype).eval(), reference.to(device, dtype).eval()


def modes(ours, reference, device: torch.device):
    fast, eager = Engine(ours, compile=True), Engine(ours)

    def sampling(n: int, seed: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=n, seed=seed, **SAMPLING)

    def reference_generate(p, n, seed):
        return reference.generate(p, n, generator=torch.Generator(device).manual_seed(seed), **SAMPLING)

    return {
        FAST: lambda p, n, seed: fast.generate(p, sampling(n, seed)),
        EAGER: lambda p, n, seed: eager.generate(p, sampling(n, seed)),
        RECOMPUTE: lambda p, n, seed: eager.generate(p, sampling(n, seed), use_cache=False),
        REFERENCE: reference_generate,
    }


def all_positions_logits(model, ids, cache):
    """The engine's next_logits without the last-position saving: every position through every layer."""
    return model(ids, cache=cache)[0][:, -1]


def first_token_seconds(ours, reference, repeats: int, device: torch.device) -> dict[str, float]:
    prompt = torch.randint(3, VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    engine = Engine(ours)

    def first_token() -> int:
        return int(next(iter(engine.stream(prompt, SamplingConfig(max_new_tokens=1, **SAMPLING))))[0])

    def every_position() -> int:
        with mock.patch.object(engine_module, "next_logits", all_positions_logits):
            return first_token()

    def in_training_mode() -> int:
        ours.train()
        try:
            return first_token()
        finally:
            ours.eval()

    runs = {"Mini LLM (prefill into the cache)": first_token,
            "Mini LLM, prefill of every position's logits (no last-position saving)": every_position,
            "Mini LLM, model left in training mode (switched to eval and back)": in_training_mode,
            "reference (one forward)": lambda: int(reference.generate(prompt, 1, **SAMPLING)[0, -1])}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats + 1):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}  # the first run warms up


def sdpa_one_query(q, keys, values, key_mask):
    """layers.one_query_attention as SDPA: (B, H, 1, Dh) query over (B, H, L, Dh) -> (B, H, Dh)."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask).squeeze(2)


def guards_every_call(step):
    """engine._guards_checked_once undone: torch checks the graph's guards at every call."""
    def call(*args):
        with torch._dynamo.config.patch(recompile_limit=engine_module.COMPILED_GRAPHS):
            return step(*args)
    return call


def python_wrapper_step(step, device):
    """engine.compile_step without the C++ wrapper (inductor's Python wrapper calls the kernels)."""
    return torch.compile(step, fullgraph=True, dynamic=False)


AS_IT_IS = "as it is (4 steps per graph call)"
CHOICES = {  # the compiled path with one choice undone, by name: what undoes it
    AS_IT_IS: contextlib.nullcontext,
    "1 step per graph call": lambda: mock.patch.object(engine_module, "COMPILED_BLOCK", 1),
    "8 steps per graph call": lambda: mock.patch.object(engine_module, "COMPILED_BLOCK", 8),
    "linear layers as plain products (no BatchedProducts)": lambda: mock.patch.object(
        engine_module, "BatchedProducts", contextlib.nullcontext),
    "guards checked at every call": lambda: mock.patch.object(engine_module, "_guards_checked_once",
                                                              guards_every_call),
    "no C++ wrapper": lambda: mock.patch.object(engine_module, "compile_step", python_wrapper_step),
    "SDPA in the decode step (no one_query_attention)": lambda: mock.patch.object(layers, "one_query_attention",
                                                                                  sdpa_one_query),
}


def rms_norm_of_torch(x, weight, eps):
    """layers.one_position_rms_norm as F.rms_norm (what every other position gets)."""
    return F.rms_norm(x, (x.size(-1),), weight, float(eps.item()))


EAGER_CHOICES = {  # the eager path with one choice undone
    "as it is": contextlib.nullcontext,
    "RMSNorm by F.rms_norm at one position (no one_position_rms_norm)": lambda: mock.patch.object(
        layers, "one_position_rms_norm", rms_norm_of_torch),
}


def median_rates(generators: dict, batch: int, args, device: torch.device) -> dict[str, float]:
    """Median tokens/s of each generator over args.repeats runs, the generators taking turns (so background
    load hits them alike)."""
    rates: dict[str, list[float]] = {name: [] for name in generators}
    for repeat in range(args.repeats):
        for name, generate in generators.items():
            rates[name].append(rate(generate, batch, args.new_tokens, repeat, device))
    return {name: statistics.median(values) for name, values in rates.items()}


def with_choice_undone(engine: Engine, undo):
    """`engine`'s generate(prompt, new tokens, seed) with one choice undone (`undo`: a context manager)."""
    def generate(p, n, seed):
        with undo():
            return engine.generate(p, SamplingConfig(max_new_tokens=n, seed=seed, **SAMPLING))
    return generate


def eager_choices_table(args, device: torch.device, dtype: torch.dtype) -> None:
    """Tokens/s of the eager path as it is and with each choice undone, alternating, batch 1."""
    print(f"\nWhat each choice of the eager path is worth (batch 1, {args.new_tokens} new tokens, median of "
          f"{args.repeats}):\n")
    print("| context | eager path | tokens/s | vs as it is | same tokens |")
    print("| --- | --- | --- | --- | --- |")
    prompt = torch.ones((1, 1), dtype=torch.long, device=device)
    for context in (64, 256):
        ours, _ = models(context, device, dtype)
        generators = {name: with_choice_undone(Engine(ours), undo) for name, undo in EAGER_CHOICES.items()}
        same = {name: torch.equal(generate(prompt, 50, 1), generators["as it is"](prompt, 50, 1))
                for name, generate in generators.items()}
        medians = median_rates(generators, 1, args, device)
        baseline = medians["as it is"]
        for name, median in medians.items():
            print(f"| {context} | {name} | {median:,.0f} | {median / baseline:.2f}x | "
                  f"{'same' if same[name] else 'DIFFERENT'} |")


def choices_table(args, device: torch.device, dtype: torch.dtype) -> None:
    """Tokens/s of the compiled path as it is and with each choice undone, alternating, batch 1."""
    print(f"\nWhat each choice of the compiled path is worth (batch 1, {args.new_tokens} new tokens, median of "
          f"{args.repeats}; compile: the seconds of the first run, compiling included):\n")
    print("| context | compiled path | tokens/s | vs as it is | compile s | eager's tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    prompt = torch.ones((1, 1), dtype=torch.long, device=device)
    for context in (64, 256):
        ours, _ = models(context, device, dtype)
        eager = Engine(ours).generate(prompt, SamplingConfig(max_new_tokens=50, seed=1, **SAMPLING))
        generators, compile_s, same = {}, {}, {}
        for name, undo in CHOICES.items():
            generate = with_choice_undone(Engine(ours, compile=True), undo)
            start = time.perf_counter()
            rate(generate, 1, args.new_tokens, 0, device)  # every graph the timed runs use (a slide's too)
            compile_s[name] = time.perf_counter() - start
            same[name] = torch.equal(generate(prompt, 50, 1), eager)
            generators[name] = generate
        medians = median_rates(generators, 1, args, device)
        baseline = medians[AS_IT_IS]
        for name, median in medians.items():
            print(f"| {context} | {name} | {median:,.0f} | {median / baseline:.2f}x | {compile_s[name]:.1f} | "
                  f"{'same' if same[name] else 'DIFFERENT'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode; the median is reported")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--choices", action="store_true", help="also time the compiled path with each of its "
                                                               "choices undone (CPU; minutes of compiling)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = f"{torch.cuda.get_device_name()} ({dtype})" if device.type == "cuda" else (
        f"the CPU ({torch.get_num_threads()} threads, {dtype})")
    print(f"Generation on {where}, {args.new_tokens} new tokens, sampling {SAMPLING}, median of "
          f"{args.repeats} runs\n")
    print("| context | batch | mode | tokens/s | vs reference |")
    print("| --- | --- | --- | --- | --- |")
    compile_seconds, mismatches = [], 0
    for context in (64, 256):
        ours, reference = models(context, device, dtype)
        generators = modes(ours, reference, device)
        for batch in (1, 8):
            start = time.perf_counter()
            rate(generators[FAST], batch, WARMUP_TOKENS, 0, device)  # compiles this shape
            compile_seconds.append(time.perf_counter() - start)
            for generate in generators.values():
                rate(generate, batch, WARMUP_TOKENS, 0, device)
            prompt = torch.ones((batch, 1), dtype=torch.long, device=device)
            mismatches += not torch.equal(generators[FAST](prompt, 50, 1), generators[EAGER](prompt, 50, 1))
            medians = median_rates(generators, batch, args, device)
            baseline = medians[REFERENCE]
            for name, median in medians.items():
                print(f"| {context} | {batch} | {name} | {median:,.0f} | {median / baseline:.1f}x |")
    print(f"\nCompiling the fast path (first call per context and batch): "
          f"{', '.join(f'{s:.1f}' for s in compile_seconds)} s. Fast path and eager path gave "
          f"{'the same' if not mismatches else f'DIFFERENT tokens in {mismatches} of 4 cases, not the same'} "
          f"tokens for a seed (50 tokens per case).")
    print(f"\nTime to the first new token after a {PROMPT_TOKENS}-token prompt (context 256, "
          f"{count_parameters(ours) / 1e6:.2f}M parameters):\n")
    print("| model | ms |")
    print("| --- | --- |")
    for name, seconds in first_token_seconds(ours, reference, args.repeats, device).items():
        print(f"| {name} | {seconds * 1000:.1f} |")
    if args.choices and device.type == "cpu":  # batched products and the C++ wrapper are the CPU path's
        eager_choices_table(args, device, dtype)
        choices_table(args, device, dtype)


if __name__ == "__main__":
    main()
