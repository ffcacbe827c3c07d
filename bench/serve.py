"""Serving many clients at once: `minillm serve` decoding their generations together in one batch, against the
same load served one request at a time, measured in the same run.

Run: .venv/bin/python bench/serve.py [--clients 1 4 16] [--new-tokens 200] [--repeats 3] [--threads N]

One randomly initialised run of nanoGPT's CPU shape (4 layers, 4 heads, 128 wide, a 64-token context,
QK-norm as the cpu preset; a character vocabulary of 65), served by two `minillm serve` processes started
by this script: one batching (--max-batch 16) and one that serves one request at a time (--max-batch 1,
the others wait in its queue). For each number of clients, that many streaming clients send their request
at the same moment (different prompts and seeds, top-k 50 sampling, `ignore_eos` so each makes exactly
--new-tokens tokens: an untrained model would end some texts early) to one server, then the other.
Reported per load (the median of --repeats runs, the servers taking turns): aggregate tokens per second
(all clients' tokens over the time from the requests to the last token), the time to the first token (from
the request, waiting in the queue included) and the per-token latency (the gaps between a client's chunks),
as medians and 95th percentiles. The targets on 2 cores: with 16 clients, batched aggregate tokens/s at
least 4x one client's, and a p95 time to the first token under 1 s. The clients run in this process
(asyncio, plain HTTP), so they take some of the same cores.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from minillm.checkpoint import save_best
from minillm.config import ModelConfig
from minillm.data.corpus import read_text_file
from minillm.models import build_model
from minillm.run_folder import TOKENIZER_FILE
from minillm.tokenizers.character_tokenizer import CharacterTokenizer

SHAPE = dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=64, qk_norm=True)  # nanoGPT's CPU shape
SAMPLING = dict(temperature=0.8, top_k=50)  # Mini LLM's defaults
BATCH = 16
PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD III:", "To be, or not", "O Romeo, Romeo!"]
STARTUP_S = 180


@dataclass
class Client:
    sent: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # when each chunk of tokens came (one per decode step)
    tokens: int = 0  # as the server counts them (usage)

    @property
    def first_token(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


def make_run(root: Path) -> Path:
    text = read_text_file(Path(__file__).resolve().parents[1] / "minillm" / "data" / "tinyshakespeare.txt")
    tokenizer = CharacterTokenizer.train([text])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, **SHAPE)
    torch.manual_seed(0)
    run = root / "nanogpt-cpu"
    save_best(run, build_model(config), config, tokenizer.kind, {"step": 0})
    tokenizer.save(run / TOKENIZER_FILE)
    return run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    process = subprocess.Popen([sys.executable, "-m", "minillm", "serve", str(run), "--port", str(port),
                                "--max-batch", str(max_batch), "--max-queue", "64"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"minillm serve exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=5).json()["models"][0]["loaded"]:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("minillm serve did not start in time")


async def one_client(http: httpx.AsyncClient, url: str, model: str, index: int, new_tokens: int) -> Client:
    body = {"model": model, "prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": new_tokens, "seed": index,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, **SAMPLING}
    client = Client(sent=time.perf_counter())
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise SystemExit(f"the server failed: {chunk['error']['message']}")
            if chunk["choices"]:
                client.arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                client.tokens = chunk["usage"]["completion_tokens"]
    return client


async def load(url: str, model: str, clients: int, new_tokens: int) -> tuple[float, list[Client]]:
    """(aggregate tokens per second, the clients) for `clients` requests sent at once."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        done = await asyncio.gather(*(one_client(http, url, model, i, new_tokens) for i in range(clients)))
    tokens = sum(c.tokens for c in done)
    return tokens / (max(c.arrivals[-1] for c in done) - start), done


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each load per server (the median rate)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the servers (default: torch's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        run = make_run(Path(root))
        servers = {f"batched (--max-batch {BATCH})": start_server(run, BATCH, args.threads),
                   "one request at a time (--max-batch 1)": start_server(run, 1, args.threads)}
        try:
            rows, base = [], None
            for _, url in servers.values():  # warm-up: the first request of each
                asyncio.run(load(url, run.name, 1, 8))
            for clients in args.clients:
                measured: dict[str, tuple[list[float], list[Client]]] = {name: ([], []) for name in servers}
                for _ in range(args.repeats):  # the servers take turns, so background load hits both alike
                    for name, (_, url) in servers.items():
                        rate, done = asyncio.run(load(url, run.name, clients, args.new_tokens))
                        assert all(c.tokens == args.new_tokens for c in done), "a client got fewer tokens"
                        measured[name][0].append(rate)
                        measured[name][1].extend(done)
                for name, (rates, done) in measured.items():
                    rate = statistics.median(rates)
                    base = base or rate
                    ttft, gaps = [c.first_token for c in done], [g for c in done for g in c.gaps]
                    rows.append((clients, name, rate, rate / base, percentile(ttft, 50), percentile(ttft, 95),
                                 1000 * percentile(gaps, 50), 1000 * percentile(gaps, 95)))
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=30)
    threads = args.threads or torch.get_num_threads()
    print(f"\n{args.new_tokens} new tokens per client, top-k 50 sampling, nanoGPT's CPU shape, {threads} threads "
          f"per server, median of {args.repeats} runs\n")
    print("| clients | serving | tokens/s | x 1 client | TTFT p50 (s) | TTFT p95 (s) | per token p50 (ms) | "
          "per token p95 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for clients, name, rate, times, t50, t95, g50, g95 in rows:
        print(f"| {clients} | {name} | {rate:.0f} | {times:.1f}x | {t50:.3f} | {t95:.3f} | {g50:.1f} | {g95:.1f} |")
    batched = {clients: (rate, t95) for clients, name, rate, _, _, t95, _, _ in rows if name.startswith("batched")}
    if 1 in batched and 16 in batched:
        speedup, t95 = batched[16][0] / batched[1][0], batched[16][1]
        print(f"\ntargets: 16 clients at {speedup:.1f}x one client's tokens/s (target >= 4x: "
              f"{'met' if speedup >= 4 else 'NOT met'}); p95 time to first token {t95:.2f} s (target < 1 s: "
              f"{'met' if t95 < 1 else 'NOT met'})")


if __name__ == "__main__":
    main()
