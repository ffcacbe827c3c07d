"""Shared fixtures: a small generated corpus, one tiny trained run that every test file may reuse, and the
headless Chromium of the browser tests.

`tiny_run` is session-scoped and shared: tests that change a run must copy it first
(`shutil.copytree(tiny_run, tmp_path / "run")`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
from pathlib import Path
from types import ModuleType

import pytest
import torch

from minillm.config import preset_configs

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CORPUS_PARAGRAPHS = 300
SUBJECTS = ["the cat", "a dog", "the old king", "my friend", "the fox", "a bird"]
VERBS = ["sees", "likes", "runs to", "sings to", "waits for", "jumps over"]
OBJECTS = ["the moon", "a tree", "the river", "the queen", "a small house", "the hill"]


def make_corpus(n_paragraphs: int = CORPUS_PARAGRAPHS, seed: int = 0) -> str:
    """Paragraphs of short sentences from a tiny grammar: learnable in a few dozen steps."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        lines = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                 for _ in range(rng.randint(1, 3))]
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs) + "\n"


def save_gpt2_style_tokenizer(path: Path, texts: list[str], vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer.json laid out like GPT-2's: no special token but <|endoftext|>, which comes
    after every merge (GPT-2's id 50256 is its last), and GPT-2's byte-level post-processor."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    hf.add_special_tokens(["<|endoftext|>"])
    path.parent.mkdir(parents=True, exist_ok=True)
    hf.save(str(path))
    return path


SENTENCEPIECE_SPACE = "\u2581"
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def save_llama_style_tokenizer(path: Path, texts: list[str], vocab_size: int = 400, alphabet: int = 40,
                               style: str = "llama2") -> Path:
    """A BPE tokenizer.json laid out like Llama-2's (style "llama2": a Prepend + Replace normaliser that writes
    spaces as "▁") or Mistral's ("metaspace": a Metaspace pre-tokenizer): <unk>, <s>, </s> at 0, 1, 2, the 256
    byte-fallback tokens <0x00>..<0xFF> after them, then merges learned from `texts` on at most `alphabet`
    characters (the others are spelled by their bytes), and BOS added in front. Built with `tokenizers` itself."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    learner = HFTokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SENTENCEPIECE_SPACE, prepend_scheme="always")
    learner.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *BYTE_TOKENS], limit_alphabet=alphabet,
        show_progress=False))
    raw = json.loads(learner.to_str())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    raw["model"].update(byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    metaspace = {"type": "Metaspace", "replacement": SENTENCEPIECE_SPACE, "prepend_scheme": "first", "split": False}
    if style == "llama2":
        raw["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SENTENCEPIECE_SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SENTENCEPIECE_SPACE}]}
        raw["pre_tokenizer"] = None
        first = [{"type": "Replace", "pattern": {"String": SENTENCEPIECE_SPACE}, "content": " "}]
        last = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
    else:
        raw["normalizer"], raw["pre_tokenizer"] = None, metaspace
        first, last = [metaspace], []
    raw["decoder"] = {"type": "Sequence", "decoders": [*first, {"type": "ByteFallback"}, {"type": "Fuse"}, *last]}
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    raw["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                                      {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    HFTokenizer.from_str(json.dumps(raw)).save(str(path))
    return path


def tiny_configs(model_type: str = "decoder_only", tokenizer: str = "char", data: str | Path | None = None,
                 **train_overrides):
    """The tiny preset's configs, for a data file."""
    return preset_configs("tiny", {"model_type": model_type},
                          {"tokenizer": tokenizer, "data": str(data) if data else None, **train_overrides})


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_browser() -> None:
    """Skip (fail under CI) with the reason when the browser cannot run here."""
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (scripts/install_browser.sh installs Debian's chromium)"
    if reason:
        if under_ci():
            pytest.fail(f"browser test cannot run under CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, headless, for the tests of one module."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


def import_dev_dependency(name: str) -> ModuleType:
    """Import a package of the dev extras, or skip with the reason (pytest's -ra lists it in the summary).

    Under CI (CI=true) a missing one is a failure, not a skip: CI installs the dev extras.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        reason = f"{name} is not installed ({e}); pip install -e '.[dev]' (or `make setup`) to run this test"
        if under_ci():
            pytest.fail(f"under CI: {reason}", pytrace=False)
        pytest.skip(reason)


@contextlib.contextmanager
def single_thread():
    """Run tiny models on one CPU thread: at this size a second thread only adds synchronisation,
    and on a loaded machine two threads that spin-wait on each other can make a test 10x slower
    (training the string reverser took 225 s on two threads with the machine loaded, 13 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_file) -> Path:
    """The run folder of a char-level decoder-only model trained with the tiny preset (a few seconds)."""
    from minillm.training import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny-decoder_only-char"
    model_config, train_config = tiny_configs(data=corpus_file)
    with single_thread():
        train(model_config, train_config, run_dir, progress=False, log=lambda message: None)
    return run_dir


ENDING_SAMPLE = "abcdef"  # every sample of the ending run's data: after the prompt "abc", "def" then EOS


@pytest.fixture(scope="session")
def ending_run(tmp_path_factory) -> Path:
    """A char-level run trained (tiny preset, a few seconds) on paragraphs that are all ENDING_SAMPLE: greedy
    decoding after "abc" writes "def" and then ends the text itself (EOS), a real model where a test needs one
    that stops early."""
    from minillm.training import train

    root = tmp_path_factory.mktemp("ending")
    data = root / "abcdef.txt"
    data.write_text("\n\n".join([ENDING_SAMPLE] * 200) + "\n", encoding="utf-8")
    with single_thread():
        train(*tiny_configs(data=data), root / "run", progress=False, log=lambda message: None)
    return root / "run"
REPO = Path(__file__).resolve().parents[1]
DIALOGUES = 300  # conversations of the tests' data set (scripts/make_dialogues.py)
CHAT_CONTEXT = 128  # the tiny chat run's context: a conversation of the tests' data set is up to about 120 characters


@pytest.fixture(scope="session")
def dialogues_file(tmp_path_factory) -> Path:
    """A small conversation file (JSONL, OpenAI's format) written by the repository's script."""
    import subprocess
    import sys

    path = tmp_path_factory.mktemp("dialogues") / "dialogues.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_dialogues.py"), "--out", str(path), "--n",
                    str(DIALOGUES), "--max-turns", "2"], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory, dialogues_file) -> Path:
    """The run folder of a char-level decoder-only chat model trained with the tiny preset on the dialogues."""
    from minillm.training import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny-chat"
    model_config, train_config = preset_configs("tiny", {"max_seq_len": CHAT_CONTEXT},
                                                {"data": str(dialogues_file), "max_steps": 40})
    with single_thread():
        train(model_config, train_config, run_dir, progress=False, log=lambda message: None)
    return run_dir
