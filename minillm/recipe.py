"""A recipe: the options of a training in a JSON or YAML file, `minillm train --config FILE`.

    preset: tiny                # optional: the starting point (--preset on the command line wins)
    data: notes/                # any option by its field name (or its option name: block-size, vocab-size)
    d_model: 64
    learning_rate: 3.0e-3

or in sections, as every run's train_config.json is (so that file repeats its run exactly):

    {"model": {"d_model": 64, ...}, "train": {"data": "notes/", "learning_rate": 0.003, ...}}

Explicit options on the command line override the recipe, which overrides the preset. An unknown field is one
error naming it (and the nearest known one); so is a field the tokenizer sets (vocab_size, the special ids).
Paths in a recipe are read from the current folder, as on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.config import TOKENIZER_FIELDS, ModelConfig, TrainConfig
from minillm.errors import MiniLLMError
from minillm.version import VERSION_KEY

# Option names that are not field names (the CLI's aliases): --block-size, --vocab-size, --format, --model.
FIELD_ALIASES = {"block_size": "max_seq_len", "vocab_size": "bpe_vocab_size", "format": "data_format",
                 "model": "model_type"}
SECTIONS = {"model": ModelConfig, "train": TrainConfig}
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class Recipe:
    """What a recipe file sets: a preset (or None) and the fields of each config."""

    preset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


def _fields(cls: type) -> dict[str, str]:
    """Field name -> its annotation's base type ("int", "float", ...)."""
    return {f.name: str(f.type).replace(" | None", "").strip() for f in dataclasses.fields(cls)}


def _parse(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in YAML_SUFFIXES:
        try:
            import yaml
        except ImportError:
            raise MiniLLMError(f"recipe {path} is YAML, which needs PyYAML: pip install pyyaml (or write the recipe "
                               "as JSON)") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MiniLLMError(f"recipe {path} is not valid YAML ({' '.join(str(e).split())})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MiniLLMError(f"recipe {path} is not valid JSON (line {e.lineno}: {e.msg}); a YAML recipe needs a .yaml "
                           "or .yml name") from None


def read_recipe(path: str | Path) -> Recipe:
    """The recipe in a JSON or YAML file (a run's train_config.json is one); a bad one is a MiniLLMError."""
    path = Path(path)
    if not path.is_file():
        raise MiniLLMError(f"recipe not found: {path}; give a JSON or YAML file of options (any run's "
                           "train_config.json is one)")
    try:
        raw = _parse(path)
    except (OSError, UnicodeDecodeError) as e:
        raise MiniLLMError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(raw, dict):
        raise MiniLLMError(f"recipe {path} must hold a mapping of options (field: value), got "
                           f"{type(raw).__name__}")
    recipe = Recipe()
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name == VERSION_KEY:
            continue
        if name == "preset":
            if not isinstance(value, str):
                raise MiniLLMError(f"recipe {path}: preset must be a preset's name, got {value!r}")
            recipe.preset = value
        elif name in SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                _put(recipe, path, str(inner).replace("-", "_"), inner_value, SECTIONS[name])
        else:
            _put(recipe, path, FIELD_ALIASES.get(name, name), value, None)
    return recipe


def _put(recipe: Recipe, path: Path, name: str, value: Any, section: type | None) -> None:
    """Set one field in the recipe's model or train part (`section`: the one it was written in, if any)."""
    name = TrainConfig.RENAMED_FIELDS.get(name, name) if section is TrainConfig else name
    owners = [cls for cls in (section,) if cls] or list(SECTIONS.values())
    owner = next((cls for cls in owners if name in _fields(cls)), None)
    if name in TOKENIZER_FIELDS and owner is ModelConfig:
        raise MiniLLMError(f"recipe {path}: {name} comes from the tokenizer, not from a recipe; leave it out "
                           "(--vocab-size, bpe_vocab_size, sets a BPE tokenizer's size)")
    if owner is None:
        known = sorted({*_fields(ModelConfig), *_fields(TrainConfig), *FIELD_ALIASES} - set(TOKENIZER_FIELDS))
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        where = f"a {section.__name__} field" if section else "a model or training option"
        raise MiniLLMError(f"recipe {path}: unknown field {name!r}: not {where}{hint} (`minillm train --help` "
                           "lists them)")
    kind = _fields(owner)[name]
    if kind in ("int", "float") and isinstance(value, str):  # YAML reads 3e-3 (no dot) as text
        try:
            number = float(value)
            value = int(number) if kind == "int" and number.is_integer() else number
        except ValueError:
            pass  # (the config's own check names the field and the value)
    (recipe.model if owner is ModelConfig else recipe.train)[name] = value


def with_recipe(path: str | Path | None, model_overrides: dict[str, Any],
                train_overrides: dict[str, Any]) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """(preset, model fields, train fields): a recipe's (none without `path`) under the explicit options."""
    recipe = read_recipe(path) if path is not None else Recipe()
    return recipe.preset, {**recipe.model, **model_overrides}, {**recipe.train, **train_overrides}
