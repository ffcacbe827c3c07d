"""The UI's handlers, called directly (no browser): loading, generating, stopping and every error path."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
import pytest
import torch

from minillm.checkpoint import load_run, save_best
from minillm.config import ModelConfig
from minillm.engine import Engine
from minillm.generation import stream_text
from minillm.models import build_model, count_parameters
from minillm.run_folder import BEST_CONFIG_FILE, BEST_MODEL_FILE, TOKENIZER_FILE
from minillm.sampling import SamplingConfig
from minillm.serve import run_cache
from minillm.serve.batching import BatchScheduler, CompileState
from minillm.serve.limits import ServerLimits
from minillm.tokenizers import CharacterTokenizer
from minillm.ui import app, generate_tab

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 4
ELEM_IDS = ["model_type", "tokenizer_type", "model_path", "tokenizer_path", "run_picker", "load_button",
            "model_info", "prompt", "source", "max_new_tokens", "temperature", "top_k", "top_p",
            "repetition_penalty", "seed", "generate_button", "stop_button", "output", "error"]
SETTINGS = dict(max_new_tokens=24, temperature=0.9, top_k=10, top_p=0.95, repetition_penalty=1.1, seed=7)
LOAD_OUTPUTS = ["model_info", "model_type", "tokenizer_type", "prompt", "source", "error", "warning"]
GENERATE_OUTPUTS = ["output", "stats", "error", "warning"]
MAX_LOADED_RUNS = ServerLimits().max_loaded_runs
COMPILE_WAIT_S = 900  # a background compile of every batch size, on a loaded 2-core machine


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


class FakeRequest:
    """What Gradio passes a handler that asks for a gr.Request: the client's session hash."""

    def __init__(self, session_hash):
        self.session_hash = session_hash


@pytest.fixture(scope="module")
def page(ui_run):
    """One page (the server's sessions and run cache) for the module; each test's tabs are its own clients."""
    return app.build_page(runs_dir=ui_run.parent)


def named(ui, update, names):
    """A handler's {component: update} by the components' names (those it left unchanged are absent)."""
    return {name: update[getattr(ui, name)] for name in names if getattr(ui, name) in update}


class Tab:
    """A browser tab (or API client) on a page, calling the Generate tab's handlers as Gradio would: every
    request carries the tab's own session hash."""

    def __init__(self, page, session_hash=None):
        self.page, self.ui = page, page.generate
        self.request = FakeRequest(session_hash or uuid.uuid4().hex)

    @property
    def session(self):
        return self.page.sessions.get(self.request.session_hash)

    def load(self, run_dir, model_path=None, tokenizer_path=None):
        """Press Load model; returns the outputs by name."""
        model_path = str(run_dir / BEST_MODEL_FILE) if model_path is None else model_path
        tokenizer_path = str(run_dir / TOKENIZER_FILE) if tokenizer_path is None else tokenizer_path
        return named(self.ui, self.ui.load_model(model_path, tokenizer_path, self.request), LOAD_OUTPUTS)

    def stream(self, prompt="Speak", source="", **settings):
        """Press Generate: the stream of its steps, each by output name."""
        merged = {**SETTINGS, **settings}
        steps = self.ui.generate(prompt, source, *(merged[name] for name in SETTINGS), self.request)
        return (named(self.ui, step, GENERATE_OUTPUTS) for step in steps)

    def generate(self, prompt="Speak", source="", **settings):
        """Press Generate and run the stream to its end; returns every step."""
        return list(self.stream(prompt, source, **settings))

    def stop(self):
        self.ui.stop(self.request)

    def close(self):
        """The tab is closed: Gradio's unload event."""
        unload = next(fn for fn in self.page.demo.fns.values() if any(t[1] == "unload" for t in fn.targets))
        unload.fn(self.request)


def shown(update) -> bool:
    return update is not None and bool(update.get("visible")) and bool(update.get("value"))


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


def test_the_server_wide_objects_are_not_per_session_state(ui_run):
    """gr.State is deep-copied for every tab: the run cache, the sessions and the training manager are the
    server's, so no State holds them or any other object of ours (the handlers close over them)."""
    page = app.build_page(ui_run, runs_dir=ui_run.parent)
    states = [block.value for block in page.demo.blocks.values() if isinstance(block, gr.State)]
    assert states and [value for value in states if type(value).__module__.startswith("minillm")] == []


def test_load_shows_model_info(page, ui_run):
    tab = Tab(page)
    out = tab.load(ui_run)
    run = load_run(ui_run)
    info = out["model_info"]
    assert f"{count_parameters(run.model):,}" in info
    vocab = str(run.tokenizer.vocab_size)
    for expected in ("decoder_only", "char", "cpu", "2.3456", "step 40", "32 tokens", vocab):
        assert expected in info
    assert not shown(out["error"]) and not shown(out["warning"])
    assert tab.session.run is not None and tab.session.run.run.config == run.config


def test_loading_button_is_disabled_then_restored(page):
    busy, idle = page.generate.start_loading(), page.generate.finish_loading()
    assert busy["interactive"] is False and busy["value"] == generate_tab.LOADING_LABEL
    assert idle["interactive"] is True and idle["value"] == generate_tab.LOAD_LABEL


def test_a_load_during_a_generation_leaves_that_generation_alone(page, ui_run, tmp_path, every_token):
    tab = Tab(page)
    tab.load(ui_run)
    solo = tab.generate(seed=11)[-1]["output"]
    stream = tab.stream(seed=11)
    for _ in range(3):
        next(stream)
    other = make_run(tmp_path / "other", seed=1)
    assert not shown(tab.load(other)["error"])
    assert [*stream][-1]["output"] == solo  # finished with the model it started with
    assert tab.session.run.run.info["model_path"] == str(other / BEST_MODEL_FILE)  # the next one: the new model


def test_loads_racing_in_one_session_leave_one_whole_model(page, ui_run, tmp_path):
    """Two loads at once (e.g. two API calls): the session ends with one of them, fully loaded."""
    other = make_run(tmp_path / "other", seed=1)
    tab = Tab(page)
    results = []
    threads = [threading.Thread(target=lambda d=d: results.append(tab.load(d))) for d in (ui_run, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(not shown(r["error"]) for r in results)
    loaded = tab.session.run.run
    assert loaded.info["model_path"] in (str(ui_run / BEST_MODEL_FILE), str(other / BEST_MODEL_FILE))
    fresh = load_run(Path(loaded.info["model_path"]).parent)
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_run_folder_as_model_path_and_blank_tokenizer_path(page, ui_run):
    tab = Tab(page)
    out = tab.load(ui_run, model_path=str(ui_run), tokenizer_path="")
    assert not shown(out["error"]) and tab.session.run is not None


def test_model_and_tokenizer_types_are_shown_from_the_files_not_chosen(page, ui_run):
    by_id = {c["props"].get("elem_id"): c["props"] for c in
             app.build_demo(ui_run, runs_dir=ui_run.parent).get_config_file()["components"]}
    for elem_id, value in (("model_type", "decoder_only"), ("tokenizer_type", "char")):
        assert by_id[elem_id]["interactive"] is False and by_id[elem_id]["value"] == value
    out = Tab(page).load(ui_run)
    assert (out["model_type"], out["tokenizer_type"]) == ("decoder_only", "char")
    assert not shown(out["warning"])


@pytest.mark.parametrize("model_path, tokenizer_path, expected", [
    ("", None, "enter the path"),
    ("/no/such/best_model.pt", None, "/no/such/best_model.pt is not the best_model.pt of a run"),
    (None, "/no/such/tokenizer.json", "/no/such/tokenizer.json is not the tokenizer.json of a run"),
])
def test_missing_paths_are_readable_errors(page, ui_run, model_path, tokenizer_path, expected):
    out = Tab(page).load(ui_run, model_path=model_path, tokenizer_path=tokenizer_path)
    assert shown(out["error"]) and expected in out["error"]["value"]


def test_failed_load_keeps_the_previous_model(page, ui_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ui_run, broken)
    (broken / BEST_MODEL_FILE).write_bytes(b"not a checkpoint at all")
    tab = Tab(page)
    tab.load(ui_run)
    before = tab.session.run
    out = tab.load(broken)
    assert shown(out["error"]) and "model_info" not in out  # the model's info is left as it was
    assert "corrupt" in out["error"]["value"] and "still in use" in out["error"]["value"]
    assert "Traceback" not in out["error"]["value"]
    assert tab.session.run is before
    # The app keeps working with the model it had.
    assert not shown(tab.generate()[-1].get("error"))


def test_tokenizer_from_another_run_is_refused(page, ui_run, tmp_path):
    other = make_run(tmp_path / "other", text="completely different alphabet: xyzXYZ 0123456789")
    out = Tab(page).load(ui_run, tokenizer_path=str(other / TOKENIZER_FILE))
    assert shown(out["error"]) and "do not belong together" in out["error"]["value"]


def test_corrupt_config_and_tokenizer_are_readable_errors(page, ui_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ui_run, broken)
    (broken / BEST_CONFIG_FILE).write_text("{ not json", encoding="utf-8")
    out = Tab(page).load(broken)
    assert shown(out["error"]) and "not valid JSON" in out["error"]["value"]
    (broken / TOKENIZER_FILE).write_text('{"type": "something else"}', encoding="utf-8")
    out = Tab(page).load(broken)
    assert shown(out["error"]) and "tokenizer" in out["error"]["value"]


def test_unexpected_exception_is_one_short_line(page, ui_run, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("something deep broke\n  File 'x.py', line 1\nmore traceback")

    monkeypatch.setattr(run_cache, "load_model_files", explode)
    out = Tab(page).load(make_run(tmp_path / "unloaded"))
    message = out["error"]["value"]
    assert "RuntimeError" in message and "something deep broke" in message
    assert "\n" not in message and "x.py" not in message


def test_generate_before_loading_is_an_error(page):
    steps = Tab(page).generate()
    assert len(steps) == 1 and shown(steps[0]["error"]) and "no model loaded" in steps[0]["error"]["value"]


@pytest.fixture
def every_token(monkeypatch):
    """Update the page after every token (by default updates are batched by time)."""
    monkeypatch.setattr(generate_tab, "STREAM_INTERVAL_S", 0.0)


def test_generate_streams_what_the_library_generates(page, ui_run, every_token):
    tab = Tab(page)
    tab.load(ui_run)
    steps = tab.generate(prompt="Speak")
    outputs = [s["output"] for s in steps]
    run = tab.session.run.run
    chunks = list(stream_text(run.model, run.tokenizer, "Speak", SamplingConfig(**SETTINGS)))
    expected = "Speak" + "".join(chunks)
    assert outputs[-1] == expected
    # It streamed: the prompt, a step per chunk of text (each extending the one before), the end.
    assert len(outputs) == 1 + len(chunks) + 1 and len(chunks) > 3
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:], strict=False))
    final_stats = steps[-1]["stats"]
    assert "tokens/s" in final_stats and "seed 7" in final_stats and "Generated" in final_stats
    assert f"Generated {len(chunks)} tokens" in final_stats  # char tokenizer: one token per chunk
    # Same seed, same text.
    assert tab.generate(prompt="Speak")[-1]["output"] == expected


def test_generations_use_the_loaded_runs_one_scheduler(page, ui_run, monkeypatch):
    """Every generation of every session on a run goes through the scheduler the cache keeps with that run (so
    they are decoded together and its compiled steps serve them all), not an engine made for the request."""
    first, second = Tab(page), Tab(page)
    first.load(ui_run)
    second.load(ui_run)
    served = first.session.run
    assert second.session.run is served and served.scheduler() is served.scheduler()
    used = []
    real_submit = BatchScheduler.submit
    monkeypatch.setattr(BatchScheduler, "submit", lambda scheduler, *args: (
        used.append(scheduler), real_submit(scheduler, *args))[1])
    monkeypatch.setattr(Engine, "stream", None)  # no eager engine of its own
    for tab in (first, second, first):
        assert "Generated" in tab.generate(max_new_tokens=3)[-1]["stats"]
    assert used == [served.scheduler()] * 3


def test_without_compile_the_page_says_nothing_about_a_compile(page, ui_run):
    tab = Tab(page)
    assert not shown(tab.ui.load_model(str(ui_run / BEST_MODEL_FILE), "", tab.request)[tab.ui.decode_step])
    assert tab.ui.compile_timer is None and tab.session.run.scheduler().compile_state is CompileState.OFF


@pytest.mark.slow  # compiling takes a minute or more per batch size on a small CPU
def test_with_compile_the_page_generates_at_once_and_the_compiled_step_gives_the_same_text(page, ui_run):
    """`minillm ui --compile`: loading a run starts its compile; generations do not wait for it (eager until it
    is ready) and give the text they give without a compile; the note under the model follows it."""
    eager, tab = Tab(page), Tab(app.build_page(runs_dir=ui_run.parent, compile=True))
    eager.load(ui_run)
    expected = [eager.generate(seed=seed)[-1]["output"] for seed in (5, 6)]
    note = tab.ui.load_model(str(ui_run / BEST_MODEL_FILE), "", tab.request)[tab.ui.decode_step]
    assert shown(note) and "compiling in the background" in note["value"]
    scheduler = tab.session.run.scheduler()
    assert tab.generate(seed=5)[-1]["output"] == expected[0]
    assert scheduler.compile_state is CompileState.COMPILING  # served while it compiles
    deadline = time.monotonic() + COMPILE_WAIT_S
    while scheduler.compile_state is CompileState.COMPILING and time.monotonic() < deadline:
        time.sleep(1)
    assert scheduler.compile_state is CompileState.COMPILED, scheduler.compile_error
    assert tab.ui.decode_step_status(tab.request)["value"] == generate_tab.COMPILE_NOTES[CompileState.COMPILED]
    assert [tab.generate(seed=seed)[-1]["output"] for seed in (5, 6)] == expected


def test_blank_seed_draws_one_and_reports_it(page, ui_run):
    tab = Tab(page)
    tab.load(ui_run)
    steps = tab.generate(seed=None)
    seed = int(steps[-1]["stats"].rsplit("seed ", 1)[1].rstrip(")"))
    again = tab.generate(seed=seed)
    assert again[-1]["output"] == steps[-1]["output"]


def test_a_long_seed_is_used_as_typed_or_refused_with_its_bounds(page, ui_run):
    tab = Tab(page)
    tab.load(ui_run)
    typed = str(2**53 + 1)  # the first whole number a float cannot hold: it became 2**53
    assert tab.generate(seed=typed)[-1]["stats"].endswith(f"(seed {typed})")
    [step] = tab.generate(seed=str(2**64))
    assert "seed must be a whole number from 0 to 9,223,372,036,854,775,807, got 18446744073709551616" in (
        step["error"]["value"])


@pytest.mark.parametrize("setting, value, expected", [
    ("max_new_tokens", 0, "max_new_tokens must be a whole number from 1"),
    ("max_new_tokens", ServerLimits().max_new_tokens + 1,
     f"max_new_tokens is at most {ServerLimits().max_new_tokens} on this server"),
    ("temperature", -1, "temperature must be 0 (greedy) or between"),
    ("temperature", "hot", "temperature must be a number"),
    ("top_k", 2.5, "top_k must be a whole number"),
    ("top_p", 0, "top_p must be in (0, 1]"),
    ("repetition_penalty", 0, "repetition_penalty must be between"),
    ("seed", -3, "seed must be a whole number"),
])
def test_bad_settings_are_errors_and_the_app_keeps_working(page, ui_run, setting, value, expected):
    tab = Tab(page)
    tab.load(ui_run)
    steps = tab.generate(**{setting: value})
    assert len(steps) == 1 and shown(steps[0]["error"]) and expected in steps[0]["error"]["value"]
    assert not shown(tab.generate()[-1].get("error"))


def test_a_prompt_or_source_over_the_servers_limit_is_refused(ui_run, tmp_path):
    page = app.build_page(runs_dir=tmp_path, limits=ServerLimits(max_prompt_chars=10))
    tab = Tab(page)
    tab.load(ui_run)
    steps = tab.generate(prompt="Speak, speak!")
    assert len(steps) == 1 and "the prompt is 13 characters; the limit is 10" in steps[0]["error"]["value"]
    seq2seq = Tab(page)
    seq2seq.load(make_run(tmp_path / "seq2seq", model_type="transformer"))
    steps = seq2seq.generate(prompt="", source="Speak, speak!")
    assert len(steps) == 1 and "the source is 13 characters" in steps[0]["error"]["value"]
    assert "Generated" in tab.generate(prompt="Speak")[-1]["stats"]


def test_updates_are_batched_in_time_to_the_same_text(page, ui_run, monkeypatch):
    tab = Tab(page)
    tab.load(ui_run)
    every = tab.generate(max_new_tokens=100)
    monkeypatch.setattr(generate_tab, "STREAM_INTERVAL_S", 3600.0)
    batched = tab.generate(max_new_tokens=100)
    assert batched[-1]["output"] == every[-1]["output"]
    assert len(batched) == 2  # "Generating…" and the final text: no update in between


def test_stop_ends_generation_within_one_token_and_keeps_the_text(page, ui_run, every_token):
    tab = Tab(page)
    tab.load(ui_run)
    stream = tab.stream("Speak", "", max_new_tokens=200, temperature=1.0, top_k=0, top_p=1.0,
                        repetition_penalty=1.0, seed=3)
    next(stream)  # "Generating…": the prompt is shown
    for _ in range(5):
        text = next(stream)["output"]
    tab.stop()
    rest = list(stream)
    # The stop is seen right after the token in flight: one final step, the text so far kept.
    assert len(rest) == 1
    assert rest[0]["output"] == text and "Stopped after 5 tokens" in rest[0]["stats"]
    assert "error" not in rest[0]
    # Ready for the next request: a new generation runs to its end.
    assert "Generated" in tab.generate(max_new_tokens=10)[-1]["stats"]


def test_stop_pressed_while_the_generation_is_queued_still_stops_it(page, ui_run, every_token):
    tab = Tab(page)
    tab.load(ui_run)
    page.generate.start_generating(tab.request)  # the click on Generate; the generation then waits in the queue
    tab.stop()
    steps = tab.generate(max_new_tokens=200)
    assert "Stopped after 1 tokens" in steps[-1]["stats"]


def test_stop_with_nothing_running_does_not_stop_the_next_generation(page, ui_run):
    tab = Tab(page)
    tab.load(ui_run)
    tab.stop()
    assert "Generated" in tab.generate(max_new_tokens=10)[-1]["stats"]


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


def test_sessions_are_separate_and_interleaved_generations_do_not_mix(page, ui_run, tmp_path):
    first, second = Tab(page), Tab(page)
    assert first.session is not second.session and first.session.stop is not second.session.stop
    assert first.session is first.session  # one session per client, kept between its requests
    first.load(ui_run)
    second.load(make_run(tmp_path / "other", seed=1))
    solo_first = first.generate(seed=11)[-1]["output"]
    solo_second = second.generate(seed=22)[-1]["output"]
    assert solo_first != solo_second
    last_first, last_second = run_round_robin(first.stream(seed=11), second.stream(seed=22))
    assert last_first["output"] == solo_first and last_second["output"] == solo_second


def test_unknown_characters_get_a_warning(page, ui_run):
    tab = Tab(page)
    tab.load(ui_run)
    steps = tab.generate(prompt="Speak ☃")
    assert shown(steps[0]["warning"]) and "1 character(s)" in steps[0]["warning"]["value"]
    assert "&lt;|unk|&gt;" in steps[0]["warning"]["value"]  # escaped, so the page shows it instead of eating it
    assert not shown(steps[-1].get("error"))


def test_encoder_decoder_run(page, tmp_path):
    run_dir = make_run(tmp_path / "seq2seq", model_type="transformer")
    tab = Tab(page)
    out = tab.load(run_dir)
    assert "transformer" in out["model_info"] and "2 encoder + 2 decoder" in out["model_info"]
    assert out["source"]["visible"] is True  # only an encoder-decoder reads a source
    run = tab.session.run.run
    expected = "".join(stream_text(run.model, run.tokenizer, "", SamplingConfig(**SETTINGS), source="Speak"))
    # The output is the generated target only; a blank source means the prompt is the source (as in the CLI).
    assert tab.generate(prompt="", source="Speak")[-1]["output"] == expected
    assert tab.generate(prompt="Speak", source="")[-1]["output"] == expected
    steps = tab.generate(prompt="", source="")
    assert shown(steps[0]["error"]) and "source" in steps[0]["error"]["value"]


def test_pick_run_fills_paths_and_types(page, ui_run, tmp_path):
    out = named(page.generate, page.generate.pick_run(str(ui_run)),
                ["model_path", "tokenizer_path", "model_type", "tokenizer_type", "error"])
    assert out["model_path"] == str(ui_run / BEST_MODEL_FILE) and out["tokenizer_path"] == str(ui_run / TOKENIZER_FILE)
    assert (out["model_type"], out["tokenizer_type"]) == ("decoder_only", "char") and not shown(out["error"])
    out = named(page.generate, page.generate.pick_run(str(tmp_path / "gone")), ["model_path", "error"])
    assert "model_path" not in out and shown(out["error"]) and "no run in" in out["error"]["value"]


def test_refresh_lists_runs_newest_first(tmp_path):
    runs = tmp_path / "runs"
    for name, saved_at in [("a", 1000), ("b", 3000), ("c", 2000)]:
        make_run(runs / name)
        os.utime(runs / name / BEST_MODEL_FILE, (saved_at, saved_at))
    update = app.build_page(runs_dir=runs).generate.refresh_runs(None)
    assert update["choices"] == [str(runs / "b"), str(runs / "c"), str(runs / "a")]


def test_the_stats_say_when_the_model_ended_the_text(page, ending_run):
    # A real model that ends its text (EOS) three tokens after the prompt.
    tab = Tab(page)
    tab.load(ending_run)
    final = tab.generate(prompt="abc", temperature=0)[-1]
    assert final["output"] == "abcdef"
    assert final["stats"].startswith("Stopped at end of text after 3 tokens. Generated 3")


def test_model_info_shows_bits_per_byte_beside_the_loss(tiny_run):
    info = generate_tab.model_info_markdown(load_run(tiny_run))
    assert "bits per byte" in next(line for line in info.splitlines() if "Best validation loss" in line)


def test_tabs_share_one_copy_of_a_run_and_closing_them_releases_it(ui_run, tmp_path):
    page = app.build_page(runs_dir=tmp_path)
    runs = [ui_run, *(make_run(tmp_path / f"run{i}", seed=i) for i in range(1, MAX_LOADED_RUNS + 2))]
    tabs = [Tab(page) for _ in range(3 * len(runs))]
    for i, tab in enumerate(tabs):
        tab.load(runs[i % len(runs)])
        assert len(page.sessions.runs) <= MAX_LOADED_RUNS
    # Tabs that loaded the same files use the same model object.
    assert tabs[0].session.run is tabs[len(runs)].session.run is tabs[2 * len(runs)].session.run
    # A tab whose run was pushed out still generates: it is loaded again from the same files.
    assert "Generated" in tabs[1].generate(max_new_tokens=5)[-1]["stats"]
    for tab in tabs:
        tab.close()
    assert len(page.sessions.runs) == 0 and len(page.sessions) == 0


def test_closing_a_tab_releases_its_model_and_stops_its_generation(ui_run, tmp_path, every_token):
    page = app.build_page(runs_dir=tmp_path)
    tab = Tab(page, "tab-1")
    out = tab.load(ui_run)
    assert not shown(out["error"]) and tab.session.id == "tab-1" and len(page.sessions.runs) == 1
    stream = tab.stream(max_new_tokens=200, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    next(stream)
    tab.close()  # the unload event, with the tab's generation running
    assert [*stream][-1]["stats"].startswith("Stopped after")
    assert len(page.sessions.runs) == 0 and len(page.sessions) == 0
    # The same client coming back has a new session, with no model.
    assert tab.session.run is None


def test_a_second_generation_of_one_session_is_refused_while_another_session_generates(page, ui_run, every_token):
    busy, other = Tab(page), Tab(page)
    busy.load(ui_run)
    other.load(ui_run)
    running = busy.stream(max_new_tokens=200, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=3)
    next(running)
    refused = busy.generate()
    assert len(refused) == 1 and "already generating" in refused[0]["error"]["value"]
    assert "Generated" in other.generate(max_new_tokens=5)[-1]["stats"]  # other sessions are not held up
    busy.stop()  # the refused request changed nothing: Stop still ends the running one
    assert "Stopped after" in list(running)[-1]["stats"]
    assert "Generated" in busy.generate(max_new_tokens=5)[-1]["stats"]  # and the session may generate again


def test_an_error_before_generating_clears_the_output_of_the_run_before(page, ui_run):
    tab = Tab(page)
    tab.load(ui_run)
    assert tab.generate()[-1]["output"]
    steps = tab.generate(temperature=-1)
    assert shown(steps[-1]["error"]) and steps[-1]["output"] == "" and steps[-1]["stats"] == ""


def test_encoder_decoder_page_shows_the_source_first_and_the_prefix_as_optional(page, tmp_path):
    run_dir = make_run(tmp_path / "seq2seq", model_type="transformer")
    components = app.build_demo(run_dir, runs_dir=tmp_path).get_config_file()["components"]
    order = [c["props"].get("elem_id") for c in components]
    by_id = {c["props"].get("elem_id"): c["props"] for c in components}
    assert order.index("source") < order.index("prompt")
    assert by_id["source"]["visible"] is not False and "input" in by_id["source"]["label"]
    assert by_id["prompt"]["label"].startswith("Target prefix (optional")
    # Loading a decoder-only run turns the box back into the prompt and hides the source.
    out = Tab(page).load(make_run(tmp_path / "plain"))
    assert out["prompt"]["label"] == "Prompt" and out["source"]["visible"] is False


def test_a_seed_is_the_number_typed_or_refused_with_its_bounds():
    """Through a float, 9007199254740993 (2**53 + 1) became 9007199254740992: another seed than the one shown."""
    from minillm.errors import MiniLLMError

    for typed in ("9007199254740993", " 9223372036854775807 ", "0", "42"):
        assert generate_tab.form_sampling(10, 0.8, 50, 1.0, 1.0, typed).seed == int(typed)
    with pytest.raises(MiniLLMError, match="seed must be a whole number from 0 to 9,223,372,036,854,775,807"):
        generate_tab.form_sampling(10, 0.8, 50, 1.0, 1.0, "9223372036854775808")
    assert generate_tab.form_sampling(10, 0.8, 50, 1.0, 1.0, "").seed is None
