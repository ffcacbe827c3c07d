"""Where a new run starts (TrainConfig.init_from): from nothing (random weights, the default), from another
run's best model, or from a local Hugging Face checkpoint folder (Llama, Qwen3: models.hf_checkpoint).

    minillm train pairs.tsv --init-from runs/pretrained     # your run: its shape, tokenizer and best weights
    minillm train notes.txt --init-from models/Qwen3-0.6B   # a Hugging Face folder (downloaded beforehand)

The source gives the new run its model's shape (model options that would change it are refused; the run sets
its own training window, --block-size, up to the source's context, and its dropout), its tokenizer (through
--tokenizer-file's mapping: no id changes) and its first weights; the optimizer and the schedule start fresh.
Everything here is checked before a run folder is touched, and the weights are read only when the trainer
is built, after the memory estimate. The run records where it started (kind, path, step, a fingerprint of
the weights) in best_model_config.json ("init_from"), and the model card says it.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from torch import nn

from minillm.checkpoint import check_finite, clean_state_dict, read_model_config
from minillm.config import ModelConfig, TrainConfig
from minillm.errors import MiniLLMError
from minillm.files import load_torch
from minillm.models.hf_checkpoint import CONFIG_FILE, HFCheckpoint, weights_fingerprint
from minillm.models.llama import fuse_split
from minillm.run_folder import RunFolder

# Model options a run that starts from another model still chooses for itself (neither changes a weight).
OWN_MODEL_OPTIONS = ("max_seq_len", "dropout")
# owner/name, as a model is named on the Hugging Face Hub (what a user may pass instead of a local folder)
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DOWNLOADS = "models"  # where the download hint puts a checkpoint


class StartPoint(ABC):
    """A model a new run starts from: its shape, its tokenizer, its weights, and what the run records of it."""

    kind: str  # "run" or "hugging_face" (the record's)
    path: Path
    config: ModelConfig  # the source's shape (its vocabulary is replaced by the tokenizer's)
    context: int  # the longest window the source was trained for
    tokenizer_file: Path

    @abstractmethod
    def describe(self) -> str:
        """What it is, for messages: "the run runs/pretrained (step 300)"."""

    @abstractmethod
    def default_window(self, requested: int) -> int:
        """The run's training window when the user sets none (`requested`: the preset's)."""

    @abstractmethod
    def load_into(self, model: nn.Module, base_rows: int) -> None:
        """Copy the weights into `model` (see HFCheckpoint.load_into for `base_rows`)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short hash of the weights' file(s)."""

    @abstractmethod
    def chat_template(self) -> str | None:
        """The source's chat template (Jinja), if it has one."""

    def step(self) -> int | None:
        """The source run's step (None for a checkpoint)."""
        return None

    def run_config(self, explicit: dict[str, Any], requested_window: int) -> ModelConfig:
        """The new run's model config: the source's shape, with the run's own window and dropout. `explicit`
        are the model options the user gave: any other than OWN_MODEL_OPTIONS must agree with the source."""
        contradicting = [f"--{name.replace('_', '-')} {value} (it has {getattr(self.config, name, None)})"
                         for name, value in explicit.items()
                         if name not in OWN_MODEL_OPTIONS and getattr(self.config, name, None) != value]
        if contradicting:
            raise MiniLLMError(f"--init-from {self.path} takes the model's shape from {self.describe()}, and "
                               f"{', '.join(contradicting)} contradicts it; drop "
                               f"{'it' if len(contradicting) == 1 else 'them'} (a run that starts from another "
                               "model sets only its --block-size and --dropout)")
        window = explicit.get("max_seq_len") or self.default_window(requested_window)
        if window > self.context:
            raise MiniLLMError(f"--block-size {window} is longer than the context {self.describe()} was trained "
                               f"for ({self.context:,} tokens); use at most {self.context:,}")
        return self.config.replace(max_seq_len=window, dropout=explicit.get("dropout", self.config.dropout))

    def record(self) -> dict[str, Any]:
        """What the run keeps of where it started (best_model_config.json's "init_from")."""
        return {"kind": self.kind, "path": str(self.path.resolve()), "step": self.step(),
                "fingerprint": self.fingerprint()}


class RunStart(StartPoint):
    """Another Mini LLM run's best model (best_model.pt), with its config and tokenizer."""

    kind = "run"

    def __init__(self, folder: RunFolder) -> None:
        self.folder, self.path = folder, folder.path
        self.config, self.meta = read_model_config(folder.best_config)
        self.context, self.tokenizer_file = self.config.max_seq_len, folder.tokenizer

    def describe(self) -> str:
        return f"the run {self.path} (step {self.step()})"

    def step(self) -> int | None:
        return (self.meta.get("training") or {}).get("step")

    def default_window(self, requested: int) -> int:
        return self.context  # the window it was trained with, which fit this machine then

    def load_into(self, model: nn.Module, base_rows: int) -> None:
        state = load_torch(self.folder.best_model)
        if not isinstance(state, dict):
            raise MiniLLMError(f"{self.folder.best_model} does not hold a state_dict; pick another run")
        state = fuse_split(clean_state_dict(state))
        check_finite(state, self.folder.best_model)
        model.load_state_dict(state)

    def fingerprint(self) -> str:
        return weights_fingerprint([self.folder.best_model])

    def chat_template(self) -> str | None:
        path = self.folder.chat_template
        return path.read_text(encoding="utf-8") if path.is_file() else None


class CheckpointStart(StartPoint):
    """A local Hugging Face checkpoint folder of a LlamaForCausalLM or a Qwen3ForCausalLM."""

    kind = "hugging_face"

    def __init__(self, checkpoint: HFCheckpoint) -> None:
        self.checkpoint, self.path = checkpoint, checkpoint.path
        self.config, self.context = checkpoint.config, checkpoint.context
        self.tokenizer_file = checkpoint.path / "tokenizer.json"

    def describe(self) -> str:
        return f"the {self.checkpoint.architecture} checkpoint {self.path}"

    def default_window(self, requested: int) -> int:
        return min(self.context, requested)  # its context (often 32k+) would rarely fit a training batch

    def load_into(self, model: nn.Module, base_rows: int) -> None:
        self.checkpoint.load_into(model, base_rows)

    def fingerprint(self) -> str:
        return self.checkpoint.fingerprint()

    def chat_template(self) -> str | None:
        return self.checkpoint.chat_template()

    def record(self) -> dict[str, Any]:
        return {**super().record(), "architecture": self.checkpoint.architecture}


def open_start(init_from: str) -> StartPoint:
    """The run folder or Hugging Face checkpoint folder `init_from` names, checked (nothing is downloaded)."""
    path = Path(init_from).expanduser()
    if not path.exists():
        hint = ""
        if HUB_NAME.fullmatch(init_from):
            local = f"{DOWNLOADS}/{init_from.split('/')[1]}"
            hint = (f"; if it is a model on the Hugging Face Hub, Mini LLM does not download: fetch it first with "
                    f"`huggingface-cli download {init_from} --local-dir {local}`, then pass --init-from {local}")
        raise MiniLLMError(f"--init-from {init_from}: no such folder (a run folder or a Hugging Face checkpoint "
                           f"folder){hint}")
    if not path.is_dir():
        raise MiniLLMError(f"--init-from {init_from} is a file; give the folder of a run or of a Hugging Face "
                           "checkpoint")
    folder = RunFolder(path)
    folder.finish_swaps_for_reading()  # a new run that a killed training had begun to move in
    if folder.has_best_model():
        return RunStart(folder)
    if (path / CONFIG_FILE).is_file():
        return CheckpointStart(HFCheckpoint.open(path))
    if folder.holds_run():
        raise MiniLLMError(f"--init-from {init_from}: the run has not saved a model yet (its first evaluation "
                           "saves one); wait for it, or start from another run")
    raise MiniLLMError(f"--init-from {init_from} is neither a run folder (it has no {folder.best_model.name}) nor "
                       f"a Hugging Face checkpoint folder (no {CONFIG_FILE})")


def starting_configs(model_config: ModelConfig, config: TrainConfig, explicit: dict[str, Any] | None = None,
                     run_dir: str | Path | None = None) -> tuple[StartPoint | None, ModelConfig, TrainConfig]:
    """(where the run starts, its model config, its training config). Without config.init_from: (None, the
    configs as they are). With it: the source's shape with the run's window (the explicit --block-size, else
    the source's default from `model_config`'s) and the source's tokenizer as --tokenizer-file; `explicit`
    are the model options the user gave (they must agree with the source)."""
    if not config.init_from:
        return None, model_config, config
    start = open_start(config.init_from)
    if run_dir is not None and Path(run_dir).resolve() == start.path.resolve():
        raise MiniLLMError(f"--init-from {config.init_from} is the run's own folder (--out); train into another "
                           "folder")
    if config.tokenizer_file and Path(config.tokenizer_file).resolve() != start.tokenizer_file.resolve():
        raise MiniLLMError(f"--tokenizer-file {config.tokenizer_file} contradicts --init-from: the run uses the "
                           f"tokenizer of {start.describe()}; drop --tokenizer-file")
    model = start.run_config(dict(explicit or {}), model_config.max_seq_len)
    return start, model, config.replace(tokenizer_file=str(start.tokenizer_file))
