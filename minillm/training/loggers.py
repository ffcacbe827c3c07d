"""What a training records as it goes, in one place (`RunRecords`, the trainer's `metrics`): metrics.jsonl (one
row per log step and per evaluation), samples.jsonl (the short samples of samples.py) and, when asked with
`--log`, an experiment log in the run's logs/ folder through TensorBoard or Weights & Biases.

    --log tensorboard   TensorBoard's event files, written by torch.utils.tensorboard's SummaryWriter
                        (pip install 'mini-llm[logs]'); `tensorboard --logdir runs` shows every run
    --log wandb         a Weights & Biases run named after the run folder (pip install wandb; WANDB_MODE=offline
                        keeps it on disk, without an account, for `wandb sync` later)

Both get the same series: train/loss, train/learning_rate, train/tokens_per_s, val/loss, val/bits_per_byte,
val/best_loss, at the end test/loss, test/perplexity, test/bits_per_byte, and each sample as text. A run that
replaces another trains in a staging folder until its first model: what it logs there is held in memory and
written once the run is in its folder (the old run's logs/ goes with the old run).
"""

from __future__ import annotations

import importlib
import json
import math
import netrc
import os
import urllib.parse
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from minillm.config import LOGGERS as LOGGER_NAMES
from minillm.errors import MiniLLMError
from minillm.run_folder import RunFolder
from minillm.training.metrics import MetricsLog

NO_LOGGER = LOGGER_NAMES[0]
# The metrics.jsonl keys each logger gets, by row kind, under the names it shows.
SERIES = {
    "train": {"train_loss": "train/loss", "lr": "train/learning_rate", "tokens_per_s": "train/tokens_per_s"},
    "eval": {"val_loss": "val/loss", "val_bits_per_byte": "val/bits_per_byte", "best_val_loss": "val/best_loss"},
    "test": {"loss": "test/loss", "perplexity": "test/perplexity", "bits_per_byte": "test/bits_per_byte"},
}
SAMPLE_TAG = "sample"
WANDB_PROJECT = "minillm"  # the W&B project unless WANDB_PROJECT says another
WANDB_HOST = "https://api.wandb.ai"  # unless WANDB_BASE_URL says another
OFFLINE_MODES = ("offline", "disabled", "dryrun")  # WANDB_MODE values that need no account


class ExperimentLogger(ABC):
    """One experiment-tracking tool, writing into a run's logs/ folder."""

    name: ClassVar[str]
    package: ClassVar[str]  # what must be importable
    install: ClassVar[str]  # how to get it

    @classmethod
    def check_available(cls) -> None:
        """Refuse, in one line, a logger whose package is not installed (before a run starts)."""
        try:
            importlib.import_module(cls.package)
        except ImportError:
            raise MiniLLMError(f"--log {cls.name} needs the {cls.package} package, which is not installed: "
                               f"{cls.install}; or leave out --log") from None

    @abstractmethod
    def __init__(self, log_dir: Path, run_name: str, hparams: dict[str, Any], first_step: int) -> None:
        """Start logging into `log_dir`; `first_step`: the first step this session logs (after a resume, the
        events the old session logged from there on are dropped where the tool can)."""

    @abstractmethod
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    @abstractmethod
    def text(self, step: int, tag: str, text: str) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class TensorBoardLogger(ExperimentLogger):
    name, package, install = "tensorboard", "tensorboard", "pip install 'mini-llm[logs]' (or pip install tensorboard)"

    def __init__(self, log_dir: Path, run_name: str, hparams: dict[str, Any], first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events its interrupted session wrote after the checkpoint.
        self.writer = SummaryWriter(str(log_dir), purge_step=first_step if first_step > 1 else None)
        if first_step <= 1:  # the recipe, as TensorBoard's text (indented: shown as code)
            self.writer.add_text("config", "    " + json.dumps(hparams, indent=2).replace("\n", "\n    "), 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)  # as code: spaces and lines kept

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(ExperimentLogger):
    name, package, install = "wandb", "wandb", "pip install wandb (WANDB_MODE=offline then works without an account)"

    @classmethod
    def check_available(cls) -> None:
        """Also refuse, before the run starts, to go online without credentials (W&B would stop the run at its
        first log to ask for them)."""
        super().check_available()
        if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES or os.environ.get("WANDB_API_KEY"):
            return
        host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", WANDB_HOST)).hostname
        try:
            known = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            known = False
        if not known:
            raise MiniLLMError(f"--log wandb found no W&B credentials for {host}: run `wandb login` (or set "
                               "WANDB_API_KEY), or set WANDB_MODE=offline to log on disk without an account")

    def __init__(self, log_dir: Path, run_name: str, hparams: dict[str, Any], first_step: int) -> None:
        import wandb

        log_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run is a new W&B run in the same group (its steps go on from the checkpoint's). W&B's own
        # console capture is off: it would fight the progress bar.
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=run_name,
                                  group=run_name, dir=str(log_dir), config=hparams,
                                  settings=wandb.Settings(console="off"))
        except wandb.Error as e:
            raise MiniLLMError(f"W&B could not start ({' '.join(str(e).split())}); set WANDB_MODE=offline to log "
                               "on disk, or leave out --log") from None
        self.html = wandb.Html

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        from html import escape

        self.run.log({tag: self.html(f"<pre>{escape(text)}</pre>")}, step=step)

    def flush(self) -> None:
        return None  # (W&B writes as it goes)

    def close(self) -> None:
        self.run.finish()


LOGGERS: dict[str, type[ExperimentLogger]] = {cls.name: cls for cls in (TensorBoardLogger, WandbLogger)}


def check_logger(name: str) -> None:
    """Refuse an unknown logger, or one whose package is missing, in one line (NO_LOGGER passes)."""
    if name == NO_LOGGER:
        return
    if name not in LOGGERS:
        raise MiniLLMError(f"--log must be one of {LOGGER_NAMES}, got {name!r}")
    LOGGERS[name].check_available()


def series(kind: str, row: dict[str, Any]) -> dict[str, float]:
    """The logger's scalars of a metrics row (or of the test metrics, kind "test"): finite numbers only."""
    return {tag: float(row[key]) for key, tag in SERIES.get(kind, {}).items()
            if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
            and math.isfinite(row[key])}


class RunRecords:
    """metrics.jsonl, samples.jsonl and the experiment log of one run (only the main process writes: `enabled`).

    A context manager: leaving it closes the experiment log, however the training ended."""

    def __init__(self, folder: RunFolder, logger: str, hparams: dict[str, Any], enabled: bool = True) -> None:
        self.folder, self.logger_name, self.hparams, self.enabled = folder, logger, hparams, enabled
        self.metrics = MetricsLog(folder.metrics, enabled)
        self.samples = MetricsLog(folder.samples, enabled)
        self.logger: ExperimentLogger | None = None
        self.pending: list[tuple[str, int, Any]] = []  # events held while the run is in a staging folder
        self.first_step = 1

    @property
    def path(self) -> Path:  # (metrics.jsonl, as MetricsLog's)
        return self.metrics.path

    def append(self, row: dict[str, Any]) -> None:
        """A metrics row (kind "train" or "eval"): to metrics.jsonl and the experiment log."""
        self.metrics.append(row)
        self._event("scalars", row["step"], series(row.get("kind", ""), row))
        if row.get("kind") == "eval":
            self._event("flush", row["step"], None)  # an interrupted run keeps its log up to here

    def sample(self, row: dict[str, Any], shown: str) -> None:
        """A sample (step, prompt, text, ...): to samples.jsonl, and `shown` as text to the experiment log."""
        self.samples.append(row)
        self._event("text", row["step"], shown)

    def test(self, metrics: dict[str, Any], step: int) -> None:
        """The best model's test metrics, at the last step, to the experiment log."""
        self._event("scalars", step, series("test", metrics))

    def truncate_after(self, step: int) -> None:
        """A resumed run: drop what was recorded after its checkpoint's step."""
        self.metrics.truncate_after(step)
        self.samples.truncate_after(step)
        self.first_step = step + 1

    def move_to(self, folder: RunFolder) -> None:
        """Go on in `folder`, where the run's files have just been moved from its staging folder."""
        self.folder = folder
        self.metrics.path, self.samples.path = folder.metrics, folder.samples
        pending, self.pending = self.pending, []
        for event in pending:
            self._event(*event)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def __enter__(self) -> RunRecords:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _event(self, what: str, step: int, payload: Any) -> None:
        if not self.enabled or self.logger_name == NO_LOGGER:
            return
        if self.folder.is_staging:  # written once the run is in its own folder (move_to)
            self.pending.append((what, step, payload))
            return
        if self.logger is None:
            self.logger = LOGGERS[self.logger_name](self.folder.logs, self.folder.path.name, self.hparams,
                                                    self.first_step)
        if what == "scalars":
            self.logger.scalars(step, payload)
        elif what == "text":
            self.logger.text(step, SAMPLE_TAG, payload)
        else:
            self.logger.flush()
