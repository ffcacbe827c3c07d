"""What starting from a pretrained run buys (--init-from), at equal steps on a small text of your own.

Run: .venv/bin/python bench/init_from.py [--pretrain-steps 600] [--steps 300] [--small-chars 40000]

A char-level decoder-only model is pretrained on Tiny Shakespeare without its last part; the last
--small-chars characters stand for a user's own small file. On that small file, for the same --steps and the
same recipe: (a) a model trained from nothing (its own character tokenizer), (b) the pretrained run tuned
with --init-from (its tokenizer and weights). Scored on the small file's held-out test split in bits per
byte (comparable across tokenizers), with each row's validation loss before and after its steps. Both rows
see exactly the same small file, split the same way (same seed).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from minillm.checkpoint import load_run
from minillm.config import preset_configs
from minillm.data.prepare import bundled_data_path
from minillm.training import train

SHAPE = dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=64)
RECIPE = dict(tokenizer="char", batch_size=24, learning_rate=2e-3, min_lr=2e-4, warmup_steps=50, eval_batches=10,
              split_mode="line", holdout="tail")


def configs(data: Path, steps: int, **changes):
    return preset_configs("tiny", SHAPE, {**RECIPE, "data": str(data), "max_steps": steps,
                                          "eval_interval": max(1, steps // 4), **changes})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=600, help="steps of pretraining on the big text")
    parser.add_argument("--steps", type=int, default=300, help="steps on the small text, for both rows")
    parser.add_argument("--small-chars", type=int, default=40_000, help="characters of the small text (the end "
                                                                        "of Tiny Shakespeare)")
    args = parser.parse_args()
    text = bundled_data_path().read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory(prefix="minillm-bench-init-from-") as tmp:
        big, small = Path(tmp) / "big.txt", Path(tmp) / "small.txt"
        big.write_text(text[:-args.small_chars], encoding="utf-8")
        small.write_text(text[-args.small_chars:], encoding="utf-8")
        start = time.perf_counter()
        pretrained = train(*configs(big, args.pretrain_steps), Path(tmp) / "pretrained", progress=False,
                           log=lambda m: None)
        pretrain_seconds = time.perf_counter() - start
        for name, changes in (("from nothing", {}), ("from the pretrained run (--init-from)",
                                                     {"init_from": str(Path(tmp) / "pretrained")})):
            out = Path(tmp) / name.split()[1]
            start = time.perf_counter()
            result = train(*configs(small, args.steps, **changes), out, progress=False, log=lambda m: None)
            seconds = time.perf_counter() - start
            run = load_run(out)
            # the pretrained run's weights scored before any step; a new model's: chance, ln(vocabulary)
            before = run.info["init_from"]["val_loss"] if changes else math.log(run.config.vocab_size)
            label = "measured" if changes else "chance"
            rows.append((name, result.steps, seconds, before, label, result.best_val_loss,
                         result.test_metrics["bits_per_byte"]))
    print(f"Pretrained {args.pretrain_steps} steps on {len(text) - args.small_chars:,} characters of Tiny "
          f"Shakespeare ({pretrain_seconds:.0f} s, best val loss {pretrained.best_val_loss:.3f}); then "
          f"{args.steps} steps on its last {args.small_chars:,} characters (the small text)\n")
    print("| start | steps | seconds | val loss before | best val loss | test bits per byte |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, steps, seconds, before, label, best, bpb in rows:
        print(f"| {name} | {steps} | {seconds:.0f} | {before:.3f} ({label}) | {best:.3f} | {bpb:.3f} |")
    print("\n(val losses are per token of each run's own tokenizer; bits per byte compare across them)")


if __name__ == "__main__":
    main()
