"""The benchmark scripts still run against the library as it is (their imports and calls drift otherwise:
nothing else runs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(path.name for path in BENCH.glob("*.py") if path.name != "reference_gpt.py")


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_benchmark_script_starts(name):
    """Run as `python bench/<name>` (bench/ first on sys.path): its imports resolve, its options parse."""
    done = run_script(name, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_the_training_benchmark_trains_scores_and_samples(tmp_path):
    """A few seconds of its nanoGPT row: training, the table from the metrics file, a sample of the best
    model."""
    done = run_script("train_shakespeare.py", "--only", "nanogpt", "--budget", "2", "--runs-dir",
                      str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| nanogpt |" in done.stdout
    assert "sample from nanogpt (best model):\n\nROMEO:\n" in done.stdout


def test_the_chat_benchmark_trains_scores_and_talks():
    """A few seconds of bench/chat.py: the dialogues, a chat run, the held-out score and a transcript."""
    done = run_script("chat.py", "--conversations", "60", "--held-out", "4", "--max-time", "2", "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| decoder_only (d_model 96, 3 layers, context 192), cpu preset's recipe |" in done.stdout
    assert "system: You are a calculator.\nyou> What is 17 + 8?\nbot> " in done.stdout
