"""Training with imported tokenizers that do not spell text byte by byte: Llama-2/Mistral-style BPE with byte
fallback is supported end to end (bits per byte, streaming, export to transformers and to llama.cpp's "llama"
tokenizer); a tokenizer that cannot spell the data is refused before any file, or warned about, and the
bytes it cannot spell count in bits per byte."""

from __future__ import annotations

import json
import math

import pytest
from conftest import make_corpus, save_llama_style_tokenizer, tiny_configs

from minillm.checkpoint import load_run
from minillm.errors import MiniLLMError
from minillm.export import export_run
from minillm.generation import stream_text, unknown_characters_warning
from minillm.sampling import SamplingConfig
from minillm.training import evaluate_run, train
from minillm.training.evaluation import RAW_BITS_PER_BYTE, honest_bits_per_byte

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "the old king sees 世界 and the moon.\n  x"


def train_with(tokenizer_path, data, run_dir, log=lambda m: None, **overrides):
    settings = {"max_steps": 20, "eval_interval": 10, "tokenizer_file": str(tokenizer_path), **overrides}
    return train(*tiny_configs(data=data, **settings), run_dir, progress=False, log=log)


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def llama_run(request, tmp_path_factory, corpus_file):
    root = tmp_path_factory.mktemp(f"llama-{request.param}")
    path = save_llama_style_tokenizer(root / "tok" / "tokenizer.json", [corpus_file.read_text()], style=request.param)
    train_with(path, corpus_file, root / "run")
    return root / "run"


def test_a_llama_style_tokenizer_trains_scores_and_streams(llama_run):
    """It used to die with KeyError: '▁' at the first evaluation, leaving a run without a model."""
    run = load_run(llama_run)
    metrics = json.loads((llama_run / "test_metrics.json").read_text(encoding="utf-8"))
    assert math.isfinite(metrics["bits_per_byte"]) and 0 < metrics["bits_per_byte"] < RAW_BITS_PER_BYTE
    assert evaluate_run(llama_run)["bits_per_byte"] == pytest.approx(metrics["bits_per_byte"])
    chunks = list(stream_text(run.model, run.tokenizer, "the cat", SamplingConfig(max_new_tokens=30, seed=1)))
    ids = run.tokenizer.encode("the cat", add_special_tokens=True)[:-1]  # (what the stream is prompted with)
    assert chunks and all("\N{REPLACEMENT CHARACTER}" not in chunk for chunk in chunks) and ids[0] == 1


def test_a_llama_style_run_exports_to_transformers_with_the_same_tokens(llama_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = load_run(llama_run)
    out = export_run(llama_run, "hf", tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    plain = run.tokenizer.encode(TEXT)
    assert tokenizer(TEXT, add_special_tokens=False).input_ids == plain
    assert tokenizer(TEXT).input_ids == [run.tokenizer.bos_id, *plain]
    assert tokenizer.decode(plain) == run.tokenizer.decode(plain) == TEXT


def test_a_llama_style_run_exports_to_gguf_as_llama_cpps_sentencepiece_tokenizer(llama_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    run = load_run(llama_run)
    reader = gguf.GGUFReader(export_run(llama_run, "gguf", tmp_path / "model.gguf"))

    def field(name):
        return reader.fields[name].contents()

    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.add_space_prefix") is True
    assert "tokenizer.ggml.merges" not in reader.fields  # (the "llama" model merges by score)
    tokens, scores, types = (field(f"tokenizer.ggml.{name}") for name in ("tokens", "scores", "token_type"))
    assert tokens == [run.tokenizer.token_text(i) for i in range(run.config.vocab_size)]
    assert [types[i] for i in range(3, 3 + 256)] == [gguf.TokenType.BYTE] * 256 and tokens[3] == "<0x00>"
    assert (types[0], types[1], types[2]) == (gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL)
    assert field("tokenizer.ggml.unknown_token_id") == 0 and field("tokenizer.ggml.bos_token_id") == 1
    # Each merge's token scores below every earlier merge's: llama.cpp replays them in their order.
    merges = run.tokenizer.hugging_face_json()["model"]["merges"]
    merged = [scores[tokens.index("".join(m.split(" ", 1) if isinstance(m, str) else m))] for m in merges]
    assert merged == sorted(merged, reverse=True) and len(set(merged)) == len(merged) and max(merged) < 0


def word_level_tokenizer(path, texts):
    """A BPE without byte fallback or byte level, trained on English: it splits on whitespace (dropping it)
    and maps every character outside its alphabet to <unk>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                      show_progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    hf.save(str(path))
    return path


def test_a_tokenizer_that_cannot_spell_the_data_is_refused_before_any_file(tmp_path, corpus_file):
    tokenizer = word_level_tokenizer(tmp_path / "tok" / "tokenizer.json", [corpus_file.read_text()])
    data = tmp_path / "chinese.txt"
    data.write_text("\n\n".join("世界你好，这是一个测试。the cat" for _ in range(200)), encoding="utf-8")
    with pytest.raises(MiniLLMError, match=r"cannot spell \d+\.\d% of the training text .*'世' x\d+"):
        train_with(tokenizer, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bits_per_byte_count_the_bytes_a_tokenizer_cannot_spell(tmp_path):
    """Below the refusal threshold: a warning that names the characters, and bits per byte in which each byte
    the tokenizer cannot spell costs 8 bits (left out, a tokenizer that drops text would look good)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    corpus = make_corpus(300)
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))  # spaces as "▁", but no byte fallback
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=200, show_progress=False,
                                                         special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    data = tmp_path / "data.txt"
    data.write_text(corpus.replace("the hill.", "the hill~."), encoding="utf-8")  # '~': not in its alphabet
    said: list[str] = []
    result = train_with(tmp_path / "tokenizer.json", data, tmp_path / "run", log=said.append)
    [warning] = [line for line in said if line.startswith("warning:") and "cannot spell" in line]
    assert "'~' x" in warning and "8 bits" in warning
    # generate warns about such characters in a prompt, as it does for a character tokenizer's unseen ones
    assert unknown_characters_warning(load_run(tmp_path / "run").tokenizer, "the hill~").startswith("1 character(s)")
    record = json.loads((tmp_path / "run" / "split.json").read_text(encoding="utf-8"))
    unspelled, total = record["unspelled"]["test"]
    assert 0 < unspelled < total / 100
    metrics = result.test_metrics
    share = unspelled / total
    assert metrics["unspelled_share"] == pytest.approx(share)
    assert metrics["bits_per_byte"] == pytest.approx(
        honest_bits_per_byte(metrics["loss"], metrics["tokens"], metrics["bytes"], share))
    spelled_only = metrics["loss"] * metrics["tokens"] / math.log(2) / metrics["bytes"]
    assert metrics["bits_per_byte"] > spelled_only  # (the model's loss is below 8 bits per byte here)


def test_honest_bits_per_byte():
    assert honest_bits_per_byte(1.0, 100, 200) == pytest.approx(100 / math.log(2) / 200)
    # A quarter of the text unspelled: 200 spelled bytes stand for 266.7 in all, the rest at 8 bits each.
    expected = (100 / math.log(2) + RAW_BITS_PER_BYTE * 200 / 3) / (200 + 200 / 3)
    assert honest_bits_per_byte(1.0, 100, 200, 0.25) == pytest.approx(expected)
    assert honest_bits_per_byte(1.0, 100, 0, 1.0) == RAW_BITS_PER_BYTE
