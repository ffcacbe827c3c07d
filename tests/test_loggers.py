"""Experiment logs (--log tensorboard|wandb) and the samples made during training (samples.jsonl), read back with
the tools' own readers."""

from __future__ import annotations

import json
import shutil
import struct
import sys

import pytest
from conftest import import_dev_dependency, tiny_configs

from minillm.checkpoint import load_run, read_model_config
from minillm.cli import main
from minillm.errors import MiniLLMError
from minillm.files import read_json
from minillm.generation import generate_text
from minillm.run_folder import RunFolder
from minillm.sampling import SamplingConfig
from minillm.tokenizers import load_tokenizer
from minillm.training import resume, train
from minillm.training.loggers import RunRecords
from minillm.training.metrics import read_metrics
from minillm.training.samples import SAMPLE_SEED, SAMPLE_TOKENS, TrainingSamples

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(message: str) -> None:
    pass


def scalars(run_dir, tag):
    """(step, value) of a TensorBoard scalar series, read with TensorBoard's own EventAccumulator."""
    event_accumulator = import_dev_dependency("tensorboard.backend.event_processing.event_accumulator")
    accumulator = event_accumulator.EventAccumulator(str(run_dir / "logs"), size_guidance={"scalars": 0,
                                                                                           "tensors": 0})
    accumulator.Reload()
    if tag.endswith("text_summary"):
        return [(e.step, e.tensor_proto.string_val[0].decode()) for e in accumulator.Tensors(tag)]
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def series(rows, kind, key):
    return [(row["step"], row[key]) for row in rows if row["kind"] == kind]


def test_tensorboard_events_hold_the_loss_series_of_metrics_jsonl(tmp_path, corpus_file):
    run_dir = tmp_path / "run"
    old = tiny_configs(data=corpus_file, max_steps=8, eval_interval=4, log="tensorboard")
    train(*old, run_dir, progress=False, log=quiet)
    # A run that replaces it trains in a staging folder until its first model: its events are written once it
    # is in the run folder, and the old run's are gone with the old run.
    model_config, train_config = tiny_configs(data=corpus_file, max_steps=20, eval_interval=10, log_interval=5,
                                              log="tensorboard")
    result = train(model_config, train_config, run_dir, overwrite=True, progress=False, log=quiet)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [step for step, _ in series(rows, "train", "train_loss")] == [5, 10, 15, 20]
    for tag, kind, key in [("train/loss", "train", "train_loss"), ("train/learning_rate", "train", "lr"),
                           ("train/tokens_per_s", "train", "tokens_per_s"), ("val/loss", "eval", "val_loss"),
                           ("val/bits_per_byte", "eval", "val_bits_per_byte")]:
        logged = scalars(run_dir, tag)
        expected = series(rows, kind, key)
        assert [step for step, _ in logged] == [step for step, _ in expected], tag
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6), tag
    test_loss = read_json(run_dir / "test_metrics.json", "")["loss"]
    assert scalars(run_dir, "test/loss") == [(20, pytest.approx(test_loss, rel=1e-6))]
    # The samples, as text (indented: TensorBoard shows them as code, lines and spaces kept).
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    texts = scalars(run_dir, "sample/text_summary")
    assert [step for step, _ in texts] == [row["step"] for row in samples] == [10, 20]
    assert texts[-1][1].replace("\n    ", "\n").strip() == (samples[-1]["prompt"] + samples[-1]["text"]).strip()
    assert result.steps == 20


def test_a_resumed_run_logs_each_step_once(tmp_path, corpus_file):
    configs = tiny_configs(data=corpus_file, max_steps=30, eval_interval=10, log_interval=5, log="tensorboard")

    def interrupt_at_step_25(row):
        if row["step"] == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(*configs, tmp_path / "run", progress=False, log=quiet, on_metrics=interrupt_at_step_25)
    assert [step for step, _ in scalars(tmp_path / "run", "train/loss")] == [5, 10, 15, 20, 25]
    resume(tmp_path / "run", progress=False, log=quiet)
    # TensorBoard drops what the interrupted session logged after its checkpoint (step 20): no step twice.
    assert [step for step, _ in scalars(tmp_path / "run", "train/loss")] == [5, 10, 15, 20, 25, 30]
    logged = dict(scalars(tmp_path / "run", "train/loss"))
    rows = dict(series(read_metrics(tmp_path / "run" / "metrics.jsonl"), "train", "train_loss"))
    assert logged == pytest.approx(rows, rel=1e-6)
    samples = [json.loads(line)["step"] for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples == [10, 20, 30]


def wandb_history(run_dir):
    """The history rows of the offline W&B run in `run_dir` ({key: value} by step), read from its .wandb file
    (a LevelDB-style log of protobuf records: 32 KiB blocks, a 7-byte header per record piece)."""
    pb = import_dev_dependency("wandb.proto.wandb_internal_pb2")
    [path] = list((run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    data, block, position, pieces, records = path.read_bytes(), 32768, 7, b"", []
    assert data.startswith(b":W&B")
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            break
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            records.append(pieces)
            pieces = b""
    history = {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    return history


def test_wandb_offline_logs_the_metrics_series(tmp_path, corpus_file, monkeypatch):
    wandb = import_dev_dependency("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model_config, train_config = tiny_configs(data=corpus_file, max_steps=10, eval_interval=5, log_interval=5,
                                              log="wandb")
    train(model_config, train_config, tmp_path / "run", progress=False, log=quiet)
    wandb.teardown()  # W&B's service writes the file on its own time: its teardown (at exit, or here) waits for it
    history = wandb_history(tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {step: values["train/loss"] for step, values in history.items() if "train/loss" in values} == \
        pytest.approx(dict(series(rows, "train", "train_loss")))
    assert {step: values["val/loss"] for step, values in history.items() if "val/loss" in values} == \
        pytest.approx(dict(series(rows, "eval", "val_loss")))
    assert history[10]["sample/_type"] == "html-file"


@pytest.mark.parametrize("logger, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_logger_package_is_one_line_before_anything_is_written(logger, package, tmp_path, corpus_file,
                                                                         monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # what a missing package looks like to `import`
    with pytest.raises(MiniLLMError, match=f"--log {logger} needs the {package} package, which is not installed: "
                                           "pip install"):
        train(*tiny_configs(data=corpus_file, log=logger), tmp_path / "run", progress=False, log=quiet)
    assert main(["train", str(corpus_file), "--preset", "tiny", "--log", logger, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --log {logger} needs the {package} package")
    assert not (tmp_path / "run").exists()


def test_wandb_online_without_credentials_is_one_line_before_anything_is_written(tmp_path, corpus_file,
                                                                                monkeypatch):
    import_dev_dependency("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.netrc)
    with pytest.raises(MiniLLMError, match="no W&B credentials.*wandb login.*WANDB_MODE=offline"):
        train(*tiny_configs(data=corpus_file, log="wandb"), tmp_path / "run", progress=False, log=quiet)
    assert not (tmp_path / "run").exists()


def test_samples_are_made_at_each_evaluation_by_the_librarys_generation(tmp_path, corpus_file):
    lines = []
    result = train(*tiny_configs(data=corpus_file, threads=1), tmp_path / "run", progress=False, log=lines.append)
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [20, 40, 60]  # the tiny preset evaluates every 20 steps
    assert {row["prompt"] for row in rows} == {rows[0]["prompt"]} and rows[0]["prompt"].strip()
    said = [line for line in lines if line.startswith("sample at step")]
    assert said[0] == f"sample at step 20:\n{rows[0]['prompt']}{rows[0]['text']}"
    # The last sample is the trained model's, drawn as `generate` draws it (same prompt, seed and length).
    assert result.best_step == 60
    run = load_run(tmp_path / "run")
    again = generate_text(run.model, run.tokenizer, rows[-1]["prompt"],
                          SamplingConfig(max_new_tokens=SAMPLE_TOKENS, seed=SAMPLE_SEED))
    assert again == rows[-1]["text"]


def test_the_sample_interval_is_steps_never_or_auto_for_runs_under_an_hour(tmp_path, corpus_file, tiny_run):
    train(*tiny_configs(data=corpus_file, max_steps=20, sample_interval=7), tmp_path / "every7", progress=False,
          log=quiet)
    steps = [json.loads(line)["step"] for line in (tmp_path / "every7" / "samples.jsonl").read_text().splitlines()]
    assert steps == [7, 14]
    train(*tiny_configs(data=corpus_file, max_steps=20, sample_interval=0), tmp_path / "never", progress=False,
          log=quiet)
    assert not (tmp_path / "never" / "samples.jsonl").exists()

    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    model_config, _ = read_model_config(run_dir / "best_model_config.json")
    _, config = tiny_configs(data=corpus_file)
    records = RunRecords(RunFolder(run_dir), "none", {}, enabled=False)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    samples = TrainingSamples(run_dir, tokenizer, model_config, config, quiet, records)
    assert samples.due(100, True, elapsed=10.0, max_steps=1000)  # 100 s in all: at each evaluation
    assert not samples.due(101, False, elapsed=10.0, max_steps=1000)
    assert not samples.due(100, True, elapsed=1000.0, max_steps=1000)  # 10,000 s: off unless asked
    budgeted = TrainingSamples(run_dir, tokenizer, model_config, config.replace(max_time=600.0), quiet, records)
    assert budgeted.due(100, True, elapsed=1000.0, max_steps=1000)  # the budget ends it within the hour
