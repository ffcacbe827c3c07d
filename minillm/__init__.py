"""Mini LLM: train, understand and use your own small language model."""

__version__ = "0.1.0"
