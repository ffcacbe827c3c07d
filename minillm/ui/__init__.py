"""The Gradio web UI: `minillm ui [RUN_DIR]` calls `launch`; `build_demo` returns the page itself.

Only Gradio lives here: the page (app.py), one module per tab (generate_tab.py, train_tab.py, with the
Train tab's view of a training in train_view.py) and what both tabs use (shared.py: the message boxes, the
names of uploads). What a server needs besides the page (loaded runs and their engines,
limits, sessions, the training manager) is minillm.serve's. Nothing imports this package but the CLI's `ui`
command, when it runs; `import minillm` never needs gradio.
"""

from __future__ import annotations

import os
from typing import Any

# Before gradio is imported (by any module of the UI, all of which import this package first): no
# analytics or telemetry calls; it works offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__all__ = ["build_demo", "launch"]


def build_demo(*args: Any, **kwargs: Any):
    """The UI as a gr.Blocks; see minillm.ui.app.build_demo."""
    from minillm.ui.app import build_demo as _build_demo

    return _build_demo(*args, **kwargs)


def launch(*args: Any, **kwargs: Any) -> None:
    """Serve the UI (127.0.0.1:7860 by default); see minillm.ui.app.launch."""
    from minillm.ui.app import launch as _launch

    _launch(*args, **kwargs)
