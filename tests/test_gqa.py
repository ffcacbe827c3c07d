"""Grouped-query attention (n_kv_heads < n_heads) and a head width of its own (head_dim): the same model in
every way of running it (full forward, KV cache, the compiled decode step's static view and the compiled
engine), a cache n_kv_heads / n_heads the size, the same logits as transformers' Llama, and a run that trains,
reloads and exports with it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import import_dev_dependency, single_thread, tiny_configs
from test_models import VOCAB, assert_matches_hugging_face, random_ids, static_view, tiny_config, tiny_model

from minillm.checkpoint import load_run
from minillm.cli import build_parser
from minillm.config import ModelConfig
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.models.llama import fuse_split, split_fused
from minillm.sampling import SamplingConfig
from minillm.training import train

KINDS = ["decoder_only", "transformer"]
GQA = dict(n_heads=4, n_kv_heads=2)  # two query heads per key/value head

pytestmark = pytest.mark.usefixtures("one_thread")


def source(kind: str) -> torch.Tensor | None:
    return random_ids(2, 9, seed=3) if kind == "transformer" else None


def full_logits(model: torch.nn.Module, ids: torch.Tensor, src: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0] if src is None else model(ids, src_ids=src)[0]


def test_the_config_derives_and_checks_the_key_value_heads():
    assert ModelConfig(n_heads=4).n_kv_heads == 4  # default: plain multi-head attention, as every earlier run
    assert ModelConfig(d_model=64, n_heads=8, n_kv_heads=2).head_dim == 8
    with pytest.raises(MiniLLMError, match=r"n_kv_heads \(3\) must divide n_heads \(4\)"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    # replace() derives what was derived again (head width, key/value heads), keeps what was set
    assert ModelConfig(d_model=32, n_heads=2).replace(d_model=64, n_heads=8).head_dim == 8
    assert ModelConfig(d_model=32, n_heads=4, n_kv_heads=2).replace(d_model=64).n_kv_heads == 2
    assert ModelConfig(d_model=32, n_heads=4, head_dim=16).replace(d_model=64).head_dim == 16
    # an earlier run's config (no n_kv_heads, no head_dim) loads as the multi-head model it was
    old = {k: v for k, v in ModelConfig(d_model=32, n_heads=4).to_dict().items() if k not in ("n_kv_heads", "head_dim")}
    assert (ModelConfig.from_dict(old).n_kv_heads, ModelConfig.from_dict(old).head_dim) == (4, 8)
    options = build_parser().parse_args(["train", "--n-kv-heads", "2", "--head-dim", "16"])
    assert (options.model__n_kv_heads, options.model__head_dim) == (2, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_the_projections_hold_fewer_key_value_rows_and_split_into_llamas(kind):
    model = tiny_model(kind, **GQA, head_dim=12)  # d_model 32; 4 query heads of 12; 2 key/value heads of 12
    state = model.state_dict()
    layer = "layers.0" if kind == "decoder_only" else "decoder_layers.0"
    assert state[f"{layer}.self_attn.qkv_proj.weight"].shape == ((4 + 2 * 2) * 12, 32)
    assert state[f"{layer}.self_attn.o_proj.weight"].shape == (32, 4 * 12)
    llama = split_fused(state, model.config)
    assert llama[f"{layer}.self_attn.q_proj.weight"].shape == (48, 32)
    assert llama[f"{layer}.self_attn.k_proj.weight"].shape == llama[f"{layer}.self_attn.v_proj.weight"].shape == (
        24, 32)
    if kind == "transformer":
        assert llama[f"{layer}.cross_attn.k_proj.weight"].shape == (24, 32)
    assert all(torch.equal(fuse_split(llama)[name], value) for name, value in state.items())


@pytest.mark.parametrize("kind", KINDS)
def test_the_cache_holds_the_key_value_heads_only(kind):
    """The tensors themselves: with 4 query heads over 2 key/value heads the cache is half the size."""
    def cache_bytes(model):
        cache = model.new_cache(2, source(kind))
        return sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))

    grouped, plain = tiny_model(kind, **GQA), tiny_model(kind, n_heads=4)
    assert grouped.new_cache(1, source(kind)[:1] if kind == "transformer" else None).keys[0].shape == (1, 2, 16, 8)
    assert cache_bytes(grouped) * 4 == cache_bytes(plain) * 2  # n_kv_heads / n_heads of the multi-head size
    assert cache_bytes(tiny_model(kind, n_heads=4, n_kv_heads=1)) * 4 == cache_bytes(plain)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_cached_decoding_equals_the_full_forward(kind, prompt_len):
    model = tiny_model(kind, **GQA, max_seq_len=16)
    src, ids = source(kind), random_ids(2, 16)
    full = full_logits(model, ids, src)
    with torch.no_grad():
        cache = model.new_cache(2, src)
        prefill = model(ids[:, :prompt_len], cache=cache)[0]
        steps = [model(ids[:, t:t + 1], cache=cache)[0] for t in range(prompt_len, 16)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_compiled_steps_static_view_equals_the_full_forward(kind):
    """One token over the whole preallocated cache under a mask (one_query_attention, grouped), as the
    compiled decode step computes it."""
    model = tiny_model(kind, **GQA, head_dim=6, max_seq_len=16)
    src, ids = source(kind), random_ids(2, 16)
    full = full_logits(model, ids, src)
    with torch.no_grad():
        cache = model.new_cache(2, src)
        model(ids[:, :5], cache=cache, last_only=True)
        view = static_view(cache)
        steps = [model(ids[:, t:t + 1], cache=view)[0] for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 5:], atol=1e-5, rtol=0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_the_compiled_engine_gives_the_eager_tokens():
    """One compile (tens of seconds): the compiled decode blocks of a grouped model, sampled with a seed."""
    model = tiny_model(**GQA, max_seq_len=16)  # slides after 16 tokens
    settings = SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=None, seed=4)
    prompt = random_ids(2, 3)
    compiled = Engine(model, compile=True).generate(prompt, settings)
    assert torch.equal(compiled, Engine(model).generate(prompt, settings))
    assert torch.equal(compiled, Engine(model).generate(prompt, settings, use_cache=False))  # the full forward


def test_a_grouped_model_equals_hugging_face_llama_with_the_same_weights():
    """An independent implementation: transformers' Llama with 4 query heads over 2 key/value heads (repeated
    by its own repeat_kv) and a head width that is not d_model / n_heads."""
    transformers = import_dev_dependency("transformers")
    config = tiny_config(**GQA, head_dim=16, rope_theta=500.0)
    torch.manual_seed(0)
    model = tiny_model(**GQA, head_dim=16, rope_theta=500.0)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    assert_matches_hugging_face(transformers.LlamaForCausalLM(hf_config).eval(), model)


@pytest.fixture(scope="module")
def gqa_run(tmp_path_factory, corpus_file):
    """A tiny BPE run with 4 query heads over 1 key/value head, QK-norm off (a Llama)."""
    path = tmp_path_factory.mktemp("gqa") / "run"
    model_config, train_config = tiny_configs("decoder_only", "bpe", corpus_file, max_steps=30)
    with single_thread():
        train(model_config.replace(n_heads=4, n_kv_heads=1, max_seq_len=64), train_config, path, progress=False,
              log=lambda m: None)
    return path


def test_a_grouped_run_trains_reloads_and_exports_to_transformers(gqa_run, tmp_path):
    transformers = import_dev_dependency("transformers")
    run = load_run(gqa_run, "cpu")
    assert (run.config.n_heads, run.config.n_kv_heads) == (4, 1)
    saved = json.loads((gqa_run / "best_model_config.json").read_text(encoding="utf-8"))["model"]
    assert saved["n_kv_heads"] == 1
    out = tmp_path / "hf"
    from minillm.export import export_run

    export_run(gqa_run, "hf", out)
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["num_key_value_heads"] == 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([run.tokenizer.encode("the cat sees the moon. a dog runs to", add_special_tokens=True)])
    with torch.no_grad():
        assert (hf(ids).logits - run.model(ids)[0]).abs().max().item() <= 1e-4
