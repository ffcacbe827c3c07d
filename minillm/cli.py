"""The `minillm` command: train, generate, evaluate, export, ui, serve. A thin layer: parse arguments, call the
library.

    minillm train [DATA ...] --tokenizer {bpe,char} --model {decoder_only,transformer} --out RUN_DIR
    minillm train --config RECIPE.yaml [options that override it]
    minillm generate RUN_DIR --prompt "ROMEO:" [--num-samples 3] [--stop STRING] [--prompt-file FILE]
    minillm chat RUN_DIR [--system TEXT]
    minillm evaluate RUN_DIR [--data FILE]
    minillm export RUN_DIR --format {hf,gguf,safetensors} --out PATH [--dtype float16]
    minillm ui [RUN_DIR]
    minillm runs [FOLDER] [--json]
    minillm serve [RUN_DIR | RUNS_DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

`train` has an option for every ModelConfig and TrainConfig field (generated from the dataclasses,
`--d-model`, `--learning-rate`, ...); explicit options override the --preset. A problem the user can fix
(MiniLLMError) prints one line `error: ...` to stderr and exits with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from minillm.cli_serve import add_serve_command
from minillm.config import (
    DEFAULT_PRESET,
    PRESETS,
    TOKENIZER_FIELDS,
    ModelConfig,
    TrainConfig,
    field_choices,
    field_help,
    field_none_word,
    preset_configs,
)
from minillm.errors import MiniLLMError, describe_error, is_expected
from minillm.export import EXPORT_DTYPES, EXPORT_FORMATS, export_run
from minillm.models import is_encoder_decoder, model_kinds
from minillm.recipe import FIELD_ALIASES, with_recipe
from minillm.run_folder import default_run_name
from minillm.runs_list import add_runs_command
from minillm.sampling import SamplingConfig
from minillm.serve.address import (
    DEFAULT_HOST,
    DEFAULT_RUNS_DIR,
    DEFAULT_UI_PORT,
    MAX_PORT,
    MIN_PORT,
    check_port_number,
)
from minillm.version import __version__

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
FINAL_SAMPLE_TOKENS = 200  # the showcase sample printed at the end of `minillm train`
SAMPLE_PROMPT_TOKENS = 24  # ... its prompt's tokens at most (and at most half the context)

# ModelConfig fields that come from the trained tokenizer or have their own option, not a generated one.
MODEL_FIELDS_NOT_OPTIONS = ("model_type", *TOKENIZER_FIELDS)
TRAIN_FIELDS_NOT_OPTIONS = ("data", "tokenizer")
OPTION_ALIASES = {field: [f"--{alias.replace('_', '-')}"] for alias, field in FIELD_ALIASES.items()
                  if field != "model_type"}  # (--model has its own option)
NONE_WORDS = ("none", "off")
PRESET_HELP_WIDTH = 100

class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see `{self.prog} --help`)\n")


def _as_option(name: str, value: Any) -> str:
    """A config value as the train option that sets it: --d-model 32, --compile, --no-compile."""
    option = f"--{name.replace('_', '-')}"
    if isinstance(value, bool):
        return option if value else f"--no-{option[2:]}"
    return f"{option}\xa0{value:g}" if isinstance(value, float) else f"{option}\xa0{value}"


def presets_help(width: int = PRESET_HELP_WIDTH) -> str:
    """The end of `minillm train --help`: each preset's description and the options it sets."""
    lines = ["presets (explicit options override their values):"]
    for name, preset in PRESETS.items():
        lines.append(f"  {name}: {preset.description}")
        for part, values in (("model", preset.model), ("training", preset.train)):
            # A no-break space inside each "--option value" keeps the pair on one line.
            options = " ".join(_as_option(key, value) for key, value in values.items())
            lines += textwrap.wrap(f"{part}: {options}", width, initial_indent="    ", subsequent_indent="      ",
                                   break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines).replace("\xa0", " ")


def _port(text: str) -> int:
    """--port: a whole number in the range of TCP ports (argparse names the option in the error)."""
    try:
        return check_port_number(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from {MIN_PORT} to {MAX_PORT}, "
                                         f"got {text!r}") from None
    except MiniLLMError:
        raise argparse.ArgumentTypeError(f"must be from {MIN_PORT} to {MAX_PORT}, got {text}") from None


def _converter(base: type, optional: bool, none_words: Sequence[str] = NONE_WORDS) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if optional and text.strip().lower() in none_words:
            return None
        return base(text)

    convert.__name__ = base.__name__  # argparse names it in "invalid int value"
    return convert


def _add_config_options(group: argparse._ArgumentGroup, cls: type, prefix: str, skip: Sequence[str] = (),
                        show_defaults: bool = False) -> None:
    """One --option per dataclass field: --d-model for d_model, typed from the annotation, with the field's
    help, range and choices (and its default, with `show_defaults`)."""
    defaults = cls() if show_defaults else None
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        names = [f"--{f.name.replace('_', '-')}", *OPTION_ALIASES.get(f.name, [])]
        help_text = field_help(cls, f.name)
        if defaults is not None:
            default = getattr(defaults, f.name)
            help_text += f" (default: {'none' if default is None else default})"
        kwargs: dict[str, Any] = {"dest": f"{prefix}{f.name}", "default": argparse.SUPPRESS,
                                  "help": help_text.replace("%", "%%")}
        annotation = str(f.type)
        base_name = annotation.replace(" | None", "").strip()
        if base_name == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            base = {"int": int, "float": float, "str": str}[base_name]
            none_word = field_none_word(cls, f.name)
            kwargs["type"] = _converter(base, "None" in annotation, (none_word,) if none_word else NONE_WORDS)
            kwargs["metavar"] = base_name.upper()
            if field_choices(cls, f.name):
                kwargs["choices"] = field_choices(cls, f.name)
                kwargs.pop("metavar")
        group.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minillm", description="Train and use your own small language model.")
    parser.add_argument("--version", action="version", version=f"minillm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model on a text file (default: Tiny Shakespeare)",
                                description="Train a tokenizer and a model on DATA into a run folder.",
                                epilog=presets_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("data", nargs="*", metavar="DATA",
                       help="UTF-8 text files, TSV/JSONL pairs, folders or globs of them, parquet or arrow files, "
                            "a folder saved by datasets' save_to_disk (default: the bundled Tiny Shakespeare)")
    train.add_argument("--config", type=Path, metavar="RECIPE",
                       help="a JSON or YAML file of options (any run's train_config.json is one); explicit options "
                            "override it")
    train.add_argument("--tokenizer", dest="train__tokenizer", choices=field_choices(TrainConfig, "tokenizer"),
                       default=argparse.SUPPRESS,
                       help=f"{field_help(TrainConfig, 'tokenizer')} (default: {TrainConfig().tokenizer})")
    train.add_argument("--model", "--model-type", dest="model__model_type", choices=model_kinds(),
                       default=argparse.SUPPRESS,
                       help="decoder-only (GPT-style) or encoder-decoder transformer (default: decoder_only)")
    train.add_argument("--out", type=Path,
                       help=f"run folder (default: {DEFAULT_RUNS_DIR}/<data>-<model>-<tokenizer>)")
    train.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help=f"starting settings, overridden by a recipe and explicit options (default: the "
                            f"recipe's, else {DEFAULT_PRESET}; each preset's values are listed at the end)")
    existing = train.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue an interrupted run from its last.pt")
    existing.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_options(train.add_argument_group("model options"), ModelConfig, "model__",
                        MODEL_FIELDS_NOT_OPTIONS)
    _add_config_options(train.add_argument_group("training options"), TrainConfig, "train__",
                        TRAIN_FIELDS_NOT_OPTIONS)
    train.set_defaults(func=cmd_train)

    generate = commands.add_parser(
        "generate", help="generate text from a trained run",
        description="Stream text from a run's best model. stdout is the prompt followed by the "
                    "continuation (decoder-only), or the generated target (encoder-decoder).")
    generate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    generate.add_argument("--prompt", default="", help="text to continue (decoder-only) or the target prefix")
    generate.add_argument("--source", help="encoder-decoder input (default: --prompt)")
    generate.add_argument("--prompt-file", type=Path, metavar="FILE",
                          help="generate for each line of FILE (the prompt; an encoder-decoder's source) and write "
                               "JSON Lines: each line's samples, their token counts and stop reasons, the settings")
    generate.add_argument("--num-samples", type=int, default=1, metavar="N",
                          help="N samples of the prompt, decoded as one batch drawn from --seed (default 1)")
    generate.add_argument("--stop", action="append", default=[], metavar="STRING",
                          help="end a sample where its text reaches STRING, which is left out (repeatable; a "
                               "blank line in bash: --stop $'\\n\\n')")
    _add_config_options(generate.add_argument_group("sampling options"), SamplingConfig, "sampling__",
                        show_defaults=True)
    generate.add_argument("--compile", action="store_true",
                          help="compile the decode step first (seconds to a minute; faster per token "
                               "afterwards, the same tokens)")
    generate.add_argument("--device", default=None)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser(
        "chat", help="talk with a run trained on conversations, in the terminal",
        description="A conversation with a chat run (trained on a JSONL file of {\"messages\": [...]} lines): "
                    "the history is kept, answers stream; /system TEXT sets the system message, /reset starts "
                    "over, Ctrl-C stops an answer, Ctrl-D quits.")
    chat.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    chat.add_argument("--system", default="", help="the system message to start with (as in the training data)")
    _add_config_options(chat.add_argument_group("sampling options"), SamplingConfig, "sampling__", show_defaults=True)
    chat.add_argument("--compile", action="store_true", help="compile the decode step first (as generate's)")
    chat.add_argument("--device", default=None)
    chat.set_defaults(func=cmd_chat)

    evaluate = commands.add_parser("evaluate", help="loss, perplexity and bits per byte on the test split or a file")
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--data", type=Path, help="score this file instead of the test split")
    evaluate.add_argument("--test-tokens", type=_converter(int, True), default=argparse.SUPPRESS, metavar="INT",
                          help="score at most about this many tokens (a larger set gives an estimate from a "
                               "random sample, with its 95%% confidence); 'none': all (default: the run's setting)")
    evaluate.add_argument("--test-pairs", type=_converter(int, True), default=argparse.SUPPRESS, metavar="INT",
                          help="on pairs, also answer at most this many greedily (a seeded random sample of more) "
                               "and score the answers: exact match, character error rate, chrF and BLEU; 'none': "
                               "all (default: the run's setting)")
    evaluate.add_argument("--device", default=None)
    evaluate.set_defaults(func=cmd_evaluate)

    export = commands.add_parser(
        "export", help="write a run's best model for transformers (hf), llama.cpp (gguf) or as safetensors",
        description="Export the best model of RUN_DIR (needs the 'export' extra: pip install 'mini-llm[export]').")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--format", required=True, choices=sorted(EXPORT_FORMATS),
                        help="; ".join(f"{f.name}: {f.description}" for f in EXPORT_FORMATS.values()))
    export.add_argument("--out", type=Path, required=True, help="the folder (hf, safetensors) or file (gguf) to write")
    export.add_argument("--dtype", choices=EXPORT_DTYPES, default=EXPORT_DTYPES[0],
                        help="the weights: float32 or float16 (every format); q8_0 or q4_0, llama.cpp's 8- and "
                             "4-bit blocks (gguf only)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    export.set_defaults(func=cmd_export)

    ui = commands.add_parser("ui", help="open the web UI (needs the 'ui' extra: gradio)")
    ui.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="run to load at start")
    ui.add_argument("--host", default=DEFAULT_HOST,
                    help=f"address to serve on (default {DEFAULT_HOST}: this machine only; any other address lets "
                         "anyone on the network load any run the server can read and train runs into --runs-dir)")
    ui.add_argument("--port", type=_port, default=DEFAULT_UI_PORT,
                    help=f"port to serve on, {MIN_PORT}-{MAX_PORT} (default {DEFAULT_UI_PORT})")
    ui.add_argument("--runs-dir", type=Path, default=Path(DEFAULT_RUNS_DIR), help="where to list runs from")
    ui.add_argument("--data-dir", type=Path, action="append", default=[], metavar="DIR", dest="data_dirs",
                    help="a folder whose files the Train tab may train on, given by their path (repeatable; "
                         "default: none: the page trains on uploads and the bundled corpus only)")
    ui.add_argument("--share", action="store_true", help="make a public Gradio link (anyone can use it)")
    ui.add_argument("--compile", action="store_true",
                    help="compile each loaded run's decode step in the background (a minute or more on a CPU; "
                         "until it is ready generations run eagerly, the same text, and the page says so)")
    ui.set_defaults(func=cmd_ui)

    add_runs_command(commands)
    add_serve_command(commands, _port)
    return parser


# ---------------------------------------------------------------------------------------------------------
# Commands


def _overrides(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def default_run_dir(data: str | None, model_type: str, tokenizer: str) -> Path:
    return Path(DEFAULT_RUNS_DIR) / default_run_name(data, model_type, tokenizer)


@contextlib.contextmanager
def stop_on_ctrl_c() -> Iterator[threading.Event]:
    """A first Ctrl-C sets the event (the training's stop hook: it evaluates, saves and ends); a second one
    interrupts at once. Outside the main thread (where signals cannot be caught) the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_ctrl_c(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step: the run evaluates and saves (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_train(args: argparse.Namespace) -> int:
    from minillm.training import StopReason, distributed, resume, train
    from minillm.training.answers import describe_answers

    train_overrides = _overrides(args, "train__")
    if args.data:
        train_overrides["data"] = args.data[0] if len(args.data) == 1 else args.data
    preset, model_overrides, train_overrides = with_recipe(args.config, _overrides(args, "model__"), train_overrides)
    model_config, train_config = preset_configs(args.preset or preset or DEFAULT_PRESET, model_overrides,
                                                train_overrides)
    out = args.out or default_run_dir(train_config.data, model_config.model_type, train_config.tokenizer)
    progress = not args.no_progress
    try:
        with stop_on_ctrl_c() as stop:
            if args.resume:
                result = resume(out, train_overrides, model_overrides=model_overrides, progress=progress,
                                should_stop=stop.is_set)
            else:
                result = train(model_config, train_config, out, overwrite=args.overwrite, progress=progress,
                               should_stop=stop.is_set, model_overrides=model_overrides)
    finally:
        distributed.teardown()
    if not distributed.is_main_process():  # under torchrun, rank 0 reports
        return EXIT_INTERRUPTED if result.stop_reason == StopReason.STOPPED else 0
    test = result.test_metrics
    print(f"\nrun saved in {result.run_dir} (best model: step {result.best_step}, "
          f"val loss {result.best_val_loss:.4f}; test perplexity {test['perplexity']:.2f}, "
          f"{test['bits_per_byte']:.3f} bits per byte)")
    if describe_answers(test):
        print(f"test: {describe_answers(test)}")
    if result.stop_reason == StopReason.STOPPED:
        print("stopped by Ctrl-C: continue with the same command plus --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        print_final_sample(result.run_dir, train_config.device)
    except MiniLLMError as e:  # the run is saved and good: a sample that cannot be made is not a failure
        print(f"warning: no sample: {e}", file=sys.stderr)
    from minillm.checkpoint import read_model_config
    from minillm.run_folder import RunFolder

    folder = RunFolder(result.run_dir)
    trained, _ = read_model_config(folder.best_config)  # (a resumed run's kind is not in args)
    flag = "--source" if is_encoder_decoder(trained) else "--prompt"
    use = f"chat {result.run_dir}" if folder.chat_template.is_file() else f"generate {result.run_dir} {flag} \"...\""
    print(f"\nnext: minillm {use}   or   minillm ui {result.run_dir}")
    return 0


def print_final_sample(run_dir: Path, device: str | None) -> None:
    """The run's showcase sample from the best model (prompted with the start of the test split)."""
    from minillm.checkpoint import load_run
    from minillm.cli_generate import write_stream
    from minillm.generation import showcase

    run = load_run(run_dir, device)
    sample = showcase(run, FINAL_SAMPLE_TOKENS, SAMPLE_PROMPT_TOKENS)
    print(f"\nsample from the best model (prompt {sample.prompt!r}):\n")
    sys.stdout.write(sample.prefix)
    write_stream(sample.tokens(run))


def cmd_generate(args: argparse.Namespace) -> int:
    from minillm.cli_generate import generate

    return generate(args.run_dir, SamplingConfig(**_overrides(args, "sampling__")), args.prompt, args.source,
                    args.prompt_file, args.num_samples, args.stop, args.compile, args.device)


def cmd_chat(args: argparse.Namespace) -> int:
    from minillm.checkpoint import load_run
    from minillm.engine import Engine
    from minillm.terminal_chat import TerminalChat, enable_line_editing

    run = load_run(args.run_dir, args.device)
    chat = TerminalChat(run, SamplingConfig(**_overrides(args, "sampling__")), Engine(run.model, args.compile),
                        args.system)
    enable_line_editing()
    chat.loop()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from minillm.training import evaluate_run
    from minillm.training.answers import describe_answers
    from minillm.training.evaluation import describe_score

    max_tokens = getattr(args, "test_tokens", "run")  # "run": the run's own --test-tokens
    metrics = evaluate_run(args.run_dir, args.data, args.device, max_tokens, progress=True,
                           max_pairs=getattr(args, "test_pairs", "run"),
                           warn=lambda warning: print(f"warning: {warning}", file=sys.stderr, flush=True))
    print(f"{metrics['data']}: {describe_score(metrics)}")
    if describe_answers(metrics):
        print(f"{metrics['data']}: {describe_answers(metrics)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.format, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {args.run_dir} as {args.format} ({args.dtype}) to {out}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise MiniLLMError("the web UI needs gradio: pip install 'mini-llm[ui]'")
    from minillm.ui.app import launch

    launch(run_dir=args.run_dir, host=args.host, port=args.port, runs_dir=args.runs_dir, share=args.share,
           data_dirs=args.data_dirs, compile=args.compile)
    return 0


def error_line(error: BaseException) -> str | None:
    """The line this process prints for `error`, or None. Under torchrun a user error (a MiniLLMError) is the
    same on every rank (the same files and options; rank 0's data error is shared with all), so rank 0 alone
    says it; a rank's own trouble (its disk, its memory) is said by that rank, with its number. Every rank exits
    with the same status either way (torchrun then reports the failed processes itself)."""
    rank = os.environ.get("RANK", "0")  # (distributed.rank(), without importing torch for an error line)
    if rank == "0":
        return f"error: {describe_error(error)}"
    return None if isinstance(error, MiniLLMError) else f"error: rank {rank}: {describe_error(error)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for a user error, 130 when interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors (already printed)
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    try:
        return args.func(args)
    except Exception as e:  # a user error, a file or memory problem: one line (a bug keeps its traceback)
        if not is_expected(e):
            raise
        if line := error_line(e):
            print(line, file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        hint = " (continue training with the same command plus --resume)" if args.command == "train" else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
