"""Where the UI serves by default; gradio-free, so the CLI can show these in its help."""

DEFAULT_HOST = "127.0.0.1"  # local only; a public link needs --share
DEFAULT_PORT = 7860
DEFAULT_RUNS_DIR = "runs"
