"""The UI's handlers, called directly (no browser): loading, generating, stopping and every error path."""

from __future__ import annotations

import copy
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from minillm import run_cache
from minillm.checkpoint import load_run, save_best
from minillm.config import ModelConfig
from minillm.generation import stream_text
from minillm.models import build_model, count_parameters
from minillm.run_folder import BEST_CONFIG_FILE, BEST_MODEL_FILE, TOKENIZER_FILE
from minillm.sampling import SamplingConfig
from minillm.tokenizers import CharacterTokenizer
from minillm.ui import app, generating, loading

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 4
ELEM_IDS = ["model_type", "tokenizer_type", "model_path", "tokenizer_path", "run_picker", "load_button",
            "model_info", "prompt", "source", "max_new_tokens", "temperature", "top_k", "top_p",
            "repetition_penalty", "seed", "generate_button", "stop_button", "output", "error"]
SETTINGS = dict(max_new_tokens=24, temperature=0.9, top_k=10, top_p=0.95, repetition_penalty=1.1, seed=7)


# Tiny models run on one CPU thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(run_dir, text=TEXT, model_type="decoder_only", seed=0):
    """A run folder with a character tokenizer and an untrained tiny model, saved as training saves one."""
    tokenizer = CharacterTokenizer.train([text])
    config = ModelConfig(model_type=model_type, vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2,
                         n_heads=2, max_seq_len=32)
    torch.manual_seed(seed)
    model = build_model(config)
    save_best(run_dir, model, config, tokenizer.kind, {"step": 40, "val_loss": 2.3456})
    tokenizer.save(run_dir / TOKENIZER_FILE)
    return run_dir


@pytest.fixture(scope="module")
def ui_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


def load(session, run_dir, model_path=None, tokenizer_path=None):
    """Press Load model; returns the outputs by name."""
    model_path = str(run_dir / BEST_MODEL_FILE) if model_path is None else model_path
    tokenizer_path = str(run_dir / TOKENIZER_FILE) if tokenizer_path is None else tokenizer_path
    out = app.load_model(session, model_path, tokenizer_path)
    names = ["model_info", "model_type", "tokenizer_type", "prompt", "source", "error", "warning"]
    return dict(zip(names, out, strict=True))


def generate(session, prompt="Speak", source="", **settings):
    """Press Generate and run the stream to its end; returns every (output, stats, error) step."""
    merged = {**SETTINGS, **settings}
    return list(app.generate(session, prompt, source, merged["max_new_tokens"], merged["temperature"],
                             merged["top_k"], merged["top_p"], merged["repetition_penalty"], merged["seed"]))


def shown(update) -> bool:
    return bool(update.get("visible")) and bool(update.get("value"))


def test_page_has_every_element_and_named_api(ui_run):
    demo = app.build_demo(ui_run, runs_dir=ui_run.parent)
    config = demo.get_config_file()
    elem_ids = {c["props"].get("elem_id") for c in config["components"]}
    assert set(ELEM_IDS) <= elem_ids
    api_names = {d.get("api_name") for d in config["dependencies"]}
    assert {"load_model", "generate", "stop", "pick_run"} <= api_names
    # Pre-filled from RUN_DIR, and the run is listed in the picker.
    by_id = {c["props"].get("elem_id"): c["props"] for c in config["components"]}
    assert by_id["model_path"]["value"] == str(ui_run / BEST_MODEL_FILE)
    assert by_id["tokenizer_path"]["value"] == str(ui_run / TOKENIZER_FILE)
    assert str(ui_run) in [choice[1] for choice in by_id["run_picker"]["choices"]]
    # Without a run: empty paths, and the runs found under runs_dir to pick from.
    by_id = {c["props"].get("elem_id"): c["props"] for c in
             app.build_demo(runs_dir=ui_run.parent).get_config_file()["components"]}
    assert by_id["model_path"]["value"] == "" and by_id["run_picker"].get("value") is None
    assert [choice[1] for choice in by_id["run_picker"]["choices"]] == [str(ui_run)]


def test_load_shows_model_info(ui_run):
    session = app.Session()
    out = load(session, ui_run)
    run = load_run(ui_run)
    info = out["model_info"]
    assert f"{count_parameters(run.model):,}" in info
    vocab = str(run.tokenizer.vocab_size)
    for expected in ("decoder_only", "char", "cpu", "2.3456", "step 40", "32 tokens", vocab):
        assert expected in info
    assert not shown(out["error"]) and not shown(out["warning"])
    assert session.run is not None and session.run.config == run.config


def test_loading_button_is_disabled_then_restored():
    busy, idle = app.start_loading(), app.finish_loading()
    assert busy["interactive"] is False and busy["value"] == app.LOADING_LABEL
    assert idle["interactive"] is True and idle["value"] == app.LOAD_LABEL


def test_a_load_during_a_generation_leaves_that_generation_alone(ui_run, tmp_path, every_token):
    session = app.Session()
    load(session, ui_run)
    solo = generate(session, seed=11)[-1][0]
    stream = app.generate(session, "Speak", "", *list(SETTINGS.values())[:-1], 11)
    for _ in range(3):
        next(stream)
    other = make_run(tmp_path / "other", seed=1)
    assert not shown(load(session, other)["error"])
    assert [*stream][-1][0] == solo  # finished with the model it started with
    assert session.run.info["model_path"] == str(other / BEST_MODEL_FILE)  # the next one uses the new model


def test_loads_racing_in_one_session_leave_one_whole_model(ui_run, tmp_path):
    """Two loads at once (e.g. two API calls): the session ends with one of them, fully loaded."""
    other = make_run(tmp_path / "other", seed=1)
    session = app.Session()
    results = []
    threads = [threading.Thread(target=lambda d=d: results.append(load(session, d))) for d in (ui_run, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(not shown(r["error"]) for r in results)
    loaded = session.run.info["model_path"]
    assert loaded in (str(ui_run / BEST_MODEL_FILE), str(other / BEST_MODEL_FILE))
    fresh = load_run(Path(loaded).parent)
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(session.run.model.state_dict()[key], value)


def test_run_folder_as_model_path_and_blank_tokenizer_path(ui_run):
    session = app.Session()
    out = load(session, ui_run, model_path=str(ui_run), tokenizer_path="")
    assert not shown(out["error"]) and session.run is not None


def test_model_and_tokenizer_types_are_shown_from_the_files_not_chosen(ui_run):
    by_id = {c["props"].get("elem_id"): c["props"] for c in
             app.build_demo(ui_run, runs_dir=ui_run.parent).get_config_file()["components"]}
    for elem_id, value in (("model_type", "decoder_only"), ("tokenizer_type", "char")):
        assert by_id[elem_id]["interactive"] is False and by_id[elem_id]["value"] == value
    out = load(app.Session(), ui_run)
    assert (out["model_type"], out["tokenizer_type"]) == ("decoder_only", "char")
    assert not shown(out["warning"])


@pytest.mark.parametrize("model_path, tokenizer_path, expected", [
    ("", None, "enter the path"),
    ("/no/such/best_model.pt", None, "model file not found"),
    (None, "/no/such/tokenizer.json", "tokenizer file not found"),
])
def test_missing_paths_are_readable_errors(ui_run, model_path, tokenizer_path, expected):
    out = load(app.Session(), ui_run, model_path=model_path, tokenizer_path=tokenizer_path)
    assert shown(out["error"]) and expected in out["error"]["value"]


def test_failed_load_keeps_the_previous_model(ui_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ui_run, broken)
    (broken / BEST_MODEL_FILE).write_bytes(b"not a checkpoint at all")
    session = app.Session()
    load(session, ui_run)
    before = session.run
    out = load(session, broken)
    assert shown(out["error"])
    assert "corrupt" in out["error"]["value"] and "still in use" in out["error"]["value"]
    assert "Traceback" not in out["error"]["value"]
    assert session.run is before
    # The app keeps working with the model it had.
    assert not shown(generate(session)[-1][2])


def test_tokenizer_from_another_run_is_refused(ui_run, tmp_path):
    other = make_run(tmp_path / "other", text="completely different alphabet: xyzXYZ 0123456789")
    out = load(app.Session(), ui_run, tokenizer_path=str(other / TOKENIZER_FILE))
    assert shown(out["error"]) and "do not belong together" in out["error"]["value"]


def test_corrupt_config_and_tokenizer_are_readable_errors(ui_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ui_run, broken)
    (broken / BEST_CONFIG_FILE).write_text("{ not json", encoding="utf-8")
    out = load(app.Session(), broken)
    assert shown(out["error"]) and "not valid JSON" in out["error"]["value"]
    (broken / TOKENIZER_FILE).write_text('{"type": "something else"}', encoding="utf-8")
    out = load(app.Session(), broken)
    assert shown(out["error"]) and "tokenizer" in out["error"]["value"]


def test_unexpected_exception_is_one_short_line(ui_run, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("something deep broke\n  File 'x.py', line 1\nmore traceback")

    monkeypatch.setattr(run_cache, "load_model_files", explode)
    out = load(app.Session(), ui_run)
    message = out["error"]["value"]
    assert "RuntimeError" in message and "something deep broke" in message
    assert "\n" not in message and "x.py" not in message


def test_generate_before_loading_is_an_error():
    steps = generate(app.Session())
    assert len(steps) == 1 and shown(steps[0][2]) and "no model loaded" in steps[0][2]["value"]


@pytest.fixture
def every_token(monkeypatch):
    """Update the page after every token (by default updates are batched by time)."""
    monkeypatch.setattr(generating, "STREAM_INTERVAL_S", 0.0)


def test_generate_streams_what_the_library_generates(ui_run, every_token):
    session = app.Session()
    load(session, ui_run)
    steps = generate(session, prompt="Speak")
    outputs = [s[0] for s in steps if isinstance(s[0], str)]
    run = session.run
    chunks = list(stream_text(run.model, run.tokenizer, "Speak", SamplingConfig(**SETTINGS)))
    expected = "Speak" + "".join(chunks)
    assert outputs[-1] == expected
    # It streamed: the prompt, a step per chunk of text (each extending the one before), the end.
    assert len(outputs) == 1 + len(chunks) + 1 and len(chunks) > 3
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:], strict=False))
    final_stats = steps[-1][1]
    assert "tokens/s" in final_stats and "seed 7" in final_stats and "Generated" in final_stats
    assert f"Generated {len(chunks)} tokens" in final_stats  # char tokenizer: one token per chunk
    # Same seed, same text.
    assert [s[0] for s in generate(session, prompt="Speak")][-1] == expected


def test_blank_seed_draws_one_and_reports_it(ui_run):
    session = app.Session()
    load(session, ui_run)
    steps = generate(session, seed=None)
    seed = int(steps[-1][1].rsplit("seed ", 1)[1].rstrip(")"))
    again = generate(session, seed=seed)
    assert again[-1][0] == steps[-1][0]


@pytest.mark.parametrize("setting, value, expected", [
    ("max_new_tokens", 0, "max_new_tokens must be a whole number from 1"),
    ("max_new_tokens", app.MAX_NEW_TOKENS + 1, f"max_new_tokens is at most {app.MAX_NEW_TOKENS} on this server"),
    ("temperature", -1, "temperature must be 0 (greedy) or between"),
    ("temperature", "hot", "temperature must be a number"),
    ("top_k", 2.5, "top_k must be a whole number"),
    ("top_p", 0, "top_p must be in (0, 1]"),
    ("repetition_penalty", 0, "repetition_penalty must be between"),
    ("seed", -3, "seed must be a whole number"),
])
def test_bad_settings_are_errors_and_the_app_keeps_working(ui_run, setting, value, expected):
    session = app.Session()
    load(session, ui_run)
    steps = generate(session, **{setting: value})
    assert len(steps) == 1 and shown(steps[0][2]) and expected in steps[0][2]["value"]
    assert not shown(generate(session)[-1][2])


def test_updates_are_batched_in_time_to_the_same_text(ui_run, monkeypatch):
    session = app.Session()
    load(session, ui_run)
    every = generate(session, max_new_tokens=100)
    monkeypatch.setattr(generating, "STREAM_INTERVAL_S", 3600.0)
    batched = generate(session, max_new_tokens=100)
    assert batched[-1][0] == every[-1][0]
    assert len(batched) == 2  # "Generating…" and the final text: no update in between


def test_stop_ends_generation_within_one_token_and_keeps_the_text(ui_run, every_token):
    session = app.Session()
    load(session, ui_run)
    stream = app.generate(session, "Speak", "", 200, 1.0, 0, 1.0, 1.0, 3)
    next(stream)  # "Generating…": the prompt is shown
    for _ in range(5):
        text, *_ = next(stream)
    app.stop(session)
    rest = list(stream)
    # The stop is seen right after the token in flight: one final step, the text so far kept.
    assert len(rest) == 1
    final_text, final_stats, error, _ = rest[0]
    assert final_text == text and "Stopped after 5 tokens" in final_stats
    assert not shown(error)
    # Ready for the next request: a new generation runs to its end.
    assert "Generated" in generate(session, max_new_tokens=10)[-1][1]


def test_stop_pressed_while_the_generation_is_queued_still_stops_it(ui_run, every_token):
    session = app.Session()
    load(session, ui_run)
    app.start_generating(session)  # the click on Generate; the generation then waits in the queue
    app.stop(session)
    steps = generate(session, max_new_tokens=200)
    assert "Stopped after 1 tokens" in steps[-1][1]


def test_stop_with_nothing_running_does_not_stop_the_next_generation(ui_run):
    session = app.Session()
    load(session, ui_run)
    app.stop(session)
    assert "Generated" in generate(session, max_new_tokens=10)[-1][1]


def run_round_robin(*streams):
    """Advance the streams a step each in turn, as two tabs generating at once would; the last steps."""
    last = [None] * len(streams)
    live = dict(enumerate(streams))
    while live:
        for i, stream in list(live.items()):
            try:
                last[i] = next(stream)
            except StopIteration:
                del live[i]
    return last


def test_sessions_are_separate_and_interleaved_generations_do_not_mix(ui_run, tmp_path):
    template = app.Session()
    first, second = copy.deepcopy(template), copy.deepcopy(template)  # what Gradio does for each new tab
    assert first is not second and first.stop is not second.stop
    load(first, ui_run)
    load(second, make_run(tmp_path / "other", seed=1))
    solo_first = generate(first, seed=11)[-1][0]
    solo_second = generate(second, seed=22)[-1][0]
    assert solo_first != solo_second
    settings = list(SETTINGS.values())[:-1]
    last_first, last_second = run_round_robin(app.generate(first, "Speak", "", *settings, 11),
                                              app.generate(second, "Speak", "", *settings, 22))
    assert last_first[0] == solo_first and last_second[0] == solo_second


def test_unknown_characters_get_a_warning(ui_run):
    session = app.Session()
    load(session, ui_run)
    steps = generate(session, prompt="Speak ☃")
    assert shown(steps[0][3]) and "1 character(s)" in steps[0][3]["value"]
    assert "&lt;|unk|&gt;" in steps[0][3]["value"]  # escaped, so the page shows it instead of eating it
    assert not shown(steps[-1][2])


def test_encoder_decoder_run(tmp_path):
    run_dir = make_run(tmp_path / "seq2seq", model_type="transformer")
    session = app.Session()
    out = load(session, run_dir)
    assert "transformer" in out["model_info"] and "2 encoder + 2 decoder" in out["model_info"]
    assert out["source"]["visible"] is True  # only an encoder-decoder reads a source
    run = session.run
    expected = "".join(stream_text(run.model, run.tokenizer, "", SamplingConfig(**SETTINGS), source="Speak"))
    # The output is the generated target only; a blank source means the prompt is the source (as in the CLI).
    assert generate(session, prompt="", source="Speak")[-1][0] == expected
    assert generate(session, prompt="Speak", source="")[-1][0] == expected
    steps = generate(session, prompt="", source="")
    assert shown(steps[0][2]) and "source" in steps[0][2]["value"]


def test_pick_run_fills_paths_and_types(ui_run, tmp_path):
    model_path, tokenizer_path, model_type, tokenizer_type, error = app.pick_run(str(ui_run))
    assert model_path == str(ui_run / BEST_MODEL_FILE) and tokenizer_path == str(ui_run / TOKENIZER_FILE)
    assert (model_type, tokenizer_type) == ("decoder_only", "char") and not shown(error)
    *_, error = app.pick_run(str(tmp_path / "gone"))
    assert shown(error) and "not found" in error["value"]


def test_refresh_lists_runs_newest_first(ui_run, tmp_path):
    runs = tmp_path / "runs"
    for name, saved_at in [("a", 1000), ("b", 3000), ("c", 2000)]:
        make_run(runs / name)
        os.utime(runs / name / BEST_MODEL_FILE, (saved_at, saved_at))
    update = app.refresh_runs(str(runs), None)
    assert update["choices"] == [str(runs / "b"), str(runs / "c"), str(runs / "a")]


def test_the_stats_say_when_the_model_ended_the_text(ending_run):
    # A real model that ends its text (EOS) three tokens after the prompt.
    session = app.Session()
    load(session, ending_run)
    final_text, final_stats, *_ = generate(session, prompt="abc", temperature=0)[-1]
    assert final_text == "abcdef" and final_stats.startswith("Stopped at end of text after 3 tokens. Generated 3")


def test_model_info_shows_bits_per_byte_beside_the_loss(tiny_run):
    info = loading.model_info_markdown(load_run(tiny_run))
    assert "bits per byte" in next(line for line in info.splitlines() if "Best validation loss" in line)


class FakeRequest:
    """What Gradio passes a handler that asks for a gr.Request: the tab's session hash."""

    def __init__(self, session_hash):
        self.session_hash = session_hash


def test_tabs_share_one_copy_of_a_run_and_closing_them_releases_it(ui_run, tmp_path):
    template = app.Session()  # the page's gr.State value; Gradio deep-copies it for every tab
    runs = [ui_run, *(make_run(tmp_path / f"run{i}", seed=i) for i in range(1, app.MAX_LOADED_RUNS + 2))]
    tabs = [copy.deepcopy(template) for _ in range(3 * len(runs))]
    for i, tab in enumerate(tabs):
        load(tab, runs[i % len(runs)])
        assert len(template.runs) <= app.MAX_LOADED_RUNS
    # Tabs that loaded the same files use the same model object.
    assert tabs[0].run is tabs[len(runs)].run is tabs[2 * len(runs)].run
    # A tab whose run was pushed out still generates: it is loaded again from the same files.
    assert "Generated" in generate(tabs[1], max_new_tokens=5)[-1][1]
    for tab in tabs:
        tab.close()
    assert len(template.runs) == 0


def test_closing_a_tab_releases_its_model_through_the_unload_event(ui_run):
    demo = app.build_demo(runs_dir=ui_run.parent)
    session = demo.blocks[next(i for i, b in demo.blocks.items() if isinstance(b, app.gr.State)
                               and isinstance(b.value, app.Session))].value
    tab = copy.deepcopy(session)
    out = app.load_model(tab, str(ui_run / BEST_MODEL_FILE), str(ui_run / TOKENIZER_FILE), FakeRequest("tab-1"))
    assert not shown(out[5]) and tab.id == "tab-1" and len(session.runs) == 1
    unload = next(fn for fn in demo.fns.values() if any(target[1] == "unload" for target in fn.targets))
    unload.fn(FakeRequest("tab-1"))
    assert len(session.runs) == 0 and tab.run is None


def test_a_second_generation_of_one_session_is_refused_while_another_session_generates(ui_run, every_token):
    template = app.Session()
    busy, other = copy.deepcopy(template), copy.deepcopy(template)
    load(busy, ui_run)
    load(other, ui_run)
    running = app.generate(busy, "Speak", "", 200, 1.0, 0, 1.0, 1.0, 3)
    next(running)
    refused = generate(busy)
    assert len(refused) == 1 and "already generating" in refused[0][2]["value"]
    assert "Generated" in generate(other, max_new_tokens=5)[-1][1]  # other sessions are not held up
    app.stop(busy)  # the refused request changed nothing: Stop still ends the running one
    assert "Stopped after" in list(running)[-1][1]
    assert "Generated" in generate(busy, max_new_tokens=5)[-1][1]  # and the session may generate again


def test_an_error_before_generating_clears_the_output_of_the_run_before(ui_run):
    session = app.Session()
    load(session, ui_run)
    assert generate(session)[-1][0]
    steps = generate(session, temperature=-1)
    output, stats, error, _ = steps[-1]
    assert shown(error) and output == "" and stats == ""


def test_encoder_decoder_page_shows_the_source_first_and_the_prefix_as_optional(tmp_path):
    run_dir = make_run(tmp_path / "seq2seq", model_type="transformer")
    components = app.build_demo(run_dir, runs_dir=tmp_path).get_config_file()["components"]
    order = [c["props"].get("elem_id") for c in components]
    by_id = {c["props"].get("elem_id"): c["props"] for c in components}
    assert order.index("source") < order.index("prompt")
    assert by_id["source"]["visible"] is not False and "input" in by_id["source"]["label"]
    assert by_id["prompt"]["label"].startswith("Target prefix (optional")
    # Loading a decoder-only run turns the box back into the prompt and hides the source.
    out = load(app.Session(), make_run(tmp_path / "plain"))
    assert out["prompt"]["label"] == "Prompt" and out["source"]["visible"] is False
