"""What training leaves behind for people: metrics.jsonl (one JSON row per log step and per eval) and
loss_curve.png (train and validation loss by step)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from minillm.files import atomic_write

PLOT_SIZE_INCHES = (7.0, 4.2)
PLOT_DPI = 110


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    """Appends rows to metrics.jsonl; `truncate_after(step)` drops rows logged after a resumed checkpoint."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        if not self.enabled:
            return
        rows = [row for row in read_metrics(self.path) if row.get("step", 0) <= step]
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in rows)), mode="w")


def prepare_plotting() -> None:
    """Import matplotlib's figure and PNG writer now, before a training's clock starts: the import takes a
    second or more, which the first evaluation's plot would otherwise take out of a short time budget."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def loss_figure(rows: list[dict[str, Any]], title: str = "", size_inches: tuple[float, float] = PLOT_SIZE_INCHES):
    """Train and validation loss by step, from metrics rows, as a matplotlib Figure (made without pyplot: no
    global state, so a server may draw in several threads; nothing to close)."""
    from matplotlib.figure import Figure

    train = _points(rows, "train", "train_loss")
    val = _points(rows, "eval", "val_loss")
    fig = Figure(figsize=size_inches)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), label="val loss", color="tab:orange", marker="o", markersize=3)
        best_step, best = min(val, key=lambda point: point[1])
        ax.axhline(best, color="tab:orange", linestyle=":", linewidth=1)
        ax.annotate(f"best {best:.3f}", (best_step, best), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.set_title(title or "Mini LLM training")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    return fig


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Draw train and validation loss by step from metrics.jsonl into a PNG (written atomically)."""
    buffer = io.BytesIO()
    loss_figure(read_metrics(metrics_path), title).savefig(buffer, format="png", dpi=PLOT_DPI)
    atomic_write(png_path, lambda f: f.write(buffer.getvalue()))


def _points(rows: list[dict[str, Any]], kind: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of the rows of one kind whose value is a finite number."""
    points = []
    for row in rows:
        value = row.get(key)
        if row.get("kind") == kind and isinstance(value, (int, float)) and math.isfinite(value):
            points.append((row["step"], value))
    return points
