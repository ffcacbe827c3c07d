"""The web UI and conversations: the chat view's handlers called directly (history, streaming, Stop, Clear, a
run without a template), the Train tab's task, and the chat view in real Chromium (two messages, two streamed
answers, Stop, Clear)."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
import torch
from conftest import require_browser
from test_ui_browser import OFFLINE_ENV, WAIT_MS, field, ui_server

from minillm.checkpoint import load_run, read_model_config, save_best
from minillm.generation import stream_reply
from minillm.models import build_model
from minillm.run_folder import BEST_MODEL_FILE, TOKENIZER_FILE, RunFolder
from minillm.sampling import SamplingConfig
from minillm.ui import app, train_tab

SETTINGS = dict(max_new_tokens=16, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=1)
SYSTEM = "You are a calculator."
RUN_FILES = ("tokenizer.json", "special_tokens.json", "chat_template.jinja")

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeRequest:
    def __init__(self) -> None:
        self.session_hash = uuid.uuid4().hex


def untrained_copy(chat_run, folder, **shape) -> object:
    """The chat run's tokenizer and template with an untrained model (of `shape`) that never ends a turn: its
    answers run to max_new_tokens, and depend on the whole conversation."""
    config, meta = read_model_config(RunFolder(chat_run).best_config)
    config = config.replace(**shape) if shape else config
    torch.manual_seed(0)
    model = build_model(config)
    tokenizer = load_run(chat_run).tokenizer
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
        for spelling, token_id in tokenizer.special_tokens().items():
            if spelling != "<|unk|>":
                model.lm_head.weight[token_id] = 0.0
    save_best(folder, model, config, meta["tokenizer_type"], {"step": 0, "val_loss": None})
    for name in RUN_FILES:
        shutil.copy(RunFolder(chat_run).path / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def chat_page(chat_run, tmp_path_factory):
    runs = tmp_path_factory.mktemp("chat_ui_runs")
    untrained_copy(chat_run, runs / "untrained")
    page = app.build_page(runs_dir=runs)
    page.generate.chat.stream_interval = 0.0  # an update per token
    return page, runs / "untrained"


def load(page, run_dir, request) -> dict:
    return page.generate.load_model(str(run_dir / BEST_MODEL_FILE), str(run_dir / TOKENIZER_FILE), request)


def answer_steps(page, message, history, request, system=SYSTEM, **settings):
    values = {**SETTINGS, **settings}
    return page.generate.chat.answer(message, history, system, *values.values(), request=request)


def reply_of(run, messages) -> str:
    sampling = SamplingConfig(**{**SETTINGS, "top_k": None, "top_p": None})
    return "".join(text for _, text in stream_reply(run.model, run.tokenizer, messages, sampling))


def test_a_chat_run_shows_the_chat_view_and_a_text_run_does_not(chat_page, tiny_run):
    page, run_dir = chat_page
    request = FakeRequest()
    assert load(page, run_dir, request)[page.generate.chat.column]["visible"] is True
    assert load(page, tiny_run, request)[page.generate.chat.column]["visible"] is False
    steps = list(answer_steps(page, "What is 2 + 3?", [], request))
    assert "no chat template" in steps[-1][page.generate.error]["value"]


def test_answers_stream_in_and_follow_the_whole_conversation(chat_page):
    page, run_dir = chat_page
    chat, request = page.generate.chat, FakeRequest()
    load(page, run_dir, request)
    run = load_run(run_dir)
    steps = list(answer_steps(page, "What is 2 + 3?", [], request))
    history = steps[-1][chat.chatbot]
    first = reply_of(run, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 3?"}])
    assert history == [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": first}]
    shown = [step[chat.chatbot][-1]["content"] for step in steps if chat.chatbot in step]
    assert shown[0] == "" and len(set(shown)) >= SETTINGS["max_new_tokens"]  # token by token
    # The page sends the history back in Gradio's own form (content as a list of text parts).
    sent = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}], "metadata": None} for m in history]
    steps = list(answer_steps(page, "Add 10 and 4.", sent, request))
    system, question = {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Add 10 and 4."}
    second = reply_of(run, [system, *history, question])
    assert steps[-1][chat.chatbot][-1] == {"role": "assistant", "content": second}
    assert second != reply_of(run, [system, question])  # (the history tells)


def test_stop_keeps_the_answer_so_far_and_clear_starts_over(chat_page):
    page, run_dir = chat_page
    chat, request = page.generate.chat, FakeRequest()
    load(page, run_dir, request)
    chat.start(request)
    steps = answer_steps(page, "What is 2 + 3?", [], request, max_new_tokens=500)
    shown = [next(steps), next(steps), next(steps)]
    chat.stop(request)
    shown += list(steps)
    final = shown[-1][chat.chatbot][-1]["content"]
    assert 0 < len(final) < 100 and final.startswith(shown[2][chat.chatbot][-1]["content"])
    chat.start(request)  # a new answer, cleared while it streams: the conversation is empty at its end
    steps = answer_steps(page, "Add 10 and 4.", shown[-1][chat.chatbot], request, max_new_tokens=500)
    next(steps), next(steps)
    assert chat.clear(request) == {chat.chatbot: [], chat.note: ""}
    assert list(steps)[-1][chat.chatbot] == []


def test_the_train_tab_sets_the_task_and_its_plan_says_it(dialogues_file, tmp_path):
    values = dict(zip(train_tab.PRESET_FIELDS, train_tab.preset_values("tiny"), strict=True))
    assert values["train_task"] == "auto"
    values["train_context"] = 192
    form = [None, str(dialogues_file), "char", "decoder_only", "tiny", *values.values()]  # (no upload)
    for task in ("auto", "chat"):
        form[train_tab.FORM.index("train_task")] = task
        _, config = train_tab.form_configs(*form[1:])
        assert config.task == task
    tab = app.build_page(runs_dir=tmp_path, data_dirs=[dialogues_file.parent]).train
    plan = tab.show_plan(*form, "")[tab.train_plan]
    assert "JSON-lines conversations" in plan and "300 conversations" in plan and "data: task chat: " in plan
    form[train_tab.FORM.index("train_task")] = "pairs"
    assert "they train --task chat" in tab.show_plan(*form, "")[tab.train_error]["value"]


# ---- in Chromium ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_server(chat_run, tmp_path_factory):
    """`minillm ui RUN` on an untrained chat model big enough that 500 tokens take a while (time to Stop)."""
    require_browser()
    runs = tmp_path_factory.mktemp("chat_browser_runs")
    run_dir = untrained_copy(chat_run, runs / "chat", d_model=256, n_layers=4, n_heads=4, d_ff=None)
    log = tmp_path_factory.mktemp("chat_server") / "server.log"
    with ui_server([str(run_dir), "--runs-dir", str(runs)], log, {**os.environ, **OFFLINE_ENV}) as (url, _):
        yield url, run_dir


def bot_texts(page) -> list[str]:
    return page.locator("#chatbot [data-testid=bot]").all_inner_texts()


def test_the_chat_view_in_chromium(browser, chat_server):
    url, run_dir = chat_server
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto(url)
        page.locator("#chat_view").wait_for(state="visible")  # the run has a template: the view shows
        field(page, "max_new_tokens").fill("40")
        field(page, "max_new_tokens").press("Tab")
        field(page, "temperature").fill("0")
        field(page, "temperature").press("Tab")
        run = load_run(run_dir)
        sampling = SamplingConfig(max_new_tokens=40, temperature=0)
        history = []
        for n, message in enumerate(("What is 2 + 3?", "Add 10 and 4."), start=1):
            page.evaluate("""() => { window.lengths = [];
                new MutationObserver(() => { const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
                    if (bots.length) window.lengths.push(bots[bots.length - 1].innerText.length); })
                .observe(document.querySelector('#chatbot'), {childList: true, subtree: true, characterData: true});
            }""")
            field(page, "chat_message").fill(message)
            page.locator("#chat_send").click()
            page.wait_for_function(f"() => document.querySelectorAll('#chatbot [data-testid=bot]').length == {n}"
                                   " && !document.querySelector('#chat_send').disabled")
            history.append({"role": "user", "content": message})
            expected = "".join(t for _, t in stream_reply(run.model, run.tokenizer, history, sampling))
            history.append({"role": "assistant", "content": expected})
            page.wait_for_function("t => { const bots = document.querySelectorAll('#chatbot [data-testid=bot]');"
                                   " return bots[bots.length - 1].innerText.trim() === t; }", arg=expected.strip())
            lengths = page.evaluate("window.lengths")
            assert len({length for length in lengths if 0 < length < len(expected)}) >= 1, lengths  # streamed
        assert page.locator("#chatbot [data-testid=user]").all_inner_texts() == ["What is 2 + 3?", "Add 10 and 4."]

        field(page, "max_new_tokens").fill("2000")
        field(page, "max_new_tokens").press("Tab")
        field(page, "chat_message").fill("How many m are 3 km?")
        page.locator("#chat_send").click()
        page.wait_for_function("() => { const bots = document.querySelectorAll('#chatbot [data-testid=bot]');"
                               " return bots.length == 3 && bots[2].innerText.length > 20; }")
        page.locator("#chat_stop").click()
        page.wait_for_function("() => !document.querySelector('#chat_send').disabled")
        stopped = bot_texts(page)[2]
        assert 20 < len(stopped) < 2000
        page.locator("#chat_clear").click()
        page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=bot]').length == 0")
        assert not page.locator("#error").is_visible()
    finally:
        context.close()
