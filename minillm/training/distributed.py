"""Training on several processes with PyTorch's own engine (torchrun + DistributedDataParallel).

The one place that reads torchrun's variables and talks to the process group. Without torchrun (or with
one process) every helper answers as the single process of a one-process run and no collective runs, so
the single-process path is exactly what it was.

    torchrun --standalone --nproc_per_node=2 -m minillm train data.txt ...
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# Imported before any process group exists: its functions take `group=group.WORLD` as a default, evaluated at
# import, and DDP imports it (through torch._dynamo) once the group exists. Imported then, those defaults hold
# the group for the life of the process, so teardown() cannot free it: its Gloo threads run on into the
# interpreter's exit, where a rank was seen to abort (SIGABRT) at the end of a run.
if dist.is_available():
    import torch.distributed.nn  # noqa: F401

from minillm.errors import MiniLLMError

# How long a collective may wait for the other ranks. A rank that fails ends its process, and torchrun then
# stops the others at once; this bounds the wait when a rank hangs instead.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def rank() -> int:
    """This process's rank among all processes of the run (env RANK; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine (env LOCAL_RANK): which GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """How many processes train together (env WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun): only it writes files and prints."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, Gloo on CPU) once; returns this rank's device.

    On CUDA each process drives the GPU of its local rank (`--device cuda` means "one GPU per process").
    """
    if not is_distributed():
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise MiniLLMError(f"distributed training runs on CUDA (NCCL) or CPU (Gloo), not {device.type}; "
                           "use --device cuda or --device cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return device


def barrier() -> None:
    if is_distributed() and dist.is_initialized():
        dist.barrier()


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not (is_distributed() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(work: Callable[[], Any]) -> Any:
    """`work()` on rank 0 only, its result shared with every rank; a MiniLLMError it raises is raised on
    every rank (so a bad data file ends the whole job with rank 0's message, no rank left waiting)."""
    if not (is_distributed() and dist.is_initialized()):
        return work()
    outcome: tuple[str, Any] = ("ok", None)
    if is_main_process():
        try:
            outcome = ("ok", work())
        except MiniLLMError as e:
            outcome = ("error", str(e))
    kind, value = broadcast_from_main(outcome)
    if kind == "error":
        raise MiniLLMError(value)
    return value


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not (is_distributed() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all ranks (itself in a one-process run)."""
    if not (is_distributed() and dist.is_initialized()):
        return tensor
    total = tensor.detach().clone().float()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag True on every rank when it is True on any (one collective for all of them): the ranks
    agree on when to evaluate and when to stop."""
    if not (is_distributed() and dist.is_initialized()):
        return flags
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def teardown() -> None:
    """Leave the process group (at the end of a distributed command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
