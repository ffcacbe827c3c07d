"""Batched decoding (minillm.batch_engine over models.decoding.SlotCache): rows at their own positions,
joining and leaving between steps, each the generation the engine makes alone for the same seed."""

from __future__ import annotations

import pytest
import torch
from test_models import random_ids, tiny_model

from minillm import batch_engine as batch_module
from minillm import engine as engine_module
from minillm.batch_engine import BatchEngine, Generation, row_buckets
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.models.decoding import SlotCache
from minillm.sampling import SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 16  # tiny_model's max_seq_len: generations past it slide their windows


def generations(model_type: str, count: int = 6) -> list[Generation]:
    """Generations of different prompts, lengths and settings (some past the context: they slide)."""
    made = []
    for i in range(count):
        settings = dict(temperature=1.0, top_k=None if i % 2 else 20, top_p=0.9 if i % 3 == 1 else None,
                        repetition_penalty=1.3 if i % 3 == 2 else 1.0)
        sampling = SamplingConfig(max_new_tokens=5 + 7 * i, seed=i, **settings)
        if model_type == "transformer":
            made.append(Generation(random_ids(1, i % 2, seed=i)[0].tolist(), sampling,
                                   random_ids(1, 3 + i, seed=50 + i)[0].tolist()))
        else:
            made.append(Generation(random_ids(1, 1 + 2 * i, seed=i)[0].tolist(), sampling))
    return made


def alone(model, generation: Generation) -> list[int]:
    source = None if generation.source_ids is None else torch.tensor([generation.source_ids])
    return Engine(model).generate(torch.tensor([generation.prompt_ids], dtype=torch.long), generation.sampling,
                                  source_ids=source)[0].tolist()


def run_batch(batch: BatchEngine, todo: list[Generation], leave_after: dict[int, int] | None = None) -> dict:
    """Each generation's tokens, decoded `batch.max_rows` at a time; generations join as rows free up, and
    those in `leave_after` (index -> steps) are removed after that many steps."""
    made, index, pending, steps = {}, {}, list(range(len(todo))), 0
    while pending or batch.rows:
        while pending and batch.free:
            i = pending.pop(0)
            row, tokens = batch.add(todo[i])
            index[id(row)], made[i] = (i, row), [t.id for t in tokens]
        for row, tokens in batch.step():
            made[index[id(row)][0]] += [t.id for t in tokens]
        steps += 1
        for i, after in (leave_after or {}).items():
            row = next((r for n, r in index.values() if n == i), None)
            if row is not None and steps == after:
                batch.remove(row)
    return made


@pytest.fixture
def sampled_logits(monkeypatch) -> dict[str, dict[int, list[torch.Tensor]]]:
    """The logits each generation's tokens were sampled from, by engine and by seed (each generation of a
    test has its own): a spy, the sampling is real. Tests compare logits, not only tokens: a tiny random
    model's tokens hardly change with the context, so a wrong position or a row's lost keys could still give
    the same tokens."""
    seen: dict[str, dict[int, list[torch.Tensor]]] = {"alone": {}, "batch": {}}
    for name, module in (("alone", engine_module), ("batch", batch_module)):
        real = module.sample_next_token

        def spy(logits, sampling, *args, _real=real, _seen=seen[name], **kwargs):
            _seen.setdefault(sampling.seed, []).append(logits[0].clone())
            return _real(logits, sampling, *args, **kwargs)

        monkeypatch.setattr(module, "sample_next_token", spy)
    return seen


def assert_same_logits(seen: dict, seeds: list[int]) -> None:
    for seed in seeds:
        alone_logits, batch_logits = seen["alone"][seed], seen["batch"][seed]
        assert len(alone_logits) == len(batch_logits)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(alone_logits, batch_logits, strict=True))


@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_rows_decoded_together_are_each_the_engines_generation_alone(model_type, sampled_logits):
    model = tiny_model(model_type)
    todo = generations(model_type)
    expected = [alone(model, g) for g in todo]
    assert max(map(len, expected)) > 2 * CONTEXT  # windows slide
    batch = BatchEngine(model, max_rows=4)  # six generations: two join when others leave
    assert run_batch(batch, todo) == dict(enumerate(expected))
    assert_same_logits(sampled_logits, list(range(len(todo))))
    assert batch.free == 4 and batch.rows == []


@pytest.mark.parametrize("settings", [dict(temperature=1.0, top_k=None), dict(temperature=0.8, top_k=20),
                                      dict(temperature=1.0, top_p=0.8, repetition_penalty=1.3)])
def test_rows_with_the_same_settings_sampled_in_one_call_each_get_their_own_tokens(settings):
    model = tiny_model("decoder_only")
    todo = [Generation(g.prompt_ids, SamplingConfig(max_new_tokens=g.sampling.max_new_tokens, seed=g.sampling.seed,
                                                    **settings)) for g in generations("decoder_only")]
    assert run_batch(BatchEngine(model, max_rows=6), todo) == {i: alone(model, g) for i, g in enumerate(todo)}


def test_a_row_that_leaves_early_changes_no_other_row(sampled_logits):
    model = tiny_model("decoder_only")
    todo = generations("decoder_only")
    expected = {i: alone(model, g) for i, g in enumerate(todo)}
    made = run_batch(BatchEngine(model, max_rows=6), todo, leave_after={1: 3, 4: 2})
    assert made[1] == expected[1][:len(made[1])] and len(made[1]) < len(expected[1])
    assert {i: t for i, t in made.items() if i not in (1, 4)} == {i: t for i, t in expected.items() if i not in (1, 4)}
    assert_same_logits(sampled_logits, [0, 2, 3, 5])


def test_a_row_ends_at_a_stop_id_which_is_its_last_token():
    model = tiny_model("decoder_only")
    free_run = alone(model, generations("decoder_only")[5])
    stop = free_run[3]
    batch = BatchEngine(model, max_rows=2)
    todo = generations("decoder_only")[5]
    generation = Generation(todo.prompt_ids, todo.sampling, stop_ids=(stop,))
    made = run_batch(batch, [generation])[0]
    assert made == free_run[:free_run.index(stop) + 1]


def test_logprobs_are_the_log_softmax_of_the_models_logits():
    model = tiny_model("decoder_only")
    prompt = random_ids(1, 5, seed=3)[0].tolist()
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=None, seed=1)
    generation = Generation(prompt, sampling, logprobs=3, prompt_logprobs=True)
    batch = BatchEngine(model, max_rows=2)
    # A row without logprobs, with the same settings, goes first: the scored row is the second of its group.
    other, other_tokens = batch.add(Generation(random_ids(1, 4, seed=4)[0].tolist(), sampling.replace(seed=2)))
    row, tokens = batch.add(generation)
    while batch.rows:
        made = {id(r): t for r, t in batch.step()}
        tokens += made.get(id(row), [])
        other_tokens += made.get(id(other), [])
    assert all(t.logprob is None and t.top == () for t in other_tokens)
    ids = prompt + [t.id for t in tokens]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)
    for position, token in enumerate([*row.prompt_logprobs, *tokens], start=1):
        assert token.id == ids[position]
        assert token.logprob == pytest.approx(float(expected[position - 1, token.id]), abs=1e-5)
        best = torch.topk(expected[position - 1], 3)
        assert [i for i, _ in token.top] == best.indices.tolist()
        assert [p for _, p in token.top] == pytest.approx(best.values.tolist(), abs=1e-5)


def test_a_slot_caches_rows_attend_to_their_own_positions_only():
    """The batched step's logits are each row's own forward pass over its own tokens."""
    model = tiny_model("decoder_only").eval()
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 1)]
    cache = SlotCache(model.new_cache(1), rows=3)
    with torch.no_grad():
        for slot, prompt in enumerate(prompts):
            view = cache.row_view(slot)
            model(torch.tensor([prompt]), cache=view)
            cache.commit(slot, view.length)
        nxt = torch.tensor([[5], [6], [7]])
        batched = model(nxt, cache=cache)[0][:, -1]
        for prompt, token, logits in zip(prompts, nxt[:, 0].tolist(), batched, strict=True):
            assert torch.allclose(logits, model(torch.tensor([prompt + [token]]))[0][0, -1], atol=1e-5)
    assert cache.row_lengths() == [4, 10, 2]
    cache.release(0)  # the last row moves into slot 0
    assert cache.row_lengths() == [2, 10] and cache.active == 2


def test_a_full_batch_refuses_another_row_and_the_buckets_cover_every_size():
    batch = BatchEngine(tiny_model("decoder_only"), max_rows=1)
    batch.add(generations("decoder_only")[3])
    with pytest.raises(MiniLLMError, match="the batch is full"):
        batch.add(generations("decoder_only")[3])
    assert row_buckets(1) == [1] and row_buckets(16) == [1, 2, 4, 8, 16] and row_buckets(12) == [1, 2, 4, 8, 12]


@pytest.mark.slow  # compiling takes a minute or more per bucket on a small CPU
@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_the_compiled_batched_step_gives_the_eager_tokens(model_type):
    model = tiny_model(model_type)
    todo = generations(model_type)
    eager = run_batch(BatchEngine(model, max_rows=2), todo)
    batch = BatchEngine(model, max_rows=2)
    batch.compile_steps()
    assert batch.compiled and run_batch(batch, todo) == eager
