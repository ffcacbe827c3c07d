"""`minillm serve`, as its users meet it: started in a subprocess over a folder of tiny runs, on a free port,
and talked to with OpenAI's own Python client (and plain HTTP where a client would hide the answer).

The server's text is the library's: a completion equals `generate_text` for the same settings and seed,
streamed or not, alone or among 16 clients decoded in one batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ENDING_SAMPLE, import_dev_dependency

from minillm.checkpoint import load_run, save_best
from minillm.config import ModelConfig
from minillm.generation import generate_text, stream_reply
from minillm.models import build_model
from minillm.run_folder import TOKENIZER_FILE
from minillm.sampling import SamplingConfig
from minillm.tokenizers.character_tokenizer import CharacterTokenizer

openai = import_dev_dependency("openai")

KEY = "test-key-0123"
STARTUP_S = 120  # importing torch and FastAPI on a loaded 2-core machine takes a while
MAX_BATCH = 16
QUEUE = 2  # the test server's queue: generations that may wait for a row
# What the server may keep of 16 concurrent generations once they are over (allocator slack, the event
# loop's buffers); the weights and the batch's cache are allocated before the measurement starts.
MEMORY_MARGIN_MIB = 32
PROMPT = "the cat"
# The sampler's defaults (Mini LLM's; the API's are OpenAI's). A trained tiny model often ends its text
# early: the tests compare finish reasons with the library's, not with "length".
SETTINGS = dict(temperature=0.8, top_k=50)


def random_run(run_dir: Path, model_type: str, seed: int = 0) -> Path:
    """A run folder of an untrained tiny model (its logits vary with the context far more than a trained
    one's), saved as training saves one."""
    tokenizer = CharacterTokenizer.train(["the cat sees a dog. abcdefgh\n"])
    config = ModelConfig(model_type=model_type, vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2,
                         n_heads=2, max_seq_len=32)
    torch.manual_seed(seed)
    save_best(run_dir, build_model(config), config, tokenizer.kind, {"step": 1, "val_loss": 3.0})
    tokenizer.save(run_dir / TOKENIZER_FILE)
    return run_dir


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_run, ending_run, chat_run) -> Path:
    """The served folder: the trained tiny run, the run that ends its text, a run trained on conversations,
    an encoder-decoder."""
    root = tmp_path_factory.mktemp("served")
    (root / "tiny").symlink_to(tiny_run)
    (root / "ending").symlink_to(ending_run)
    random_run(root / "seq2seq", "transformer")
    random_run(root / "endless", "decoder_only")  # greedy, it never ends its text (it repeats one letter)
    (root / "not-a-run").mkdir()  # only runs are models
    (root / "chat").symlink_to(chat_run)
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, port: int) -> None:
        self.process, self.url = process, f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def model(self, name: str) -> dict:
        return next(m for m in self.health()["models"] if m["id"] == name)

    def memory_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024

    def wait_idle(self, name: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.model(name)
            if status.get("running") == 0 and status.get("waiting") == 0:
                return status
            time.sleep(0.05)
        pytest.fail(f"the server still runs generations of {name}: {self.model(name)}")


def start_server(*args: str, env: dict | None = None) -> Server:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "minillm", "serve", *args, "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = Server(process, port)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"minillm serve exited with {process.returncode}: {process.stderr.read()}")
        try:
            server.health()
            return server
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    pytest.fail("minillm serve did not answer in time")


@pytest.fixture(scope="module")
def server(runs_dir):
    server = start_server(str(runs_dir), "--max-batch", str(MAX_BATCH), "--max-queue", str(QUEUE),
                          env={"MINILLM_API_KEY": KEY})
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return load_run(tiny_run)


def complete(server: Server, stream: bool = False, **request) -> tuple[list[str], list[str | None], object]:
    """(texts, finish reasons) of each choice, by index, and the response (the last chunk when streamed)."""
    request = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "seed": 1, **request}
    extra = {**request.pop("extra_body", {}), **{k: request.pop(k) for k in ("top_k", "repetition_penalty")
                                                 if k in request}}
    response = server.client.completions.create(stream=stream, extra_body=extra or None, **request)
    if not stream:
        choices = sorted(response.choices, key=lambda c: c.index)
        return [c.text for c in choices], [c.finish_reason for c in choices], response
    texts, reasons, last = {}, {}, None
    for chunk in response:
        last = chunk
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    return [texts[i] for i in sorted(texts)], [reasons[i] for i in sorted(reasons)], last


def test_the_models_are_the_runs_under_the_folder(server):
    expected = ["chat", "endless", "ending", "seq2seq", "tiny"]
    assert sorted(m.id for m in server.client.models.list()) == sorted(expected)
    assert server.client.models.retrieve("tiny").owned_by == "minillm"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("not-a-run")


def test_a_completion_is_minillm_generates_text_streamed_or_not(server, tiny):
    texts, reasons, response = complete(server, seed=3, **SETTINGS)
    expected = generate_text(tiny.model, tiny.tokenizer, PROMPT, SamplingConfig(max_new_tokens=40, seed=3, **SETTINGS))
    assert texts == [expected] and reasons == ["length"]
    assert response.object == "text_completion" and response.model == "tiny"
    assert complete(server, stream=True, seed=3, **SETTINGS)[:2] == ([expected], ["length"])
    assert complete(server, seed=4, **SETTINGS)[0] != [expected]  # the seed matters


def test_a_stop_string_cuts_the_text_even_across_tokens(server):
    [text], [reason], _ = complete(server, max_tokens=60, seed=5)
    stop = text[20:23]  # three characters: three tokens of the char-level run
    cut = text[:text.index(stop)]
    for stream in (False, True):
        assert complete(server, stream, max_tokens=60, seed=5, stop=[stop, "never there"])[:2] == ([cut], ["stop"])
    assert complete(server, max_tokens=60, seed=5, stop="never there")[:2] == ([text], [reason])


def test_n_gives_that_many_choices_each_the_text_of_its_own_seed(server):
    texts, reasons, _ = complete(server, n=3, seed=10)
    assert len(texts) == 3 and len(set(texts)) == 3
    alone = [complete(server, seed=10 + i)[:2] for i in range(3)]  # choice i: seed + i
    assert [text for [text], _ in alone] == texts and [reason for _, [reason] in alone] == reasons
    assert complete(server, stream=True, n=3, seed=10)[:2] == (texts, reasons)


def test_logprobs_are_the_models_log_softmax_and_usage_counts_the_tokens(server, tiny):
    _, _, response = complete(server, logprobs=5, max_tokens=12, temperature=1.0)
    [choice] = response.choices
    prompt_ids = tiny.tokenizer.encode(PROMPT)
    new_ids = tiny.tokenizer.encode(choice.text)  # (12 of them, or fewer when the model ended the text)
    n = len(new_ids)
    assert n and choice.logprobs.tokens == list(choice.text) and (n == 12) == (choice.finish_reason == "length")
    with torch.no_grad():
        logits = tiny.model(torch.tensor([prompt_ids + new_ids]))[0][0]
    expected = torch.log_softmax(logits[len(prompt_ids) - 1:-1].float(), dim=-1)  # (n, V): before each new token
    for i, (token_id, logprob, top) in enumerate(zip(new_ids, choice.logprobs.token_logprobs,
                                                      choice.logprobs.top_logprobs, strict=True)):
        assert logprob == pytest.approx(float(expected[i, token_id]), abs=1e-4)
        best = torch.topk(expected[i], 5)
        assert len(top) == 5
        assert top == pytest.approx({tiny.tokenizer.decode([t], skip_special_tokens=False): float(v)
                                     for t, v in zip(best.indices.tolist(), best.values, strict=True)}, abs=1e-4)
    assert choice.logprobs.text_offset == list(range(n))
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(prompt_ids), n,
                                                                                   len(prompt_ids) + n)


def test_echo_scores_the_prompt(server, tiny):
    _, _, response = complete(server, echo=True, max_tokens=0, logprobs=1)
    [choice] = response.choices
    ids = tiny.tokenizer.encode(PROMPT)
    assert choice.text == PROMPT and choice.logprobs.token_logprobs[0] is None and response.usage.completion_tokens == 0
    with torch.no_grad():
        expected = torch.log_softmax(tiny.model(torch.tensor([ids]))[0][0].float(), dim=-1)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [float(expected[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4)
    texts, _, _ = complete(server, echo=True, max_tokens=5, seed=2)
    assert texts[0] == PROMPT + complete(server, max_tokens=5, seed=2)[0][0]


def test_a_model_that_ends_its_text_finishes_with_stop_unless_told_to_ignore_it(server):
    assert complete(server, model="ending", prompt="abc", temperature=0, max_tokens=30)[:2] == (
        [ENDING_SAMPLE[3:]], ["stop"])
    texts, reasons, response = complete(server, model="ending", prompt="abc", temperature=0, max_tokens=30,
                                        extra_body={"ignore_eos": True})
    assert texts[0].startswith(ENDING_SAMPLE[3:]) and reasons == ["length"] and response.usage.completion_tokens == 30


def test_an_encoder_decoder_takes_the_prompt_as_its_source(server, runs_dir):
    run = load_run(runs_dir / "seq2seq")
    expected = generate_text(run.model, run.tokenizer, "", SamplingConfig(max_new_tokens=20, seed=7, **SETTINGS),
                             source="a dog sees the cat")
    assert complete(server, model="seq2seq", prompt="a dog sees the cat", max_tokens=20, seed=7,
                    **SETTINGS)[0] == [expected]
    with pytest.raises(openai.BadRequestError, match="echo"):
        complete(server, model="seq2seq", echo=True)


@pytest.mark.parametrize("request_changes, param", [
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"n": 99}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": "x" * 200}, "prompt"),  # longer than the run's context (32 tokens)
])
def test_a_bad_parameter_is_a_400_that_names_it(server, request_changes, param):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(server, **request_changes)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param
    assert param.replace("_", " ") in caught.value.message.replace("_", " ")


def test_errors_are_openais_error_objects(server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(server, model="nope")
    with pytest.raises(openai.NotFoundError):
        complete(server, model="../tiny")  # a request names a model, never a path
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        wrong.completions.create(model="tiny", prompt="x")
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument supplied: best_guess"):
        complete(server, extra_body={"best_guess": True})
    post = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert post.status_code == 401 and post.json()["error"]["code"] == "missing_api_key"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    too_large = json.dumps({"model": "tiny", "prompt": "x" * 2_000_000}).encode()
    for body, status in ((b"{not json", 400), (b"[1, 2]", 400), (too_large, 413)):
        answer = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers)
        assert answer.status_code == status and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in server.health().__repr__()


def test_chat_is_refused_clearly_on_a_run_without_a_template(server):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="no chat template.*/v1/completions.*conversation"):
            server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  stream=stream)
    with pytest.raises(openai.BadRequestError, match="tools is not supported"):
        server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              tools=[{"type": "function", "function": {"name": "f"}}])


def stream_text(server: Server, seed: int, max_tokens: int, results: dict, key: object, stop_after: int = 0) -> None:
    """Stream a completion into results[key]; with stop_after, go away after that many chunks."""
    stream = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_tokens, seed=seed,
                                              stream=True, extra_body={"top_k": 50}, temperature=0.8)
    text = ""
    for n, chunk in enumerate(stream, start=1):
        text += "".join(c.text for c in chunk.choices)
        if n == stop_after:
            stream.close()
            break
    results[key] = text


def test_sixteen_concurrent_clients_get_the_text_each_gets_alone(server):
    clients = [(seed, 20 + 7 * seed) for seed in range(MAX_BATCH)]  # 20 to 125 tokens: windows slide
    alone: dict = {}
    for seed, length in clients:
        stream_text(server, seed, length, alone, seed)
    server.wait_idle("tiny")
    before, steps_before = server.memory_mib(), server.model("tiny")["steps"]
    together: dict = {}
    threads = [threading.Thread(target=stream_text, args=(server, seed, length, together, seed)) for seed, length
               in clients]
    # Two more clients go away after a few chunks of a long generation (their rows must leave the batch).
    threads += [threading.Thread(target=stream_text, args=(server, 100 + i, 1000, together, f"gone{i}", 3))
                for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {seed: together[seed] for seed, _ in clients} == alone
    status = server.wait_idle("tiny")
    print(f"server memory before {before:.1f} MiB, after {server.memory_mib():.1f} MiB")
    tokens = sum(map(len, alone.values()))  # (one token per character; a text may end before its length)
    assert status["steps"] - steps_before < tokens / 2  # decoded together: far fewer steps than tokens
    assert server.memory_mib() - before < MEMORY_MARGIN_MIB


def test_a_full_batch_and_queue_is_a_429_and_clients_that_leave_free_their_rows(server):
    def endless():
        return server.client.completions.create(model="endless", prompt=PROMPT, max_tokens=1000, temperature=0,
                                                stream=True)

    running = [endless() for _ in range(MAX_BATCH)]
    waiting = []
    try:
        for stream in running:
            next(iter(stream))  # each is running
        waiting = [endless() for _ in range(QUEUE)]
        deadline = time.monotonic() + 30
        while server.model("endless")["waiting"] < QUEUE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (server.model("endless")["running"], server.model("endless")["waiting"]) == (MAX_BATCH, QUEUE)
        with pytest.raises(openai.RateLimitError, match="busy"):
            complete(server, model="endless")
        for stream in running[:QUEUE + 2]:  # four leave: the two waiting take two rows, two rows are free
            stream.close()
        for stream in waiting:
            next(iter(stream))
        deadline = time.monotonic() + 30
        while server.model("endless")["running"] > MAX_BATCH - 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        # A short request is served while the long ones go on (it does not wait for them to end).
        assert complete(server, model="endless", n=2, max_tokens=5)[1] == ["length", "length"]
    finally:
        for stream in running + waiting:
            stream.close()
    server.wait_idle("endless")


def test_chat_on_a_conversation_trained_run_is_the_librarys_reply(server, runs_dir):
    run = load_run(runs_dir / "chat")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    sampling = SamplingConfig(max_new_tokens=60, seed=2, **SETTINGS)
    expected = "".join(text for _, text in stream_reply(run.model, run.tokenizer, messages, sampling))
    request = dict(model="chat", messages=messages, max_tokens=60, seed=2, temperature=0.8, extra_body={"top_k": 50})
    response = server.client.chat.completions.create(**request)
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == ("stop" if response.usage.completion_tokens < 60 else "length")
    chunks = list(server.client.chat.completions.create(stream=True, **request))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
