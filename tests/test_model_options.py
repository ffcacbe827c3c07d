"""The architecture options beyond Llama (QK-norm, the relu2 feed-forward, logit soft-capping, a zero-initialised
head), on both model kinds: each does what it says in the forward pass, trains, decodes from a cache as it
computes in full, survives save, load and an exact resume, and keeps a run out of the Llama-only exports."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import import_dev_dependency, single_thread, tiny_configs
from test_models import VOCAB, assert_matches_hugging_face, random_ids, static_view, tiny_config, tiny_model

from minillm.checkpoint import load_run, load_torch
from minillm.config import ModelConfig
from minillm.data.split_record import read_split_record
from minillm.errors import MiniLLMError
from minillm.export import export_run
from minillm.models import build_model, count_parameters
from minillm.models.llama import options_beyond_llama
from minillm.training import Trainer, resume, train

KINDS = ["decoder_only", "transformer"]
OPTIONS = {"qk-norm": {"qk_norm": True}, "relu2": {"mlp": "relu2"}, "softcap": {"logit_softcap": 3.0},
           "zero head": {"tie_embeddings": False, "zero_init_head": True}}
ALL_OPTIONS = {"qk_norm": True, "mlp": "relu2", "logit_softcap": 3.0}

pytestmark = pytest.mark.usefixtures("one_thread")


def logits(m: torch.nn.Module, kind: str, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of the tokens (the encoder-decoder's target, against a fixed source)."""
    source = random_ids(tokens.size(0), 6, seed=7, vocab=m.config.vocab_size)
    with torch.no_grad():
        return m(tokens, src_ids=source)[0] if kind == "transformer" else m(tokens)[0]


def quiet(message: str) -> None:
    pass


# ---- the forward pass -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(kind):
    """Scaling the query and key projections by 10 changes a Llama's output, not a QK-normed model's."""
    tokens = random_ids(2, 8)
    for qk_norm, changes in ((False, True), (True, False)):
        m = tiny_model(kind, qk_norm=qk_norm)
        before = logits(m, kind, tokens)
        with torch.no_grad():
            for name, weight in m.named_parameters():
                if name.endswith("qkv_proj.weight"):
                    weight[:2 * 32] *= 10  # the q and k rows
                elif name.endswith(("cross_attn.q_proj.weight",)):
                    weight *= 10
                elif name.endswith("cross_attn.kv_proj.weight"):
                    weight[:32] *= 10  # the k rows
        moved = (logits(m, kind, tokens) - before).abs().max().item()
        assert (moved > 1e-2) if changes else (moved < 1e-3), (qk_norm, moved)


def test_qk_norm_decoder_only_equals_hugging_face_qwen3_with_the_same_weights():
    """An independent implementation: Qwen3 is Llama plus a learned RMSNorm on each head's q and k before RoPE."""
    transformers = import_dev_dependency("transformers")
    c = tiny_config(qk_norm=True, rope_theta=500.0)
    m = tiny_model(qk_norm=True, rope_theta=500.0)
    with torch.no_grad():
        for name, weight in m.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                weight.uniform_(0.5, 1.5)  # not all ones, so a norm read in the wrong place would show
    qwen = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=True, attention_bias=False)).eval()
    assert_matches_hugging_face(qwen, m)


@pytest.mark.parametrize("kind", KINDS)
def test_relu2_is_an_ungated_squared_relu_with_about_swiglus_parameters(kind):
    m = tiny_model(kind, mlp="relu2")
    mlp = next(module for name, module in m.named_modules() if name.endswith("mlp"))
    assert sorted(n for n, _ in mlp.named_parameters()) == ["down_proj.weight", "up_proj.weight"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = F.relu(x @ mlp.up_proj.weight.T).pow(2) @ mlp.down_proj.weight.T
        torch.testing.assert_close(mlp(x), expected)
    assert tiny_config(kind, mlp="relu2").d_ff == 4 * 32  # two matrices of 4 D: SwiGLU's three of 8/3 D
    for d_model in (96, 128, 384):  # (both widths are rounded up to a multiple of 32)
        swiglu, relu2 = (tiny_config(kind, d_model=d_model, mlp=mlp) for mlp in ("swiglu", "relu2"))
        assert abs(2 * relu2.d_ff / (3 * swiglu.d_ff) - 1) < 0.05
    assert count_parameters(m) < count_parameters(tiny_model(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_softcap_bounds_the_logits_smoothly_in_the_forward_pass_and_when_decoding(kind):
    uncapped, capped = tiny_model(kind), tiny_model(kind, logit_softcap=3.0)
    capped.load_state_dict(uncapped.state_dict())  # no weights of its own
    tokens = random_ids(2, 8)
    small = logits(uncapped, kind, tokens)  # at initialisation, well below the cap: nearly unchanged
    assert small.abs().max() < 1.0
    torch.testing.assert_close(logits(capped, kind, tokens), small, atol=0.04, rtol=0)
    with torch.no_grad():
        uncapped.lm_head.weight.mul_(100)  # tied: the embedding too; logits far past the cap
        capped.lm_head.weight.mul_(100)
    raw, soft = logits(uncapped, kind, tokens), logits(capped, kind, tokens)
    assert raw.abs().max() > 10 and soft.abs().max() <= 3.0
    torch.testing.assert_close(soft, 3.0 * torch.tanh(raw / 3.0))
    # Generation reads the cached path's logits: capped there too.
    with torch.no_grad():
        cache = capped.new_cache(2, random_ids(2, 6, seed=7) if kind == "transformer" else None)
        torch.testing.assert_close(capped(tokens, cache=cache)[0], soft, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_zero_initialised_head_starts_with_every_token_equally_likely(kind):
    m = tiny_model(kind, tie_embeddings=False, zero_init_head=True)
    assert torch.count_nonzero(m.lm_head.weight) == 0 and torch.count_nonzero(m.embed_tokens.weight) > 0
    assert torch.count_nonzero(logits(m, kind, random_ids(2, 8))) == 0
    assert not options_beyond_llama(m.config)  # only the initialisation differs: still a Llama


def test_bad_option_values_are_clear_errors_and_old_configs_load_as_llama():
    with pytest.raises(MiniLLMError, match="mlp must be one of"):
        tiny_config(mlp="geglu")
    with pytest.raises(MiniLLMError, match="zero_init_head.*--no-tie-embeddings"):
        tiny_config(zero_init_head=True)
    with pytest.raises(MiniLLMError, match="logit_softcap must be between 0"):
        tiny_config(logit_softcap=-1.0)
    saved = tiny_config().to_dict()
    for name in ("qk_norm", "mlp", "logit_softcap", "zero_init_head"):
        del saved[name]  # a config written before the options existed
    old = ModelConfig.from_dict(saved)
    assert (old.qk_norm, old.mlp, old.logit_softcap, old.zero_init_head) == (False, "swiglu", 0.0, False)
    assert not options_beyond_llama(old)


# ---- learning and decoding ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_trains(kind, option):
    m = tiny_model(kind, **OPTIONS[option]).train()
    src, target = random_ids(4, 8, seed=3), random_ids(4, 9, seed=5)
    batch = ({"src_ids": src, "tgt_ids": target[:, :-1], "targets": target[:, 1:]} if kind == "transformer"
             else {"input_ids": target[:, :-1], "targets": target[:, 1:]})
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = m(**batch)[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kind", KINDS)
def test_cached_and_static_decoding_equal_the_full_forward_with_every_option(kind):
    m = tiny_model(kind, **ALL_OPTIONS)
    tokens = random_ids(2, 10)
    full = logits(m, kind, tokens)
    with torch.no_grad():
        source = random_ids(2, 6, seed=7) if kind == "transformer" else None
        cache, static = m.new_cache(2, source), m.new_cache(2, source)
        steps = [m(tokens[:, :4], cache=cache)[0]]
        steps += [m(tokens[:, t:t + 1], cache=cache)[0] for t in range(4, 10)]
        m(tokens[:, :4], cache=static, last_only=True)
        view = static_view(static)  # as the compiled decode step sees the cache
        fast = [m(tokens[:, t:t + 1], cache=view)[0] for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(fast, dim=1), full[:, 4:], atol=1e-5, rtol=1e-5)


# ---- runs: save, load, resume, export -------------------------------------------------------------------

def train_with_options(path, corpus_file, kind="decoder_only", options=ALL_OPTIONS, **settings):
    model_config, train_config = tiny_configs(kind, "char", corpus_file, **{"max_steps": 20, "eval_interval": 10,
                                                                             **settings})
    return train(model_config.replace(**options), train_config, path, progress=False, log=quiet)


@pytest.fixture(scope="module")
def option_runs(tmp_path_factory, corpus_file):
    """A tiny run of each kind with every option on, Muon + warm-down as in the cpu preset."""
    root = tmp_path_factory.mktemp("option-runs")
    with single_thread():
        for kind in KINDS:
            train_with_options(root / kind, corpus_file, kind, optimizer="muon", schedule="warmdown")
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_keeps_its_options_through_save_and_load_and_muon_takes_their_matrices(option_runs, kind,
                                                                                     corpus_file):
    run_dir = option_runs / kind
    saved = json.loads((run_dir / "best_model_config.json").read_text(encoding="utf-8"))["model"]
    assert {name: saved[name] for name in ALL_OPTIONS} == ALL_OPTIONS
    run = load_run(run_dir, "cpu")
    assert run.config == ModelConfig.from_dict(saved)
    assert any(name.endswith("self_attn.q_norm.weight") for name, _ in run.model.named_parameters())
    train_config = tiny_configs(kind, "char", corpus_file, optimizer="muon")[1]
    trainer = Trainer(run_dir, run.config, train_config, read_split_record(run_dir), log=quiet,
                      progress=False)
    muon_params = {id(p) for g in trainer.optimizers[1].param_groups for p in g["params"]}
    for name, param in trainer.model.named_parameters():
        if name.endswith(("mlp.up_proj.weight", "mlp.down_proj.weight", "o_proj.weight")):
            assert id(param) in muon_params, name
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            assert id(param) not in muon_params, name  # vectors: AdamW's


def test_a_stopped_run_with_the_options_resumes_exactly(tmp_path, corpus_file):
    settings = dict(max_steps=24, eval_interval=8, optimizer="muon", schedule="warmdown")
    train_with_options(tmp_path / "straight", corpus_file, **settings)
    steps = iter(range(1, 1000))
    model_config, train_config = tiny_configs("decoder_only", "char", corpus_file, **settings)
    train(model_config.replace(**ALL_OPTIONS), train_config, tmp_path / "stopped", progress=False, log=quiet,
          should_stop=lambda: next(steps) >= 13)
    resume(tmp_path / "stopped", progress=False, log=quiet)
    a, b = (load_torch(tmp_path / name / "last.pt") for name in ("straight", "stopped"))
    assert a["step"] == b["step"] == 24
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_llama_exports_refuse_an_option_a_llama_does_not_have_and_say_what_to_do(option_runs, fmt, tmp_path):
    import_dev_dependency("transformers")
    with pytest.raises(MiniLLMError, match=r"trained with --mlp relu2 and --logit-softcap 3, which neither Llama "
                                           r"nor Qwen3 has.*retrain without them.*--format safetensors"):
        export_run(option_runs / "decoder_only", fmt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", KINDS)
def test_safetensors_export_with_every_option_loads_back_as_the_same_model(option_runs, kind, tmp_path):
    safetensors_torch = import_dev_dependency("safetensors.torch")
    run = load_run(option_runs / kind, "cpu")
    out = export_run(option_runs / kind, "safetensors", tmp_path / "out")
    exported = ModelConfig.from_dict(json.loads((out / "config.json").read_text(encoding="utf-8"))["model"])
    assert exported == run.config
    again = build_model(exported).eval()
    again.load_state_dict(safetensors_torch.load_file(out / "model.safetensors"), strict=False)
    tokens = random_ids(1, 8, vocab=run.config.vocab_size)
    torch.testing.assert_close(logits(again, kind, tokens), logits(run.model, kind, tokens), atol=0, rtol=0)
