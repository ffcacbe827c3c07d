"""One training at a time per server, in a background thread, through the library's `train` and `resume`
(the CLI's trainer, not a subprocess); its progress readable by every client, so a page opened later shows it.

The web UI's Train tab (minillm.ui.train_tab) drives it, and the tests drive it directly. The thread lives
with the server, not with the page that started it: closing the browser neither stops nor harms a run.
Stop asks the trainer's stop hook: the run evaluates, saves best_model.pt and last.pt, and returns.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.errors import MiniLLMError, describe_error
from minillm.run_folder import RunFolder
from minillm.training.metrics import read_metrics
from minillm.training.outcome import StopReason

MAX_LOG_LINES = 200  # the trainer's messages kept for the page (the newest)
RATE_WINDOW = 5  # the last this many train rows give the steps per second behind the ETA

# The states of a training: running (preparing its data, then training), stopping (Stop was pressed), and
# how it ended.
RUNNING, STOPPING, FINISHED, STOPPED, FAILED = "running", "stopping", "finished", "stopped", "failed"
ENDED = (FINISHED, STOPPED, FAILED)


@dataclass
class TrainingStatus:
    """What the page shows of a training (a copy: the training thread goes on updating its own)."""

    run_dir: Path
    owner: str  # the session that started it
    resumed: bool
    max_steps: int | None
    max_time: float | None
    state: str = RUNNING
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows, as the trainer logs them
    log: list[str] = field(default_factory=list)  # the trainer's messages
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)  # stop_reason, best_step, best_val_loss, test metrics
    started: float = field(default_factory=time.time)
    # The run's settings as the front that started it words them (the web UI: its form's values), so that
    # a client that comes later can show them beside the progress.
    form: dict[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def warnings(self) -> list[str]:
        return [line.removeprefix("warning: ") for line in self.log if line.startswith("warning:")]

    def latest(self, kind: str) -> dict[str, Any]:
        return next((row for row in reversed(self.rows) if row.get("kind") == kind), {})

    @property
    def step(self) -> int:
        return max((row.get("step", 0) for row in self.rows), default=0)

    @property
    def elapsed(self) -> float:
        return max((row.get("elapsed", 0.0) for row in self.rows), default=0.0)

    def eta(self) -> float | None:
        """Seconds of training left: the steps left at the recent rate, capped by the time budget."""
        if self.ended:
            return 0.0
        train = [row for row in self.rows if row.get("kind") == "train"][-RATE_WINDOW:]
        if len(train) < 2 or not self.max_steps:
            return None
        steps = train[-1]["step"] - train[0]["step"]
        seconds = train[-1]["elapsed"] - train[0]["elapsed"]
        if steps <= 0 or seconds <= 0:
            return None
        left = (self.max_steps - self.step) * seconds / steps
        if self.max_time:
            left = min(left, max(0.0, self.max_time - self.elapsed))
        return max(0.0, left)


Work = Callable[["TrainingJob"], Any]  # runs the training (train or resume) with the job's hooks; -> TrainResult


class TrainingJob:
    """One training: its thread, its stop flag, and the status its callbacks keep up to date."""

    def __init__(self, status: TrainingStatus, work: Work) -> None:
        self._status = status
        self._lock = threading.Lock()
        self.stop_event = threading.Event()
        self._work = work
        self._reread_metrics = status.resumed  # a resumed run's first row: read its (truncated) history
        self.thread = threading.Thread(target=self._run, name=f"minillm-train-{status.run_dir.name}",
                                       daemon=True)

    def status(self) -> TrainingStatus:
        with self._lock:
            return copy.deepcopy(self._status)

    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    def stop(self) -> None:
        with self._lock:
            if not self._status.ended:
                self._status.state = STOPPING
        self.stop_event.set()

    def log(self, message: str) -> None:
        with self._lock:
            self._status.log = [*self._status.log, message][-MAX_LOG_LINES:]

    def on_metrics(self, row: dict[str, Any]) -> None:
        with self._lock:
            if self._reread_metrics:  # resume truncated metrics.jsonl to its checkpoint, then wrote this row
                self._reread_metrics = False
                self._status.rows = read_metrics(RunFolder(self._status.run_dir).metrics) or [row]
            else:
                self._status.rows.append(dict(row))

    def _run(self) -> None:
        try:
            result = self._work(self)
            test = result.test_metrics or {}
            summary = {"stop_reason": result.stop_reason, "steps": result.steps, "best_step": result.best_step,
                       "best_val_loss": result.best_val_loss,
                       **{k: test.get(k) for k in ("loss", "perplexity", "bits_per_byte")}}
        except BaseException as e:  # whatever it is, the page shows it and the server goes on
            with self._lock:
                self._status.state, self._status.error = FAILED, describe_error(e)
            return
        with self._lock:
            self._status.state = STOPPED if result.stop_reason == StopReason.STOPPED else FINISHED
            self._status.result = summary


class TrainingManager:
    """The server's trainings: at most one runs at a time; the last one's status stays readable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: TrainingJob | None = None

    def start(self, run_dir: str | Path, owner: str, work: Work, max_steps: int | None = None,
              max_time: float | None = None, resumed: bool = False,
              form: dict[str, Any] | None = None) -> TrainingJob:
        """Start `work` in the background; refused (MiniLLMError) while another training runs. `form`: the
        run's settings as the caller words them (TrainingStatus.form)."""
        with self._lock:
            if self._job is not None and not self._job.status().ended:
                raise MiniLLMError(busy_message(self._job.status(), owner))
            status = TrainingStatus(Path(run_dir), owner, resumed, max_steps, max_time, form=dict(form or {}))
            self._job = TrainingJob(status, work)
            self._job.thread.start()
            return self._job

    def status(self) -> TrainingStatus | None:
        """The running training's status, or the last one's; None before the first."""
        job = self._job
        return job.status() if job is not None else None

    def stop(self) -> bool:
        """Ask the running training to stop (it evaluates, saves and ends); False when none runs."""
        job = self._job
        if job is None or job.status().ended:
            return False
        job.stop()
        return True

    def wait(self, timeout: float | None = None) -> TrainingStatus | None:
        """Wait for the current training to end (tests, and a server shutting down); returns its status."""
        job = self._job
        if job is not None:
            job.thread.join(timeout)
        return self.status()


def busy_message(status: TrainingStatus, asker: str) -> str:
    who = "this tab" if status.owner == asker else "another tab"
    of = f" of {status.max_steps:,}" if status.max_steps else ""
    return (f"a training is already running on this server ({status.run_dir}, step {status.step:,}{of}, started "
            f"by {who}); one runs at a time: wait for it to end, or press Stop")
