"""The decoding engine: one loop for both model kinds; eager, compiled and recomputed paths agree; the
sliding window, seeds, EOS, closing, bad input."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_models import BOS, PAD, VOCAB, random_ids, tiny_model

from minillm import engine as engine_module
from minillm.config import ModelConfig
from minillm.engine import COMPILED_BLOCK, CONTEXT_KEEP_FRACTION, BatchedProducts, Engine
from minillm.errors import MiniLLMError
from minillm.models.decoding import DecodingModel, KVCache, check_token_ids
from minillm.sampling import MAX_NEW_TOKENS, SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingConfig(temperature=0, top_k=None)


def sampled(n: int, seed: int = 0, **settings) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=1.0, top_k=None, seed=seed, **settings)


def source_for(model_type: str) -> torch.Tensor | None:
    return random_ids(1, 5, seed=7) if model_type == "transformer" else None


def expected_windows(prompt_len: int, n_new: int, max_seq_len: int) -> list[tuple[int, int]]:
    """(start, end) of the context window before each new token, by the documented sliding rule."""
    keep = max(1, int(max_seq_len * CONTEXT_KEEP_FRACTION))
    start, end, windows = max(0, prompt_len - max_seq_len), prompt_len, []
    for _ in range(n_new):
        windows.append((start, end))
        end += 1
        if end - start > max_seq_len:
            start = end - keep
    return windows


@pytest.fixture
def sampled_logits(monkeypatch) -> list[torch.Tensor]:
    """The (B, V) logits the engine hands to the sampler, one per new token (a spy: sampling is real).

    Generation tests compare these logits, not greedy tokens: an untrained tiny model's greedy token is
    nearly always the same whatever the context, so a test of tokens cannot see a context bug.
    """
    seen = []
    real = engine_module.sample_next_token

    def spy(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(engine_module, "sample_next_token", spy)
    return seen


def full_recompute_logits(model: torch.nn.Module, window: torch.Tensor, src: torch.Tensor | None) -> torch.Tensor:
    """(B, V) logits after `window`, from a plain forward pass over it alone."""
    with torch.no_grad():
        logits = model(window)[0] if src is None else model(window, src_ids=src)[0]
    return logits[:, -1]


@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_past_the_context_slides_and_matches_a_full_recompute(model_type, use_cache,
                                                                         sampled_logits):
    max_seq_len, n_new = 8, 20
    model = tiny_model(model_type, max_seq_len=max_seq_len)
    src = source_for(model_type)
    # Sampled, not greedy: greedy decoding of an untrained model soon repeats one token, and over a run of
    # identical tokens every window length gives the same logits.
    prompt = random_ids(1, 3) if src is None else None
    new = Engine(model).generate(prompt, sampled(n_new), source_ids=src, use_cache=use_cache)
    context = prompt if src is None else torch.full((1, 1), BOS)
    full_sequence = torch.cat([context, new], dim=1)
    assert new.shape == (1, n_new) and len(sampled_logits) == n_new
    windows = expected_windows(context.size(1), n_new, max_seq_len)
    assert windows[-1][0] > 0, "the test must cover at least one slide"
    for i, (start, end) in enumerate(windows):
        expected = full_recompute_logits(model, full_sequence[:, start:end], src)
        torch.testing.assert_close(sampled_logits[i], expected, atol=1e-5, rtol=0,
                                   msg=f"token {i}: the logits differ from a full recompute of tokens "
                                       f"[{start}, {end})")
        if end - start > 1:  # the logits depend on the whole window, so a window one token short would show
            shorter = full_recompute_logits(model, full_sequence[:, start + 1:end], src)
            assert (shorter - expected).abs().max() > 1e-3


def test_a_prompt_longer_than_the_context_keeps_its_last_window(sampled_logits):
    model = tiny_model(max_seq_len=8)
    prompt = random_ids(1, 20)
    Engine(model).generate(prompt, GREEDY.replace(max_new_tokens=1))
    torch.testing.assert_close(sampled_logits[0], full_recompute_logits(model, prompt[:, -8:], None),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_generate_gives_the_new_tokens_and_stream_yields_them_one_step_at_a_time(model_type):
    model = tiny_model(model_type)
    src = random_ids(2, 6, seed=4) if model_type == "transformer" else None
    prompt = random_ids(2, 4) if src is None else None
    engine = Engine(model)
    out = engine.generate(prompt, GREEDY.replace(max_new_tokens=6), source_ids=src)
    assert out.shape == (2, 6) and out.dtype == torch.long
    steps = list(engine.stream(prompt, GREEDY.replace(max_new_tokens=6), source_ids=src))
    assert len(steps) == 6 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), out)


def test_the_encoder_decoder_continues_a_target_prefix():
    model = tiny_model("transformer")
    src = random_ids(1, 6)
    engine = Engine(model)
    out = engine.generate(None, GREEDY.replace(max_new_tokens=8), source_ids=src)
    continued = engine.generate(out[:, :3], GREEDY.replace(max_new_tokens=5), source_ids=src)
    assert torch.equal(continued, out[:, 3:])


@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_cached_and_recomputed_generation_give_the_same_tokens_for_a_seed(model_type):
    model = tiny_model(model_type, max_seq_len=8)
    src, prompt = source_for(model_type), random_ids(1, 3)
    prompt = None if src is not None else prompt
    for settings in (sampled(20, seed=3), sampled(20, seed=4, top_p=0.8, repetition_penalty=1.5),
                     SamplingConfig(max_new_tokens=20, temperature=0.7, top_k=5, seed=5)):
        cached = Engine(model).generate(prompt, settings, source_ids=src)
        recomputed = Engine(model).generate(prompt, settings, source_ids=src, use_cache=False)
        assert torch.equal(cached, recomputed), settings


@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_same_seed_gives_the_same_sample(model_type):
    model = tiny_model(model_type)
    src = source_for(model_type)
    prompt = random_ids(1, 3) if src is None else None

    def sample(seed: int) -> torch.Tensor:
        return Engine(model).generate(prompt, sampled(30, seed=seed), source_ids=src)

    assert torch.equal(sample(5), sample(5))
    assert not torch.equal(sample(5), sample(6))


def test_generation_stops_when_every_row_reached_eos_and_pads_finished_rows():
    model = tiny_model()
    prompt = random_ids(2, 3)
    engine = Engine(model)
    free = engine.generate(prompt, GREEDY.replace(max_new_tokens=12))
    eos = int(free[0, 2])  # make row 0's third token the end of sequence

    def first_eos(row: torch.Tensor) -> int:
        hits = (row == eos).nonzero()
        return int(hits[0]) if len(hits) else len(row)

    stops = [first_eos(free[0]), first_eos(free[1])]
    out = engine.generate(prompt, GREEDY.replace(max_new_tokens=12), eos_id=eos)
    assert out.size(1) == min(12, max(stops) + 1)
    for row, stop in enumerate(stops):
        assert torch.equal(out[row, :stop + 1], free[row, :stop + 1])
        assert (out[row, stop + 1:] == PAD).all()


def test_a_single_row_stops_right_after_its_eos():
    model = tiny_model()
    engine = Engine(model)
    prompt = random_ids(1, 3)
    free = engine.generate(prompt, sampled(12, seed=1))[0]
    eos = int(free[4])
    stop = int((free == eos).nonzero()[0])  # its first occurrence
    out = engine.generate(prompt, sampled(12, seed=1), eos_id=eos)[0]
    assert out.tolist() == free[:stop + 1].tolist()


def test_closing_the_stream_stops_the_work_and_restores_training_mode():
    model = tiny_model().train()
    # Nothing is sized by max_new_tokens: a billion costs nothing up front.
    steps = Engine(model).stream(random_ids(1, 2), GREEDY.replace(max_new_tokens=MAX_NEW_TOKENS))
    next(steps)
    assert not model.training, "generation runs in eval mode (no dropout)"
    assert torch.is_grad_enabled(), "inference mode stays inside the engine's steps"
    steps.close()
    assert model.training
    model.eval()
    model.layers[0].train()  # one module left in training mode: switched too
    steps = Engine(model).stream(random_ids(1, 2), GREEDY)
    next(steps)
    assert not any(module.training for module in model.modules())
    steps.close()


@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_bad_input_ids_are_clear_errors(model_type):
    model = tiny_model(model_type)
    engine = Engine(model)

    def generate(ids):
        if model_type == "transformer":
            return engine.generate(None, GREEDY, source_ids=ids)
        return engine.generate(ids, GREEDY)

    for ids, message in [(torch.tensor([[3, VOCAB]]), "outside the model's vocabulary"),
                         (torch.tensor([[-1, 3]]), "outside the model's vocabulary"),
                         (torch.tensor([3, 4]), "shape"), (torch.zeros(1, 0, dtype=torch.long), "empty"),
                         (torch.tensor([[3.0, 4.0]]), "integer")]:
        with pytest.raises(MiniLLMError, match=message):
            generate(ids)
    with pytest.raises(MiniLLMError, match="SamplingConfig"):
        engine.generate(random_ids(1, 2), {"temperature": 0})


def test_each_model_kind_refuses_the_other_kinds_input():
    with pytest.raises(MiniLLMError, match="decoder-only model: it takes no source"):
        Engine(tiny_model()).generate(random_ids(1, 2), GREEDY, source_ids=random_ids(1, 2))
    with pytest.raises(MiniLLMError, match="give source ids"):
        Engine(tiny_model("transformer")).generate(random_ids(1, 2), GREEDY)


def test_a_source_longer_than_the_context_is_a_clear_error():
    with pytest.raises(MiniLLMError, match="max_seq_len"):
        Engine(tiny_model("transformer")).generate(None, GREEDY, source_ids=random_ids(1, 17))


# ---- the decoding contract -------------------------------------------------------------------------------

class BagOfTokens:
    """A throwaway model kind that implements DecodingModel and nothing else (not even nn.Module): the next
    token's logits are a fixed matrix times the sum of the embeddings of every token in the window, so they
    depend on the whole window. Its cache (one layer, one head) keeps each position's embedding as a value;
    `keeps_cache=False` makes it a kind with no cache."""

    WIDTH = 8

    def __init__(self, max_seq_len: int, keeps_cache: bool = True) -> None:
        self.config = ModelConfig(vocab_size=VOCAB, d_model=self.WIDTH, n_layers=1, n_heads=1,
                                  max_seq_len=max_seq_len)
        generator = torch.Generator().manual_seed(0)
        self.embedding = torch.randn(VOCAB, self.WIDTH, generator=generator)
        self.head = torch.randn(self.WIDTH, VOCAB, generator=generator)
        self.keeps_cache, self.training = keeps_cache, True

    def __call__(self, ids: torch.Tensor, /, *, cache: KVCache | None = None,
                 last_only: bool = False) -> tuple[torch.Tensor, None]:
        new = self.embedding[ids]  # (B, T, E)
        if cache is None:
            sums = new.cumsum(dim=1)
        else:
            T = ids.size(1)
            mask, _ = cache.attention_mask(T)  # None: causal, aligned to the last key
            _, values = cache.store(0, new[:, None], new[:, None])  # (B, 1, S, E)
            S = values.size(2)
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T) if mask is None else mask
            sums = mask.float() @ values[:, 0]
            cache.advance(T)
        logits = sums @ self.head  # (B, T, V)
        return (logits[:, -1:] if last_only else logits), None

    def decoder_context(self, prompt_ids: torch.Tensor, source_ids: None = None, source_mask: None = None):
        return check_token_ids(prompt_ids, VOCAB, "prompt", torch.device("cpu"))

    def new_cache(self, batch_size: int, source_ids: None = None, source_mask: None = None) -> KVCache | None:
        if not self.keeps_cache:
            return None
        return KVCache(1, batch_size, 1, self.config.max_seq_len, self.WIDTH, torch.float32, torch.device("cpu"))

    def modules(self):
        yield self

    def train(self, mode: bool = True) -> BagOfTokens:
        self.training = mode
        return self


@pytest.mark.parametrize("keeps_cache", [True, False])
@pytest.mark.parametrize("use_cache", [True, False])
def test_the_engine_drives_any_model_kind_through_the_decoding_contract_alone(keeps_cache, use_cache,
                                                                               sampled_logits):
    max_seq_len, n_new = 8, 20
    model = BagOfTokens(max_seq_len, keeps_cache)
    assert isinstance(model, DecodingModel)
    prompt, settings = random_ids(2, 3), sampled(n_new, seed=3, repetition_penalty=1.3)
    steps = list(Engine(model).stream(prompt, settings, use_cache=use_cache))
    assert model.training, "the model's mode is restored"
    new = torch.stack(steps, dim=1)
    history = torch.cat([prompt, new], dim=1)
    windows = expected_windows(3, n_new, max_seq_len)
    assert windows[-1][0] > 0 and len(sampled_logits) == n_new, "the test must cover a slide"
    for i, (start, end) in enumerate(windows):
        expected = model.embedding[history[:, start:end]].sum(dim=1) @ model.head
        torch.testing.assert_close(sampled_logits[i], expected, atol=1e-4, rtol=1e-5, msg=f"token {i}")
    reference = Engine(BagOfTokens(max_seq_len)).generate(prompt, settings)  # eager, over a cache
    assert torch.equal(new, reference)


def test_a_model_that_is_not_a_decoding_model_is_refused_with_one_clear_error():
    with pytest.raises(MiniLLMError, match="a Linear cannot generate: it is not a DecodingModel"):
        Engine(torch.nn.Linear(2, 2))


# ---- the compiled fast path -----------------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile on the CPU needs a C++ compiler")


@needs_compiler
@pytest.mark.parametrize("model_type", ["decoder_only", "transformer"])
def test_the_compiled_decode_step_gives_the_eager_tokens_for_a_seed(model_type, monkeypatch):
    """One compile per kind (tens of seconds): the compiled blocks of static steps, with the sampler in
    their graph, slide, penalise and stop like the eager path, token for token; a one-step graph makes the
    tokens left over before a slide or the end, so the eager step makes none."""
    eager_steps = []
    eager_step = Engine._eager_step
    monkeypatch.setattr(Engine, "_eager_step", lambda *args: eager_steps.append(1) or eager_step(*args))
    block_sizes = []  # steps per compiled block call
    checked_once = engine_module._guards_checked_once

    def counted(graph):
        call = checked_once(graph)

        def spy(*args):
            if isinstance(args[2], list):  # a block's noises, one per step (a refill takes one noise)
                block_sizes.append(len(args[2]))
            return call(*args)
        return spy

    monkeypatch.setattr(engine_module, "_guards_checked_once", counted)
    model = tiny_model(model_type, max_seq_len=16)  # slides after 16 tokens, then every 4 (a block)
    src = random_ids(2, 5, seed=7) if model_type == "transformer" else None
    prompt = random_ids(2, 3) if src is None else None
    settings = SamplingConfig(max_new_tokens=40, temperature=0.9, top_k=10, repetition_penalty=1.3, seed=2)
    fast = Engine(model, compile=True)
    compiled = fast.generate(prompt, settings, source_ids=src)
    assert eager_steps == [] and set(block_sizes) == {1, COMPILED_BLOCK}
    eager = Engine(model).generate(prompt, settings, source_ids=src)
    assert compiled.shape == (2, 40)
    assert torch.equal(compiled, eager)
    again = fast.generate(prompt, settings.replace(seed=3), source_ids=src)  # the compiled step is reused
    assert torch.equal(again, Engine(model).generate(prompt, settings.replace(seed=3), source_ids=src))
    with torch.no_grad():  # new weights: the compiled graph must not keep serving the old ones
        for parameter in model.parameters():
            parameter.mul_(1.5)
    changed = Engine(model).generate(prompt, settings, source_ids=src)
    assert not torch.equal(changed, eager)
    assert torch.equal(fast.generate(prompt, settings, source_ids=src), changed)


def test_a_compiler_failure_is_one_clear_error(monkeypatch):
    def failing_compile(step, device):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(a long report follows)")
        return call

    monkeypatch.setattr(engine_module, "compile_step", failing_compile)
    with pytest.raises(MiniLLMError, match=r"compiling the decode step failed \(InvalidCxxCompiler: No working "
                                           r"C\+\+ compiler found\); generate without compile"):
        Engine(tiny_model(), compile=True).generate(random_ids(1, 2), GREEDY.replace(max_new_tokens=8))


@pytest.mark.parametrize("bias", [False, True])
def test_batched_products_compute_a_linear_layer(bias):
    """The compiled CPU step's linear layers, written as batched products, give the layer's own output."""
    layer = torch.nn.Linear(6, 5, bias=bias)
    x = torch.randn(3, 1, 6)
    with BatchedProducts():
        out = layer(x)
    assert out.shape == (3, 1, 5)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))


@needs_compiler
def test_a_generation_checks_the_compiled_graphs_guards_at_its_first_call_only():
    """Later calls skip torch's guard checks; inputs of a shape no graph was made for then raise rather
    than run a graph made for other inputs, and the next generation, checking again, compiles for them."""
    layer = torch.nn.Linear(4, 3)
    step = torch.compile(lambda x: layer(x) * 2, fullgraph=True, dynamic=False)
    one_row, two_rows = torch.randn(1, 4), torch.randn(2, 4)
    generation = engine_module._guards_checked_once(step)
    torch.testing.assert_close(generation(one_row), layer(one_row) * 2)
    torch.testing.assert_close(generation(one_row + 1), layer(one_row + 1) * 2)  # unchecked, same graph
    with pytest.raises(RuntimeError, match="Recompilation"):
        generation(two_rows)
    next_generation = engine_module._guards_checked_once(step)
    torch.testing.assert_close(next_generation(two_rows), layer(two_rows) * 2)


@needs_compiler
def test_compiled_graphs_are_not_limited_to_torchs_default_count():
    """Every sampling setting, batch size and block length is a graph of the same decode functions, shared
    by all engines; torch's limit (8 by default, 1 here) would make the next one a compiler failure."""
    model = tiny_model(max_seq_len=16)
    fast = Engine(model, compile=True)
    # (torch's own patch: pytest's monkeypatch on a config module deletes the option on undo, in torch 2.13)
    with torch._dynamo.config.patch(recompile_limit=1):
        for temperature in (0.7, 0.9):
            settings = SamplingConfig(max_new_tokens=2, temperature=temperature, seed=1)  # a one-step graph
            prompt = random_ids(1, 3)
            assert torch.equal(fast.generate(prompt, settings), Engine(model).generate(prompt, settings))
