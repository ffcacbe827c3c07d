"""Export a run's best model into other tools' formats, as a registry of formats (name -> ExportFormat).

    export_run("runs/demo", "hf", "exports/demo-hf")          # transformers: AutoModelForCausalLM, AutoTokenizer
    export_run("runs/demo", "gguf", "exports/demo.gguf")      # llama.cpp (and Ollama, LM Studio)
    export_run("runs/seq2seq", "safetensors", "exports/s2s")  # any kind: weights + Mini LLM's config
    export_run("runs/demo", "gguf", "exports/demo-q8.gguf", dtype="q8_0")  # 8-bit blocks (gguf only)

A format is asked what it can do (`refusal(run)`: why it cannot take this run, or None); the CLI never
names a format. The libraries a format writes with (transformers, safetensors, gguf) are the optional
`export` extra, imported here only; a missing one is one line saying what to install. Where the output
goes, and what --overwrite may replace, is export.target's: the same for every format.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from minillm.checkpoint import load_run
from minillm.errors import MiniLLMError
from minillm.export.base import EXPORT_DTYPES, ExportFormat
from minillm.export.gguf import GGUF_FORMAT
from minillm.export.hf import HF_FORMAT
from minillm.export.target import ExportTarget
from minillm.export.weights import SAFETENSORS_FORMAT

__all__ = ["EXPORT_DTYPES", "EXPORT_FORMATS", "ExportFormat", "export_format", "export_run"]

# The formats by name; a new one is a module with an ExportFormat and one entry here.
EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (HF_FORMAT, GGUF_FORMAT, SAFETENSORS_FORMAT)}


def export_format(name: str) -> ExportFormat:
    """The format called `name`; an unknown name is refused with the known ones."""
    if name not in EXPORT_FORMATS:
        raise MiniLLMError(f"unknown export format {name!r}; choose one of {sorted(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[name]


def check_dtype(fmt: ExportFormat, dtype: str) -> None:
    """Refuse a --dtype that `fmt` does not write, naming the formats that do."""
    if dtype not in EXPORT_DTYPES:
        raise MiniLLMError(f"unknown export dtype {dtype!r}; choose one of {list(EXPORT_DTYPES)}")
    if dtype not in fmt.dtypes:
        writers = " or ".join(f.name for f in EXPORT_FORMATS.values() if dtype in f.dtypes)
        raise MiniLLMError(f"--format {fmt.name} writes {' or '.join(fmt.dtypes)} weights, not {dtype}; "
                           f"{dtype} is for --format {writers}")


def export_run(run_dir: str | Path, format_name: str, out: str | Path, dtype: str = "float32",
               overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write the best model of `run_dir` as `format_name` into `out`; returns `out`.

    The output appears whole or not at all, and an existing `out` is replaced only with `overwrite` and only
    when it is an earlier export (see export.target). `log` hears what was cleaned up from a killed export.
    """
    fmt = export_format(format_name)
    check_dtype(fmt, dtype)
    target = ExportTarget(fmt, out, overwrite, log)  # refused before the run is even read
    run = load_run(run_dir, "cpu")
    reason = fmt.refusal(run)
    if reason:
        raise MiniLLMError(f"cannot export {run_dir} as {fmt.name}: {reason}")
    with target.staging() as staged:
        fmt.write(run, staged, dtype)
        target.commit(staged)
    return Path(out)
