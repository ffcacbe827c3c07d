"""`minillm runs [FOLDER]`: the runs in a folder, one row each: its kind, size, data, steps, best validation
and test loss, and date (`--json`: the same as JSON objects, for scripts).

Read from each run's own files (best_model_config.json, split.json, metrics.jsonl, test_metrics.json); a file
that is missing or damaged leaves its columns empty rather than hiding the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path
from typing import Any

from minillm.checkpoint import read_model_config
from minillm.data.split_record import read_split_record
from minillm.errors import MiniLLMError
from minillm.files import read_json
from minillm.run_folder import RunFolder, find_runs
from minillm.serve.address import DEFAULT_RUNS_DIR
from minillm.training.metrics import read_metrics

COLUMNS = {"run": "run", "kind": "kind", "parameters": "size", "data": "data", "steps": "steps",
           "best_val_loss": "best val", "test_loss": "test", "date": "date"}
DATE_FORMAT = "%Y-%m-%d %H:%M"


def describe_run(path: Path) -> dict[str, Any]:
    """One run's row: name, path, kind (model/tokenizer/task), parameters, data file, steps trained, best
    validation loss (and its step), test loss, and when it last wrote (local time)."""
    folder = RunFolder(path)
    row: dict[str, Any] = {"run": path.name, "path": str(path), "kind": None, "parameters": None, "data": None,
                           "steps": None, "best_step": None, "best_val_loss": None, "test_loss": None, "date": None}
    try:
        config, meta = read_model_config(folder.best_config)
        training = meta.get("training", {}) if isinstance(meta.get("training"), dict) else {}
        row.update(parameters=training.get("parameters"), best_step=training.get("step"),
                   best_val_loss=training.get("val_loss"), data=_data_name(training.get("data")))
        kind = [config.model_type, meta.get("tokenizer_type")]
    except MiniLLMError:
        kind = [None, None]
    try:
        record = read_split_record(path)
        kind.append(record.task)
        row["data"] = row["data"] or _data_name(record.source)
    except MiniLLMError:
        kind.append(None)
    row["kind"] = "/".join(str(part) for part in kind if part) or None
    rows = read_metrics(folder.metrics)
    row["steps"] = max((r.get("step", 0) for r in rows if isinstance(r.get("step"), int)), default=None)
    try:
        test = read_json(folder.test_metrics, "test metrics") if folder.test_metrics.is_file() else {}
        row["test_loss"] = test.get("loss") if isinstance(test, dict) else None
    except MiniLLMError:
        pass
    times = [p.stat().st_mtime for p in (folder.best_model, folder.metrics, folder.test_metrics) if p.is_file()]
    if times:
        row["date"] = datetime.datetime.fromtimestamp(max(times)).strftime(DATE_FORMAT)
    return row


def _data_name(source: Any) -> str | None:
    """A data source as the table shows it: its file or folder name."""
    return Path(source).name or str(source) if isinstance(source, str) and source else None


def list_runs(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of the runs directly inside `folder` (those with a best model), newest first."""
    return [describe_run(path) for path in find_runs(folder)]


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if key == "parameters":
        return f"{value / 1e6:.2f}M"
    if key in ("best_val_loss", "test_loss"):
        return f"{value:.4f}"
    if key == "steps":
        return f"{value:,}"
    return str(value)


def runs_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (numbers right-aligned)."""
    table = [list(COLUMNS.values())] + [[_cell(key, row.get(key)) for key in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = {i for i, key in enumerate(COLUMNS) if key in ("parameters", "steps", "best_val_loss", "test_loss")}
    return "\n".join("  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip()
                     for line in table)


def add_runs_command(commands: argparse._SubParsersAction) -> None:
    """The CLI's `runs` command."""
    runs = commands.add_parser("runs", help="list the runs in a folder: kind, size, data, steps, losses, date")
    runs.add_argument("folder", nargs="?", type=Path, default=Path(DEFAULT_RUNS_DIR), metavar="FOLDER",
                      help=f"where the run folders are (default: {DEFAULT_RUNS_DIR})")
    runs.add_argument("--json", action="store_true", help="one JSON object per run, for scripts")
    runs.set_defaults(func=cmd_runs)


def cmd_runs(args: argparse.Namespace) -> int:
    runs = list_runs(args.folder)
    if args.json:
        print(json.dumps(runs, indent=2))
    else:
        print(runs_table(runs) if runs else f"no runs in {args.folder} (a run folder holds a best_model.pt)")
    return 0
