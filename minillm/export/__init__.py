"""Export a run's best model into other tools' formats, as a registry of formats (name -> ExportFormat).

    export_run("runs/demo", "hf", "exports/demo-hf")          # transformers: AutoModelForCausalLM, AutoTokenizer
    export_run("runs/demo", "gguf", "exports/demo.gguf")      # llama.cpp (and Ollama, LM Studio)
    export_run("runs/seq2seq", "safetensors", "exports/s2s")  # any kind: weights + Mini LLM's config

A format is asked what it can do (`refusal(run)`: why it cannot take this run, or None); the CLI never
names a format. The libraries a format writes with (transformers, safetensors, gguf) are the optional
`export` extra, imported here only; a missing one is one line saying what to install.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from minillm.checkpoint import load_run
from minillm.errors import MiniLLMError
from minillm.export.base import EXPORT_DTYPES, ExportFormat
from minillm.export.gguf import GGUF_FORMAT
from minillm.export.hf import HF_FORMAT
from minillm.export.weights import SAFETENSORS_FORMAT

__all__ = ["EXPORT_DTYPES", "EXPORT_FORMATS", "ExportFormat", "export_format", "export_run"]

# The formats by name; a new one is a module with an ExportFormat and one entry here.
EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (HF_FORMAT, GGUF_FORMAT, SAFETENSORS_FORMAT)}


def export_format(name: str) -> ExportFormat:
    """The format called `name`; an unknown name is refused with the known ones."""
    if name not in EXPORT_FORMATS:
        raise MiniLLMError(f"unknown export format {name!r}; choose one of {sorted(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[name]


def export_run(run_dir: str | Path, format_name: str, out: str | Path, dtype: str = "float32",
               overwrite: bool = False) -> Path:
    """Write the best model of `run_dir` as `format_name` into `out`; returns `out`.

    The output appears whole or not at all (written beside it, then moved in). An existing `out` is
    replaced only with `overwrite`, and a folder only when it holds nothing but this format's files.
    """
    fmt = export_format(format_name)
    if dtype not in EXPORT_DTYPES:
        raise MiniLLMError(f"unknown export dtype {dtype!r}; choose one of {list(EXPORT_DTYPES)}")
    out = Path(out)
    _check_target(fmt, out, overwrite)
    run = load_run(run_dir, "cpu")
    reason = fmt.refusal(run)
    if reason:
        raise MiniLLMError(f"cannot export {run_dir} as {fmt.name}: {reason}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        target = staging / out.name  # (the final name: a model card may mention it)
        fmt.write(run, target, dtype)
        if out.is_dir():
            shutil.rmtree(out)
        target.replace(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _check_target(fmt: ExportFormat, out: Path, overwrite: bool) -> None:
    """Refuse to write over something the user did not ask to replace (or that is not an export)."""
    if not out.exists():
        return
    if fmt.folder != out.is_dir():
        kind = "a folder" if out.is_dir() else "a file"
        raise MiniLLMError(f"--out {out} is {kind}, but the {fmt.name} format writes "
                           f"{'a folder' if fmt.folder else 'one file'}; pick another --out")
    if out.is_dir() and not any(out.iterdir()):
        return
    if not overwrite:
        raise MiniLLMError(f"{out} already exists; pass --overwrite to replace it or pick another --out")
    if out.is_file():
        with out.open("rb") as f:
            if f.read(len(fmt.file_magic)) != fmt.file_magic:
                raise MiniLLMError(f"{out} is not a {fmt.name} file, so --overwrite will not replace it; "
                                   "pick another --out")
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in fmt.file_names)
    if foreign:
        raise MiniLLMError(f"{out} holds files that a {fmt.name} export does not write ({', '.join(foreign[:3])}), "
                           "so --overwrite will not delete it; pick another --out")
