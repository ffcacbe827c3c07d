"""`minillm serve`: its options and the command (the server itself is minillm.serve.http's)."""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from minillm.errors import MiniLLMError
from minillm.serve.address import DEFAULT_API_PORT, DEFAULT_HOST, DEFAULT_RUNS_DIR, MAX_PORT, MIN_PORT
from minillm.serve.batching import DEFAULT_MAX_ROWS, WAITING_PER_ROW, BatchSettings
from minillm.serve.limits import ServerLimits

API_KEY_VARIABLE = "MINILLM_API_KEY"  # `minillm serve`'s key when --api-key is not given


def add_serve_command(commands: argparse._SubParsersAction, port: Callable[[str], int]) -> None:
    """The serve command's options (`port`: the CLI's --port type)."""
    serve = commands.add_parser(
        "serve", help="serve runs over an OpenAI-compatible HTTP API (needs the 'serve' extra)",
        description="Serve the run RUN_DIR, or every run under RUNS_DIR (each named by its folder), over OpenAI's "
                    "HTTP API (/v1/models, /v1/completions, /v1/chat/completions) at http://HOST:PORT/v1.")
    serve.add_argument("path", nargs="?", type=Path, default=Path(DEFAULT_RUNS_DIR), metavar="RUN_DIR | RUNS_DIR",
                       help=f"a run folder, or a folder of runs (default: {DEFAULT_RUNS_DIR})")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to serve on (default {DEFAULT_HOST}: this "
                       "machine only; any other address needs --api-key, or it starts with a warning)")
    serve.add_argument("--port", type=port, default=DEFAULT_API_PORT,
                       help=f"port to serve on, {MIN_PORT}-{MAX_PORT} (default {DEFAULT_API_PORT})")
    serve.add_argument("--api-key", help=f"the key clients must send (Authorization: Bearer KEY; default: "
                       f"${API_KEY_VARIABLE}, else none)")
    serve.add_argument("--compile", action="store_true", help="compile each run's batched decode step in the "
                       "background when it loads (served eagerly until it is ready; the same tokens)")
    serve.add_argument("--max-batch", type=_whole(1), default=DEFAULT_MAX_ROWS, metavar="N",
                       help=f"generations of one run decoded together (default {DEFAULT_MAX_ROWS})")
    serve.add_argument("--max-queue", type=_whole(0), metavar="N", help="generations of one run that may wait "
                       f"for a row (default {WAITING_PER_ROW} x --max-batch); more are refused (429, retry later)")
    serve.add_argument("--max-loaded", type=_whole(1), default=ServerLimits.max_loaded_runs, metavar="N",
                       help=f"runs kept in memory, least recently used out (default {ServerLimits.max_loaded_runs})")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API (repeatable)")
    serve.set_defaults(func=cmd_serve)


def _whole(low: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        if not text.strip().isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {low}, got {text!r}")
        return int(text)

    return convert


def cmd_serve(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise MiniLLMError("the HTTP API needs fastapi and uvicorn: pip install 'mini-llm[serve]'")
    from minillm.serve.http import APIOptions, serve

    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    limits = ServerLimits(max_loaded_runs=args.max_loaded)
    waiting = args.max_batch * WAITING_PER_ROW if args.max_queue is None else args.max_queue
    batch = BatchSettings(args.max_batch, waiting, compile=args.compile)
    options = APIOptions(args.path, api_key, limits, batch, tuple(args.cors_origin))
    serve(options, args.host, args.port)
    return 0
