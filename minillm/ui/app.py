"""The web UI's page: a Generate tab (load a run, generate from it with the output streaming in) and a Train
tab (train a run from the browser), and `launch`, which serves it.

The tabs (generate_tab.py, train_tab.py) hold the components and the handlers; their handlers only call the
library, the same functions the CLI uses. Every failure becomes a readable message in the page's error box
and the app keeps working. What the page serves from is the server's, not the page's (minillm.serve): the
loaded runs, shared read-only by every tab and API client that loads the same files (at most
ServerLimits.max_loaded_runs of them, released when the tabs that use them close), each generating through
its one batch scheduler (with `compile`, its decode steps compile in the background when it loads), each
client's Session (looked up by the request's session hash), and one TrainingManager.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from minillm.errors import MiniLLMError
from minillm.serve.address import DEFAULT_HOST, DEFAULT_RUNS_DIR, DEFAULT_UI_PORT, check_can_serve, network_warning

try:
    import gradio as gr
except ImportError:  # gradio is the optional "ui" extra
    raise MiniLLMError("the web UI needs gradio: pip install 'mini-llm[ui]'") from None

from minillm.serve.access import DataAccess
from minillm.serve.batching import WAITING_PER_ROW, BatchSettings
from minillm.serve.limits import ServerLimits
from minillm.serve.run_cache import RunCache, load_read_only
from minillm.serve.sessions import Sessions
from minillm.serve.training_manager import TrainingManager
from minillm.ui.generate_tab import GenerateTab
from minillm.ui.shared import client_of, upload_folder
from minillm.ui.train_tab import TrainTab

# Events of all tabs running at once (loads and generations); more would only split the same CPU cores.
CONCURRENCY_LIMIT = 2
# Generations of one run decoded together: the Generate box and the chat view each run CONCURRENCY_LIMIT at
# once (a batch's KV cache is made for all its rows: no more than the page can use).
BATCH_ROWS = 2 * CONCURRENCY_LIMIT
# The short UI-state steps skip the concurrency limit, so they never wait behind a generation.
QUICK = dict(concurrency_limit=None, show_progress="hidden", queue=True)
TITLE = "Mini LLM"
CSS = """
#error { border: 1px solid var(--error-border-color, #ef4444); border-radius: 8px; padding: 4px 12px;
         background: var(--error-background-fill, #fef2f2); }
#warning { border: 1px solid #f59e0b; border-radius: 8px; padding: 4px 12px; background: #fffbeb; }
#output textarea { font-family: var(--font-mono); }
#train_error { border: 1px solid var(--error-border-color, #ef4444); border-radius: 8px; padding: 4px 12px;
               background: var(--error-background-fill, #fef2f2); }
#train_warning { border: 1px solid #f59e0b; border-radius: 8px; padding: 4px 12px; background: #fffbeb; }
#train_plan pre, #train_plan code { white-space: pre-wrap !important; font-size: 0.85em; }
#train_plot svg { width: 100%; height: auto; display: block; }
#train_plot figure { margin: 0; }
#train_plot .curve-caption { margin: 4px 0 0; font-size: var(--text-sm); color: var(--body-text-color-subdued); }
/* The two-column tables (name, value): a name on one line, a value never broken inside a number (a path
   may break anywhere). (No selector lists inside :is(): Gradio prefixes each item of a list.) */
#train_status table { width: auto; }
#train_status td, #train_status th, #model_info td, #model_info th { overflow-wrap: normal; word-break: normal; }
#train_status td:first-child, #train_status th:first-child, #model_info td:first-child, #model_info th:first-child {
  white-space: nowrap; }
#model_info td:last-child, #model_info th:last-child { overflow-wrap: anywhere; }
/* A phone: the Generate tab's parts in the order they are used (pick and load a run, write a prompt,
   Generate, read the output), then the sampling settings, then the run's files and details. */
@media (max-width: 640px) {
  #generate_columns > .column { display: contents; }
  #generate_columns > .column > * { flex: 1 1 100%; min-width: 0; }
  #generate_columns > .column > :has(#max_new_tokens) { order: 2; }
  #generate_columns > .column > :has(#model_type) { order: 3; }
  #generate_columns > .column > :has(#model_path) { order: 3; }
  #generate_columns > .column > #model_info { order: 3; }
  #generate_columns > .column > #run_curve { order: 3; }
}
"""


@dataclass
class Page:
    """The page and what it serves from: its tabs (components and handlers), the clients' sessions (on the
    run cache) and the training manager."""

    demo: gr.Blocks
    generate: GenerateTab
    train: TrainTab
    sessions: Sessions
    trainings: TrainingManager


def batch_settings(compile: bool = False) -> BatchSettings:
    """How the page's runs decode: BATCH_ROWS generations together; `compile`: in the background at load."""
    return BatchSettings(BATCH_ROWS, BATCH_ROWS * WAITING_PER_ROW, compile)


def build_page(run_dir: str | Path | None = None, runs_dir: str | Path = DEFAULT_RUNS_DIR,
               trainings: TrainingManager | None = None, limits: ServerLimits | None = None,
               runs: RunCache | None = None, data_dirs: Sequence[str | Path] = (), compile: bool = False) -> Page:
    """The page. With `run_dir` the paths are pre-filled and that run loads when the page opens.
    `trainings`, `runs`: the server's training manager and run cache (new ones by default). `data_dirs`:
    the folders whose files the Train tab may train on (besides uploads and the bundled corpus). `compile`:
    a loaded run's decode steps compile in the background (generations run eagerly until they are ready)."""
    runs_dir = str(runs_dir)
    run_dir = str(run_dir) if run_dir else None
    limits = limits or ServerLimits()
    load = functools.partial(load_read_only, batch=batch_settings(compile))
    sessions = Sessions(runs or RunCache(limits.max_loaded_runs, load))
    trainings = trainings or TrainingManager()  # one training at a time on this server, seen by every tab
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nTrain a model on your text, or load a trained run, and generate text from it.")
        with gr.Tabs(selected="generate") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="generate_tab"):
                generate = GenerateTab(sessions, limits, runs_dir, run_dir, compile)
            with gr.Tab("Train", id="train", elem_id="train_tab"):
                train = TrainTab(trainings, runs_dir, generate, tabs, DataAccess(data_dirs, upload_folder()))
        generate.wire(QUICK)

        def close_session(request: gr.Request) -> None:
            """The tab was closed or reloaded (or an API client went away): its session ends, its model is
            released."""
            sessions.close(client_of(request))

        demo.unload(close_session)
        # The run picker as the runs folder is now, not as it was when the server started.
        demo.load(generate.refresh_runs, generate.run_picker, generate.run_picker, api_name=False, **QUICK)
        if run_dir:  # `minillm ui RUN_DIR`: load that run as soon as the page opens
            generate.load_after(demo.load(generate.start_loading, None, generate.load_button, api_name=False,
                                          **QUICK), QUICK)
        train.wire(QUICK, demo)
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT)
    return Page(demo, generate, train, sessions, trainings)


def build_demo(run_dir: str | Path | None = None, runs_dir: str | Path = DEFAULT_RUNS_DIR,
               trainings: TrainingManager | None = None, data_dirs: Sequence[str | Path] = (),
               compile: bool = False) -> gr.Blocks:
    """The page as a gr.Blocks; see build_page."""
    return build_page(run_dir, runs_dir, trainings, data_dirs=data_dirs, compile=compile).demo


def launch(run_dir: str | Path | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_UI_PORT,
           runs_dir: str | Path = DEFAULT_RUNS_DIR, share: bool = False, data_dirs: Sequence[str | Path] = (),
           compile: bool = False) -> None:
    """Serve the UI until interrupted: on 127.0.0.1 only, unless `host` or `share` says otherwise. The Train
    tab trains on uploads, the bundled corpus and the files under `data_dirs` (`--data-dir`) only. `compile`:
    each loaded run's decode steps compile in the background (see build_page)."""
    if run_dir and not Path(run_dir).is_dir():
        raise MiniLLMError(f"run folder not found: {run_dir}; train one with `minillm train --out {run_dir}`")
    DataAccess.check_folders(data_dirs)
    check_can_serve(host, port)  # before anything is printed: a busy or bad port is one error line
    warning = network_warning(host)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    trainings = TrainingManager()
    demo = build_demo(run_dir, runs_dir, trainings, data_dirs, compile)
    if share:
        print("note: --share makes a public link: anyone with it can use this model through your machine")
    try:
        demo.launch(server_name=host, server_port=port, share=share, quiet=not share, show_error=False, css=CSS,
                    footer_links=["api", "settings"], prevent_thread_lock=True)
    except OSError as e:  # taken between the check and the start
        reason = str(e).split(". ")[0].rstrip(".")
        raise MiniLLMError(f"cannot serve on {host}:{port} ({reason}); choose another port with --port") from None
    if not share:  # Gradio's own banner would suggest share=True; say where it is and how to stop it instead
        print(f"Mini LLM UI on http://{host}:{port} (Ctrl+C to stop)", flush=True)
    demo.block_thread()  # until Ctrl+C
    if trainings.stop():  # a training still running is saved, to be resumed, rather than cut off
        print("stopping the training: it evaluates and saves (Ctrl+C again to quit at once)", flush=True)
        trainings.wait()
