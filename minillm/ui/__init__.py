"""The Gradio web UI: `minillm ui [RUN_DIR]` calls `launch`; `build_demo` returns the page itself.

Gradio is imported lazily (only when the UI is used), so `import minillm` never needs it.
"""

from __future__ import annotations

import os
from typing import Any

from minillm.ui.settings import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_RUNS_DIR

# Before gradio is imported (by any module of the UI): no analytics or telemetry calls; it works offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__all__ = ["build_demo", "launch", "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_RUNS_DIR"]



def build_demo(*args: Any, **kwargs: Any):
    """The UI as a gr.Blocks; see minillm.ui.app.build_demo."""
    from minillm.ui.app import build_demo as _build_demo

    return _build_demo(*args, **kwargs)


def launch(*args: Any, **kwargs: Any) -> None:
    """Serve the UI (127.0.0.1:7860 by default); see minillm.ui.app.launch."""
    from minillm.ui.app import launch as _launch

    _launch(*args, **kwargs)
