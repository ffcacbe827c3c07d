"""Mini LLM: train, understand and use your own small language model."""

from minillm.version import __version__

__all__ = ["__version__", "load_run"]


def __getattr__(name: str):
    # `minillm.load_run(run_dir)` without making `import minillm` import torch.
    if name == "load_run":
        from minillm.checkpoint import load_run

        return load_run
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")
