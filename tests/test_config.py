"""The typed configs validate themselves and round-trip through JSON."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minillm.config import PRESETS, ModelConfig, TrainConfig, preset_configs
from minillm.errors import MiniLLMError


@given(d_model=st.sampled_from([16, 32, 48, 64]), n_heads=st.sampled_from([1, 2, 4, 8]),
       n_layers=st.integers(1, 6), tie=st.booleans(), model_type=st.sampled_from(["decoder_only", "transformer"]))
def test_model_config_round_trips_through_json(d_model, n_heads, n_layers, tie, model_type):
    config = ModelConfig(model_type=model_type, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                         tie_embeddings=tie, vocab_size=100)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_train_config_round_trips_through_json():
    config = TrainConfig(tokenizer="bpe", max_time=12.5, patience=3, epochs=2.0)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_defaults_are_derived_and_stay_derived_after_a_round_trip():
    config = ModelConfig(d_model=96, n_heads=4, n_layers=3)
    assert config.d_ff == 256 and config.d_ff % 32 == 0  # about 8/3 * d_model, rounded up to 32
    assert config.n_encoder_layers == config.n_decoder_layers == 3
    assert config.head_dim == 24
    saved = json.loads(json.dumps(config.to_dict()))
    # The JSON holds the derived values themselves, so a saved run keeps its shape whatever the defaults become.
    assert (saved["d_ff"], saved["n_encoder_layers"], saved["n_decoder_layers"]) == (256, 3, 3)
    again = ModelConfig.from_dict(saved)
    assert again == config
    assert (again.d_ff, again.n_encoder_layers, again.n_decoder_layers, again.head_dim) == (256, 3, 3, 24)


@pytest.mark.parametrize("values, message", [
    (dict(d_model=30, n_heads=4), "divisible by n_heads"),
    (dict(d_model=12, n_heads=4), "must be even"),
    (dict(n_layers=0), "n_layers must be between 1 and 1,024, got 0"),
    (dict(model_type=""), "model_type must be the name of a model kind"),
    (dict(dropout=1.5), "dropout"),
    (dict(vocab_size=3, eos_id=5), "eos_id must be a token id below vocab_size"),
    (dict(max_seq_len=-1), "max_seq_len"),
])
def test_nonsense_model_settings_are_refused_with_the_reason(values, message):
    with pytest.raises(MiniLLMError, match=message):
        ModelConfig(**values)


@pytest.mark.parametrize("values, message", [
    (dict(tokenizer="word"), "tokenizer must be one of"),
    (dict(batch_size=0), "batch_size must be between 1 and 1,000,000, got 0"),
    (dict(learning_rate=-1.0), "learning_rate must be between"),
    (dict(min_lr=1.0, learning_rate=1e-3), "min_lr"),
    (dict(val_fraction=0.7), "val_fraction"),
    (dict(max_time=0.0), "max_time must be between 1e-06 and"),
    (dict(dtype="int8"), "dtype"),
])
def test_nonsense_train_settings_are_refused_with_the_reason(values, message):
    with pytest.raises(MiniLLMError, match=message):
        TrainConfig(**values)


def test_a_typo_in_a_saved_config_is_an_error_not_silently_ignored():
    with pytest.raises(MiniLLMError, match="unknown ModelConfig field.*n_layer"):
        ModelConfig.from_dict({"n_layer": 4})
    with pytest.raises(MiniLLMError, match="must be a JSON object"):
        TrainConfig.from_dict(["batch_size", 8])


def test_a_value_of_the_wrong_type_in_a_saved_config_is_a_clear_error():
    with pytest.raises(MiniLLMError, match="dropout must be a number, got '0.1'"):
        ModelConfig.from_dict({"dropout": "0.1"})
    with pytest.raises(MiniLLMError, match="learning_rate must be a number, got 'fast'"):
        TrainConfig.from_dict({"learning_rate": "fast"})
    with pytest.raises(MiniLLMError, match="val_fraction must be a number, got 'a tenth'"):
        TrainConfig.from_dict({"val_fraction": "a tenth"})
    with pytest.raises(MiniLLMError, match="separator must be text, got 5"):
        TrainConfig.from_dict({"separator": 5})
    with pytest.raises(MiniLLMError, match="compile must be true or false, got 'yes'"):
        TrainConfig.from_dict({"compile": "yes"})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_valid_configs_and_overrides_win(name):
    model, train = preset_configs(name, {"d_model": 64, "n_heads": 4}, {"seed": 7})
    assert (model.d_model, model.n_heads, train.seed) == (64, 4, 7)


def test_unknown_preset_names_the_choices():
    with pytest.raises(MiniLLMError, match="unknown preset 'huge'.*cpu"):
        preset_configs("huge")


@pytest.mark.parametrize("cls, values, message", [
    (ModelConfig, dict(vocab_size=10**12), "vocab_size must be between 1 and 1,048,576"),
    (ModelConfig, dict(d_model=2**40, n_heads=1), "d_model must be between"),
    (ModelConfig, dict(rope_theta=float("inf")), "rope_theta must be between"),
    (ModelConfig, dict(norm_eps=float("nan")), "norm_eps must be between"),
    (ModelConfig, dict(n_layers=2.5), "n_layers must be a whole number"),
    (ModelConfig, dict(dropout=True), "dropout must be a number"),
    (TrainConfig, dict(learning_rate=float("inf")), "learning_rate must be between"),
    (TrainConfig, dict(seed=2**64), "seed must be between 0 and 9,223,372,036,854,775,807"),
    (TrainConfig, dict(seed=-1), "seed must be between"),
    (TrainConfig, dict(bpe_vocab_size=2**31), "bpe_vocab_size must be between"),
    (TrainConfig, dict(max_steps=10**15), "max_steps must be between"),
    (TrainConfig, dict(max_time=float("nan")), "max_time must be between"),
    (TrainConfig, dict(val_fraction=0.0), "val_fraction must be above 0 and below 0.5, got 0.0"),
    (TrainConfig, dict(test_fraction=0.5), "test_fraction must be above 0 and below 0.5, got 0.5"),
    (TrainConfig, dict(beta2=1.0), "beta2 must be at least 0 and below 1, got 1.0"),
    (TrainConfig, dict(source_column=""), "source_column must name a column"),  # (a TSV column: test_data)
    (TrainConfig, dict(sample_interval=-1), "sample_interval must be between 0 and"),
    (TrainConfig, dict(schedule="linear"), r"schedule must be one of \('cosine', 'warmdown'\), got 'linear'"),
])
def test_numbers_outside_their_documented_range_are_refused(cls, values, message):
    with pytest.raises(MiniLLMError, match=message):
        cls(**values)


def test_the_ranges_are_in_the_help():
    from minillm.config import field_help

    assert field_help(TrainConfig, "batch_size").endswith("[1..1,000,000]")
    assert field_help(ModelConfig, "dropout").endswith("[0..0.99]")
    assert field_help(TrainConfig, "val_fraction").endswith("(0..0.5)")
    assert field_help(TrainConfig, "beta1").endswith("[0..1)")


def registries() -> list[tuple[type, str, set[str]]]:
    """(config class, field, the names its registry builds) for every field that names a kind."""
    from minillm.data.corpus import FILE_FORMAT_NAMES, SPLITTERS
    from minillm.data.tasks import TASKS
    from minillm.models.layers import MLPS
    from minillm.tokenizers import TOKENIZER_KINDS
    from minillm.training.loggers import LOGGERS
    from minillm.training.optimizer import OPTIMIZER_RECIPES, SCHEDULE_SHAPES
    from minillm.training.precision import AUTOCAST_DTYPES

    return [(ModelConfig, "mlp", set(MLPS)), (TrainConfig, "tokenizer", set(TOKENIZER_KINDS)),
            (TrainConfig, "optimizer", set(OPTIMIZER_RECIPES)), (TrainConfig, "schedule", set(SCHEDULE_SHAPES)),
            (TrainConfig, "split_mode", set(SPLITTERS)), (TrainConfig, "dtype", {"auto", *AUTOCAST_DTYPES}),
            (TrainConfig, "data_format", {"auto", *FILE_FORMAT_NAMES}), (TrainConfig, "task", {"auto", *TASKS}),
            (TrainConfig, "log", {"none", *LOGGERS})]


def test_every_kind_a_config_may_name_is_one_its_registry_builds_and_the_other_way():
    import dataclasses

    from minillm.config import field_choices

    checked = {(cls, name): (set(field_choices(cls, name)), built) for cls, name, built in registries()}
    assert {key: names for key, names in checked.items() if names[0] != names[1]} == {}
    # ... and every field with choices has its registry here.
    with_choices = {(cls, f.name) for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)
                    if f.metadata.get("choices") and f.name != "holdout"}  # (two ways to split: no registry)
    assert with_choices == set(checked)


def test_every_optimizer_a_recipe_uses_is_built_and_counted():
    from minillm.models import build_model
    from minillm.training.optimizer import OPTIMIZER_BUILDERS, OPTIMIZER_RECIPES, STATE_FLOATS, owned_parameters

    model = build_model(ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1))
    used = {name for recipe in OPTIMIZER_RECIPES for name in owned_parameters(model, TrainConfig(optimizer=recipe))}
    assert used == set(OPTIMIZER_BUILDERS) == set(STATE_FLOATS)


def test_the_gpu_preset_stops_early_and_the_plan_says_so():
    from minillm.training.plan import RunPlan

    model, config = preset_configs("gpu")
    assert config.patience is not None
    plan = RunPlan(model.replace(vocab_size=65), config, 10_000_000, 1_000_000, 64 * 256, config.max_steps, "cuda")
    assert any("early stopping after 4 evaluations (1,000 steps)" in line for line in plan.lines())
