"""Save and load a run's model: the best weights with their config, and the configs a run was trained with.

The one `load_run` that the CLI, the UI and the exporter use (they never import the trainer). File names
come from minillm.run_folder; atomic writes and the safe `torch.load` from minillm.files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillm.config import TOKENIZER_FIELDS, ModelConfig, TrainConfig
from minillm.errors import MiniLLMError
from minillm.files import load_torch, read_json, save_torch, write_json
from minillm.models import build_model, pick_device
from minillm.models.llama import fuse_split
from minillm.run_folder import BEST_CONFIG_FILE, RunFolder
from minillm.tokenizers import Tokenizer, load_tokenizer
from minillm.version import stamp


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
              training: dict[str, Any], tokenizer_fingerprint: str | None = None,
              init_from: dict[str, Any] | None = None) -> None:
    """Save best_model.pt and best_model_config.json (weights first, so the config never points ahead).

    `tokenizer_fingerprint` (Tokenizer.fingerprint()) lets a load tell the run's own tokenizer from another
    one of the same kind and size; `init_from` is where the run started (training.init_from's record).
    """
    folder = RunFolder(run_dir)
    state = clean_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_torch(folder.best_model, state)
    write_json(folder.best_config, {
        **stamp(),
        "model": config.to_dict(),
        "tokenizer_type": tokenizer_type,
        **({"tokenizer_fingerprint": tokenizer_fingerprint} if tokenizer_fingerprint else {}),
        **({"init_from": init_from} if init_from else {}),
        "training": training,
    })


def read_model_config(config_path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
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
    """A loaded run: the model (eval mode, on its device), its tokenizer, config and metadata, and the run
    folder it was loaded from (the folder of its model file: where its split, metrics and test scores are)."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    info: dict[str, Any]  # tokenizer_type, training summary, paths
    device: torch.device
    folder: RunFolder


def check_compatible(config: ModelConfig, tokenizer: Tokenizer, where: str = "") -> None:
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


def check_finite(state: dict[str, Any], path: str | Path) -> None:
    """Refuse weights holding NaN or Inf (a damaged file, or a diverged training): they would generate
    garbage, and an export would carry them on, without a word."""
    bad = [name for name, value in state.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise MiniLLMError(f"checkpoint {path} holds weights that are not numbers (NaN or Inf) in {listed}: the "
                           "file is damaged; restore it from a copy, or retrain")


def check_tokenizer(config: ModelConfig, meta: dict[str, Any], tokenizer: Tokenizer, tokenizer_path: Path,
                    model_path: Path) -> None:
    """Refuse a tokenizer that is not the one the model was trained with: its size and special ids, its kind,
    and its fingerprint (recorded in best_model_config.json, `meta`), which tells apart two of the same size."""
    check_compatible(config, tokenizer, f" ({model_path} and {tokenizer_path})")
    expected = meta.get("tokenizer_type")
    if expected is not None and expected != tokenizer.kind:
        raise MiniLLMError(
            f"the model in {model_path} was trained with a {expected!r} tokenizer but {tokenizer_path} "
            f"is a {tokenizer.kind!r} tokenizer; use the tokenizer.json from the same run"
        )
    expected_fingerprint = meta.get("tokenizer_fingerprint")
    if expected_fingerprint is not None and expected_fingerprint != tokenizer.fingerprint():
        raise MiniLLMError(
            f"{tokenizer_path} is not the tokenizer the model in {model_path} was trained with (same kind and "
            "size, other tokens: its fingerprint differs); use the tokenizer.json saved in the same run folder"
        )


def load_model_files(model_path: str | Path, tokenizer_path: str | Path, config_path: str | Path | None = None,
                     device: str | torch.device | None = None) -> Run:
    """Load a model from explicit paths; the config defaults to best_model_config.json beside the weights."""
    model_path, tokenizer_path = Path(model_path), Path(tokenizer_path)
    config_path = Path(config_path) if config_path else model_path.parent / BEST_CONFIG_FILE
    tokenizer = load_tokenizer(tokenizer_path)
    config, meta = read_model_config(config_path)
    check_tokenizer(config, meta, tokenizer, tokenizer_path, model_path)
    device = pick_device(device)
    model = build_model(config)
    state = load_torch(model_path)
    if not isinstance(state, dict):
        raise MiniLLMError(f"checkpoint {model_path} does not hold a state_dict; retrain or pick another file")
    state = fuse_split(clean_state_dict(state))  # (checkpoints from before the projections were fused)
    check_finite(state, model_path)
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
    return Run(model=model, tokenizer=tokenizer, config=config, info=info, device=device,
               folder=RunFolder(model_path.parent))


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> Run:
    """Load the best model of a run folder with its tokenizer, after checking they belong together."""
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise MiniLLMError(f"run folder not found: {run_dir}; train one with `minillm train --out {run_dir}`")
    folder.finish_swaps_for_reading()  # a new run that a killed training had begun to move in
    if not folder.best_model.is_file():
        raise MiniLLMError(f"{run_dir} has no {folder.best_model.name}: training has not saved a model there yet")
    return load_model_files(folder.best_model, folder.tokenizer, folder.best_config, device)


def write_train_config(run_dir: str | Path, config: TrainConfig, model_config: ModelConfig) -> None:
    """Record the TrainConfig a run is trained with (train_config.json); resume and evaluate read it back. With it
    the model's shape as asked (its options: no tokenizer fields), so that the file is a recipe that repeats
    the run (`minillm train --config`). The model config a run loads is best_model_config.json's."""
    model = {k: v for k, v in model_config.to_dict().items() if k not in TOKENIZER_FIELDS}
    write_json(RunFolder(run_dir).train_config, {**stamp(), "model": model, "train": config.to_dict()})


def read_train_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was trained with (train_config.json)."""
    path = RunFolder(run_dir).train_config
    raw = read_json(path, "training config")
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict):
        raise MiniLLMError(f"{path} has no \"train\" section; retrain the run")
    try:
        return TrainConfig.from_dict(raw["train"])
    except MiniLLMError as e:
        raise MiniLLMError(f"training config {path}: {e}") from None
