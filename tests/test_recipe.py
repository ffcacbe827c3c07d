"""Recipes (`minillm train --config FILE`: JSON or YAML; every run's train_config.json is one) and `minillm runs`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_configs

from minillm.cli import main
from minillm.config import preset_configs
from minillm.errors import MiniLLMError
from minillm.files import load_torch, read_json
from minillm.recipe import read_recipe, with_recipe
from minillm.runs_list import list_runs
from minillm.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(message: str) -> None:
    pass


def same_weights(a, b) -> bool:
    first, second = load_torch(a / "best_model.pt"), load_torch(b / "best_model.pt")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_runs_train_config_repeats_the_run_bit_for_bit(tmp_path, corpus_file, capsys):
    model_config, train_config = tiny_configs(data=corpus_file, max_steps=20, eval_interval=10, threads=1,
                                              learning_rate=4e-3, sample_interval=0)
    model_config = model_config.replace(d_model=48, n_heads=4, qk_norm=True)
    original = tmp_path / "original"
    train(model_config, train_config, original, progress=False, log=quiet)
    kept = shutil.copytree(original, tmp_path / "kept")
    recipe = str(original / "train_config.json")
    # Into another folder, and into its own folder with --overwrite (read before the run is replaced).
    assert main(["train", "--config", recipe, "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    assert main(["train", "--config", recipe, "--out", str(original), "--overwrite", "--no-progress"]) == 0
    capsys.readouterr()
    assert same_weights(kept, tmp_path / "again") and same_weights(kept, original)
    assert read_json(tmp_path / "again" / "train_config.json", "") == read_json(kept / "train_config.json", "")
    # Explicit options vary it: the rest stays the recipe's.
    assert main(["train", "--config", recipe, "--out", str(tmp_path / "varied"), "--max-steps", "4",
                 "--no-progress"]) == 0
    varied = read_json(tmp_path / "varied" / "train_config.json", "")
    base = read_json(kept / "train_config.json", "")
    assert varied["train"] == {**base["train"], "max_steps": 4} and varied["model"] == base["model"]


def test_a_yaml_recipe_is_flat_or_in_sections_and_options_override_it(tmp_path, corpus_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"preset: tiny\ndata: {corpus_file}\nd-model: 48\nlearning_rate: 3e-3\nblock-size: 16\n"
                      "vocab-size: 280\nmodel: transformer\n", encoding="utf-8")
    preset, model, train_fields = with_recipe(recipe, {"n_layers": 3}, {"learning_rate": 1e-3})
    model_config, train_config = preset_configs(preset, model, train_fields)
    assert preset == "tiny" and train_config.max_steps == preset_configs("tiny")[1].max_steps
    assert (model_config.d_model, model_config.max_seq_len, model_config.n_layers) == (48, 16, 3)
    assert model_config.model_type == "transformer" and train_config.bpe_vocab_size == 280
    assert train_config.learning_rate == 1e-3  # the option, over the recipe's 3e-3 (read as a number)
    sections = tmp_path / "sections.yml"
    sections.write_text("model:\n  d_model: 64\ntrain:\n  max_steps: 7\n  data: [a.txt, b.txt]\n", encoding="utf-8")
    assert read_recipe(sections).model == {"d_model": 64}
    assert read_recipe(sections).train == {"max_steps": 7, "data": ["a.txt", "b.txt"]}


@pytest.mark.parametrize("text, suffix, message", [
    ("learning_rat: 0.01\n", ".yaml", r"unknown field 'learning_rat': not a model or training option; did you mean "
                                      r"'learning_rate'\?"),
    ('{"train": {"d_model": 8}}', ".json", "unknown field 'd_model': not a TrainConfig field"),
    ('{"model": {"vocab_size": 300}}', ".json", "vocab_size comes from the tokenizer"),
    ("[1, 2]", ".json", "must hold a mapping of options"),
    ("a: [1,\n", ".yaml", "is not valid YAML"),
    ("d_model: 64", ".json", "is not valid JSON.*needs a .yaml"),
])
def test_a_bad_recipe_is_one_line_naming_the_problem(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"recipe{suffix}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MiniLLMError, match=message):
        read_recipe(path)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: recipe {path}") and not (tmp_path / "run").exists()


def test_runs_lists_the_runs_as_a_table_and_as_json(tmp_path, tiny_run, corpus_file, capsys):
    shutil.copytree(tiny_run, tmp_path / "runs" / "first")
    model_config, train_config = tiny_configs("transformer", "char", corpus_file, max_steps=4, eval_interval=2,
                                              sample_interval=0)
    train(model_config, train_config, tmp_path / "runs" / "second", progress=False, log=quiet)
    (tmp_path / "runs" / "not-a-run").mkdir()
    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["run"] for row in rows] == ["second", "first"]  # newest first
    first = rows[1]
    best = read_json(tiny_run / "best_model_config.json", "")["training"]
    assert first["kind"] == "decoder_only/char/text" and rows[0]["kind"] == "transformer/char/text"
    assert (first["steps"], first["best_val_loss"], first["parameters"]) == (60, best["val_loss"], best["parameters"])
    assert first["test_loss"] == read_json(tiny_run / "test_metrics.json", "")["loss"] and first["data"] == "corpus.txt"
    assert main(["runs", str(tmp_path / "runs")]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "kind", "size", "data", "steps", "best", "val", "test", "date"]
    assert lines[1].split()[:5] == ["first", "decoder_only/char/text", f"{best['parameters'] / 1e6:.2f}M",
                                    "corpus.txt", "60"]
    assert f"{best['val_loss']:.4f}" in lines[1]
    assert list_runs(tmp_path / "nothing") == []
    assert main(["runs", str(tmp_path / "nothing")]) == 0 and "no runs in" in capsys.readouterr().out
