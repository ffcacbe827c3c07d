"""The `minillm` command: it trains, generates and evaluates; a user mistake is one line, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

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


def test_train_help_lists_each_presets_values(capsys):
    from minillm.config import PRESETS

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    presets = out[out.index("presets ("):]
    for name, preset in PRESETS.items():
        assert f"{name}: {preset.description}" in presets
        for key, value in {**preset.model, **preset.train}.items():
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            assert f"--{key.replace('_', '-')} {shown}" in presets, (name, key)


@pytest.mark.parametrize("port", ["0", "70000", "-1", "abc", "80.5"])
def test_ui_with_an_invalid_port_is_one_line_naming_port(port, capsys):
    line = assert_one_line_error(capsys, main(["ui", "--port", port]), "--port")
    assert "65535" in line


def busy_port():
    """A socket listening on a free local port, as another server would."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def test_ui_on_a_port_in_use_is_one_line_naming_port_and_nothing_before_it(capsys):
    with busy_port() as listener:
        port = listener.getsockname()[1]
        code = main(["ui", "--port", str(port)])
    out = capsys.readouterr()
    assert out.out == ""  # no "Mini LLM UI on http://..." first
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert f"port {port} is already in use" in lines[0] and "--port" in lines[0]


@pytest.fixture
def launch_without_serving(monkeypatch):
    """Gradio's launch and its wait for Ctrl-C do nothing: what `minillm ui` prints around them is seen."""
    import gradio

    launched = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.append(kwargs))
    monkeypatch.setattr(gradio.Blocks, "block_thread", lambda self: None)
    return launched


def free_port() -> int:
    with busy_port() as listener:
        return listener.getsockname()[1]


def test_ui_on_a_network_address_warns_who_can_load_models(launch_without_serving, tmp_path, capsys):
    port = free_port()
    assert main(["ui", "--host", "0.0.0.0", "--port", str(port), "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.err.startswith("warning: --host 0.0.0.0 is not local")
    assert "anyone on the network" in out.err and "any model file the server can read" in out.err
    assert out.out == f"Mini LLM UI on http://0.0.0.0:{port} (Ctrl+C to stop)\n"
    assert launch_without_serving[0]["server_name"] == "0.0.0.0"
    # The default stays on this machine: no warning.
    assert main(["ui", "--port", str(port), "--runs-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""
