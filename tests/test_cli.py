"""The `minillm` command: it trains, generates and evaluates; a user mistake is one line, no traceback."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import make_corpus, save_gpt2_style_tokenizer, single_thread, tiny_configs
from tokenizers import Tokenizer as HFTokenizer

import minillm.generation
import minillm.training
from minillm.checkpoint import load_run, load_torch
from minillm.cli import FINAL_SAMPLE_TOKENS, SAMPLE_PROMPT_TOKENS, main
from minillm.cli_generate import SAMPLE_SEPARATOR
from minillm.completions import COMPILE_NOTE, complete, stop_note
from minillm.data.prepare import bundled_data_path, sample_prompt
from minillm.generation import SHOWCASE_SEED, GenerationStop, stream_text
from minillm.sampling import SamplingConfig
from minillm.tokenizers import CharacterTokenizer
from minillm.training import evaluate_run, train
from minillm.training import trainer as trainer_module
from minillm.training.answers import describe_answers
from minillm.version import __version__

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--no-progress"]


# Tiny models run on one CPU thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_dtype_sets_the_precision_of_training(tmp_path, corpus_file, monkeypatch, dtype, expected):
    computed_in = set()  # the dtype of the logits of every forward pass of the trainer's model
    real_build_model = trainer_module.build_model

    def build_model(config):  # the real model, observed
        model = real_build_model(config)
        model.lm_head.register_forward_hook(lambda module, inputs, output: computed_in.add(output.dtype))
        return model

    monkeypatch.setattr(trainer_module, "build_model", build_model)
    out = tmp_path / "run"
    assert main(["train", str(corpus_file), *TINY, "--out", str(out), "--max-steps", "2", "--eval-interval", "2",
                 "--dtype", dtype]) == 0
    assert computed_in == {expected}
    assert all(w.dtype == torch.float32 for w in load_torch(out / "best_model.pt").values()), "fp32 weights"


def test_the_quick_start_trains_on_the_bundled_tiny_shakespeare(tmp_path, monkeypatch, capsys):
    """`minillm train` with no data and no preset, as the quick start runs it; only 3 steps long, and
    evaluated on fewer tokens (a full evaluation of the test split alone takes seconds)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--max-steps", "3", "--eval-interval", "3", "--eval-batches", "2",
                 "--test-fraction", "0.005", "--no-progress"]) == 0
    out = capsys.readouterr().out
    run_dir = Path("runs") / "tinyshakespeare-decoder_only-char"  # the default --out
    record = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    assert Path(record["source"]) == bundled_data_path().resolve()
    assert record["tokens"]["train"] > 900_000  # about 1.1M characters in all
    run = load_run(run_dir)
    assert (run.config.d_model, run.config.n_layers, run.config.max_seq_len) == (128, 4, 64)  # the cpu preset
    assert run.info["tokenizer_type"] == "char" and run.info["training"]["step"] == 3
    assert f"run saved in {run_dir} (best model: step 3" in out
    # The sample: the start of the test split, then what the best model makes of it.
    prompt = sample_prompt(run_dir, run.tokenizer, SAMPLE_PROMPT_TOKENS, encoder_decoder=False)
    assert prompt.strip()
    generated = "".join(stream_text(run.model, run.tokenizer, prompt,
                                    SamplingConfig(max_new_tokens=FINAL_SAMPLE_TOKENS, seed=SHOWCASE_SEED)))
    assert f"sample from the best model (prompt {prompt!r}):\n\n{prompt}{generated}\n" in out
    assert f"next: minillm generate {run_dir} --prompt" in out


@pytest.mark.parametrize("options, samples", [
    ([], 40),  # paragraph: the blank lines cut
    (["--split-mode", "line"], 70),  # every non-blank line
    (["--split-mode", "separator", "--separator", "@@"], 21),  # blank lines and all
])
def test_split_mode_and_separator_cut_the_samples(tmp_path, options, samples):
    data = tmp_path / "data.txt"
    data.write_text("a b\nc d\n\ne f@@g h\n\ni j\nk l\n@@m n\n\no p\n\n" * 10, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--out", str(out), "--max-steps", "1", "--eval-interval", "1",
                 *options]) == 0
    assert json.loads((out / "split.json").read_text(encoding="utf-8"))["n_samples"] == samples
    recorded = json.loads((out / "train_config.json").read_text(encoding="utf-8"))["train"]
    assert [recorded["split_mode"], recorded["separator"]] == [
        options[1] if options else "paragraph", options[3] if len(options) > 2 else "<|endoftext|>"]


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"minillm {__version__}\n"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: minillm") and all(c in out for c in ("train", "generate", "evaluate", "ui"))
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--d-model", "--learning-rate", "--split-mode", "--separator", "--dtype", "--resume"):
        assert option in out
    assert "clip the gradient norm" in out  # the help texts beside the config fields
    assert main(["generate", "--help"]) == 0
    assert "--source" in capsys.readouterr().out


def test_generate_has_an_option_per_sampling_setting_from_its_field(capsys):
    import dataclasses

    from minillm.cli import build_parser

    assert main(["generate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(SamplingConfig):
        assert f"--{f.name.replace('_', '-')} " in out
    assert "[0.01..100] (default: 1.0)" in out and "(0..1] (default: none)" in out  # ranges and defaults
    args = build_parser().parse_args(["generate", "RUN", "--top-p", "0.9", "--top-k", "off", "--seed", "3"])
    assert SamplingConfig(**{k.removeprefix("sampling__"): v for k, v in vars(args).items()
                             if k.startswith("sampling__")}) == SamplingConfig(top_p=0.9, top_k=None, seed=3)


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


def test_train_says_how_it_read_a_pair_file_and_takes_its_first_two_columns(tmp_path, capsys):
    data = tmp_path / "fra.txt"  # Tatoeba-style: source, target, attribution; no .tsv extension
    data.write_text("".join(f"w{i}\tm{i}\tCC-BY #{i}\n" for i in range(40)), encoding="utf-8")
    code = main(["train", str(data), *TINY, "--model", "transformer", "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--eval-interval", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert ("data file: fra.txt read as tab-separated pairs (by its content: every line has 3 tab-separated columns; "
            "--format text|tsv|jsonl overrides): 40 pairs") in captured.out
    assert "warning: " in captured.err and "has 3 tab-separated columns; using column 1 as the source" in captured.err
    # The end-of-training summary shows the scores of the greedy answers to the test pairs.
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text(encoding="utf-8"))
    assert f"test: {describe_answers(test)}\n" in captured.out and test["answers"] == 2  # (5% of 40 pairs)


def test_format_option_reads_a_pair_file_as_text(tmp_path, capsys):
    data = tmp_path / "p.tsv"
    data.write_text("".join(f"w{i}\tm{i}\n" for i in range(40)), encoding="utf-8")
    code = main(["train", str(data), *TINY, "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--eval-interval", "2", "--format", "text", "--split-mode", "line"])
    assert code == 0
    assert "read as plain text (as --format says" in capsys.readouterr().out


def test_the_task_option_chooses_what_a_decoder_only_model_learns_from_a_pair_file(tmp_path, corpus_file, capsys):
    data = tmp_path / "p.tsv"
    data.write_text("".join(f"w{i}\tm{i}\n" for i in range(40)), encoding="utf-8")
    for task, expected in ((None, "pairs"), ("text", "text"), ("pairs", "pairs")):
        out = tmp_path / f"run-{task}"
        options = ["--task", task] if task else []
        assert main(["train", str(data), *TINY, "--out", str(out), "--max-steps", "2", "--eval-interval", "2",
                     *options]) == 0
        assert json.loads((out / "split.json").read_text(encoding="utf-8"))["task"] == expected
    capsys.readouterr()
    code = main(["train", str(corpus_file), *TINY, "--out", str(tmp_path / "refused"), "--task", "pairs"])
    assert_one_line_error(capsys, code, "--task pairs needs a file of (source, target) pairs", str(corpus_file))
    assert not (tmp_path / "refused").exists()


def test_pair_file_whose_targets_are_all_empty_is_refused(tmp_path, capsys):
    data = tmp_path / "p.tsv"
    data.write_text("".join(f"w{i}\t\n" for i in range(40)), encoding="utf-8")
    code = main(["train", str(data), *TINY, "--model", "transformer", "--out", str(tmp_path / "run")])
    assert_one_line_error(capsys, code, "every target (column 2)", str(data), "--target-column")
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
    settings = SamplingConfig(max_new_tokens=40, temperature=0.9, top_k=10, seed=7)
    assert main(["generate", str(tiny_run), "--prompt", "the cat", "--max-new-tokens", "40",
                 "--temperature", "0.9", "--top-k", "10", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    run = load_run(tiny_run)
    expected = "the cat" + "".join(stream_text(run.model, run.tokenizer, "the cat", settings)) + "\n"
    assert out == expected


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_generate_with_compile_prints_the_same_text(tiny_run, capsys):
    options = ["generate", str(tiny_run), "--prompt", "the cat", "--max-new-tokens", "30", "--seed", "5"]
    assert main(options) == 0
    eager = capsys.readouterr().out
    assert main([*options, "--compile"]) == 0
    captured = capsys.readouterr()
    assert captured.out == eager and len(eager) > len("the cat\n")
    # The compile is announced and timed on stderr, before the text and its own note.
    notes = captured.err.splitlines()
    assert notes[0] == COMPILE_NOTE and re.fullmatch(r"\(compiled in [\d.]+ s\)", notes[1])
    assert notes[2].startswith("(stopped at") and len(notes) == 3


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory, corpus_file) -> Path:
    """A briefly trained char-level encoder-decoder run."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-transformer-char"
    with single_thread():
        train(*tiny_configs("transformer", data=corpus_file, max_steps=20, eval_interval=20), run_dir,
              progress=False, log=lambda message: None)
    return run_dir


@pytest.mark.parametrize("options, prompt, source", [
    (["--source", "a dog runs", "--prompt", "the "], "the ", "a dog runs"),  # the prompt: a target prefix
    (["--prompt", "a dog runs"], "", "a dog runs"),  # without --source the prompt is the source
])
def test_generate_on_an_encoder_decoder_run_prints_only_the_target(seq2seq_run, capsys, options, prompt, source):
    settings = SamplingConfig(max_new_tokens=30, temperature=0.9, seed=3)
    assert main(["generate", str(seq2seq_run), *options, "--max-new-tokens", "30", "--temperature", "0.9",
                 "--seed", "3"]) == 0
    run = load_run(seq2seq_run)
    target = "".join(stream_text(run.model, run.tokenizer, prompt, settings, source=source))
    assert capsys.readouterr().out == target + "\n"  # no prompt, no source: the generated target
    other_source = "".join(stream_text(run.model, run.tokenizer, prompt, settings, source="the old king"))
    assert other_source != target, "the source must matter, or this test could not tell"


def test_generate_says_when_the_model_ended_the_text(ending_run, capsys):
    # A real model that ends its text (EOS) three tokens after the prompt.
    assert main(["generate", str(ending_run), "--prompt", "abc", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "abcdef\n"  # stdout stays the text alone
    assert re.fullmatch(r"\(stopped at end of text after 3 tokens; [\d,]+\.\d tokens/s\)\n", captured.err)


def test_generate_num_samples_prints_each_sample_cut_at_its_stop_string(tiny_run, capsys):
    settings = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=4)
    assert main(["generate", str(tiny_run), "--prompt", "the cat", "--max-new-tokens", "40", "--temperature", "1",
                 "--seed", "4", "--num-samples", "3", "--stop", "e", "--stop", ".\n"]) == 0
    captured = capsys.readouterr()
    run = load_run(tiny_run)
    result = complete(run.model, run.tokenizer, "the cat", settings, num_samples=3, stops=["e", ".\n"])
    assert captured.out == f"\n{SAMPLE_SEPARATOR}\n".join(f"the cat{s.text}" for s in result.samples) + "\n"
    assert all("e" not in s.text and ".\n" not in s.text for s in result.samples)
    assert [s.stop_reason for s in result.samples].count(GenerationStop.STOP_STRING) >= 2, "the stops must cut"
    notes = captured.err.splitlines()
    assert notes[:3] == [f"(sample {i} of 3: {stop_note(s.stop_reason, s.tokens, s.stop_string)})"
                         for i, s in enumerate(result.samples, start=1)]
    assert re.fullmatch(rf"\({result.tokens} tokens in [\d.]+ s: [\d,]+\.\d tokens/s\)", notes[3])


def test_generate_prompt_file_writes_json_lines_with_the_settings_and_token_counts(tiny_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\na dog \n", encoding="utf-8")
    assert main(["generate", str(tiny_run), "--prompt-file", str(prompts), "--max-new-tokens", "30", "--seed", "2",
                 "--num-samples", "2", "--stop", "."]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    run = load_run(tiny_run)
    settings = SamplingConfig(max_new_tokens=30, seed=2)
    assert [(r["line"], r["prompt"]) for r in records] == [(1, "the cat"), (3, "a dog ")]
    for record in records:
        result = complete(run.model, run.tokenizer, record["prompt"], settings, num_samples=2, stops=["."])
        assert record["samples"] == [{"text": s.text, "tokens": s.tokens, "stop_reason": str(s.stop_reason),
                                      "stop_string": s.stop_string} for s in result.samples]
        assert record["prompt_tokens"] == len(run.tokenizer.encode(record["prompt"]))
        assert record["settings"] == {"max_new_tokens": 30, "temperature": 0.8, "top_k": 50, "top_p": None,
                                      "repetition_penalty": 1.0, "seed": 2, "num_samples": 2, "stop": ["."]}
    tokens = sum(s["tokens"] for r in records for s in r["samples"])
    assert re.fullmatch(rf"\(2 prompts, {tokens} tokens in [\d.]+ s: [\d,]+\.\d tokens/s\)\n", captured.err)
    assert main(["generate", str(tiny_run), "--prompt-file", str(prompts), "--prompt", "x"]) == 2
    assert "--prompt-file gives the prompts" in capsys.readouterr().err


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


def test_evaluate_prints_the_test_loss_and_perplexity_training_saved(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run)]) == 0
    saved = json.loads((tiny_run / "test_metrics.json").read_text(encoding="utf-8"))
    assert capsys.readouterr().out == (f"{tiny_run} test split: loss {saved['loss']:.4f}, perplexity "
                                       f"{saved['perplexity']:.2f}, {saved['bits_per_byte']:.3f} bits per byte "
                                       f"({saved['bits_per_char']:.3f} per character) over {saved['tokens']:,} "
                                       "tokens\n")


def test_evaluate_data_scores_every_sample_of_that_file(tiny_run, tmp_path, capsys):
    data = tmp_path / "other.txt"
    data.write_text("the fox sees the moon.\n\na dog runs to the hill.\n", encoding="utf-8")
    assert main(["evaluate", str(tiny_run), "--data", str(data)]) == 0
    expected = evaluate_run(tiny_run, data)
    # The stream BOS sample EOS BOS sample EOS (one token per character): every token but the first is scored.
    tokens = sum(len(line) + 2 for line in ["the fox sees the moon.", "a dog runs to the hill."]) - 1
    assert expected["tokens"] == tokens
    assert capsys.readouterr().out == (f"{expected['data']}: loss {expected['loss']:.4f}, perplexity "
                                       f"{expected['perplexity']:.2f}, {expected['bits_per_byte']:.3f} bits per "
                                       f"byte ({expected['bits_per_char']:.3f} per character) over {tokens:,} "
                                       "tokens\n")
    assert expected["data"].startswith(f"{data} (read as plain text")


def test_evaluate_data_warns_about_characters_the_tokenizer_never_saw(tiny_run, tmp_path, capsys):
    data = tmp_path / "other.txt"
    data.write_text("the \u03a9 cat sees the moon.\n\nthe \u03a9\u03a9 dog.\n", encoding="utf-8")
    assert main(["evaluate", str(tiny_run), "--data", str(data)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {data}: 3 character(s) of the input are not in this run's vocabulary")


def test_evaluate_prints_loss_perplexity_and_bits_per_byte(tiny_run, corpus_file, capsys):
    assert main(["evaluate", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "test split: loss" in out and "perplexity" in out and "bits per byte" in out and "per character" in out
    assert main(["evaluate", str(tiny_run), "--data", str(corpus_file), "--test-tokens", "2000"]) == 0
    out = capsys.readouterr().out
    assert "(read as plain text, by its content" in out and " \u00b1 " in out and "random sample of" in out


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
    assert calls == [dict(run_dir=tmp_path, host="127.0.0.1", port=7999, runs_dir=tmp_path, share=False,
                          data_dirs=[], compile=False)]
    assert main(["ui", "--data-dir", str(tmp_path), "--data-dir", "/srv/texts", "--compile"]) == 0
    assert calls[-1]["data_dirs"] == [tmp_path, Path("/srv/texts")] and calls[-1]["compile"] is True


def test_ui_refuses_a_data_dir_that_is_not_a_folder(launch_without_serving, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("text")
    for folder in (tmp_path / "missing", tmp_path / "notes.txt"):
        assert_one_line_error(capsys, main(["ui", "--data-dir", str(folder), "--port", str(free_port())]),
                              f"--data-dir {folder} is not a folder")
    assert launch_without_serving == []


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


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KB filesystem (tmpfs; needs root, as on the CI machine), so that a write really fills it."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.parametrize("paragraphs, model, full_at", [
    (3000, [], "train.bin"),  # the token files do not fit
    (300, ["--d-model", "128", "--n-heads", "2"], ".pt"),  # the data fits, a checkpoint does not
])
def test_a_disk_that_fills_up_during_training_is_one_clear_line(small_disk, capsys, paragraphs, model, full_at):
    corpus = small_disk.parent / "corpus.txt"  # on the normal disk: only the run folder is short of space
    corpus.write_text(make_corpus(paragraphs), encoding="utf-8")
    run_dir = small_disk / "run"
    status = main(["train", str(corpus), *TINY, *model, "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.startswith("error:") and "no space left" in err.lower() and "another disk" in err
    assert full_at in err.split(";")[0]
    assert not list(run_dir.rglob("*.tmp"))  # no temporary file left behind


def test_train_help_lists_each_presets_values(capsys):
    from minillm.config import PRESETS

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    presets = out[out.index("presets ("):]
    for name, preset in PRESETS.items():
        assert f"{name}: {preset.description}" in presets
        for key, value in {**preset.model, **preset.train}.items():
            option = f"--{key.replace('_', '-')}"
            if isinstance(value, bool):  # a switch: --qk-norm or --no-qk-norm
                assert (option if value else f"--no-{option[2:]}") in presets.split(), (name, key)
                continue
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            assert f"{option} {shown}" in presets, (name, key)


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
    assert "anyone on the network" in out.err and "load any run the server can read" in out.err
    assert "the files under --data-dir" in out.err
    assert out.out == f"Mini LLM UI on http://0.0.0.0:{port} (Ctrl+C to stop)\n"
    assert launch_without_serving[0]["server_name"] == "0.0.0.0"
    # The default stays on this machine: no warning.
    assert main(["ui", "--port", str(port), "--runs-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""


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


def test_an_error_during_training_starts_a_line_of_its_own_after_the_progress_bar(tmp_path, corpus_file, capsys):
    # An absurd learning rate (and no clipping) diverges at the first evaluation, with the progress bar on.
    code = main(["train", str(corpus_file), "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "10",
                 "--eval-interval", "2", "--learning-rate", "1e8", "--min-lr", "0", "--warmup-steps", "0",
                 "--grad-clip", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "training:" in err  # (the bar was drawn)
    before, error, after = err.partition("error: training diverged")
    assert error and before.endswith("\n") and after.count("\n") == 1 and after.endswith("\n"), err[-600:]
