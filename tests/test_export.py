"""Export: a tiny run of each tokenizer kind loads in transformers as the same model (logits, greedy ids,
tokens), its GGUF file holds exactly the run's tensors and tokenizer in llama.cpp's layout, the
encoder-decoder exports as safetensors and is refused elsewhere, and every mistake is one clear error."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import save_gpt2_style_tokenizer, tiny_configs

from minillm.checkpoint import load_run
from minillm.cli import main
from minillm.config import ModelConfig
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.export import EXPORT_FORMATS, export_run
from minillm.export.card import example_prompt
from minillm.export.gguf import TENSOR_NAMES, gguf_name, unpermute_for_rope
from minillm.models import build_model
from minillm.models.llama import split_fused
from minillm.sampling import SamplingConfig
from minillm.training import train

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
safetensors_torch = pytest.importorskip("safetensors.torch")

CONTEXT = 96  # room for a prompt and 50 greedy tokens without sliding the window (transformers does not)
GREEDY_TOKENS = 50
LOGITS_TOLERANCE = 1e-4
MIXED_TEXT = "Café naïve façade — Ærøskøbing, 東京の中文字符 😀👩‍👩‍👧\tTab\tend\r\nCRLF line\r\nthe cat sees"


def train_tiny(path, corpus_file, model_type="decoder_only", tokenizer="bpe", model_options=None, **train_overrides):
    model_config, train_config = tiny_configs(model_type, tokenizer, corpus_file, max_steps=30, **train_overrides)
    train(model_config.replace(max_seq_len=CONTEXT, **(model_options or {})), train_config, path, progress=False,
          log=lambda m: None)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file):
    """A tiny decoder-only run per tokenizer: trained BPE, characters, and an imported GPT-2-style BPE."""
    root = tmp_path_factory.mktemp("export-runs")
    gpt2 = save_gpt2_style_tokenizer(root / "gpt2" / "tokenizer.json", [corpus_file.read_text()], 400)
    return {"bpe": train_tiny(root / "bpe", corpus_file),
            "char": train_tiny(root / "char", corpus_file, tokenizer="char"),
            "gpt2": train_tiny(root / "gpt2-run", corpus_file, tokenizer_file=str(gpt2))}


@pytest.fixture(scope="module")
def qk_norm_run(tmp_path_factory, corpus_file):
    """A BPE run with QK-norm (the cpu preset's architecture): Qwen3 in transformers and llama.cpp."""
    return train_tiny(tmp_path_factory.mktemp("export-qk-norm") / "run", corpus_file, model_options={"qk_norm": True})


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory, corpus_file):
    return train_tiny(tmp_path_factory.mktemp("export-seq2seq") / "run", corpus_file, "transformer", "char")


def prompt_ids(run) -> torch.Tensor:
    return torch.tensor([run.tokenizer.encode("the cat sees", add_special_tokens=True)[:-1]])  # BOS + text


# ---- Hugging Face ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "char", "gpt2"])
def test_hf_export_is_the_same_model_in_transformers(runs, kind, tmp_path, one_thread):
    run = load_run(runs[kind], "cpu")
    out = export_run(runs[kind], "hf", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32

    generator = torch.Generator().manual_seed(0)
    ids = torch.cat([prompt_ids(run), torch.randint(run.config.vocab_size, (1, 40), generator=generator)], dim=1)
    with torch.no_grad():
        difference = (model(ids).logits - run.model(ids)[0]).abs().max().item()
    assert difference <= LOGITS_TOLERANCE

    ids = prompt_ids(run)
    ours = torch.cat([ids, Engine(run.model).generate(ids, SamplingConfig(max_new_tokens=GREEDY_TOKENS,
                                                                          temperature=0.0))], dim=1)
    model.generation_config.eos_token_id = None  # 50 tokens, also past an end of sample, as ours above
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=GREEDY_TOKENS)
    assert theirs.shape[1] == ids.shape[1] + GREEDY_TOKENS and theirs.tolist() == ours.tolist()

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    plain = run.tokenizer.encode(MIXED_TEXT)
    assert tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids == plain
    assert tokenizer(MIXED_TEXT).input_ids == [run.tokenizer.bos_id, *plain]  # BOS first, as in training
    assert tokenizer.decode(plain) == run.tokenizer.decode(plain)
    assert tokenizer.decode([run.tokenizer.bos_id, *plain, run.tokenizer.eos_id], skip_special_tokens=True) == \
        run.tokenizer.decode(plain)
    if kind != "char":  # byte-level: every text round-trips (the char run has unseen characters: U+FFFD)
        assert tokenizer.decode(plain) == MIXED_TEXT
    else:
        assert run.tokenizer.count_unknown(MIXED_TEXT) > 0 and "\N{REPLACEMENT CHARACTER}" in tokenizer.decode(plain)
    roles = {role: token for role, (token, _) in run.tokenizer.role_tokens().items()}
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (roles["pad"], roles["bos"], roles["eos"])


def test_hf_export_describes_the_model_its_sampling_and_its_training(runs, tmp_path, corpus_file):
    run = load_run(runs["bpe"], "cpu")
    out = export_run(runs["bpe"], "hf", tmp_path / "demo-hf", dtype="float16")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    c = run.config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (
        c.d_model, c.d_ff, c.n_layers)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (c.n_heads, c.n_heads)
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (
        c.rope_theta, c.norm_eps, c.max_seq_len)
    assert (config["vocab_size"], config["tie_word_embeddings"]) == (c.vocab_size, True)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (c.bos_id, c.eos_id, c.pad_id)
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.temperature, generation.top_k, generation.do_sample) == (
        SamplingConfig().temperature, SamplingConfig().top_k, True)
    # Its length stays within the context (transformers has no sliding window), the prompt included.
    assert (generation.max_length, generation.max_new_tokens) == (c.max_seq_len, None)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    model.generation_config.eos_token_id = None  # (no early end: the length is the one to see)
    ids = prompt_ids(run)
    assert model.generate(ids, attention_mask=torch.ones_like(ids)).shape[1] == c.max_seq_len
    weights = safetensors_torch.load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights and weights["model.embed_tokens.weight"].dtype == torch.float16
    card = (out / "README.md").read_text(encoding="utf-8")
    val_loss = run.info["training"]["val_loss"]
    assert f"validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f})" in card
    assert "corpus.txt" in card and "tokens seen" in card and "test loss" in card and "temperature 0.8" in card
    assert 'AutoModelForCausalLM.from_pretrained("demo-hf")' in card
    prompt = example_prompt(run)  # the how-to's prompt comes from the run's data, not another corpus's
    assert prompt.strip() and prompt in corpus_file.read_text() and f"tokenizer({prompt!r}" in card
    assert "ROMEO" not in card and "model.generate(**inputs)" in card
    assert "\nlicense: mit\n" in card.split("\n---\n")[0]  # (the hub's front matter: the project's license)


# ---- GGUF -----------------------------------------------------------------------------------------------

def gguf_field(reader, name):
    return reader.fields[name].contents()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_gguf_file_holds_the_runs_tensors_and_tokenizer(runs, kind, dtype, tmp_path):
    run = load_run(runs[kind], "cpu")
    reader = gguf.GGUFReader(export_run(runs[kind], "gguf", tmp_path / "model.gguf", dtype=dtype))
    c = run.config
    expected = {"general.architecture": "llama", "llama.context_length": c.max_seq_len,
                "llama.embedding_length": c.d_model, "llama.block_count": c.n_layers,
                "llama.feed_forward_length": c.d_ff, "llama.attention.head_count": c.n_heads,
                "llama.attention.head_count_kv": c.n_heads, "llama.rope.dimension_count": c.head_dim,
                "llama.vocab_size": c.vocab_size, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                "tokenizer.ggml.bos_token_id": c.bos_id, "tokenizer.ggml.eos_token_id": c.eos_id,
                "tokenizer.ggml.padding_token_id": c.pad_id, "tokenizer.ggml.add_bos_token": True,
                "general.license": "MIT"}
    assert {name: gguf_field(reader, name) for name in expected} == expected
    assert gguf_field(reader, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert gguf_field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)

    hf = run.tokenizer.hugging_face_json()
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    assert tokens == [run.tokenizer.token_text(i) for i in range(c.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf["model"]["merges"]]
    assert gguf_field(reader, "tokenizer.ggml.merges") == merges and len(merges) > 0
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    special = {t["id"] for t in hf["added_tokens"] if t["special"]}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == special >= {c.bos_id, c.eos_id, c.pad_id}

    state = split_fused(run.model.state_dict(), run.config)  # the Llama names the GGUF file uses
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert set(stored) == {gguf_name(name) for name in state if name != "lm_head.weight"}  # tied: no output
    for name, weight in state.items():
        if name == "lm_head.weight":
            continue
        tensor = stored[gguf_name(name)]
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = unpermute_for_rope(tensor, c.n_heads if name.endswith("q_proj.weight") else c.n_kv_heads)
        if weight.dim() == 1 or dtype == "float32":
            assert tensor.dtype == torch.float32 and torch.equal(tensor, weight), name
        else:
            assert tensor.dtype == torch.float16 and torch.equal(tensor, weight.half()), name


def stored_weights(reader) -> dict[str, torch.Tensor]:
    """The GGUF file's tensors as float64, quantized ones dequantized by the `gguf` package, in numpy's order."""
    return {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).double()
            for t in reader.tensors}


def llama_cpp_logits(reader, config: ModelConfig, ids: list[int]) -> torch.Tensor:
    """llama.cpp's Llama forward pass, written independently of our model from the GGUF tensors: RoPE
    rotates adjacent pairs of dimensions (its "normal" mode), which is why the exporter permutes q and k.
    Its qwen3 is the same with an RMSNorm on each head's q and k first and RoPE over the two halves ("neox")."""
    w = stored_weights(reader)
    T, H, Hkv, Dh = len(ids), config.n_heads, config.n_kv_heads, config.head_dim
    qwen3 = gguf_field(reader, "general.architecture") == "qwen3"

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps) * weight

    def rope(x):  # (T, H, Dh), pairs (2i, 2i + 1) rotated by pos * theta^(-2i/Dh); qwen3: pairs (i, i + Dh/2)
        freqs = config.rope_theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
        angle = torch.arange(T, dtype=torch.float64)[:, None, None] * freqs
        x0, x1 = (x[..., :Dh // 2], x[..., Dh // 2:]) if qwen3 else (x[..., 0::2], x[..., 1::2])
        rotated = [x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()]
        return torch.cat(rotated, -1) if qwen3 else torch.stack(rotated, -1).flatten(2)

    def heads(h, i, n):  # (T, H, Dh) queries or keys of layer i, normed per head in qwen3
        x = (h @ w[f"blk.{i}.attn_{n}.weight"].T).view(T, -1, Dh)
        return rope(norm(x, w[f"blk.{i}.attn_{n}_norm.weight"]) if qwen3 else x)

    x = w["token_embd.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(config.n_layers):
        h = norm(x, w[f"blk.{i}.attn_norm.weight"])
        q, k = heads(h, i, "q"), heads(h, i, "k")
        v = (h @ w[f"blk.{i}.attn_v.weight"].T).view(T, Hkv, Dh)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # a k/v head per group
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(Dh)
        attention = scores.masked_fill(~causal, -math.inf).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", attention, v).reshape(T, H * Dh) @ w[f"blk.{i}.attn_output.weight"].T
        h = norm(x, w[f"blk.{i}.ffn_norm.weight"])
        gated = torch.nn.functional.silu(h @ w[f"blk.{i}.ffn_gate.weight"].T) * (h @ w[f"blk.{i}.ffn_up.weight"].T)
        x = x + gated @ w[f"blk.{i}.ffn_down.weight"].T
    return norm(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


def test_gguf_tensors_in_llama_cpp_layout_compute_the_same_logits(runs, tmp_path):
    run = load_run(runs["bpe"], "cpu")
    reader = gguf.GGUFReader(export_run(runs["bpe"], "gguf", tmp_path / "model.gguf"))
    ids = prompt_ids(run)[0].tolist() + run.tokenizer.encode(" the old king waits for the river.")
    with torch.no_grad():
        ours = run.model(torch.tensor([ids]))[0][0].double()
    assert (llama_cpp_logits(reader, run.config, ids) - ours).abs().max().item() <= LOGITS_TOLERANCE
    assert set(TENSOR_NAMES.values()) >= {"token_embd.weight", "output_norm.weight"}


# A quantized weight is within (its block's largest |weight|) / this of its value: q8_0 rounds to steps of
# max/127 (error half a step, and the float16 scale's rounding); q4_0 to steps of max/8, its one clamped
# end (the value opposite the largest) a whole step off. The float16 scale's rounding (2^-11 relative, times
# at most 8 steps in q4_0) adds up to 2^-8 of that.
QUANT_ERROR_DIVISOR = {"q8_0": 127, "q4_0": 8}
SCALE_ROUNDING = 1 + 2**-8
QUANT_BLOCK = 32
Q8_LOGITS_TOLERANCE = 0.05
QUANTIZED_GREEDY_TOKENS = 20


def block_errors(stored: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|stored - weight|, the largest |weight| of each one's block), both (blocks, QUANT_BLOCK)."""
    weight = weight.double().reshape(-1, QUANT_BLOCK)
    return (stored.reshape(-1, QUANT_BLOCK) - weight).abs(), weight.abs().amax(1, keepdim=True)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_gguf_holds_each_matrix_in_blocks_close_to_the_weights(runs, dtype, tmp_path):
    run = load_run(runs["bpe"], "cpu")
    path = export_run(runs["bpe"], "gguf", tmp_path / "model.gguf", dtype=dtype)
    reader = gguf.GGUFReader(path)
    assert gguf_field(reader, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{dtype.upper()}"]
    state = split_fused(run.model.state_dict(), run.config)
    weights = stored_weights(reader)
    for t in reader.tensors:
        name = next(ours for ours in state if ours != "lm_head.weight" and gguf_name(ours) == t.name)
        weight = state[name]
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[t.name] = unpermute_for_rope(weights[t.name], run.config.n_heads)
        assert tuple(reversed([int(n) for n in t.shape])) == tuple(weight.shape), t.name  # ggml: columns first
        if weight.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(weights[t.name].float(), weight)
            continue
        # The tied embeddings make the logits: q8_0 even in a q4_0 file.
        kind = "q8_0" if t.name == "token_embd.weight" else dtype
        assert t.tensor_type == gguf.GGMLQuantizationType[kind.upper()], t.name
        error, largest = block_errors(weights[t.name], weight)
        assert (error <= largest / QUANT_ERROR_DIVISOR[kind] * SCALE_ROUNDING).all(), t.name
        assert error.max() > 0, f"{t.name} is stored exactly: not quantized"
    float32 = export_run(runs["bpe"], "gguf", tmp_path / "float32.gguf").stat().st_size
    assert path.stat().st_size < float32 / 3  # about 1.06 (q8_0) or 0.56 (q4_0) bytes a weight rather than 4


def test_a_q8_0_gguf_computes_nearly_the_same_logits_and_greedy_tokens(runs, tmp_path):
    run = load_run(runs["bpe"], "cpu")
    reader = gguf.GGUFReader(export_run(runs["bpe"], "gguf", tmp_path / "model.gguf", dtype="q8_0"))
    ids = prompt_ids(run)[0].tolist()
    greedy = Engine(run.model).generate(prompt_ids(run), SamplingConfig(max_new_tokens=QUANTIZED_GREEDY_TOKENS,
                                                                        temperature=0.0))[0].tolist()
    with torch.no_grad():
        ours = run.model(torch.tensor([ids + greedy]))[0][0].double()
    theirs = llama_cpp_logits(reader, run.config, ids + greedy)
    assert (theirs - ours).abs().max().item() <= Q8_LOGITS_TOLERANCE
    # Greedy decoding from the quantized weights makes the same tokens: at each position the same argmax.
    assert theirs[len(ids) - 1:-1].argmax(-1).tolist() == greedy


def test_a_matrix_whose_rows_are_not_whole_blocks_is_stored_float16(tmp_path, corpus_file):
    run_dir = train_tiny(tmp_path / "run", corpus_file, model_options={"d_model": 48, "d_ff": 96})
    run = load_run(run_dir, "cpu")
    reader = gguf.GGUFReader(export_run(run_dir, "gguf", tmp_path / "model.gguf", dtype="q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "F16"  # rows of 48: not whole blocks
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of d_ff = 96: three blocks
    with torch.no_grad():
        ours = run.model(prompt_ids(run))[0][0].double()
    assert (llama_cpp_logits(reader, run.config, prompt_ids(run)[0].tolist()) - ours).abs().max() <= Q8_LOGITS_TOLERANCE


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_the_quantized_dtypes_are_gguf_only(runs, tmp_path, fmt, capsys):
    code = main(["export", str(runs["bpe"]), "--format", fmt, "--out", str(tmp_path / "out"), "--dtype", "q8_0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"--format {fmt} writes float32 or float16 weights, not q8_0; q8_0 is for --format gguf" in err
    assert list(tmp_path.iterdir()) == []


def test_a_qk_norm_run_exports_as_qwen3_to_transformers_and_llama_cpp(qk_norm_run, tmp_path, one_thread):
    run = load_run(qk_norm_run, "cpu")
    ids = prompt_ids(run)[0].tolist() + run.tokenizer.encode(" the old king waits for the river.")
    with torch.no_grad():
        ours = run.model(torch.tensor([ids]))[0][0].double()
    model = transformers.AutoModelForCausalLM.from_pretrained(export_run(qk_norm_run, "hf", tmp_path / "hf")).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        assert (model(torch.tensor([ids])).logits[0].double() - ours).abs().max().item() <= LOGITS_TOLERANCE
    prompt = prompt_ids(run)
    model.generation_config.eos_token_id = None
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=GREEDY_TOKENS)
    greedy = Engine(run.model).generate(prompt, SamplingConfig(max_new_tokens=GREEDY_TOKENS, temperature=0.0))
    assert theirs.tolist() == torch.cat([prompt, greedy], dim=1).tolist()

    reader = gguf.GGUFReader(export_run(qk_norm_run, "gguf", tmp_path / "model.gguf"))
    assert gguf_field(reader, "general.architecture") == "qwen3"
    assert gguf_field(reader, "qwen3.attention.head_count") == run.config.n_heads
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}
    assert (llama_cpp_logits(reader, run.config, ids) - ours).abs().max().item() <= LOGITS_TOLERANCE


def test_a_grouped_query_run_exports_to_gguf_with_its_key_value_heads(tmp_path_factory, corpus_file, tmp_path):
    """4 query heads over 2 key/value heads, with a head width that is not d_model / n_heads: llama.cpp's
    head_count_kv and key_length, the keys permuted per key/value head."""
    path = train_tiny(tmp_path_factory.mktemp("export-gqa") / "run", corpus_file,
                      model_options={"n_heads": 4, "n_kv_heads": 2, "head_dim": 12})
    run = load_run(path, "cpu")
    reader = gguf.GGUFReader(export_run(path, "gguf", tmp_path / "model.gguf"))
    assert (gguf_field(reader, "llama.attention.head_count"), gguf_field(reader, "llama.attention.head_count_kv"),
            gguf_field(reader, "llama.attention.key_length")) == (4, 2, 12)
    ids = prompt_ids(run)[0].tolist() + run.tokenizer.encode(" the old king waits for the river.")
    with torch.no_grad():
        ours = run.model(torch.tensor([ids]))[0][0].double()
    assert (llama_cpp_logits(reader, run.config, ids) - ours).abs().max().item() <= LOGITS_TOLERANCE


def test_gguf_refuses_a_character_run_and_says_why(runs, tmp_path):
    with pytest.raises(MiniLLMError, match="llama.cpp has no character-level tokenizer.*--tokenizer bpe"):
        export_run(runs["char"], "gguf", tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


# ---- the encoder-decoder ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_hf_and_gguf_refuse_an_encoder_decoder_and_say_why(seq2seq_run, fmt, tmp_path):
    with pytest.raises(MiniLLMError, match="encoder-decoder.*standard architecture.*--format safetensors"):
        export_run(seq2seq_run, fmt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_export_of_an_encoder_decoder_loads_back_as_the_same_model(seq2seq_run, tmp_path):
    from minillm.tokenizers import load_tokenizer

    run = load_run(seq2seq_run, "cpu")
    out = export_run(seq2seq_run, "safetensors", tmp_path / "s2s")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["format"] == "minillm" and config["tokenizer_type"] == "char"
    model = build_model(ModelConfig.from_dict(config["model"])).eval()
    missing, unexpected = model.load_state_dict(safetensors_torch.load_file(out / "model.safetensors"), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied: it is embed_tokens.weight
    src, tgt = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[1, 9, 10]])
    with torch.no_grad():
        assert torch.equal(model(tgt, src_ids=src)[0], run.model(tgt, src_ids=src)[0])
    assert load_tokenizer(out).fingerprint() == run.tokenizer.fingerprint()
    assert "load_file" in (out / "README.md").read_text(encoding="utf-8")


# ---- mistakes ---------------------------------------------------------------------------------------------

def test_every_format_is_registered_with_what_it_can_do():
    assert sorted(EXPORT_FORMATS) == ["gguf", "hf", "safetensors"]
    with pytest.raises(MiniLLMError, match="unknown export format 'onnx'; choose one of"):
        export_run("anywhere", "onnx", "out")


@pytest.mark.parametrize("module", ["gguf", "safetensors.torch"])
def test_a_missing_extra_is_one_line_saying_what_to_install(runs, tmp_path, monkeypatch, module, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    fmt, out = ("gguf", "m.gguf") if module == "gguf" else ("hf", "hf")
    code = main(["export", str(runs["bpe"]), "--format", fmt, "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"error: exporting needs {module}, which are not installed: pip install 'mini-llm[export]'" in err


def test_an_existing_output_is_replaced_only_when_asked_and_only_if_it_is_an_export(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    args = ["export", str(runs["bpe"]), "--format", "hf", "--out", str(out)]
    assert main(args) == 0 and (out / "config.json").is_file()
    capsys.readouterr()
    assert main(args) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 2 and "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["export", str(runs["bpe"]), "--format", "gguf", "--out", str(out)]) == 2
    assert "is a folder, but the gguf format writes one file" in capsys.readouterr().err
    gguf_args = ["export", str(runs["bpe"]), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--overwrite"]
    assert main(gguf_args) == 0 and main(gguf_args) == 0  # an earlier GGUF file is replaced
    (tmp_path / "m.gguf").write_text("not a model")
    assert main(gguf_args) == 2 and "is not a gguf file that Mini LLM exported" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "run folder not found" in capsys.readouterr().err
