"""The `minillm` command: it trains, generates and evaluates; a user mistake is one line, no traceback."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import save_gpt2_style_tokenizer
from tokenizers import Tokenizer as HFTokenizer

import minillm.training
from minillm.checkpoint import load_run, load_torch
from minillm.cli import main
from minillm.generation import stream_text
from minillm.tokenizers import CharacterTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--no-progress"]


def assert_one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture
def run_copy(tmp_path, tiny_run) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_train_writes_a_run_and_ends_with_a_sample(tmp_path, corpus_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(corpus_file), *TINY, "--max-steps", "20", "--eval-interval", "10"]) == 0
    out = capsys.readouterr().out
    run_dir = Path("runs") / "corpus-decoder_only-char"  # the default --out: data stem, model, tokenizer
    assert (run_dir / "best_model.pt").is_file()
    assert f"run saved in {run_dir}" in out
    sample = out.split("sample from the best model")[1]
    assert len(sample.strip()) > 20
    assert load_run(run_dir).info["training"]["step"] in (10, 20)


def test_explicit_options_override_the_preset(tmp_path, corpus_file):
    out = tmp_path / "run"
    args = ["train", str(corpus_file), *TINY, "--out", str(out), "--max-steps", "2", "--eval-interval", "2",
            "--d-model", "16", "--n-heads", "2", "--block-size", "8", "--model", "transformer",
            "--tokenizer", "bpe", "--max-time", "none"]
    assert main(args) == 0
    run = load_run(out)
    assert (run.config.d_model, run.config.max_seq_len, run.config.n_layers) == (16, 8, 2)  # n_layers: preset
    assert (run.config.model_type, run.info["tokenizer_type"]) == ("transformer", "bpe")


def test_resume_continues_with_a_longer_budget(run_copy, corpus_file, capsys):
    code = main(["train", str(corpus_file), *TINY, "--out", str(run_copy), "--resume", "--max-steps", "70",
                 "--eval-interval", "5"])
    assert code == 0, capsys.readouterr().err
    assert load_torch(run_copy / "last.pt")["step"] == 70
    assert "resuming" in capsys.readouterr().out


def test_existing_run_needs_overwrite_or_resume(run_copy, corpus_file, capsys):
    code = main(["train", str(corpus_file), *TINY, "--out", str(run_copy)])
    assert_one_line_error(capsys, code, str(run_copy), "--overwrite", "--resume")


@pytest.mark.parametrize("content, needle", [
    (None, "not found"), (b"", "empty"), (b"\x00\x01\x02binary\xff", "binary"), (b"\xff\xfe\xfa", "UTF-8"),
])
def test_bad_data_files(tmp_path, capsys, content, needle):
    data = tmp_path / "data.txt"
    if content is not None:
        data.write_bytes(content)
    code = main(["train", str(data), *TINY, "--out", str(tmp_path / "run")])
    assert_one_line_error(capsys, code, needle, str(data))
    assert not (tmp_path / "run" / "best_model.pt").exists()


@pytest.mark.parametrize("options, needle", [
    (["--n-heads", "3", "--d-model", "32"], "divisible"),
    (["--batch-size", "abc"], "--batch-size"),
    (["--dropout", "1.5"], "dropout"),
    (["--learning-rate", "-1"], "learning_rate"),
    (["--tokenizer", "words"], "--tokenizer"),
])
def test_nonsense_settings(tmp_path, corpus_file, capsys, options, needle):
    code = main(["train", str(corpus_file), *TINY, "--out", str(tmp_path / "run"), *options])
    assert_one_line_error(capsys, code, needle)


def test_generate_prints_prompt_then_exactly_what_stream_text_yields(tiny_run, capsys):
    settings = dict(max_new_tokens=40, temperature=0.9, top_k=10, seed=7)
    assert main(["generate", str(tiny_run), "--prompt", "the cat", "--max-new-tokens", "40",
                 "--temperature", "0.9", "--top-k", "10", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    run = load_run(tiny_run)
    expected = "the cat" + "".join(stream_text(run.model, run.tokenizer, "the cat", **settings)) + "\n"
    assert out == expected


def test_generate_warns_about_characters_the_tokenizer_never_saw(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "the \u03a9 cat", "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: 1 character(s)")


def test_generate_on_a_corrupt_model(run_copy, capsys):
    (run_copy / "best_model.pt").write_bytes(b"garbage")
    code = main(["generate", str(run_copy), "--prompt", "a"])
    assert_one_line_error(capsys, code, "best_model.pt", "corrupt")


def test_generate_with_a_tokenizer_from_elsewhere(run_copy, capsys):
    CharacterTokenizer.train(["qwerty"]).save(run_copy / "tokenizer.json")
    code = main(["generate", str(run_copy), "--prompt", "a"])
    assert_one_line_error(capsys, code, "do not belong together")


def test_generate_source_on_a_decoder_only_run(tiny_run, capsys):
    assert_one_line_error(capsys, main(["generate", str(tiny_run), "--source", "x"]), "decoder-only")


def test_evaluate_prints_loss_and_perplexity(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "test split: loss" in out and "perplexity" in out


def test_ui_without_gradio_says_how_to_install(monkeypatch, capsys):
    real_find_spec = minillm.cli.importlib.util.find_spec
    monkeypatch.setattr(minillm.cli.importlib.util, "find_spec",
                        lambda name: None if name == "gradio" else real_find_spec(name))
    assert_one_line_error(capsys, main(["ui"]), "pip install 'mini-llm[ui]'")


def test_ui_passes_its_options_to_launch(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("minillm.ui.app")
    fake.launch = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "minillm.ui.app", fake)
    assert main(["ui", str(tmp_path), "--port", "7999", "--runs-dir", str(tmp_path)]) == 0
    assert calls == [dict(run_dir=tmp_path, host="127.0.0.1", port=7999, runs_dir=tmp_path, share=False)]


def test_ctrl_c_during_training_is_a_clean_message(monkeypatch, corpus_file, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minillm.training, "train", interrupted)
    assert main(["train", str(corpus_file), *TINY, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err


@pytest.mark.parametrize("entry", [["-m", "minillm"], ["main.py"]])
def test_the_real_command_exits_2_with_one_line(tmp_path, entry):
    command = [sys.executable, *entry, "train", str(tmp_path / "missing.txt"), "--preset", "tiny"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: data file not found") and "Traceback" not in result.stderr


def test_a_first_ctrl_c_stops_training_gracefully_and_saves(tmp_path, corpus_file):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "minillm", "train", str(corpus_file), *TINY, "--max-steps", "1000000",
               "--eval-interval", "1000000", "--log-interval", "1", "--out", str(run_dir), "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or "train" not in (run_dir / "metrics.jsonl").read_text():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "stopped by Ctrl-C" in err and "--resume" in err and "Traceback" not in err
    step = load_torch(run_dir / "last.pt")["step"]  # evaluated and saved where it stopped
    assert step >= 1 and f"stopped at step {step}" in out
    assert (run_dir / "test_metrics.json").is_file()


# ---- an existing tokenizer ----------------------------------------------------------------------------

def test_train_with_a_gpt2_style_tokenizer_file_then_generate_and_evaluate(tmp_path, corpus_file, capsys):
    path = save_gpt2_style_tokenizer(tmp_path / "gpt2" / "tokenizer.json", [corpus_file.read_text()], 400)
    original = HFTokenizer.from_file(str(path))
    endoftext = original.token_to_id("<|endoftext|>")
    out = tmp_path / "run"
    args = ["train", str(corpus_file), *TINY, "--out", str(out), "--max-steps", "20", "--eval-interval", "10",
            "--tokenizer-file", str(path)]
    assert main(args) == 0
    assert f"eos <|endoftext|> = {endoftext}" in capsys.readouterr().out
    run = load_run(out)
    assert run.tokenizer.kind == "bpe" and run.config.vocab_size == endoftext + 2  # + the added <|pad|>
    assert (run.config.bos_id, run.config.eos_id, run.config.pad_id) == (endoftext, endoftext, endoftext + 1)
    record = json.loads((out / "special_tokens.json").read_text(encoding="utf-8"))
    assert record["added"] == ["<|pad|>"] and record["source"] == str(path.resolve())
    assert record["eos"] == {"token": "<|endoftext|>", "id": endoftext}
    assert run.tokenizer.encode("the cat sees the moon") == original.encode("the cat sees the moon").ids
    assert main(["generate", str(out), "--prompt", "the cat", "--max-new-tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert main(["evaluate", str(out)]) == 0


def test_train_with_another_runs_tokenizer(tmp_path, tiny_run, corpus_file):
    out = tmp_path / "run"
    args = ["train", str(corpus_file), *TINY, "--out", str(out), "--max-steps", "2", "--eval-interval", "2",
            "--tokenizer", "bpe", "--tokenizer-file", str(tiny_run / "tokenizer.json")]
    assert main(args) == 0
    run = load_run(out)  # the tokenizer file's kind (char), not --tokenizer's
    assert run.tokenizer.kind == "char" and run.tokenizer.fingerprint() == load_run(tiny_run).tokenizer.fingerprint()
    assert json.loads((tiny_run / "special_tokens.json").read_text(encoding="utf-8"))["source"] == "trained"
    assert json.loads((out / "special_tokens.json").read_text(encoding="utf-8"))["source"] == str(
        (tiny_run / "tokenizer.json").resolve())


@pytest.mark.parametrize("content, needle", [
    ('{"model_type": "llama", "hidden_size": 64}', "is of unknown kind"),
    ("not json", "is not valid JSON"),
    (None, "tokenizer not found"),
])
def test_a_tokenizer_file_that_is_not_a_tokenizer_is_one_clear_error(tmp_path, corpus_file, capsys, content,
                                                                      needle):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code = main(["train", str(corpus_file), *TINY, "--out", str(tmp_path / "run"), "--tokenizer-file", str(path)])
    assert_one_line_error(capsys, code, needle, str(path))
    assert not (tmp_path / "run").exists()
