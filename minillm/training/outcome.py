"""What the training loop reports and takes from its caller: why a run ended (StopReason), what it reports
(TrainResult), and the hooks a caller passes (a log, a metrics callback, a stop hook)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from minillm.training.distributed import is_main_process

LogFn = Callable[[str], None]
MetricsCallback = Callable[[dict[str, Any]], None]
StopHook = Callable[[], bool]  # asked after every step; True = evaluate, save and return (e.g. Event.is_set)


def default_log(message: str) -> None:
    """Print above the progress bar; warnings go to stderr."""
    if is_main_process():
        tqdm.write(message, file=sys.stderr if message.startswith("warning:") else sys.stdout)


class StopReason(str, Enum):
    """Why a training ended (Trainer.fit, TrainResult.stop_reason)."""

    MAX_STEPS = "max_steps"  # it took all its steps
    MAX_TIME = "max_time"  # its time budget ran out
    EARLY_STOPPING = "early_stopping"  # --patience evaluations without a better validation loss
    STOPPED = "stopped"  # asked to (the stop hook: Ctrl-C, a Stop button): saved, and `resume` continues it

    def __str__(self) -> str:
        return self.value


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    best_step: int
    best_val_loss: float
    test_metrics: dict[str, Any]
    stop_reason: StopReason
    parameters: int
    history: list[dict[str, float]] = field(default_factory=list)
