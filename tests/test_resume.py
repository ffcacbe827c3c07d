"""Resuming a run checks what it continues with: the run's own tokenizer, the global batch, the data file."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_corpus, tiny_configs

from minillm.checkpoint import load_run
from minillm.errors import MiniLLMError
from minillm.files import load_torch, save_torch
from minillm.run_folder import RunFolder
from minillm.tokenizers import CharacterTokenizer, load_tokenizer
from minillm.training import resume, train

pytestmark = pytest.mark.usefixtures("one_thread")


def run_copy(tiny_run, tmp_path):
    return shutil.copytree(tiny_run, tmp_path / "run")


def test_resume_refuses_a_tokenizer_that_is_not_the_runs_own(tmp_path, tiny_run):
    run_dir = run_copy(tiny_run, tmp_path)
    own = load_tokenizer(run_dir)
    # Another character tokenizer of the same size: two of its characters swapped, so every load but a
    # fingerprint check would take it.
    alphabet = list(own.alphabet)
    alphabet[-1], alphabet[-2] = alphabet[-2], alphabet[-1]
    CharacterTokenizer("".join(alphabet)).save(run_dir / "tokenizer.json")
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "best_model_config.json")}
    with pytest.raises(MiniLLMError, match="not the tokenizer the model .* was trained with"):
        resume(run_dir, {"max_steps": 80}, progress=False, log=print)
    # Nothing was trained, and the swapped tokenizer's fingerprint was not recorded as the run's.
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    with pytest.raises(MiniLLMError, match="fingerprint differs"):
        load_run(run_dir)


def test_resume_says_when_the_data_file_changed_since_the_run_was_prepared(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(make_corpus(60), encoding="utf-8")
    run_dir = tmp_path / "run"
    train(*tiny_configs(data=data, max_steps=4, eval_interval=2), run_dir, progress=False, log=lambda m: None)
    record = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    assert record["source_size"] == data.stat().st_size and len(record["source_hash"]) == 64

    said: list[str] = []
    resume(run_dir, {"max_steps": 5}, progress=False, log=said.append)
    assert not [line for line in said if "changed" in line]  # the same file: nothing to say

    text = data.read_text(encoding="utf-8")
    data.write_text(text.replace("cat", "dog"), encoding="utf-8")  # same size, other contents
    said.clear()
    resume(run_dir, {"max_steps": 6}, progress=False, log=said.append)
    [line] = [line for line in said if "changed" in line]
    assert str(data) in line and "same size, other contents" in line and "prepared" in line

    data.write_text(text + "more text\n", encoding="utf-8")
    said.clear()
    result = resume(run_dir, {"max_steps": 7}, progress=False, log=said.append)
    [line] = [line for line in said if "changed" in line]
    assert f"{len(text.encode()):,} bytes then" in line and "continues on the tokens prepared" in line
    assert result.steps == 7  # and it goes on, on the prepared tokens


def test_resume_with_another_number_of_processes_says_the_global_batch_and_what_keeps_it(tmp_path, tiny_run):
    """The run in last.pt as 2 processes would have left it (world_size 2): one process now halves the global
    batch, unless --grad-accum-steps doubles; an accumulation change that does not keep it is refused.
    (The same under torchrun, with real processes: tests/test_distributed.py.)"""
    run_dir = run_copy(tiny_run, tmp_path)
    state = load_torch(run_dir / "last.pt")
    assert state["world_size"] == 1
    save_torch(run_dir / "last.pt", {**state, "world_size": 2})
    config = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8"))["train"]
    size, accum = config["batch_size"], config["grad_accum_steps"]
    before, after = 2 * size * accum, size * accum

    with pytest.raises(MiniLLMError, match=rf"from {before} to {3 * size} sequences.*--grad-accum-steps {2 * accum} "
                                           "keeps it"):
        resume(run_dir, {"grad_accum_steps": 3}, progress=False, log=lambda m: None)
    said: list[str] = []
    step = state["step"]
    resume(run_dir, {"max_steps": step + 2}, progress=False, log=said.append)
    [line] = [line for line in said if "global batch" in line]
    assert (f"from {before} sequences (2 process(es)" in line and f"to {after} (1 x" in line
            and f"--grad-accum-steps {2 * accum} keeps it" in line)

    save_torch(run_dir / "last.pt", {**load_torch(run_dir / "last.pt"), "world_size": 2})
    said.clear()
    result = resume(run_dir, {"max_steps": step + 4, "grad_accum_steps": 2 * accum}, progress=False,
                    log=said.append)
    assert result.steps == step + 4 and not [line for line in said if "global batch" in line]
    assert json.loads((run_dir / "train_config.json").read_text())["train"]["grad_accum_steps"] == 2 * accum


def test_a_run_folder_name_with_a_null_byte_is_one_clear_error(tmp_path, corpus_file):
    with pytest.raises(MiniLLMError, match="null byte"):
        train(*tiny_configs(data=corpus_file, max_steps=2), tmp_path / "a\0b", progress=False, log=lambda m: None)
    with pytest.raises(MiniLLMError, match="null byte"):
        resume(tmp_path / "a\0b", progress=False)
    with pytest.raises(MiniLLMError, match="null byte"):
        load_run(tmp_path / "a\0b")
    assert list(tmp_path.iterdir()) == []
    assert RunFolder(tmp_path / "ok").path == tmp_path / "ok"
