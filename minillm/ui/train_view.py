"""The Train tab's view of a training, drawn from its TrainingStatus whenever a page asks (a new page, a
reload, each poll that finds something new): the progress table, the loss curve, and the warnings as the
page words them.

The loss curve is drawn here, on the server, from the status's rows (the job's own metrics: a resumed run's
history and the rows since), as an inline SVG with its legend inside the axes: the page shows the curve the
rows make, whatever it missed before, at any width.
"""

from __future__ import annotations

import html
import io
import re
import threading

import matplotlib

from minillm.serve.training_manager import FAILED, RUNNING, STOPPED, STOPPING, TrainingStatus
from minillm.training.metrics import loss_figure
from minillm.training.preview import describe_seconds

CURVE_SIZE_INCHES = (5.6, 3.4)  # drawn at this size, shown at the column's width (its text scales)
_draw_lock = threading.Lock()  # matplotlib's settings are global; one drawing at a time
_FLAG = re.compile(r"--[a-z][a-z0-9-]*")
_PARENTHESES = re.compile(r"\s*\(([^()]*)\)")


def for_the_form(text: str, flag_labels: dict[str, str]) -> str:
    """A trainer's message worded for the page: a CLI option the form has becomes the form field's name; an
    aside (in parentheses) about an option it does not have is left out (the page cannot act on it)."""

    def aside(match: re.Match) -> str:
        flags = _FLAG.findall(match.group(1))
        return "" if any(flag not in flag_labels for flag in flags) else match.group(0)

    text = _PARENTHESES.sub(aside, text)
    return _FLAG.sub(lambda m: f"**{flag_labels[m.group(0)]}**" if m.group(0) in flag_labels else m.group(0), text)


def _overfitting_is_stale(status: TrainingStatus) -> bool:
    """Whether a better model came after the evaluation that found the overfitting (the warning names the
    best step of its moment, and the model has since improved)."""
    evals = [row for row in status.rows if row.get("kind") == "eval"]
    warned = next((row for row in evals if row.get("overfitting")), None)
    return warned is not None and evals[-1].get("best_step") != warned.get("best_step")


def page_warnings(status: TrainingStatus | None, flag_labels: dict[str, str]) -> str:
    """The training's warnings that still hold, newest last, worded for the page ("" when none)."""
    if status is None:
        return ""
    shown: list[str] = []
    for line in status.warnings:
        if line.startswith("overfitting") and _overfitting_is_stale(status):
            continue
        line = for_the_form(line, flag_labels)
        if line not in shown:
            shown.append(line)
    return "\n\n".join(shown)


def _figure(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def status_markdown(status: TrainingStatus | None, flag_labels: dict[str, str] | None = None) -> str:
    """What the run is doing or how it ended, then its figures as a two-column table (step, losses, learning
    rate, tokens/s, elapsed, ETA: it fits a phone's width), then what it said last."""
    if status is None:
        return "No training yet: fill in the form and press **Start training**."
    train_row, eval_row = status.latest("train"), status.latest("eval")
    of = f" / {status.max_steps:,}" if status.max_steps else ""
    eta = status.eta()
    best = (f" (best {_figure(eval_row.get('best_val_loss'))} at step {eval_row.get('best_step')})"
            if eval_row else "")
    rate = train_row.get("tokens_per_s")
    rows = [("Step", f"{status.step:,}{of}"), ("Train loss", _figure(train_row.get("train_loss"))),
            ("Validation loss", _figure(eval_row.get("val_loss")) + best),
            ("Learning rate", f"{train_row['lr']:.2e}" if "lr" in train_row else "–"),
            ("Tokens/s", f"{rate:,.0f}" if isinstance(rate, (int, float)) else "–"),
            ("Elapsed", describe_seconds(status.elapsed)), ("ETA", describe_seconds(eta) if eta is not None else "–")]
    (head_key, head_value), *rows = rows
    table = f"| {head_key} | {head_value} |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    folder = f"`{html.escape(str(status.run_dir))}`"
    if status.state in (RUNNING, STOPPING):
        doing = "stopping: evaluating and saving" if status.state == STOPPING else (
            "training" if status.rows else "preparing the data and the model")
        head = f"**Training** {folder}: {doing}"
    elif status.state == FAILED:
        head = f"**Failed** {folder}: {html.escape(status.error)}"
    else:
        r = status.result
        test = (f"; test loss {_figure(r.get('loss'))}, perplexity {_figure(r.get('perplexity'), 2)}, "
                f"{_figure(r.get('bits_per_byte'), 3)} bits per byte" if r.get("loss") is not None else "")
        saved = (f"**Stopped** at step {r['steps']:,}: saved (best model and last.pt); **Resume** continues it to "
                 "the form's **Max steps** and **Time budget (s)**" if status.state == STOPPED
                 else f"**Finished** ({r['stop_reason']}) after {r['steps']:,} steps")
        head = (f"{saved}. {folder}: best validation loss {_figure(r['best_val_loss'])} at step {r['best_step']:,}"
                f"{test}. It is in the Generate tab's run picker.")
    last = next((line for line in reversed(status.log) if not line.startswith("warning:")), "")
    last = for_the_form(last, flag_labels or {})
    return f"{head}\n\n{table}" + (f"\n\n`{html.escape(last)}`" if last else "")


def curve_counts(status: TrainingStatus | None) -> tuple[int, int]:
    """(train points, validation points) the curve of `status` has."""
    rows = status.rows if status else []
    return (sum(row.get("kind") == "train" and isinstance(row.get("train_loss"), (int, float)) for row in rows),
            sum(row.get("kind") == "eval" and isinstance(row.get("val_loss"), (int, float)) for row in rows))


def curve_caption(status: TrainingStatus | None) -> str:
    train, val = curve_counts(status)
    return f"{train} train and {val} validation points" if train or val else "no points yet"


def curve_html(status: TrainingStatus | None) -> str:
    """The loss curve of `status` as an inline SVG (text kept as text, so it stays sharp at any size), with
    a caption that counts its points; only the caption before the first point."""
    caption = f'<p class="curve-caption">{curve_caption(status)}</p>'
    if status is None or not any(curve_counts(status)):
        return caption
    with _draw_lock, matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "minillm"}):
        buffer = io.StringIO()
        loss_figure(status.rows, status.run_dir.name, CURVE_SIZE_INCHES).savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # (no XML prolog or doctype inside the page)
    return f'<figure class="curve">{svg}{caption}</figure>'
