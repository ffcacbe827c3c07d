"""Training recipes at equal wall-clock, scored on the held-out tail of Tiny Shakespeare, in one run.

Run: .venv/bin/python bench/recipes.py [--budgets 100 300] [--rows reference default muon ...]
Every row trains for the same number of seconds on the first 90% of the text (character level) and is scored
on the next 5% (the validation split of `--holdout tail`: text after all the training text, as nanoGPT
holds out its last 10%), every token once, in windows of the row's context. Rows:
  reference  nanoGPT's recipe and CPU configuration (bench/reference_gpt.py: GPT-2 block with LayerNorm and
             GELU, learned positions; AdamW 1e-3, cosine to 1e-4, warmup 100, batch 12, context 64), its
             2,000 iterations stretched or cut to the budget as our schedule is (by elapsed time)
  default    Mini LLM's `cpu` preset as it is
  others     the default with one change (or the changes named), see ROWS
Prints a markdown table: loss and bits per character on the tail for each budget.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from reference_gpt import ReferenceGPT

from minillm.checkpoint import load_run
from minillm.config import IGNORE_INDEX, preset_configs
from minillm.data.prepare import open_split
from minillm.models import is_encoder_decoder
from minillm.training import train
from minillm.training.evaluation import mean_loss

HOLDOUT = dict(holdout="tail", val_fraction=0.05, test_fraction=0.05)
# Each row: (model overrides, training overrides) on top of the cpu preset.
ROWS = {
    "default": ({}, {}),
    "muon": ({}, {"optimizer": "muon"}),
    "warmdown": ({}, {"schedule": "warmdown"}),
    "untied head": ({"tie_embeddings": False}, {}),
    "lr 3e-3": ({}, {"learning_rate": 3e-3, "min_lr": 3e-4}),
    "muon + warmdown": ({}, {"optimizer": "muon", "schedule": "warmdown"}),
    # Architecture candidates (ModelConfig options, on top of the cpu preset's Muon + warm-down).
    "qk-norm": ({"qk_norm": True}, {}),
    "relu2": ({"mlp": "relu2"}, {}),  # d_ff 4 x d_model: the same weights as SwiGLU's 8/3
    "softcap 15": ({"logit_softcap": 15.0}, {}),
}
REFERENCE = dict(d_model=128, n_layers=4, n_heads=4, block_size=64, batch_size=12, lr=1e-3, min_lr=1e-4,
                 warmup=100, iterations=2000, weight_decay=0.1, betas=(0.9, 0.99))


def tail_loss(model: torch.nn.Module, batches, minillm: bool) -> float:
    """Mean loss over every token of the held-out tail, in non-overlapping windows."""
    windows = batches.sequential(64, torch.device("cpu"))
    if minillm:
        return mean_loss(model, windows, torch.device("cpu"), None)[0]
    model.eval()
    total = count = 0
    with torch.no_grad():
        for batch, n in windows:
            logits, _ = model(batch["input_ids"])
            total += F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").item()
            count += n
    return total / count


def train_reference(run_dir: Path, budget: float) -> tuple[float, int]:
    """nanoGPT's loop on the row's own prepared tokens: AdamW, warmup + cosine by iteration or by time."""
    r = REFERENCE
    run = load_run(run_dir)
    data = open_split(run_dir, "train", run.config.replace(max_seq_len=r["block_size"]), False, 0.5)
    torch.manual_seed(1337)
    model = ReferenceGPT(run.config.vocab_size, r["d_model"], r["n_layers"], r["n_heads"], r["block_size"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]},
                                   {"params": other, "weight_decay": 0.0}], lr=r["lr"], betas=r["betas"])
    generator = torch.Generator().manual_seed(1337)
    start, step = time.monotonic(), 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= budget:
            break
        progress = max(step / r["iterations"], elapsed / budget)  # the same time-fitted schedule as ours
        at = progress * r["iterations"]
        if at < r["warmup"]:
            lr = r["lr"] * (at + 1) / (r["warmup"] + 1)
        else:
            decayed = min(1.0, (at - r["warmup"]) / (r["iterations"] - r["warmup"]))
            lr = r["min_lr"] + 0.5 * (1 + math.cos(math.pi * decayed)) * (r["lr"] - r["min_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.sample(r["batch_size"], generator, torch.device("cpu"))
        model.train()
        _, loss = model(batch["input_ids"], batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    val = open_split(run_dir, "val", run.config.replace(max_seq_len=r["block_size"]), False, 0.5)
    return tail_loss(model, val, minillm=False), step


def train_row(name: str, budget: float, out: Path) -> tuple[float, int]:
    model_overrides, train_overrides = ROWS[name]
    model_config, config = preset_configs("cpu", model_overrides, {**HOLDOUT, **train_overrides,
                                                                   "max_time": budget, "max_steps": 10**6})
    result = train(model_config, config.replace(test_tokens=1000), out, progress=False, log=lambda m: None)
    run = load_run(out)
    val = open_split(out, "val", run.config, is_encoder_decoder(run.config), config.source_fraction)
    return tail_loss(run.model, val, minillm=True), result.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[100.0, 300.0])
    parser.add_argument("--rows", nargs="+", default=["reference", *ROWS])
    args = parser.parse_args()
    results: dict[str, dict[float, tuple[float, int]]] = {name: {} for name in args.rows}
    with tempfile.TemporaryDirectory(prefix="minillm-bench-recipes-") as tmp:
        for budget in args.budgets:
            for name in args.rows:
                out = Path(tmp) / f"{name.replace(' ', '_')}-{budget:g}"
                if name == "reference":  # the data and tokenizer of a Mini LLM run, then nanoGPT's loop
                    train_row("default", 1.0, out)
                    results[name][budget] = train_reference(out, budget)
                else:
                    results[name][budget] = train_row(name, budget, out)
                loss, steps = results[name][budget]
                print(f"  {name}, {budget:g} s: tail loss {loss:.4f} after {steps:,} steps", flush=True)
    header = " | ".join(f"tail loss at {b:g} s (steps) | vs reference" for b in args.budgets)
    print(f"\n| recipe | {header} |")
    print("| --- |" + " --- | --- |" * len(args.budgets))
    for name in args.rows:
        cells = []
        for budget in args.budgets:
            loss, steps = results[name][budget]
            reference = results.get("reference", {}).get(budget, (math.nan, 0))[0]
            cells.append(f"{loss:.4f} ({steps:,}) | {loss / reference - 1:+.1%}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
