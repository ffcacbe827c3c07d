"""The one sampler: greedy, temperature, repetition penalty, exactly-k top-k, top-p, seeds, bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.config import ModelConfig
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.models import build_model
from minillm.sampling import SamplingConfig, draw_noise, sample_next_token, seen_tokens

DRAWS = 2000  # rows sampled at once when a test looks at the distribution


def choose(logits: torch.Tensor, generator: torch.Generator | None = None, previous: torch.Tensor | None = None,
           **settings) -> torch.Tensor:
    """sample_next_token with plain sampling (temperature 1, no top-k) unless `settings` say otherwise;
    `previous`: (B, T) ids the repetition penalty looks at."""
    sampling = SamplingConfig(**{"temperature": 1.0, "top_k": None, **settings})
    seen = None if previous is None else seen_tokens(previous, logits.size(-1))
    return sample_next_token(logits, sampling, seen, generator=generator)


def draws(logits: list[float], seed: int = 0, **kwargs) -> set[int]:
    """The distinct tokens chosen when the same (V,) logits are sampled DRAWS times."""
    batch = torch.tensor(logits).repeat(DRAWS, 1)
    tokens = choose(batch, torch.Generator().manual_seed(seed), **kwargs)
    assert tokens.shape == (DRAWS,) and tokens.dtype == torch.long
    return set(tokens.tolist())


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert choose(logits, temperature=0).tolist() == [1, 0]
    assert choose(logits, temperature=0, top_k=2, top_p=0.1).tolist() == [1, 0]


def test_plain_sampling_can_reach_every_token():
    assert draws([0.0, 0.5, 1.0, 0.2]) == {0, 1, 2, 3}


def test_top_k_keeps_exactly_k_tokens_even_when_tied():
    # All ten logits tie: a threshold compare (`logits >= kth value`) would keep all ten.
    chosen = draws([1.0] * 10, top_k=3)
    assert len(chosen) == 3
    tied_top = draws([1.0, 5.0, 5.0, 5.0, 0.0], top_k=2)
    assert len(tied_top) == 2 and tied_top <= {1, 2, 3}


def test_top_k_keeps_the_most_likely():
    assert draws([0.0, 2.0, 1.0, 3.0, -1.0], top_k=2) == {1, 3}
    assert draws([0.0, 2.0, 1.0, 3.0, -1.0], top_k=1) == {3}


def test_top_k_larger_than_the_vocabulary_is_clamped():
    assert draws([0.0, 0.5, 1.0], top_k=1000) == {0, 1, 2}


def test_top_k_zero_or_none_is_off():
    assert draws([0.0, 0.5, 1.0], top_k=0) == draws([0.0, 0.5, 1.0], top_k=None) == {0, 1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert draws(logits, top_p=0.5) == {0}  # token 0 alone reaches 0.5
    assert draws(logits, top_p=0.6) == {0, 1}
    assert draws(logits, top_p=0.9) == {0, 1, 2}
    assert draws(logits, top_p=1.0) == {0, 1, 2, 3}
    assert draws(logits, top_p=0.01) == {0}, "the most likely token always stays"


def test_top_p_applies_after_top_k():
    logits = [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]
    # top_k=2 renormalises to (4/7, 3/7): top_p=0.5 then keeps only token 0.
    assert draws(logits, top_k=2, top_p=0.5) == {0}
    assert draws(logits, top_k=3, top_p=0.95) == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[0.0, 1.0]]).repeat(DRAWS, 1)

    def share_of_1(temperature: float) -> float:
        generator = torch.Generator().manual_seed(0)
        tokens = choose(logits, generator, temperature=temperature)
        return tokens.float().mean().item()

    assert share_of_1(0.1) > 0.99
    assert 0.6 < share_of_1(1.0) < 0.85  # sigmoid(1) = 0.73
    assert 0.45 < share_of_1(100.0) < 0.55


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_at_a_temperature_follows_the_softmax_of_the_logits_over_it(temperature):
    """Not only the extremes: at a moderate temperature the shares are softmax(logits / T), exactly once divided
    (divided twice, T = 0.5 gives token 0 a share of 0.87 instead of 0.68)."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    tokens = choose(logits.repeat(20_000, 1), torch.Generator().manual_seed(0), temperature=temperature)
    shares = torch.bincount(tokens, minlength=4).float() / 20_000
    torch.testing.assert_close(shares, (logits / temperature).softmax(-1), atol=0.015, rtol=0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    previous = torch.tensor([[0]])
    # positive: 2.0 / 2 = 1.0 falls below token 1's 1.5
    assert choose(torch.tensor([[2.0, 1.5]]), previous=previous, temperature=0, repetition_penalty=2.0).item() == 1
    # negative: -1.0 * 2 = -2.0 falls below token 1's -1.5 (dividing would have raised it)
    assert choose(torch.tensor([[-1.0, -1.5]]), previous=previous, temperature=0, repetition_penalty=2.0).item() == 1
    # a penalty below 1 favours repeats
    assert choose(torch.tensor([[1.0, 1.5]]), previous=previous, temperature=0, repetition_penalty=0.5).item() == 0
    # repeated ids in the history are penalised once, not once per occurrence
    assert choose(torch.tensor([[3.0, 1.4]]), previous=torch.tensor([[0, 0, 0]]), temperature=0,
                  repetition_penalty=2.0).item() == 0


def test_a_generator_makes_sampling_reproducible():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))

    def sample(seed: int) -> torch.Tensor:
        return choose(logits, torch.Generator().manual_seed(seed), torch.arange(10).repeat(64, 1),
                      temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.1)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), vocab=st.integers(1, 40), top_k=st.integers(1, 50),
       top_p=st.floats(0.01, 1.0), temperature=st.floats(0.05, 5.0))
def test_sampled_tokens_are_always_among_the_top_k(seed, vocab, top_k, top_p, temperature):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, vocab, generator=generator)
    tokens = choose(logits, generator, temperature=temperature, top_k=top_k, top_p=top_p)
    allowed = torch.topk(logits, min(top_k, vocab), dim=-1).indices
    assert ((tokens[:, None] == allowed).any(dim=-1)).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(temperature=1e-300), "temperature must be 0 \\(greedy\\) or between"),
    (dict(repetition_penalty=1e300), "repetition_penalty must be between"),
    (dict(repetition_penalty=1e-300), "repetition_penalty must be between"),
    (dict(top_k=float("inf")), "top_k"),
    (dict(top_k=2**70), "top_k"),
    (dict(max_new_tokens=10**30), "max_new_tokens"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(MiniLLMError, match=message):
        SamplingConfig(**kwargs)
    with pytest.raises(MiniLLMError, match=message):
        SamplingConfig().replace(**kwargs)


@pytest.mark.parametrize("settings", [
    (3, 0.0, 0, 1.0, 1.0),  # greedy, top-k and top-p off
    (3, 2.0, 10_000, 0.5, 0.5),  # a top-k beyond the vocabulary, a penalty below 1
    (3, 1, 5.0, 1, 2),  # integral floats and ints where floats are expected
])
def test_good_edge_settings_are_accepted_and_generate(settings):
    sampling = SamplingConfig(*settings, seed=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    out = Engine(model).generate(torch.tensor([[3, 4]]), sampling)
    assert out.shape == (1, 3) and out.dtype == torch.long
    assert 0 <= int(out.min()) and int(out.max()) < 20


@pytest.mark.parametrize("temperature, penalty", [(1e-4, 1.0), (100.0, 1.0), (1.0, 100.0), (1e-4, 1e-2)])
def test_settings_at_the_edges_of_their_ranges_sample_real_tokens(temperature, penalty):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator) * 30  # large logits: the worst case for overflow
    previous = torch.randint(50, (3, 10), generator=generator)
    tokens = choose(logits, generator, previous, temperature=temperature, repetition_penalty=penalty)
    assert tokens.shape == (3,) and ((0 <= tokens) & (tokens < 50)).all()


def test_the_draw_follows_the_probabilities():
    """The exponential race (argmax p / noise) samples each token with its probability."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    tokens = choose(probs.log().repeat(20_000, 1), torch.Generator().manual_seed(0))
    shares = torch.bincount(tokens, minlength=4).float() / 20_000
    torch.testing.assert_close(shares, probs, atol=0.015, rtol=0)


def test_noise_drawn_apart_gives_the_same_token_as_noise_drawn_inside():
    """What the compiled decode step relies on: the engine draws the noise and hands it in."""
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))
    sampling = SamplingConfig(temperature=0.7, top_k=12, top_p=0.9)
    inside = sample_next_token(logits, sampling, generator=torch.Generator().manual_seed(4))
    noise = draw_noise(8, sampling.candidates(30), torch.Generator().manual_seed(4), "cpu")
    assert torch.equal(sample_next_token(logits, sampling, noise=noise), inside)


def test_settings_are_normalised_so_equal_meanings_compare_equal():
    assert SamplingConfig(top_k=0, top_p=1.0) == SamplingConfig(top_k=None, top_p=None)
    assert SamplingConfig(temperature=1, repetition_penalty=2).temperature == 1.0
    assert SamplingConfig(seed=3.0).seed == 3 and SamplingConfig().candidates(20) == 20
    assert SamplingConfig(top_k=5).candidates(20) == 5
