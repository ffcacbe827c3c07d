"""Training: starting a run and resuming one (start), the loop (trainer), scoring (evaluation), what a run will
do before it starts (plan, preview, memory), and what the loop needs around it (optimizer, precision, the
TrainState and RNG state in last.pt, the rank of this process, metrics). The data steps are minillm.data;
where a run's files live is minillm.run_folder, and loading a trained run is minillm.checkpoint.

    from minillm.training import train, resume, evaluate_run
"""

from minillm.training.distributed import is_main_process
from minillm.training.evaluation import evaluate_run
from minillm.training.optimizer import lr_at
from minillm.training.outcome import StopReason, TrainResult
from minillm.training.start import check_resumable, resume, train
from minillm.training.trainer import Trainer

__all__ = ["StopReason", "TrainResult", "Trainer", "check_resumable", "evaluate_run", "is_main_process", "lr_at",
           "resume", "train"]
