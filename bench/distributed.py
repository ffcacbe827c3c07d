"""Training throughput of 1 process against 2 processes under torchrun (Gloo, CPU), measured in the same run.

Run: .venv/bin/python bench/distributed.py [--steps 60] [--threads-per-process 1] [--device cuda]
Both runs train the same model on Tiny Shakespeare with the same global batch (1 process: 2 accumulation
steps of 16 sequences; 2 processes: 16 each) and OMP_NUM_THREADS fixed per process, so the table shows
what a second process adds. On a 2-core machine that is mostly overhead (both processes share the cores
that the single process already uses); on a machine with a GPU per process the second one doubles the
tokens per step. Prints a markdown table of median tokens/s over the run's log intervals (the first
intervals, which include start-up, are left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Large enough that a step is compute bound on a CPU (about 3.4M parameters, 16 x 128 tokens per batch).
MODEL = ["--d-model", "256", "--n-layers", "4", "--n-heads", "4", "--block-size", "128"]
SKIP_LOGS = 2


def train_command(processes: int, steps: int, out: Path, device: str) -> list[str]:
    batch = ["--batch-size", "16", "--grad-accum-steps", str(2 // processes)]
    args = ["train", "--preset", "cpu", *MODEL, *batch, "--max-steps", str(steps), "--eval-interval", str(steps),
            "--eval-batches", "2", "--log-interval", "5", "--max-time", "none", "--no-progress", "--device", device,
            "--out", str(out)]
    if processes == 1:
        return [sys.executable, "-m", "minillm", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "minillm", *args]


def tokens_per_second(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [row["tokens_per_s"] for row in rows if row["kind"] == "train"][SKIP_LOGS:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (Gloo), or cuda (NCCL, one GPU per process)")
    args = parser.parse_args()
    threads = args.threads_per_process
    # (processes, threads each): the same cores used by 1 process, by 2, and by 1 process with all the threads
    setups = [(1, threads), (2, threads), (1, 2 * threads)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="minillm-bench-ddp-") as tmp:
        for processes, each in setups:
            out = Path(tmp) / f"p{processes}t{each}"
            env = {**os.environ, "OMP_NUM_THREADS": str(each)}
            subprocess.run(train_command(processes, args.steps, out, args.device), cwd=REPO, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            results[processes, each] = tokens_per_second(out)
    base = results[setups[0]]
    print("| processes | threads each | global batch | tokens/s (median) | vs 1 process |")
    print("| --- | --- | --- | --- | --- |")
    for (processes, each), rate in results.items():
        print(f"| {processes} | {each} | 32 x 128 | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
