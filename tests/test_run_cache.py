"""The run cache: one shared read-only copy per run (with its engines), at most N of them, released when their
clients go."""

from __future__ import annotations

import gc
import os
import threading
import weakref

import pytest
import torch

from minillm.checkpoint import save_best
from minillm.config import ModelConfig
from minillm.errors import MiniLLMError
from minillm.generation import stream_text
from minillm.models import build_model
from minillm.run_folder import BEST_MODEL_FILE, TOKENIZER_FILE
from minillm.sampling import SamplingConfig
from minillm.serve import run_cache
from minillm.serve.run_cache import RunCache, RunKey
from minillm.tokenizers import CharacterTokenizer

TEXT = "the cat sees the moon.\na dog runs to the river.\n"


def make_run(run_dir, seed=0):
    tokenizer = CharacterTokenizer.train([TEXT])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    torch.manual_seed(seed)
    save_best(run_dir, build_model(config), config, tokenizer.kind, {"step": 1, "val_loss": 3.0})
    tokenizer.save(run_dir / TOKENIZER_FILE)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Six different runs."""
    root = tmp_path_factory.mktemp("cached")
    return [make_run(root / f"run{i}", seed=i) for i in range(6)]


def paths(run_dir):
    return run_dir / BEST_MODEL_FILE, run_dir / TOKENIZER_FILE


class CountingLoads:
    """The cache's loader, counting how often each run is read from disk."""

    def __init__(self):
        self.loads = []

    def __call__(self, files):
        self.loads.append(files.model.parent.name)
        return run_cache.load_read_only(files)


def test_users_of_the_same_files_share_one_read_only_model(runs):
    loads = CountingLoads()
    cache = RunCache(2, load=loads)
    first = cache.claim("a", *paths(runs[0]))
    same = cache.claim("b", *paths(runs[0]))
    assert same is first and cache.run_of("a") is cache.run_of("b") is first
    assert loads.loads == ["run0"] and len(cache) == 1
    # Read-only: eval mode, no gradients; generating leaves every weight as it was.
    model = first.run.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    sampling = SamplingConfig(max_new_tokens=10, seed=0)
    text = "".join(chunk for _, chunk in first.stream("the", sampling))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Its scheduler makes the library's text.
    assert text == "".join(stream_text(model, first.run.tokenizer, "the", sampling)) and text


def test_many_users_on_many_runs_keep_at_most_n_models_least_recently_used_out(runs):
    cache = RunCache(3, load=CountingLoads())
    for i in range(60):  # sessions come and go, each loading one of the six runs
        cache.claim(f"user{i}", *paths(runs[i % len(runs)]))
        assert len(cache) <= 3
        if i % 2:
            cache.release(f"user{i - 1}")
    assert len(cache) <= 3
    # The least recently used go first: run a's model is kept because it was used again.
    cache = RunCache(2, load=CountingLoads())
    a = cache.claim("a", *paths(runs[0]))
    cache.claim("b", *paths(runs[1]))
    assert cache.run_of("a") is a
    cache.claim("c", *paths(runs[2]))  # pushes out b's run, the least recently used
    assert cache.run_of("a") is a and len(cache) == 2


def test_a_run_pushed_out_is_loaded_again_for_its_user(runs):
    loads = CountingLoads()
    cache = RunCache(1, load=loads)
    a = cache.claim("a", *paths(runs[0]))
    cache.claim("b", *paths(runs[1]))
    again = cache.run_of("a")  # loaded again (pushing out b's), the same weights
    assert again is not a and loads.loads == ["run0", "run1", "run0"] and len(cache) == 1
    assert all(torch.equal(a.run.model.state_dict()[k], v) for k, v in again.run.model.state_dict().items())


def test_a_pushed_out_run_whose_files_changed_is_an_error_not_another_model(runs, tmp_path):
    import shutil

    changed = shutil.copytree(runs[0], tmp_path / "changed")
    cache = RunCache(1)
    cache.claim("a", *paths(changed))
    cache.claim("b", *paths(runs[1]))
    make_run(changed, seed=99)  # retrained in place
    os.utime(changed / BEST_MODEL_FILE, ns=(1, 1))  # a new mtime even on a coarse clock
    with pytest.raises(MiniLLMError, match="changed on disk.*press Load model"):
        cache.run_of("a")
    # Loading it again on purpose gives the new files (a new key: the old copy is never mixed in).
    assert RunKey.of(*paths(changed)) != cache._claims["a"]
    cache.claim("a", *paths(changed))
    assert cache.run_of("a") is not None


def test_users_that_go_away_release_their_models(runs):
    cache = RunCache(4)
    alive = []
    for i in range(40):
        served = cache.claim(f"tab{i}", *paths(runs[i % 3]))
        served.scheduler()  # its scheduler (made, not used) goes with it
        alive.append(weakref.ref(served.run.model))
    del served
    assert len(cache) == 3
    for i in range(40):
        cache.release(f"tab{i}")
    assert len(cache) == 0
    gc.collect()
    assert [ref for ref in alive if ref() is not None] == []  # nothing else keeps a model alive
    assert cache.run_of("tab0") is None


def test_switching_runs_releases_the_one_before(runs):
    cache = RunCache(4)
    cache.claim("a", *paths(runs[0]))
    cache.claim("a", *paths(runs[1]))
    assert len(cache) == 1


def test_a_failed_load_keeps_the_run_claimed_before(runs, tmp_path):
    cache = RunCache(2)
    before = cache.claim("a", *paths(runs[0]))
    with pytest.raises(MiniLLMError):
        cache.claim("a", tmp_path / "missing" / BEST_MODEL_FILE, runs[0] / TOKENIZER_FILE)
    assert cache.run_of("a") is before


def test_users_loading_the_same_run_at_once_read_it_once(runs):
    started, release = threading.Event(), threading.Event()
    loads = CountingLoads()

    def slow_load(files):
        started.set()
        release.wait()
        return loads(files)

    cache = RunCache(2, load=slow_load)
    results = {}
    threads = [threading.Thread(target=lambda u=u: results.update({u: cache.claim(u, *paths(runs[0]))}))
               for u in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    started.wait()
    release.set()
    for thread in threads:
        thread.join()
    assert loads.loads == ["run0"] and results["a"] is results["b"] is results["c"]


def test_the_cache_holds_at_least_one_run():
    with pytest.raises(MiniLLMError, match="at least one"):
        RunCache(0)
