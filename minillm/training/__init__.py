"""Training: starting and resuming runs (runs), the loop (trainer), scoring (evaluation), and what the loop
needs around it (precision, RNG state, the rank of this process, metrics). The data steps are minillm.data.

    from minillm.training import train, resume, evaluate_run
"""

from minillm.training.distributed import is_main_process
from minillm.training.evaluation import evaluate_run
from minillm.training.optimizer import lr_at
from minillm.training.runs import check_resumable, resume, train
from minillm.training.trainer import StopReason, Trainer, TrainResult

__all__ = ["StopReason", "TrainResult", "Trainer", "check_resumable", "evaluate_run", "is_main_process", "lr_at",
           "resume", "train"]
