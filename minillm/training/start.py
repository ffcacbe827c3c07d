"""Starting a training: `train` (a new run in a folder) and `resume` (an interrupted run, from its last.pt).

The folder is checked before anything is written, prepared (and, replacing a run, trained until its first
model) in a staging folder and swapped in, and locked for the life of the training; the loop itself is
trainer.Trainer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from minillm.checkpoint import check_finite, check_tokenizer, read_model_config, read_train_config, write_train_config
from minillm.config import ModelConfig, TrainConfig
from minillm.data.prepare import ImportedTokenizer, data_change, read_data, read_split_record, write_data
from minillm.errors import MiniLLMError
from minillm.files import load_torch
from minillm.models import build_model, is_encoder_decoder, model_class, pick_device
from minillm.models.llama import fuse_split
from minillm.run_folder import RunFolder
from minillm.tokenizers import TOKENIZER_KINDS, Tokenizer, load_tokenizer
from minillm.training import distributed
from minillm.training.distributed import is_main_process
from minillm.training.evaluation import mean_loss
from minillm.training.init_from import StartPoint, starting_configs
from minillm.training.loggers import check_logger
from minillm.training.memory import check_memory
from minillm.training.outcome import LogFn, MetricsCallback, StopHook, StopReason, TrainResult, default_log
from minillm.training.state import CHECKPOINT_FORMAT
from minillm.training.trainer import Trainer


def with_tokenizer(model_config: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model config with the vocabulary and special ids of the trained tokenizer."""
    return model_config.replace(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)


def train(model_config: ModelConfig, config: TrainConfig, run_dir: str | Path, *, overwrite: bool = False,
          progress: bool = True, log: LogFn = default_log, on_metrics: MetricsCallback | None = None,
          should_stop: StopHook | None = None, model_overrides: dict[str, Any] | None = None) -> TrainResult:
    """Train a new model into `run_dir` (its vocabulary comes from the tokenizer trained here, or from
    config.tokenizer_file).

    With config.init_from the model's shape, tokenizer and first weights are another run's or a Hugging Face
    checkpoint's (training.init_from); `model_overrides` are the model options the user gave explicitly
    (they must agree with the source, but for the window and dropout; `model_config` supplies the default
    window).

    Everything that can be checked is checked before the folder is touched (model kind, device, data).
    The new run is prepared in a staging folder inside the old one; replacing a run (`overwrite`; only a
    run's own files go) it also trains there until its first best model and last.pt are saved, and only
    then is swapped in (RunFolder.swap_in), so that at every moment the old run or the new one loads.
    The folder is locked for the life of the training; what a killed training left is cleaned up first.
    `should_stop`: see Trainer.fit. Under torchrun, rank 0 prepares the data and the others wait for it
    (its error is theirs too).
    """
    folder = RunFolder(run_dir)
    start, model_config, config = starting_configs(model_config, config, model_overrides, run_dir)
    model_class(model_config.model_type)  # an unknown kind, a missing logger or an unavailable device fails
    check_logger(config.log)  # before any file
    device = distributed.setup(pick_device(config.device))
    imported = None
    if start is not None:
        log(f"starting from {start.describe()}: its shape, tokenizer and weights; a fresh optimizer and schedule "
            f"(training window {model_config.max_seq_len:,} tokens)")
    if config.tokenizer_file:  # its kind, not --tokenizer's, is the run's
        imported = ImportedTokenizer.read(config.tokenizer_file, from_model=start is not None)
        config = config.replace(tokenizer=imported.tokenizer.kind)
        log(f"tokenizer: {imported.source} ({imported.tokenizer.kind}, {imported.tokenizer.vocab_size:,} ids; "
            + ", ".join(f"{role} {token} = {i}" for role, (token, i) in imported.tokenizer.role_tokens().items())
            + (f"; added {', '.join(imported.added)}" if imported.added else "") + ")")
        for note in imported.tokenizer.notes:
            log(note)
    with contextlib.ExitStack() as held:
        def prepare() -> tuple[dict[str, Any], dict[str, Any], str]:
            folder.check_new_run(overwrite)
            data = read_data(config, is_encoder_decoder(model_config), log)
            if imported:
                imported.check_spelling(data, log)
            vocab = (imported.tokenizer.vocab_size if imported else
                     TOKENIZER_KINDS[config.tokenizer].planned_vocab_size(config.bpe_vocab_size))
            # before anything is written or allocated (or any weight of a model to start from read)
            check_memory(model_config, config, device, vocab, fixed_shape=start is not None)
            held.enter_context(folder.lock())
            for message in folder.clean_leftovers():
                log(message)
            folder.check_new_run(overwrite)  # again, now that no other training can start here
            staged = held.enter_context(folder.staging())
            bar = (lambda **kw: tqdm(unit="sample", leave=False, **kw)) if progress else None
            tokenizer, split_record = write_data(staged, data, config.tokenizer, config.bpe_vocab_size, bar, imported)
            trained_config = with_tokenizer(model_config, tokenizer)
            write_train_config(staged, config, trained_config)
            if not folder.holds_run():  # nothing to keep: the run trains in its folder from the start
                folder.swap_in(staged)
                staged = folder.path
            return trained_config.to_dict(), split_record, str(staged)

        trained, split_record, workdir = distributed.run_on_main(prepare)

        def swap_in_first_model(trainer: Trainer) -> None:  # (the trainer as an argument: no reference cycle)
            """Once the new run has a model (and last.pt) in its staging folder, it replaces the old run."""
            if trainer.run_dir == folder.path:
                return
            if is_main_process():
                replaced = folder.swap_in(trainer.run_dir)
                log(f"replaced the run that was in {folder.path} ({len(replaced)} files)")
            trainer.move_to(folder.path)

        trainer = Trainer(Path(workdir), ModelConfig.from_dict(trained), config, split_record, log, progress,
                          on_metrics, after_save=swap_in_first_model)
        if start is not None:
            begin_from(trainer, start, imported, log)
        trainer.describe()
        with trainer.metrics:  # (closes the experiment log however the training ends)
            try:
                stop_reason = trainer.fit(should_stop)
            except KeyboardInterrupt:
                if trainer.run_dir != folder.path:
                    log(f"the run that was in {folder.path} is kept: the new one had not saved a model yet")
                raise
            return finish(trainer, stop_reason)


def begin_from(trainer: Trainer, start: StartPoint, imported: ImportedTokenizer, log: LogFn) -> None:
    """Give a new run the weights it starts from, and score them on the run's validation batches: the loss
    a tuning improves on (recorded with where the run started)."""
    load_start(trainer.model, start, imported, log)
    val_loss, _ = mean_loss(trainer.eval_model, trainer.eval_batches, trainer.device, trainer.amp_dtype)
    trainer.started_from = {**start.record(), "val_loss": val_loss}
    log(f"validation loss before training: {val_loss:.4f} (weights {trainer.started_from['fingerprint']})")


def load_start(model: nn.Module, start: StartPoint, imported: ImportedTokenizer, log: LogFn) -> None:
    """Copy the source's weights into `model` (built for the run's tokenizer), and say what changed on the
    way in: rows of the embedding no token has, left out; rows for roles added to the tokenizer, grown."""
    added = imported.added
    base_rows = imported.tokenizer.vocab_size - len(added)  # a role the tokenizer lacked was added after its last id
    start.load_into(model, base_rows)
    if start.config.vocab_size > base_rows:
        log(f"left out {start.config.vocab_size - base_rows:,} rows of its embedding that no token of "
            f"{start.tokenizer_file.name} has")
    if added:
        log(f"the embedding{'' if start.config.tie_embeddings else ' and the head'} grew by {len(added)} row(s) "
            f"for {', '.join(added)} (added to the tokenizer), initialised to the mean of the others")


def starting_model(init_from: str, max_seq_len: int | None = None,
                   log: LogFn = default_log) -> tuple[nn.Module, Tokenizer]:
    """The model (eval mode, on the CPU) and tokenizer a run with --init-from `init_from` would start from,
    without training: to look at a run or checkpoint before tuning it. max_seq_len: its window (default: the
    source's context, as far as the default model config's window allows for a checkpoint)."""
    explicit = {} if max_seq_len is None else {"max_seq_len": max_seq_len}
    start, model_config, config = starting_configs(ModelConfig(), TrainConfig(init_from=init_from), explicit)
    imported = ImportedTokenizer.read(config.tokenizer_file)
    model = build_model(with_tokenizer(model_config, imported.tokenizer))
    load_start(model, start, imported, log)
    return model.eval(), imported.tokenizer


def finish(trainer: Trainer, stop_reason: StopReason) -> TrainResult:
    """The result of a run, with the best model's test metrics (scored by rank 0 alone; the other ranks wait
    for it, so that no rank leaves the process group while another still uses it)."""
    result = trainer.result(stop_reason, trainer.test() if is_main_process() else {})
    trainer.metrics.test(result.test_metrics, result.steps)
    distributed.barrier()
    return result


# Settings that may change when a run is resumed (the rest would change what is being trained), and one that
# may change only to keep the global batch when the number of processes changes (check_global_batch).
RESUMABLE_FIELDS = ("max_steps", "epochs", "max_time", "patience", "eval_interval", "log_interval", "device",
                    "compile", "dtype", "threads", "test_tokens", "test_pairs", "sample_interval", "log")
BATCH_KEEPING_FIELD = "grad_accum_steps"


def check_resumable(run_dir: str | Path) -> RunFolder:
    """The run folder, if it has a last.pt to resume from; else the one error that says so (the CLI's and
    the UI's)."""
    folder = RunFolder(run_dir)
    if not folder.last_checkpoint.is_file():
        raise MiniLLMError(
            f"nothing to resume in {run_dir}: it has no {folder.last_checkpoint.name} (training saves one at the "
            "first evaluation); start a new run instead (the CLI: --overwrite rather than --resume)"
        )
    return folder


def check_global_batch(saved: TrainConfig, config: TrainConfig, saved_world_size: int, run_dir: str | Path,
                       log: LogFn) -> None:
    """Say when a resumed run's global batch (processes x batch size x accumulation steps) differs from the
    one it was trained with, and what keeps it; refuse an accumulation change that does not keep it."""
    world_size = distributed.world_size()
    before = saved.batch_size * saved.grad_accum_steps * saved_world_size
    after = config.batch_size * config.grad_accum_steps * world_size
    if before == after:
        return
    per_step = config.batch_size * world_size
    keeping = (f"--grad-accum-steps {before // per_step} keeps it" if before % per_step == 0 else
               f"no whole number of accumulation steps keeps it with {world_size} process(es)")
    if config.grad_accum_steps != saved.grad_accum_steps:
        raise MiniLLMError(
            f"--grad-accum-steps {config.grad_accum_steps} would change the global batch of {run_dir} from "
            f"{before} to {after} sequences; on resume it may change only to keep the global batch: {keeping}")
    log(f"warning: the global batch changes from {before} sequences ({saved_world_size} process(es) x "
        f"{saved.batch_size} x {saved.grad_accum_steps} accumulation steps) to {after} ({world_size} x "
        f"{config.batch_size} x {config.grad_accum_steps}): the run goes on with another batch; {keeping}")


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None, *,
           model_overrides: dict[str, Any] | None = None, progress: bool = True, log: LogFn = default_log,
           on_metrics: MetricsCallback | None = None, should_stop: StopHook | None = None) -> TrainResult:
    """Continue an interrupted run from its last.pt, exactly where the checkpoint left off.

    `overrides` may change RESUMABLE_FIELDS (e.g. a longer max_time); any other field, of the training
    or (`model_overrides`) the model config, must equal what the run was trained with.
    """
    folder = RunFolder(run_dir)
    if is_main_process() and folder.path.is_dir():
        with folder.lock():  # (and again below, for the life of the training)
            for message in folder.clean_leftovers():
                log(message)
    folder = check_resumable(run_dir)
    with folder.lock() if is_main_process() else contextlib.nullcontext():
        state = load_torch(folder.last_checkpoint)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise MiniLLMError(f"{folder.last_checkpoint} is not a Mini LLM resume checkpoint; start again with "
                               "--overwrite")
        check_finite(state["model"], folder.last_checkpoint)
        if fuse_split(state["model"]).keys() != state["model"].keys():
            raise MiniLLMError(f"{folder.last_checkpoint} was written by an older Mini LLM (unfused layers) and "
                               "cannot be resumed; its best model still loads (generate, evaluate, export); start "
                               "again with --overwrite to train on")
        overrides, model_overrides = dict(overrides or {}), dict(model_overrides or {})
        saved_train = read_train_config(run_dir).to_dict()
        saved_model, meta = read_model_config(folder.best_config)
        saved_model = saved_model.to_dict()
        resumable = (*RESUMABLE_FIELDS, BATCH_KEEPING_FIELD)
        changed = [k for k, v in overrides.items() if k not in resumable and saved_train.get(k) != v]
        changed += [k for k, v in model_overrides.items() if saved_model.get(k) != v]
        if changed:
            raise MiniLLMError(
                f"cannot change {sorted(changed)} when resuming {run_dir} (it was trained with other values); "
                f"only {list(RESUMABLE_FIELDS)} may change (and {BATCH_KEEPING_FIELD}, to keep the global batch "
                "with another number of processes); start a new run with --overwrite to change the rest"
            )
        model_config = ModelConfig.from_dict(saved_model)
        allowed = {k: v for k, v in overrides.items() if k in resumable}
        config = TrainConfig.from_dict({**saved_train, **allowed})
        check_logger(config.log)
        check_global_batch(TrainConfig.from_dict(saved_train), config, int(state.get("world_size", 1)), run_dir, log)
        # The tokenizer is the run's own, as every load checks (a swapped file would be trained on, and its
        # fingerprint recorded as the run's with the next best model).
        check_tokenizer(model_config, meta, load_tokenizer(folder.tokenizer), folder.tokenizer, folder.best_model)
        split_record = read_split_record(run_dir)
        if change := data_change(split_record, config.data):
            log(f"warning: the data file {change}; the run continues on the tokens prepared from it then (start "
                "a new run with --overwrite to train on the file as it is now)")
        trainer = Trainer(folder.path, model_config, config, split_record, log, progress, on_metrics)
        trainer.started_from = meta.get("init_from")
        trainer.load_state(state)
        del state
        if is_main_process():
            trainer.metrics.truncate_after(trainer.state.step)
            write_train_config(run_dir, config, model_config)
        log(f"resuming {run_dir} at step {trainer.state.step} of {trainer.max_steps}")
        with trainer.metrics:
            return finish(trainer, trainer.fit(should_stop))
