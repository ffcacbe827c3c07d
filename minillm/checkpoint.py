"""A run folder is the unit of save and load.

    RUN_DIR/
      tokenizer.json          the tokenizer (its own format; says which kind it is)
      best_model.pt           state_dict of the best model by validation loss (uncompiled keys)
      best_model_config.json  {"model": ModelConfig, "tokenizer_type": ..., "training": {step, val_loss, ...}}
      last.pt                 model + optimizer + scheduler + RNG + data position, for --resume

Everything users keep is written atomically (temporary file in the same folder, then os.replace),
so a crash leaves either the old file or the new one, never half of each. Weights are read with
`torch.load(..., weights_only=True)`: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillm import __version__
from minillm.config import ModelConfig
from minillm.errors import MiniLLMError

TOKENIZER_FILE = "tokenizer.json"
BEST_MODEL_FILE = "best_model.pt"
BEST_CONFIG_FILE = "best_model_config.json"
LAST_CHECKPOINT_FILE = "last.pt"


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file beside `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file, turning every way it can be broken into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise MiniLLMError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniLLMError(f"{what} {path} is not valid JSON ({e}); re-create it or pick another file") from None


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise MiniLLMError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MiniLLMError(
            f"checkpoint {path} is corrupt or not a Mini LLM weights file ({first_line[:200]}); "
            "retrain or pick another file"
        ) from None


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes from weight names."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def save_best(run_dir: str | Path, model: torch.nn.Module, config: ModelConfig, tokenizer_type: str,
              training: dict[str, Any]) -> None:
    """Save best_model.pt and best_model_config.json (weights first, so the config never points ahead)."""
    run_dir = Path(run_dir)
    state = clean_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_torch(run_dir / BEST_MODEL_FILE, state)
    write_json(run_dir / BEST_CONFIG_FILE, {
        "minillm_version": __version__,
        "model": config.to_dict(),
        "tokenizer_type": tokenizer_type,
        "training": training,
    })


def read_run_config(config_path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and the rest of best_model_config.json (tokenizer_type, training, ...)."""
    raw = read_json(config_path, "model config")
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise MiniLLMError(
            f"model config {config_path} has no \"model\" section; is it a Mini LLM best_model_config.json?"
        )
    try:
        config = ModelConfig.from_dict(raw["model"])
    except MiniLLMError as e:
        raise MiniLLMError(f"model config {config_path}: {e}") from None
    return config, {k: v for k, v in raw.items() if k != "model"}


@dataclass
class Run:
    """A loaded run: the model (eval mode, on its device), its tokenizer, config and metadata."""

    model: torch.nn.Module
    tokenizer: Any
    config: ModelConfig
    info: dict[str, Any]  # tokenizer_type, training summary, paths
    device: torch.device


def check_compatible(config: ModelConfig, tokenizer: Any, where: str = "") -> None:
    """Refuse a model and a tokenizer that were not trained together."""
    problems = []
    if tokenizer.vocab_size != config.vocab_size:
        problems.append(f"vocabulary sizes differ (model {config.vocab_size}, tokenizer {tokenizer.vocab_size})")
    for name in ("pad_id", "bos_id", "eos_id"):
        if getattr(tokenizer, name) != getattr(config, name):
            problems.append(f"{name} differs (model {getattr(config, name)}, tokenizer {getattr(tokenizer, name)})")
    if problems:
        raise MiniLLMError(
            f"model and tokenizer do not belong together{where}: {'; '.join(problems)}; "
            "use the tokenizer.json saved in the same run folder as the model"
        )


def load_model_files(model_path: str | Path, tokenizer_path: str | Path, config_path: str | Path | None = None,
                     device: str | torch.device | None = None) -> Run:
    """Load a model from explicit paths; the config defaults to best_model_config.json beside the weights."""
    from minillm.models import build_model, pick_device
    from minillm.tokenizers import load_tokenizer

    model_path, tokenizer_path = Path(model_path), Path(tokenizer_path)
    config_path = Path(config_path) if config_path else model_path.parent / BEST_CONFIG_FILE
    tokenizer = load_tokenizer(tokenizer_path)
    config, meta = read_run_config(config_path)
    check_compatible(config, tokenizer, f" ({model_path} and {tokenizer_path})")
    expected = meta.get("tokenizer_type")
    if expected is not None and expected != tokenizer.kind:
        raise MiniLLMError(
            f"{config_path} says the model was trained with a {expected!r} tokenizer but {tokenizer_path} "
            f"is a {tokenizer.kind!r} tokenizer; use the tokenizer.json from the same run"
        )
    device = pick_device(device)
    model = build_model(config)
    state = load_torch(model_path)
    if not isinstance(state, dict):
        raise MiniLLMError(f"checkpoint {model_path} does not hold a state_dict; retrain or pick another file")
    state = clean_state_dict(state)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[0][:200]
        raise MiniLLMError(
            f"weights in {model_path} do not fit the model described by {config_path} ({detail}); "
            "keep best_model.pt and best_model_config.json from the same run together"
        ) from None
    model.to(device).eval()
    info = {**meta, "tokenizer_type": tokenizer.kind, "model_path": str(model_path),
            "tokenizer_path": str(tokenizer_path), "config_path": str(config_path)}
    return Run(model=model, tokenizer=tokenizer, config=config, info=info, device=device)


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> Run:
    """Load the best model of a run folder with its tokenizer, after checking they belong together."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MiniLLMError(f"run folder not found: {run_dir}; train one with `minillm train --out {run_dir}`")
    if not (run_dir / BEST_MODEL_FILE).is_file():
        raise MiniLLMError(f"{run_dir} has no {BEST_MODEL_FILE}: training has not saved a model there yet")
    return load_model_files(run_dir / BEST_MODEL_FILE, run_dir / TOKENIZER_FILE, run_dir / BEST_CONFIG_FILE, device)


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Run folders (holding a best model) directly under `runs_dir`, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if (p / BEST_MODEL_FILE).is_file() and (p / BEST_CONFIG_FILE).is_file()]
    return sorted(runs, key=lambda p: (p / BEST_MODEL_FILE).stat().st_mtime, reverse=True)
