"""Mini LLM: train, understand and use your own small language model."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `minillm.load_run(run_dir)` without making `import minillm` import torch.
    if name == "load_run":
        from minillm.checkpoint import load_run

        return load_run
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")
