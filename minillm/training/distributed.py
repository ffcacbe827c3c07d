"""Which process this is in a (possibly) distributed run: the one place that reads torchrun's variables.

Without torchrun every helper answers as the single process of a one-process run.
"""

from __future__ import annotations

import os


def rank() -> int:
    """This process's rank among all processes of the run (env RANK; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes train together (env WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun): only it writes files and prints."""
    return rank() == 0
