"""The declared requirements hold what the code needs: pyproject's torch floor is at least the version that
brought each torch feature the code uses."""

from __future__ import annotations

import re
from functools import reduce
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# The torch features Mini LLM uses that older releases lack, with the release that brought each (from the
# PyTorch release notes). A feature the code starts to use goes here; the floor must then reach it.
TORCH_FEATURES = {
    "optim.Muon": (2, 9),  # --optimizer muon, the cpu preset's (training/optimizer.py)
    "compiler.set_stance": (2, 6),  # the compiled decode skips guard checks after its first call (engine.py)
    "OutOfMemoryError": (2, 5),  # the CLI's out-of-memory message (cli.py)
    "nn.functional.rms_norm": (2, 4),  # the models' RMSNorm (models/layers.py)
    "compiler.is_compiling": (2, 3),  # models/layers.py
    "amp.GradScaler": (2, 3),  # the trainer's loss scaling, torch.amp's device-generic form
}


def declared_torch_floor() -> tuple[int, ...]:
    """The `torch>=X.Y` of pyproject.toml's dependencies, as (X, Y)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    found = re.findall(r'^\s*"torch>=([0-9][0-9.]*)"', text, flags=re.M)
    assert len(found) == 1, f"pyproject.toml should declare torch>=X.Y once, found {found}"
    return tuple(int(part) for part in found[0].split("."))


def test_every_listed_torch_feature_exists_here():
    # (So the table names real attributes: a misspelt one would make the floor check vacuous.)
    missing = []
    for path in TORCH_FEATURES:
        try:
            reduce(getattr, path.split("."), torch)
        except AttributeError:
            missing.append(path)
    assert missing == []
    assert F.rms_norm is torch.nn.functional.rms_norm


def test_the_declared_torch_floor_has_every_feature_the_code_uses():
    floor = declared_torch_floor()
    newest = max(TORCH_FEATURES.values())
    too_new = {path: version for path, version in TORCH_FEATURES.items() if version > floor}
    assert too_new == {}, f"pyproject declares torch>={'.'.join(map(str, floor))} but the code uses {too_new}"
    assert floor >= newest


def test_no_module_asks_for_a_newer_torch_than_declared():
    """A message or comment such as "needs PyTorch 2.9 or newer" names a version the floor must reach."""
    floor = declared_torch_floor()
    named = {f"{path.name}: {a}.{b}" for path in ROOT.joinpath("minillm").rglob("*.py")
             for a, b in re.findall(r"(?:PyTorch|torch) ([0-9]+)\.([0-9]+) or newer", path.read_text(encoding="utf-8"))
             if (int(a), int(b)) > floor}
    assert named == set()


def test_the_license_file_pyproject_and_what_exports_carry_agree():
    from minillm.version import LICENSE

    declared = re.findall(r'^license = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), flags=re.M)
    assert declared == [LICENSE] == ["MIT"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text
    assert "exports/" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()
