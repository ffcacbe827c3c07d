"""The Gradio web UI: `minillm ui [RUN_DIR]` calls `launch`; `build_demo` returns the page itself.

Gradio is imported lazily (only when the UI is used), so `import minillm` never needs it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_demo", "launch", "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_RUNS_DIR"]

# Here, not in app.py, so the CLI can show them in its help without importing gradio.
DEFAULT_HOST = "127.0.0.1"  # local only; a public link needs --share
DEFAULT_PORT = 7860
DEFAULT_RUNS_DIR = "runs"


def build_demo(*args: Any, **kwargs: Any):
    """The UI as a gr.Blocks; see minillm.ui.app.build_demo."""
    from minillm.ui.app import build_demo as _build_demo

    return _build_demo(*args, **kwargs)


def launch(*args: Any, **kwargs: Any) -> None:
    """Serve the UI (127.0.0.1:7860 by default); see minillm.ui.app.launch."""
    from minillm.ui.app import launch as _launch

    _launch(*args, **kwargs)
