"""The models: shapes, loss, masks, init, learning, KV-cache and static decode-step equivalence.

Generation (the loop, sliding window, sampling, stopping) is tested in test_engine.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import import_dev_dependency

from minillm.config import IGNORE_INDEX, ModelConfig
from minillm.errors import MiniLLMError
from minillm.models import (
    DecoderOnlyTransformer,
    TransformerModel,
    build_model,
    count_parameters,
    pick_device,
)
from minillm.models.decoding import KVCache
from minillm.models.layers import Block, RMSNorm
from minillm.models.llama import fuse_split, split_fused

VOCAB = 40
PAD, BOS, EOS = 0, 1, 2


# Tiny models run on one CPU thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(model_type: str = "decoder_only", **overrides) -> ModelConfig:
    values = dict(model_type=model_type, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    return ModelConfig(**{**values, **overrides})


def tiny_model(model_type: str = "decoder_only", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config(model_type, **overrides)).eval()


def random_ids(batch: int, length: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """Ordinary token ids (no specials), so generation tests are not cut short by an EOS."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- construction ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_build_model_gives_the_configured_type_with_config(model_type):
    model = tiny_model(model_type)
    expected = DecoderOnlyTransformer if model_type == "decoder_only" else TransformerModel
    assert isinstance(model, expected)
    assert model.config.model_type == model_type


def test_build_model_refuses_a_non_config():
    with pytest.raises(MiniLLMError, match="ModelConfig"):
        build_model({"vocab_size": 10})


def test_weight_names_and_shapes_are_llama_style():
    config = tiny_config(d_ff=64)
    state = tiny_model(d_ff=64).state_dict()
    D, F_ = config.d_model, config.d_ff
    assert state["embed_tokens.weight"].shape == (VOCAB, D)
    assert state["lm_head.weight"].shape == (VOCAB, D)
    assert state["norm.weight"].shape == (D,)
    assert state["layers.1.self_attn.qkv_proj.weight"].shape == (3 * D, D)  # fused: q, k, v rows
    assert state["layers.1.self_attn.o_proj.weight"].shape == (D, D)
    assert state["layers.0.mlp.gate_up_proj.weight"].shape == (2 * F_, D)  # fused: gate, up rows
    assert state["layers.0.mlp.down_proj.weight"].shape == (D, F_)
    llama = split_fused(state, config)  # Llama's own names and shapes, where a format needs them
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert llama[f"layers.1.self_attn.{name}.weight"].shape == (D, D)
    assert llama["layers.0.mlp.gate_proj.weight"].shape == llama["layers.0.mlp.up_proj.weight"].shape == (F_, D)
    assert fuse_split(llama).keys() == state.keys()
    assert all(torch.equal(fuse_split(llama)[k], v) for k, v in state.items())
    assert state["layers.0.input_layernorm.weight"].shape == (D,)
    assert state["layers.0.post_attention_layernorm.weight"].shape == (D,)
    assert not any("bias" in k for k in state), "Llama-style layers have no biases"
    assert not any("rotary" in k for k in state), "derived buffers are not saved"


@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_tied_embeddings_share_one_matrix_and_are_counted_once(model_type):
    tied = tiny_model(model_type, tie_embeddings=True)
    untied = tiny_model(model_type, tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert count_parameters(untied) - count_parameters(tied) == VOCAB * 32
    all_tensors = sum(p.numel() for p in untied.parameters())
    assert count_parameters(untied) == all_tensors


def test_initialisation_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=256, n_layers=8, n_heads=4, max_seq_len=16)
    model = DecoderOnlyTransformer(config)
    layer = model.layers[0]
    assert layer.self_attn.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    assert isinstance(pick_device(), torch.device)
    if not torch.cuda.is_available():
        assert pick_device() != torch.device("cuda")
        with pytest.raises(MiniLLMError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(MiniLLMError, match="unknown device"):
        pick_device("toaster")


# ---- forward --------------------------------------------------------------------------------------------

def test_decoder_only_forward_shapes_and_loss_skips_ignored_targets():
    model = tiny_model()
    ids = random_ids(2, 10)
    targets = random_ids(2, 10, seed=2)
    targets[0, 6:] = IGNORE_INDEX
    logits, loss = model(ids, targets=targets)
    assert logits.shape == (2, 10, VOCAB)
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert model(ids)[1] is None


def test_transformer_forward_shapes_and_loss_skips_ignored_targets():
    model = tiny_model("transformer")
    src, tgt = random_ids(3, 7), random_ids(3, 5, seed=2)
    targets = random_ids(3, 5, seed=3)
    targets[1, 2:] = IGNORE_INDEX
    logits, loss = model(tgt, src_ids=src, targets=targets)
    assert logits.shape == (3, 5, VOCAB)
    keep = targets != IGNORE_INDEX
    assert loss.item() == pytest.approx(F.cross_entropy(logits[keep], targets[keep]).item(), rel=1e-6)


def test_decoder_only_is_causal():
    model = tiny_model()
    ids = random_ids(1, 12)
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % VOCAB
    before, after = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_transformer_decoder_is_causal_and_encoder_sees_the_whole_source():
    model = tiny_model("transformer")
    src, tgt = random_ids(1, 6), random_ids(1, 8, seed=2)
    changed_tgt = tgt.clone()
    changed_tgt[0, 5] = (tgt[0, 5] + 1) % VOCAB
    torch.testing.assert_close(model(tgt, src_ids=src)[0][:, :5], model(changed_tgt, src_ids=src)[0][:, :5])
    changed_src = src.clone()
    changed_src[0, -1] = (src[0, -1] + 1) % VOCAB  # the last source token changes every target position
    assert not torch.allclose(model(tgt, src_ids=src)[0][:, 0], model(tgt, src_ids=changed_src)[0][:, 0])


def test_decoder_padding_mask_leaves_real_positions_unchanged_and_never_nan():
    model = tiny_model()
    ids = random_ids(1, 6)
    right = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4], dtype=torch.bool)
    torch.testing.assert_close(model(right, attention_mask=mask)[0][:, :6], model(ids)[0])
    left = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    logits = model(left, attention_mask=mask.flip(1))[0]
    assert torch.isfinite(logits).all(), "padding positions that see no real token must not turn into NaN"


def test_transformer_source_padding_mask_matches_the_unpadded_source():
    model = tiny_model("transformer")
    src, tgt = random_ids(1, 5), random_ids(1, 4, seed=2)
    padded = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    src_mask = torch.tensor([[1] * 5 + [0] * 3])
    torch.testing.assert_close(model(tgt, src_ids=padded, src_mask=src_mask)[0], model(tgt, src_ids=src)[0])
    all_pad = torch.zeros(1, 5, dtype=torch.bool)
    assert torch.isfinite(model(tgt, src_ids=src, src_mask=all_pad)[0]).all()


def test_sequence_longer_than_the_context_is_a_clear_error():
    with pytest.raises(MiniLLMError, match="max_seq_len"):
        tiny_model()(random_ids(1, 17))
    with pytest.raises(MiniLLMError, match="max_seq_len"):
        tiny_model("transformer")(random_ids(1, 3), src_ids=random_ids(1, 17))
    with pytest.raises(MiniLLMError, match="give src_ids"):
        tiny_model("transformer")(random_ids(1, 3))


# ---- learning -------------------------------------------------------------------------------------------

def overfit(model: torch.nn.Module, batch: dict, steps: int, lr: float = 1e-2) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        _, loss = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def test_decoder_only_overfits_a_tiny_batch():
    model = tiny_model(dropout=0.0)
    data = random_ids(4, 13)
    first = model(data[:, :-1], targets=data[:, 1:])[1].item()
    loss = overfit(model, {"input_ids": data[:, :-1], "targets": data[:, 1:]}, steps=100)
    assert first > 3.0 and loss < 0.05


def test_transformer_overfits_a_tiny_batch():
    model = tiny_model("transformer", dropout=0.0)
    src, target = random_ids(4, 8), random_ids(4, 8, seed=5)
    bos = torch.full((4, 1), BOS)
    batch = {"src_ids": src, "tgt_ids": torch.cat([bos, target[:, :-1]], dim=1), "targets": target}
    loss = overfit(model, batch, steps=100)
    assert loss < 0.05


# ---- KV cache ----------------------------------------------------------------------------------------
# The one forward pass with a cache: the ids follow the cache's positions (eager: attention over the filled
# part; over a static view, as in the compiled decode step: over the whole cache under a mask).

def static_view(cache: KVCache) -> KVCache:
    """The view of `cache` that a compiled decode step works on (its tensors, at its position tensor)."""
    return KVCache.over(*cache.tensors(), static=True)


@pytest.mark.parametrize("prompt_len", [1, 6])
def test_decoder_only_cached_decoding_equals_full_forward(prompt_len):
    model = tiny_model(max_seq_len=16)
    ids = random_ids(2, 16)
    full = model(ids)[0]  # (B, 16, V)
    with torch.no_grad():
        cache = model.new_cache(2)
        prefill = model(ids[:, :prompt_len], cache=cache)[0]
        steps = [model(ids[:, t:t + 1], cache=cache)[0] for t in range(prompt_len, 16)]
    incremental = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    assert cache.length == int(cache.position) == 16


@pytest.mark.parametrize("prompt_len", [1, 6])
def test_transformer_cached_decoding_equals_full_forward(prompt_len):
    model = tiny_model("transformer", max_seq_len=16)
    src, tgt = random_ids(2, 9), random_ids(2, 16, seed=2)
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 6:] = False
    full = model(tgt, src_ids=src, src_mask=src_mask)[0]
    with torch.no_grad():
        cache = model.new_cache(2, src, src_mask)
        prefill = model(tgt[:, :prompt_len], cache=cache)[0]
        steps = [model(tgt[:, t:t + 1], cache=cache)[0] for t in range(prompt_len, 16)]
    incremental = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)


def test_cached_chunks_after_a_prefix_use_the_right_causal_mask():
    model = tiny_model()
    ids = random_ids(1, 12)
    with torch.no_grad():
        cache = model.new_cache(1)
        first = model(ids[:, :5], cache=cache)[0]
        second = model(ids[:, 5:], cache=cache)[0]  # 7 queries over 12 keys
    torch.testing.assert_close(torch.cat([first, second], dim=1), model(ids)[0], atol=1e-5, rtol=0)


def test_a_cache_refuses_positions_past_its_end_and_the_forward_a_padding_mask():
    model = tiny_model(max_seq_len=16)
    with torch.no_grad():
        cache = model.new_cache(1)
        model(random_ids(1, 10), cache=cache)
        with pytest.raises(MiniLLMError, match="KV cache overflow: 17 positions for a cache of 16"):
            model(random_ids(1, 7), cache=cache)
        with pytest.raises(MiniLLMError, match="padding mask"):
            model(random_ids(1, 2), torch.ones(1, 2, dtype=torch.bool), cache=model.new_cache(1))


@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_a_prefill_for_the_next_token_runs_the_last_layers_feed_forward_on_the_last_position(model_type):
    """The other positions of the last layer are needed only as keys and values: the same logits and
    cache as a prefill of every position's logits."""
    model = tiny_model(model_type, max_seq_len=16)
    src = random_ids(2, 9, seed=3) if model_type == "transformer" else None
    ids = random_ids(2, 10)
    rows = []
    last_layer = [module for module in model.modules() if isinstance(module, Block)][-1]  # the decoder's
    last_layer.mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].size(1)))
    with torch.no_grad():
        every_cache, next_cache = model.new_cache(2, src), model.new_cache(2, src)
        every = model(ids, cache=every_cache)[0]
        next_logits = model(ids, cache=next_cache, last_only=True)[0]
    assert rows == [10, 1] and next_logits.shape == (2, 1, VOCAB)
    torch.testing.assert_close(next_logits, every[:, -1:], atol=1e-5, rtol=0)
    for a, b in zip(every_cache.keys + every_cache.values, next_cache.keys + next_cache.values,
                    strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_static_decode_steps_equal_the_cached_forward(model_type):
    """The forward over a static view (a tensor position, attention over the whole preallocated cache
    under a mask) gives the logits of the eager forward, which attends over the filled part only."""
    model = tiny_model(model_type, max_seq_len=16)
    src = random_ids(2, 9, seed=3) if model_type == "transformer" else None
    ids = random_ids(2, 16)
    with torch.no_grad():
        eager, static = model.new_cache(2, src), model.new_cache(2, src)
        prefill = model(ids[:, :5], cache=eager, last_only=True)[0]
        model(ids[:, :5], cache=static, last_only=True)
        view = static_view(static)
        steps = [model(ids[:, t:t + 1], cache=eager)[0] for t in range(5, 16)]
        fast = [model(ids[:, t:t + 1], cache=view)[0] for t in range(5, 16)]
    assert prefill.shape == (2, 1, VOCAB) and int(static.position) == 16
    torch.testing.assert_close(torch.stack(fast), torch.stack(steps), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(static.keys), torch.stack(eager.keys), atol=1e-6, rtol=0)


# ---- Hugging Face compatibility -------------------------------------------------------------------------

def test_decoder_only_equals_hugging_face_llama_with_the_same_weights():
    """An independent implementation: our weights, renamed, give the same logits in transformers' Llama."""
    transformers = import_dev_dependency("transformers")
    config = tiny_config(rope_theta=500.0)
    model = tiny_model(rope_theta=500.0)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False)
    assert_matches_hugging_face(transformers.LlamaForCausalLM(hf_config).eval(), model)


def assert_matches_hugging_face(hf_model: torch.nn.Module, model: torch.nn.Module) -> None:
    """Our weights, split and renamed to Hugging Face's, load into `hf_model` exactly (nothing missing or
    left over) and give our logits."""
    renamed = {(k if k == "lm_head.weight" else f"model.{k}"): v
               for k, v in split_fused(model.state_dict(), model.config).items()}
    missing, unexpected = hf_model.load_state_dict(renamed, strict=False)
    assert not missing and not unexpected
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids)[0], atol=1e-5, rtol=0)


def test_the_cpu_training_rms_norm_matches_torch_forward_and_backward():
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 7, 48, requires_grad=True)
    grad = torch.randn(3, 7, 48)
    norm(x).backward(grad)  # the hand-written backward
    ours_x, ours_w = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    F.rms_norm(x, (48,), norm.weight, 1e-5).backward(grad)
    torch.testing.assert_close(ours_x, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_w, norm.weight.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), F.rms_norm(x, (48,), norm.weight, 1e-5))
