"""What a training says while it runs, and when: the throughput warning (only for a lasting slowdown, with
advice the run can take), the plan's notes on epochs (counted from the steps a time budget allows), and the
progress bar's one ETA."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_configs

from minillm.training import train
from minillm.training.plan import MANY_EPOCHS, RunPlan
from minillm.training.preview import preview_run
from minillm.training.threads import SLOW_SECONDS, ThroughputWatch

pytestmark = pytest.mark.usefixtures("one_thread")
FAST, SLOW = 60_000.0, 4_000.0  # tokens/s: an early rate, and one 15 times slower


class Clock:
    """Seconds that the test moves on."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watch_rates(rates: list[float], seconds_per_log: float, threads: int = 2) -> list[str]:
    """The warnings a ThroughputWatch gives for these log intervals' rates, `seconds_per_log` apart."""
    clock, before = Clock(), torch.get_num_threads()
    watch = ThroughputWatch(clock)
    torch.set_num_threads(threads)
    try:
        warnings = []
        for rate in rates:
            clock.now += seconds_per_log
            warnings.append(watch.check(rate))
        return [w for w in warnings if w]
    finally:
        torch.set_num_threads(before)


def test_a_short_run_or_a_dip_does_not_warn_about_throughput():
    # A 60-step run logging every 5 steps (12 intervals, a second in all), slow from its fourth interval on
    # (another process started), and a long run with a few noisy intervals: neither is worth a warning.
    assert watch_rates([FAST] * 3 + [SLOW] * 9, 0.1) == []
    assert watch_rates([FAST] * 10 + [SLOW, SLOW, FAST] * 20, 5.0) == []
    # The early rate is a median: one slow interval among the first ones does not set it low.
    assert watch_rates([FAST, FAST, SLOW, FAST, FAST] + [FAST] * 10, 5.0) == []


def test_a_lasting_slowdown_warns_once_with_advice_the_run_can_take():
    slowdown = [FAST] * 5 + [SLOW] * 20  # a log every 2 s: slow for 40 s
    [warning] = watch_rates(slowdown, 2.0, threads=2)
    assert "slowed to 4,000 tokens/s from 60,000" in warning and "--threads 1; now 2" in warning
    assert re.search(r"stayed that slow for (\d+) s", warning).group(1) == f"{SLOW_SECONDS:.0f}"
    # With one thread already, fewer threads is no advice at all.
    [warning] = watch_rates(slowdown, 2.0, threads=1)
    assert "--threads" not in warning and "another process is probably using the CPU" in warning


def test_the_many_epochs_note_counts_the_steps_the_time_budget_allows(corpus_file):
    # 100,000 steps of 256 tokens over a 14,651-token file: about 1,700 passes if all were made, but a 2 s
    # budget at a few ms per step stops the run after a few hundred steps (a few passes).
    model, config = tiny_configs(data=corpus_file, max_steps=100_000, max_time=2.0)
    preview = preview_run(model, config)
    assert preview.steps < 0.01 * config.max_steps
    lines = preview.lines()
    assert not any("memorise" in line for line in lines), lines
    assert f"{config.max_steps:,} steps" in next(line for line in lines if line.startswith("plan:"))
    # Without a budget the same run does make them all, and the note says what that means.
    model, config = tiny_configs(data=corpus_file, max_steps=100_000)
    note = next(line for line in preview_run(model, config).lines() if "memorise" in line)
    assert note.startswith("note: 1747 passes over 14,651 tokens")


def test_without_an_estimate_a_budgeted_plan_says_up_to():
    model, config = tiny_configs(max_steps=1000, max_time=60.0)
    plan = RunPlan(model, config, 30_000, epoch_tokens=1000, tokens_per_step=256.0, max_steps=1000, device="cpu")
    assert plan.epochs > MANY_EPOCHS
    [note] = [line for line in plan.lines() if line.startswith("note:")]
    assert note.startswith("note: up to 256 passes (all 1,000 steps, if the 60 s budget allows them)")
    [note] = [line for line in plan.lines(budget_steps=400) if line.startswith("note:")]
    assert note.startswith("note: about 102 passes (the 400 or so steps the 60 s budget allows)")
    assert not [line for line in plan.lines(budget_steps=50) if line.startswith("note:")]  # 12.8 passes


def bar_lines(stderr: str) -> list[str]:
    """The training progress bar's refreshes (tqdm rewrites the line after a carriage return)."""
    return [part for part in re.split(r"[\r\n]", stderr) if part.startswith("training:")]


@pytest.mark.parametrize("max_time", [None, 600.0])
def test_the_progress_bar_shows_one_eta(corpus_file, tmp_path, capsys, max_time):
    model, config = tiny_configs(data=corpus_file, max_steps=30, max_time=max_time)
    train(model, config, tmp_path / "run", log=lambda message: None)
    bars = bar_lines(capsys.readouterr().err)
    assert bars, "no progress bar"
    last = bars[-1]
    tqdm_eta = re.search(r"\[\d+:\d+<\d+:\d+", last)  # tqdm's [elapsed<remaining
    if max_time is None:  # tqdm's ETA is right: the steps left at the current rate
        assert tqdm_eta and "ends in" not in last, last
    else:  # the budget may end the run first: only "ends in", which knows it, is shown
        assert not tqdm_eta and "ends in=" in last, last
