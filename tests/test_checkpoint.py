"""The run folder on disk: atomic writes, safe loading, and refusing files that do not belong together."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch

from minillm.checkpoint import clean_state_dict, load_run
from minillm.errors import MiniLLMError
from minillm.files import atomic_write, current_umask, load_torch, read_json, save_torch, write_json
from minillm.run_folder import find_runs
from minillm.tokenizers import CharacterTokenizer


class Boom(Exception):
    pass


@pytest.mark.parametrize("crash", [Boom, KeyboardInterrupt])  # an error, or Ctrl-C in the middle of a write
def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, crash):
    path = tmp_path / "model.pt"
    save_torch(path, {"w": torch.ones(3)})

    def half_then_crash(f):
        f.write(b"partial bytes")
        raise crash

    with pytest.raises(crash):
        atomic_write(path, half_then_crash)
    assert torch.equal(load_torch(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_save_and_load_round_trip_tensors_and_plain_types(tmp_path):
    state = {"w": torch.arange(4.0), "step": 3, "history": [{"val_loss": 1.5}], "rng": torch.get_rng_state()}
    save_torch(tmp_path / "x.pt", state)
    loaded = load_torch(tmp_path / "x.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["history"] == state["history"]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "best_model.pt"
    path.write_bytes(content)
    with pytest.raises(MiniLLMError, match="corrupt"):
        load_torch(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "best_model.pt"
    save_torch(path, {"w": torch.randn(64, 64)})
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(MiniLLMError, match=str(path.name)):
        load_torch(path)


class NotWeights:
    """Pickled objects other than tensors and plain containers could run code on load."""


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": NotWeights()}, path)
    with pytest.raises(MiniLLMError, match="corrupt or not a Mini LLM weights file"):
        load_torch(path)


def test_last_checkpoint_of_a_run_loads_with_weights_only(tiny_run):
    state = torch.load(tiny_run / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 60 and "optimizer" in state and "rng" in state


def test_clean_state_dict_strips_compile_and_ddp_prefixes():
    state = {"_orig_mod.module.w": torch.zeros(1), "b": torch.ones(1)}
    assert list(clean_state_dict(state)) == ["w", "b"]


def test_load_run_of_a_good_run(tiny_run):
    run = load_run(tiny_run)
    assert not run.model.training
    assert run.tokenizer.vocab_size == run.config.vocab_size
    assert run.info["training"]["step"] > 0
    assert run.folder.path == tiny_run and run.folder.test_metrics.is_file()  # where the rest of the run is


def test_a_run_loaded_from_its_files_knows_the_folder_of_its_model(tmp_path, tiny_run):
    from minillm.checkpoint import load_model_files

    shutil.copytree(tiny_run, tmp_path / "moved")
    run = load_model_files(tmp_path / "moved" / "best_model.pt", tiny_run / "tokenizer.json")
    assert run.folder.path == tmp_path / "moved"


def test_the_model_config_is_stored_once_in_a_run(tiny_run):
    """best_model_config.json holds the model's config (what loads); train_config.json the training's and, as a
    recipe (`train --config`), the model's options only (no tokenizer fields); last.pt neither."""
    recipe = read_json(tiny_run / "train_config.json", "")
    assert set(recipe) == {"minillm_version", "model", "train"}
    loaded = read_json(tiny_run / "best_model_config.json", "")["model"]
    assert recipe["model"] == {k: v for k, v in loaded.items() if k not in ("vocab_size", "pad_id", "bos_id", "eos_id")}
    last = load_torch(tiny_run / "last.pt")
    assert not {"model_config", "train_config"} & set(last)


def test_corrupt_best_model_in_a_run_is_a_clear_error(tmp_path, tiny_run):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    (run_dir / "best_model.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(MiniLLMError, match="best_model.pt"):
        load_run(run_dir)


def test_checkpoint_that_is_not_a_state_dict_is_a_clear_error(tmp_path, tiny_run):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    torch.save(torch.zeros(3), run_dir / "best_model.pt")  # loads with weights_only, but is no state_dict
    with pytest.raises(MiniLLMError, match="does not hold a state_dict"):
        load_run(run_dir)


def test_mismatched_tokenizer_is_refused(tmp_path, tiny_run):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    CharacterTokenizer.train(["xyz"]).save(run_dir / "tokenizer.json")  # another vocabulary
    with pytest.raises(MiniLLMError, match="do not belong together"):
        load_run(run_dir)


def test_weights_of_another_shape_are_refused(tmp_path, tiny_run):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    config = json.loads((run_dir / "best_model_config.json").read_text())
    config["model"]["d_model"] = 64
    config["model"]["d_ff"] = None
    (run_dir / "best_model_config.json").write_text(json.dumps(config))
    with pytest.raises(MiniLLMError, match="do not fit"):
        load_run(run_dir)


def test_missing_run_and_broken_json(tmp_path):
    with pytest.raises(MiniLLMError, match="not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MiniLLMError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_find_runs_lists_run_folders_only_newest_first(tmp_path, tiny_run):
    (tmp_path / "not-a-run").mkdir()
    # Saved at 1000 s, 3000 s and 2000 s: the names' order, and the order of copying, are neither order.
    for name, saved_at in [("b", 1000), ("a", 3000), ("c", 2000)]:
        shutil.copytree(tiny_run, tmp_path / name)
        os.utime(tmp_path / name / "best_model.pt", (saved_at, saved_at))
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "c", tmp_path / "b"]
    assert find_runs(tmp_path / "missing") == []


def test_a_swapped_tokenizer_of_the_same_size_is_refused(tmp_path, tiny_run):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    original = load_run(run_dir).tokenizer
    alphabet = original.alphabet
    swapped = CharacterTokenizer(alphabet[1:] + alphabet[0])  # same characters, other ids
    assert swapped.vocab_size == original.vocab_size and swapped.fingerprint() != original.fingerprint()
    swapped.save(run_dir / "tokenizer.json")
    with pytest.raises(MiniLLMError, match="not the tokenizer the model .* was trained with"):
        load_run(run_dir)
    original.save(run_dir / "tokenizer.json")
    assert load_run(run_dir).tokenizer.fingerprint() == original.fingerprint()


def test_the_fingerprint_depends_on_the_mapping_not_the_file(tmp_path):
    from minillm.tokenizers import BPETokenizer, load_tokenizer

    texts = ["the cat sees the moon", "a dog runs to the hill"] * 20
    bpe = BPETokenizer.train(texts, vocab_size=280)
    bpe.save(tmp_path / "a.json")
    reloaded = load_tokenizer(tmp_path / "a.json")
    assert reloaded.fingerprint() == bpe.fingerprint()
    assert BPETokenizer.train(texts[:2], vocab_size=262).fingerprint() != bpe.fingerprint()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the current umask on Linux only")
@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_are_written_with_the_users_umask(tmp_path, umask, expected):
    previous = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_torch(tmp_path / "b.pt", {"w": torch.ones(1)})
    finally:
        os.umask(previous)
    assert current_umask() == previous
    for name in ("a.json", "b.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_that_are_not_numbers_are_refused_everywhere(tmp_path, tiny_run, capsys, bad):
    """A bit-rotted checkpoint (a valid file whose weights hold NaN or Inf) is refused by every load: it would
    generate garbage, export the NaNs, or train on from them, without a word."""
    from minillm.cli import main

    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    state = load_torch(run_dir / "best_model.pt")
    state["layers.1.mlp.down_proj.weight"][3, 5] = bad
    save_torch(run_dir / "best_model.pt", state)
    with pytest.raises(MiniLLMError, match=r"best_model.pt holds weights that are not numbers \(NaN or Inf\) in "
                                           r"layers.1.mlp.down_proj.weight: the file is damaged"):
        load_run(run_dir)
    for argv in (["generate", str(run_dir), "--prompt", "the", "--max-new-tokens", "3"],
                 ["export", str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not numbers (NaN or Inf)" in err
    assert not (tmp_path / "out").exists()

    last = load_torch(run_dir / "last.pt")
    last["model"]["embed_tokens.weight"][0, 0] = bad
    save_torch(run_dir / "last.pt", last)
    from minillm.training import resume

    with pytest.raises(MiniLLMError, match="last.pt holds weights that are not numbers"):
        resume(run_dir, progress=False, log=lambda m: None)
