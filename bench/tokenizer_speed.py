"""Tokenizer speed and compression on the bundled Tiny Shakespeare, with baselines measured in the same run.

    .venv/bin/python bench/tokenizer_speed.py

Baselines: for BPE the raw Hugging Face `encode_batch` (shows what our wrapper costs); for the character
tokenizer a plain per-character dict lookup in Python (the nanoGPT way).
"""

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import minillm
from minillm.tokenizers import BPETokenizer, CharacterTokenizer

CORPUS = Path(minillm.__file__).parent / "data" / "tinyshakespeare.txt"
BPE_VOCAB_SIZES = (1024, 4096)
REPEATS = 3  # best of N: the machine is shared and noisy
TARGET_BPE_TRAIN_S = 2.0  # at vocab 4096
TARGET_BATCH_MB_S = 2.0
T = TypeVar("T")


def best_time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Fastest wall time of `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()` and how long it took, in seconds (one call: for work too slow to repeat)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    text = CORPUS.read_text(encoding="utf-8")
    paragraphs = text.split("\n\n")
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"corpus: {CORPUS.name}, {megabytes:.2f} MB, {len(paragraphs)} paragraphs\n")

    rows = []
    for vocab_size in BPE_VOCAB_SIZES:
        tok, train_s = timed(lambda v=vocab_size: BPETokenizer.train(paragraphs, vocab_size=v))
        hf = tok.hf_tokenizer  # the same Rust tokenizer, called directly
        baseline_s = best_time(
            lambda h=hf: [e.ids for e in h.encode_batch(paragraphs, add_special_tokens=False)]
        )
        rows.append((f"BPE {vocab_size}", train_s, tok, baseline_s, "raw HF encode_batch"))
        # Decoding must give the corpus back exactly, or the speed figures mean nothing.
        assert tok.decode(tok.encode(text)) == text

    char, train_s = timed(lambda: CharacterTokenizer.train(paragraphs))
    table = {c: char.encode(c)[0] for c in char.alphabet}
    baseline_s = best_time(lambda: [[table[c] for c in p] for p in paragraphs])
    rows.append((f"char {char.vocab_size}", train_s, char, baseline_s, "Python per-char dict"))
    assert char.decode(char.encode(text)) == text

    print("| tokenizer | train (s) | tokens | bytes/token | encode one string (MB/s) "
          "| encode_batch by paragraph (MB/s) | baseline (MB/s) | baseline |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    batch_mb_s = {}
    for name, train_s, tok, baseline_s, baseline_name in rows:
        n_tokens = len(tok.encode(text))
        one_s = best_time(lambda t=tok: t.encode(text))
        batch_mb_s[name] = megabytes / best_time(lambda t=tok: t.encode_batch(paragraphs))
        print(f"| {name} | {train_s:.2f} | {n_tokens:,} | {megabytes * 1e6 / n_tokens:.2f} "
              f"| {megabytes / one_s:.1f} | {batch_mb_s[name]:.1f} "
              f"| {megabytes / baseline_s:.1f} | {baseline_name} |")

    bpe_train_s = rows[BPE_VOCAB_SIZES.index(4096)][1]
    slowest = min(batch_mb_s, key=batch_mb_s.get)
    print(f"\ntarget BPE training at vocab 4096 < {TARGET_BPE_TRAIN_S} s: {bpe_train_s:.2f} s, "
          f"{'met' if bpe_train_s < TARGET_BPE_TRAIN_S else 'MISSED'}")
    print(f"target encode_batch >= {TARGET_BATCH_MB_S} MB/s: "
          f"slowest is {slowest} at {batch_mb_s[slowest]:.1f} MB/s, "
          f"{'met' if batch_mb_s[slowest] >= TARGET_BATCH_MB_S else 'MISSED'}")


if __name__ == "__main__":
    main()
