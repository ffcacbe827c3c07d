"""The parts of `minillm serve` below HTTP, and the app in-process: stop strings on streamed text, the
requests' checks, the batch scheduler's queue, a run still loading (503), CORS, the command's errors."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from test_models import random_ids, tiny_model

from minillm.batch_engine import Generation, Token
from minillm.cli import main
from minillm.sampling import SamplingConfig
from minillm.serve.address import api_network_warning
from minillm.serve.api_requests import APIError, parse_chat, parse_completion
from minillm.serve.batching import BatchScheduler, BatchSettings, QueueFull, Update
from minillm.serve.limits import ServerLimits
from minillm.serve.text import ChoiceText
from minillm.tokenizers import train_tokenizer
from minillm.tokenizers.character_tokenizer import CharacterTokenizer

LIMITS = ServerLimits()
CHARS = CharacterTokenizer.train(["abcdefgh xyz\n"])


def streamed(text: str, stops: list[str], prefix: str = "", tokenizer=CHARS) -> tuple[list[str], ChoiceText]:
    """The pieces a client receives when `text`'s tokens arrive one by one, and the choice's text at the end."""
    choice, pieces = ChoiceText(tokenizer, stops, prefix), []
    for token_id in tokenizer.encode(text):
        choice.add(Token(token_id))
        pieces.append(choice.take().text)
        if choice.finished:
            break
    choice.finish()
    pieces.append(choice.take().text)
    return pieces, choice


def test_a_stop_string_across_tokens_cuts_the_text_and_nothing_of_it_is_sent_early():
    pieces, choice = streamed("abcdef", ["cd"])
    assert pieces == ["a", "b", "", "", ""] and choice.text == "ab" and choice.stopped and choice.n_tokens == 2
    pieces, choice = streamed("abcabd", ["abd", "x"])  # "ab" held back twice: only the second one is the stop
    assert "".join(pieces) == "abc" and pieces[:3] == ["", "", "abc"] and choice.n_tokens == 3
    pieces, choice = streamed("abcdef", ["ce"])  # "c" held back, then let go
    assert pieces == ["a", "b", "", "cd", "e", "f", ""] and not choice.stopped and choice.n_tokens == 6


def test_stop_strings_are_looked_for_in_the_generated_text_only():
    pieces, choice = streamed("\nab\n\nc", ["\n\n"], prefix="zz\n")  # the echo's "\n" is no half of a stop
    assert "".join(pieces) == "zz\n\nab" and choice.stopped


def test_a_character_cut_at_the_end_shows_as_the_tokenizers_decode():
    bpe = train_tokenizer("bpe", ["plain text only " * 50], 300)
    ids = bpe.encode("ok 🙂")[:-1]  # the emoji's last byte is missing
    choice = ChoiceText(bpe, [])
    for token_id in ids:
        choice.add(Token(token_id))
    shown = choice.take().text
    choice.finish()
    assert shown + choice.take().text == bpe.decode(ids) and "\ufffd" in bpe.decode(ids)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "frequency_penalty": 1}, "frequency_penalty"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "suffix": "end"}, "suffix"),
    ({"prompt": "x", "whatever": 1}, "whatever"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "seed": -5}, "seed"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": ["a", "b"], "n": 9}, "n"),  # 18 generations, over the server's 16
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"prompt": "x" * (LIMITS.max_prompt_chars + 1)}, "prompt"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({}, "prompt"),
])
def test_a_bad_completion_request_names_its_parameter(body, param):
    with pytest.raises(APIError) as caught:
        parse_completion({"model": "m", **body}, LIMITS)
    assert caught.value.status == 400 and caught.value.param == param and param in str(caught.value)


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),  # without logprobs
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt"),  # a completion's
])
def test_a_bad_chat_request_names_its_parameter(body, param):
    with pytest.raises(APIError) as caught:
        parse_chat({"model": "m", **body}, LIMITS)
    assert caught.value.status == 400 and caught.value.param == param


def test_good_requests_read_as_openai_defines_them():
    completion = parse_completion({"model": "m", "prompt": ["a", "b"], "n": 2, "stop": "\n", "top_k": 5, "seed": 3,
                                   "presence_penalty": 0, "user": "me", "echo": True, "max_tokens": 0}, LIMITS)
    assert completion.prompts == ("a", "b") and completion.n == 2 and completion.stops == ["\n"]
    assert completion.sampling == SamplingConfig(temperature=1.0, top_k=5, top_p=None, seed=3)
    assert completion.max_tokens == 0 and completion.logprobs is None
    assert parse_completion({"model": "m", "prompt": "a"}, LIMITS).max_tokens == 16  # OpenAI's default
    chat = parse_chat({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}],
                       "logprobs": True, "top_logprobs": 2, "max_completion_tokens": 7}, LIMITS)
    assert chat.messages == ({"role": "system", "content": "hi"},) and chat.logprobs == 2 and chat.max_tokens == 7


def collect(updates: list[Update], done: threading.Event):
    def deliver(update: Update) -> None:
        updates.append(update)
        if update.done:
            done.set()

    return deliver


def test_the_scheduler_queues_up_to_its_bound_then_refuses_and_a_cancelled_generation_frees_its_row():
    model = tiny_model("decoder_only")
    scheduler = BatchScheduler(model, BatchSettings(max_rows=1, max_waiting=1))
    endless = Generation(random_ids(1, 3)[0].tolist(), SamplingConfig(max_new_tokens=10**6, temperature=0))
    updates, done = [], threading.Event()
    running = scheduler.submit([endless], [collect(updates, done)])[0]
    short_updates, short_done = [], threading.Event()
    short = Generation(random_ids(1, 3)[0].tolist(), SamplingConfig(max_new_tokens=4, temperature=0))
    scheduler.submit([short], [collect(short_updates, short_done)])  # waits for the row
    with pytest.raises(QueueFull, match="busy"):
        scheduler.submit([short], [collect([], threading.Event())])
    time.sleep(0.2)
    assert scheduler.load() == (1, 1) and not short_done.is_set()
    running.cancel()
    assert short_done.wait(30) and sum(len(u.tokens) for u in short_updates) == 4
    deadline = time.monotonic() + 10
    while scheduler.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.load() == (0, 0) and not done.is_set()  # the cancelled one just left


def test_a_generation_with_bad_input_fails_alone():
    scheduler = BatchScheduler(tiny_model("decoder_only"), BatchSettings(max_rows=2))
    good, bad = ([], threading.Event()), ([], threading.Event())
    sampling = SamplingConfig(max_new_tokens=5, temperature=0)
    scheduler.submit([Generation([3, 4], sampling), Generation([999], sampling)],
                     [collect(*good), collect(*bad)])
    assert good[1].wait(30) and bad[1].wait(30)
    assert bad[0][-1].error and "outside the model's vocabulary" in bad[0][-1].error
    assert sum(len(u.tokens) for u in good[0]) == 5 and good[0][-1].error is None


@pytest.fixture
def app_client(tiny_run):
    from fastapi.testclient import TestClient

    from minillm.serve.http import APIOptions, build_app

    def make(**options) -> TestClient:
        return TestClient(build_app(APIOptions(tiny_run, **options)))

    return make


def test_a_run_still_loading_is_a_503_to_retry(app_client):
    client = app_client(load_wait_s=0)
    first = client.post("/v1/completions", json={"model": "tiny-decoder_only-char", "prompt": "a"})
    assert first.status_code == 503 and first.headers["Retry-After"]
    assert first.json()["error"]["code"] == "model_loading"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = client.post("/v1/completions", json={"model": "tiny-decoder_only-char", "prompt": "a"})
        if answer.status_code == 200:
            break
        time.sleep(0.1)
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_cors_is_off_unless_an_origin_is_given(app_client):
    preflight = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in app_client().options("/v1/models", headers=preflight).headers
    allowed = app_client(cors_origins=("http://example.com",)).options("/v1/models", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "http://example.com"


def test_a_network_address_without_a_key_is_a_loud_warning():
    assert api_network_warning("127.0.0.1", False) == "" and api_network_warning("localhost", False) == ""
    loud = api_network_warning("0.0.0.0", False)
    assert "WITHOUT AN API KEY" in loud and "--api-key" in loud and "MINILLM_API_KEY" in loud
    assert "TLS" in api_network_warning("0.0.0.0", True)


def test_the_serve_command_refuses_a_bad_folder_or_a_busy_port_in_one_line(tmp_path, tiny_run, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a folder" in err and len(err.splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(tiny_run), "--port", str(taken.getsockname()[1])]) == 2
    assert "already in use" in capsys.readouterr().err
    assert main(["serve", "--max-batch", "0"]) == 2



@pytest.mark.slow  # compiling takes a minute or more per batch size on a small CPU
def test_with_compile_requests_are_served_at_once_and_the_compiled_steps_give_the_same_tokens():
    model = tiny_model("decoder_only")
    generation = Generation(random_ids(1, 3)[0].tolist(), SamplingConfig(max_new_tokens=40, temperature=1.0, seed=4))

    def tokens(scheduler: BatchScheduler) -> list[int]:
        updates, done = [], threading.Event()
        scheduler.submit([generation], [collect(updates, done)])
        assert done.wait(60)
        return [t.id for u in updates for t in u.tokens]

    eager = tokens(BatchScheduler(model, BatchSettings(max_rows=2)))
    compiling = BatchScheduler(model, BatchSettings(max_rows=2, compile=True))
    assert tokens(compiling) == eager and not compiling.engine.compiled  # served while it compiles
    deadline = time.monotonic() + 900
    while not compiling.engine.compiled and compiling.compile_error is None and time.monotonic() < deadline:
        time.sleep(1)
    assert compiling.engine.compiled, compiling.compile_error
    assert tokens(compiling) == eager
