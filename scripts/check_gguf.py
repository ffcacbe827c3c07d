"""Does llama.cpp run an exported GGUF file as the same model? (`make check-gguf`; needs llama-cpp-python.)

Trains a small byte-level BPE run on the bundled Tiny Shakespeare (or uses RUN_DIR), exports it with
`minillm export --format gguf` (float32), loads the file in llama.cpp through llama-cpp-python, and compares:
the prompt's token ids, the logits of its positions, and the greedy continuation (at least MIN_MATCHING
tokens must agree; a different token after a near-tie of two logits is reported, not hidden).

--dtype q8_0 (or q4_0) also exports the run quantized and compares llama.cpp's greedy continuation from the
quantized file with its continuation from the float32 file (q8_0: at least MIN_QUANTIZED_MATCHING tokens
must agree; q4_0's is reported, not required), and states both files' sizes. --speed times llama.cpp's
greedy decoding of the run exported in each dtype (tokens/s, the best of a few repeats) and prints a table.

Run: .venv/bin/python scripts/check_gguf.py [RUN_DIR] [--tokens 40] [--qk-norm] [--gqa] [--dtype q8_0] [--speed]
    [--tokenizer-file PATH]
(--qk-norm trains the run with QK-norm, the cpu preset's architecture, which exports as llama.cpp's qwen3;
--gqa with grouped-query attention, 4 query heads over 2 key/value heads: llama.cpp's head_count_kv;
--tokenizer-file trains it with that tokenizer.json: a Llama-2 or Mistral one exports as llama.cpp's
SentencePiece "llama" tokenizer.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.checkpoint import load_run
from minillm.config import preset_configs
from minillm.engine import Engine
from minillm.export import EXPORT_DTYPES, export_run
from minillm.sampling import SamplingConfig
from minillm.training import train

PROMPT = "ROMEO:\nWhat shall I say"
MIXED_TEXT = "Café naïve — Ærøskøbing, 東京の中文字符 😀👩‍👩‍👧\tTab\r\nCRLF line\n\n  two spaces"
MIN_MATCHING = 30
MIN_QUANTIZED_MATCHING = {"float16": MIN_MATCHING, "q8_0": 20, "q4_0": 0}  # 4-bit weights may change choices
GQA_KV_HEADS = 2  # --gqa: key/value heads for CHECK_RUN's 4 query heads
CHECK_RUN = dict(model={"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128},
                 train={"tokenizer": "bpe", "bpe_vocab_size": 512, "max_steps": 300, "eval_interval": 100})
THREADS = 2
SPEED_REPEATS = 3
SPEED_DTYPES = ("float32", "float16", "q8_0", "q4_0")


def open_llama(path: Path, n_ctx: int) -> Any:
    """The GGUF file in llama.cpp, with a float32 KV cache (llama.cpp's default is float16) so that the
    logits compare the model itself."""
    from llama_cpp import GGML_TYPE_F32, Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0, n_threads=THREADS,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)


def llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation of `ids`, `n` tokens."""
    tokens = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if len(tokens) == n:
            break
    return tokens


def llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) llama.cpp's logits at each position of `ids`."""
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[:len(ids)], dtype=np.float64)


def identical_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_float(run: Any, llm: Any, ours_ids: list[int], n: int) -> tuple[bool, list[int]]:
    """The float export against Mini LLM: tokenizer, logits, greedy tokens; returns (ok, llama.cpp's tokens)."""
    their_ids = llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=False)
    print(f"prompt {PROMPT!r}: {len(ours_ids)} ids; llama.cpp's tokenizer gives the same ids: {their_ids == ours_ids}")
    mixed = run.tokenizer.encode(MIXED_TEXT)
    same_mixed = llm.tokenize(MIXED_TEXT.encode("utf-8"), add_bos=False, special=False) == mixed
    # BOS first, as the model reads text (llama.cpp's SentencePiece keeps its space prefix without it).
    round_trip = llm.detokenize([run.tokenizer.bos_id, *mixed]).decode("utf-8") == MIXED_TEXT
    print(f"mixed Unicode text ({len(mixed)} ids): same ids {same_mixed}, llama.cpp decodes it back {round_trip}")

    their_logits = llama_logits(llm, ours_ids)
    with torch.no_grad():
        our_logits = run.model(torch.tensor([ours_ids]))[0][0].double().numpy()
    print(f"max |logit difference| over the prompt's {len(ours_ids)} positions: "
          f"{np.abs(their_logits - our_logits).max():.2e}")

    ours = Engine(run.model).generate(torch.tensor([ours_ids]), SamplingConfig(max_new_tokens=n, temperature=0.0))
    ours = ours[0].tolist()
    theirs = llama_greedy(llm, ours_ids, n)
    matching = identical_prefix(ours, theirs)
    print(f"greedy continuation, {n} tokens: {matching} identical before the first difference")
    print(f"  Mini LLM : {run.tokenizer.decode(ours)!r}")
    print(f"  llama.cpp: {llm.detokenize(theirs).decode('utf-8', errors='replace')!r}")
    return their_ids == ours_ids and same_mixed and round_trip and matching >= min(MIN_MATCHING, n), theirs


def check_quantized(run_dir: Path, run: Any, work: Path, dtype: str, float_llm: Any, float_tokens: list[int],
                    ours_ids: list[int], n: int) -> bool:
    """The `dtype` export against the float32 one in llama.cpp: greedy tokens, logits and file size."""
    path = export_run(run_dir, "gguf", work / f"model-{dtype}.gguf", dtype=dtype)
    size, float_size = path.stat().st_size, Path(float_llm.model_path).stat().st_size
    print(f"exported {run_dir} to {path} ({dtype}, {size:,} bytes: {size / float_size:.2f} of float32's "
          f"{float_size:,})")
    llm = open_llama(path, run.config.max_seq_len)
    theirs = llama_greedy(llm, ours_ids, n)
    matching = identical_prefix(float_tokens, theirs)
    needed = min(MIN_QUANTIZED_MATCHING[dtype], n)
    print(f"llama.cpp's greedy continuation from the {dtype} file, {n} tokens: {matching} identical to the "
          f"float32 file's before the first difference (needed: {needed})")
    print(f"  {dtype:9}: {run.tokenizer.decode(theirs)!r}")
    # Over the float32 file's continuation: how far the logits moved, and how close the float32 file's two
    # choices were where the greedy tokens first differ (a near-tie flips with the smallest change).
    sequence = ours_ids + float_tokens
    float_logits, quantized = llama_logits(float_llm, sequence), llama_logits(llm, sequence)
    note = f"max |logit difference| from the float32 file over {len(sequence)} positions: " \
           f"{np.abs(quantized - float_logits).max():.3f}"
    if matching < min(len(theirs), len(float_tokens)):
        at = float_logits[len(ours_ids) - 1 + matching]
        gap = at[float_tokens[matching]] - at[theirs[matching]]
        note += (f"; where they first differ, the float32 file's token led the {dtype} file's by {gap:.4f} in "
                 f"its logits (which spread over {np.ptp(at):.3f})")
    print(note)
    return matching >= needed


def speed_table(run_dir: Path, run: Any, work: Path, ours_ids: list[int]) -> None:
    """llama.cpp's greedy decoding speed of the run in each of SPEED_DTYPES, with the files' sizes."""
    n = run.config.max_seq_len - len(ours_ids)
    print(f"\nllama.cpp greedy decoding, {n} tokens after a {len(ours_ids)}-token prompt, {THREADS} threads, "
          f"best of {SPEED_REPEATS} (wall clock on this machine: compare within this table only)")
    print("| dtype | file size | tokens/s |\n| --- | ---: | ---: |")
    for dtype in SPEED_DTYPES:
        path = export_run(run_dir, "gguf", work / f"speed-{dtype}.gguf", dtype=dtype, overwrite=True)
        llm = open_llama(path, run.config.max_seq_len)
        best = float("inf")
        for _ in range(SPEED_REPEATS):
            start = time.perf_counter()
            made = llama_greedy(llm, ours_ids, n)
            best = min(best, (time.perf_counter() - start) / len(made))
        print(f"| {dtype} | {path.stat().st_size / 2**20:,.2f} MiB | {1 / best:,.0f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a decoder-only BPE run (default: train one)")
    parser.add_argument("--tokens", type=int, default=40, help="greedy tokens to compare")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32",
                        help="the export to check (a quantized or float16 one: against the float32 one)")
    parser.add_argument("--qk-norm", action="store_true", help="train the run with QK-norm (llama.cpp's qwen3)")
    parser.add_argument("--tokenizer-file", help="train the run with this tokenizer.json (e.g. a Llama-2 one)")
    parser.add_argument("--speed", action="store_true", help="also time llama.cpp's decoding in each dtype")
    parser.add_argument("--gqa", action="store_true",
                        help=f"train the run with grouped-query attention ({GQA_KV_HEADS} key/value heads)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (or make check-gguf)")
        return 2
    print(f"llama-cpp-python {llama_cpp.__version__}")
    work = Path(tempfile.mkdtemp(prefix="minillm-check-gguf-"))
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = work / "run"
        grouped = {"n_kv_heads": GQA_KV_HEADS} if args.gqa else {}
        model_config, train_config = preset_configs("tiny", {**CHECK_RUN["model"], "qk_norm": args.qk_norm, **grouped},
                                                    {**CHECK_RUN["train"], "tokenizer_file": args.tokenizer_file})
        print(f"training a small BPE run into {run_dir} ...", flush=True)
        train(model_config, train_config, run_dir, progress=False, log=lambda message: None)
    path = export_run(run_dir, "gguf", work / "model.gguf")
    run = load_run(run_dir, "cpu")
    c = run.config
    print(f"exported {run_dir} to {path} (float32, {path.stat().st_size:,} bytes; {c.n_heads} query heads "
          f"over {c.n_kv_heads} key/value heads{', QK-norm' if c.qk_norm else ''})")
    ours_ids = [run.tokenizer.bos_id, *run.tokenizer.encode(PROMPT)]
    n = min(args.tokens, run.config.max_seq_len - len(ours_ids))
    float_llm = open_llama(path, run.config.max_seq_len)
    ok, float_tokens = check_float(run, float_llm, ours_ids, n)
    if args.dtype != "float32":
        ok = check_quantized(run_dir, run, work, args.dtype, float_llm, float_tokens, ours_ids, n) and ok
    if args.speed:
        speed_table(run_dir, run, work, ours_ids)
    print("check-gguf:", "OK" if ok else "FAILED (see the lines above for what differs)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
