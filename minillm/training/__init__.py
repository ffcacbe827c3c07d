"""Training: data preparation (data_utils), the training loop (trainer) and its records (metrics).

    from minillm.training import train, resume, evaluate_run
"""

from minillm.training.trainer import (
    Trainer,
    TrainResult,
    evaluate_run,
    is_main_process,
    lr_at,
    read_train_config,
    resume,
    sample_prompt,
    train,
)

__all__ = ["TrainResult", "Trainer", "evaluate_run", "is_main_process", "lr_at", "read_train_config",
           "resume", "sample_prompt", "train"]
