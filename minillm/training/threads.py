"""How many CPU threads a training should use: all the cores, unless other processes keep some busy.

PyTorch's thread pool spins and waits for all its threads at every operation; when another job holds a
core, each operation waits for the thread that core cannot run, and training slows many times over (fewer
threads on the free cores are then faster than all of them). So when other processes are using the CPU at
the start of a run, the run leaves their cores to them.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

SAMPLE_SECONDS = 0.25  # how long the CPU is watched before the run starts
BUSY_CORE = 0.5  # another process using this share of a core or more counts as holding it
SLOWDOWN_FACTOR = 3.0  # throughput this many times below the run's early rate: warn (the CPU is shared?)
WARMUP_LOGS = 2  # log intervals skipped before the reference throughput is taken (first steps are slow)
REFERENCE_LOGS = 3  # the early rate is the median of this many log intervals (one interval is noisy)
SLOW_LOGS = 3  # ... and a slowdown counts when this many log intervals in a row are that slow
SLOW_SECONDS = 20.0  # ... for at least this long: a shorter dip costs the run little, and a run shorter
#                       than this has nothing to gain from the advice


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot, from /proc/stat (Linux); None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_jiffies() -> int | None:
    """CPU jiffies this process (all its threads) has used, from /proc/self/stat."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def cores_busy_elsewhere(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores other processes kept busy over `seconds` (None where this cannot be told)."""
    before, own_before = _cpu_jiffies(), _own_jiffies()
    time.sleep(seconds)
    after, own_after = _cpu_jiffies(), _own_jiffies()
    if None in (before, after, own_before, own_after) or after[1] == before[1]:
        return None
    busy = (after[0] - before[0]) - (own_after - own_before)
    return max(0.0, busy / (after[1] - before[1]) * (os.cpu_count() or 1))


def threads_for_a_busy_cpu(threads_now: int) -> tuple[int, float] | None:
    """(threads, cores busy elsewhere) when other processes hold cores this run would use, else None."""
    if threads_now <= 1:
        return None  # nothing to leave
    busy = cores_busy_elsewhere()
    if busy is None or busy < BUSY_CORE:
        return None
    cores = os.cpu_count() or 1
    threads = max(1, min(threads_now, cores - round(busy)))
    return (threads, busy) if threads < threads_now else None


def leave_busy_cores() -> str:
    """Set torch's threads to the cores other processes leave free; the note to show ("" if unchanged)."""
    choice = threads_for_a_busy_cpu(torch.get_num_threads())
    if choice is None:
        return ""
    threads, busy = choice
    torch.set_num_threads(threads)
    return (f"note: other processes are keeping about {busy:.1f} of the {os.cpu_count()} cores busy: training "
            f"with {threads} thread(s), which suffers less from sharing (--threads to choose)")


class ThroughputWatch:
    """Warns once when training runs far slower than it did early on (another process on the cores), and
    only when that is worth saying: the slowdown lasts (SLOW_LOGS intervals, SLOW_SECONDS), so a noisy
    interval or a short run never warns; the advice to use fewer threads only when the run has more than one.
    `clock`: seconds, for the tests (time.monotonic by default)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.logs_seen, self.reference_rate, self.warned = 0, None, False
        self.early: list[float] = []  # the rates the reference is taken from
        self.slow_since: float | None = None  # when the current run of slow intervals began
        self.slow_logs = 0

    def check(self, tokens_per_s: float) -> str:
        """The warning to show for this log interval's rate ("" when there is none)."""
        self.logs_seen += 1
        now = self.clock()
        if self.logs_seen <= WARMUP_LOGS or self.warned:
            return ""
        if self.reference_rate is None:
            self.early.append(tokens_per_s)
            if len(self.early) == REFERENCE_LOGS:
                self.reference_rate = statistics.median(self.early)
            return ""
        if tokens_per_s >= self.reference_rate / SLOWDOWN_FACTOR:
            self.slow_since, self.slow_logs = None, 0
            return ""
        if self.slow_since is None:
            self.slow_since = now
        self.slow_logs += 1
        if self.slow_logs < SLOW_LOGS or now - self.slow_since < SLOW_SECONDS:
            return ""
        self.warned = True
        threads = torch.get_num_threads()
        advice = (f" (stop it, or train with fewer threads, which suffer less from sharing: --threads 1; now "
                  f"{threads})" if threads > 1 else " (stop it, or wait for it to end)")
        return (f"warning: training slowed to {tokens_per_s:,.0f} tokens/s from {self.reference_rate:,.0f} early "
                f"on and has stayed that slow for {now - self.slow_since:.0f} s: another process is probably "
                f"using the CPU{advice}")
