"""What a page user can make the server read: training data only from an upload, the bundled corpus or a
folder the server allows (`--data-dir`), runs only as runs, whatever path the page or the API names (through
symlinks and `..` too). Through the handlers, and through gradio_client against a live `minillm ui`."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request

import pytest
from test_ui_browser import OFFLINE_ENV, client_for, shown_text, ui_server
from test_ui_training import TrainPage, form, shown

from minillm.run_folder import BEST_MODEL_FILE, TOKENIZER_FILE, RunFolder
from minillm.ui import app, train_tab

pytestmark = pytest.mark.usefixtures("one_thread")
SECRET = "root:$6$not-a-real-hash:19000:0:99999:7:::\n" * 200  # a file the server can read and must not give
TRAIN_WAIT_S = 120
# load_model's outputs as the API gives them (the chat column, a layout, gives none)
LOAD_OUTPUTS = ("model_info", "decode_step", "model_type", "tokenizer_type", "prompt", "source", "error", "warning",
                "chatbot")


@pytest.fixture
def files(tmp_path, corpus_file, monkeypatch):
    """An allowed folder (a text in it, a symlink out of it), a secret beside it, and an upload folder."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    allowed, secret = tmp_path / "allowed", tmp_path / "secret.txt"
    allowed.mkdir()
    secret.write_text(SECRET)
    shutil.copy(corpus_file, allowed / "notes.txt")
    (allowed / "link.txt").symlink_to(secret)
    upload = tmp_path / "uploads" / "5f0c9e" / "my notes.txt"  # as Gradio keeps an upload: FOLDER/HASH/NAME
    upload.parent.mkdir(parents=True)
    shutil.copy(corpus_file, upload)
    return allowed, secret, upload


def refusal(out) -> str:
    error = shown(out["train_error"])
    assert error and "root:" not in error and "Traceback" not in error
    return error


def test_the_train_tab_trains_only_on_an_upload_the_bundled_corpus_or_an_allowed_folder(tmp_path, files):
    allowed, secret, upload = files
    page = TrainPage(tmp_path / "runs", data_dirs=[allowed])
    for path in (secret, allowed / "link.txt", f"{allowed}/../secret.txt", "/etc/passwd", "~/.bashrc"):
        for out in (page.show_plan(form(path)), page.start(form(path))):
            error = refusal(out)
            assert "upload the file, or start the server with `minillm ui --data-dir FOLDER`" in error, error
            assert f"now it allows the files under {allowed}" in error
    assert page.manager.status() is None and not (tmp_path / "runs").exists()
    # An "upload" that is a server path is no upload.
    assert "is not an uploaded file" in refusal(page.start(form("", upload=str(secret))))
    assert page.manager.status() is None
    # What is allowed: a file under the folder, the bundled corpus (a blank path), an upload.
    for values in (form(allowed / "notes.txt"), form(""), form("my notes.txt (uploaded)", upload=str(upload))):
        out = page.show_plan(values)
        assert not shown(out["train_error"]) and "plan:" in out["train_plan"]
    # With no --data-dir, no server path but the bundled corpus.
    closed = TrainPage(tmp_path / "runs", data_dirs=[])
    error = refusal(closed.show_plan(form(allowed / "notes.txt")))
    assert "now it allows" not in error and "--data-dir FOLDER" in error
    assert "Tiny Shakespeare (other files: upload them)" in closed.page.train.train_data_path.label


def test_an_upload_is_named_by_its_name_not_the_servers_temporary_path(tmp_path, files):
    _, _, upload = files
    page = TrainPage(tmp_path / "runs", data_dirs=[])
    assert page.page.train.use_upload(str(upload)) == {"__type__": "update", "value": "my notes.txt (uploaded)",
                                                        "interactive": False}
    out = page.show_plan(form("my notes.txt (uploaded)", upload=str(upload)))
    assert "my notes.txt" in out["train_plan"] and str(upload.parent) not in out["train_plan"]
    empty = upload.parent.parent / "81aa3d" / "empty.txt"
    empty.parent.mkdir()
    empty.write_text("")
    for out in (page.show_plan(form("empty.txt (uploaded)", upload=str(empty))),
                page.start(form("empty.txt (uploaded)", upload=str(empty)))):
        error = shown(out["train_error"])
        assert "empty.txt is empty" in error and str(empty.parent) not in error, error


def test_the_generate_tab_loads_runs_and_nothing_else(tiny_run, tmp_path, files):
    _, secret, _ = files
    run = shutil.copytree(tiny_run, tmp_path / "runs" / "tiny")
    # A run-shaped folder whose best_model.pt and tokenizer.json lead to the secret.
    trap = shutil.copytree(tiny_run, tmp_path / "runs" / "trap")
    for name in (BEST_MODEL_FILE, TOKENIZER_FILE):
        (trap / name).unlink()
        (trap / name).symlink_to(secret)
    generate = app.build_page(runs_dir=tmp_path / "runs").generate

    def load(model, tokenizer=""):
        out = generate.load_model(str(model), str(tokenizer))
        return out[generate.error]["value"] if out[generate.error].get("visible") else ""

    for model, tokenizer in ((secret, ""), ("/etc", ""), (trap, ""), (trap / BEST_MODEL_FILE, ""),
                             (f"{run}/../../secret.txt", ""), (run, secret), (run, trap), (run, "/etc/passwd")):
        error = load(model, tokenizer)
        assert "of a run (the web UI loads runs only)" in error and "root:" not in error, (model, tokenizer, error)
    for model, tokenizer in ((run, ""), (run / BEST_MODEL_FILE, run / TOKENIZER_FILE), (run, run)):
        assert load(model, tokenizer) == ""
    assert "no run in /etc" in generate.pick_run("/etc")[generate.error]["value"]
    assert generate.run_curve(str(secret))["visible"] == "hidden"


@pytest.fixture(scope="module")
def live(tiny_run, corpus_file, tmp_path_factory):
    """`minillm ui --runs-dir RUNS --data-dir ALLOWED` in a subprocess: (url, runs, allowed, secret)."""
    root = tmp_path_factory.mktemp("access")
    runs, allowed, secret = root / "runs", root / "allowed", root / "secret.txt"
    shutil.copytree(tiny_run, runs / "tiny")
    allowed.mkdir()
    shutil.copy(corpus_file, allowed / "notes.txt")
    secret.write_text(SECRET)
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    with ui_server(["--runs-dir", str(runs), "--data-dir", str(allowed)], root / "server.log", env) as (url, _):
        yield url, runs, allowed, secret


def raw_call(url: str, api_name: str, data: list) -> tuple[str, str]:
    """Call an API event by plain HTTP (Gradio's /gradio_api/call/NAME), sending `data` as it is: (the last
    event's name, its data)."""
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", json.dumps({"data": data}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=60) as response:
        lines = response.read().decode().splitlines()
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return events[-1], payloads[-1]


def api_form(data_path, out, upload=None, **changes):
    """/train_start's arguments: the form, with the tiny preset's values, then "Start from" (nothing)."""
    return [*form(data_path, out=out, upload=upload, **changes), train_tab.FROM_NOTHING]


def test_a_live_server_refuses_through_its_api_what_it_does_not_allow(live, corpus_file):
    from gradio_client import handle_file

    url, runs, allowed, secret = live
    client = client_for(url)
    # Generate: the API loads runs only.
    for path in (str(secret), "/etc/passwd", str(runs)):
        outputs = client.predict(path, "", api_name="/load_model")
        assert len(outputs) == len(LOAD_OUTPUTS)
        error = shown_text(outputs[LOAD_OUTPUTS.index("error")])
        assert "of a run (the web UI loads runs only)" in error and "root:" not in error, error
    assert "Parameters" in shown_text(client.predict(str(runs / "tiny"), "", api_name="/load_model")[0])
    # Train: a server path outside the allowed folder is refused, and so is a forged "upload" of one.
    for path in (str(secret), f"{allowed}/../secret.txt", "/etc/passwd"):
        error, status = client.predict(*api_form(path, "api-refused"), api_name="/train_start")
        assert "--data-dir FOLDER" in shown_text(error) and "api-refused" not in str(status), error
    # (gradio_client would upload a local file named so; a raw request names the server's file itself.)
    forged = {"path": str(secret), "meta": {"_type": "gradio.FileData"}, "orig_name": "notes.txt"}
    event, answer = raw_call(url, "train_start", api_form("", "api-forged", upload=forged))
    assert event == "error" and "root:" not in answer, (event, answer)  # Gradio: "it was not uploaded by a user"
    event, answer = raw_call(url, "train_start", api_form(str(secret), "api-forged"))  # (the same call, no file)
    assert event == "complete" and "--data-dir FOLDER" in answer, (event, answer)
    assert not (runs / "api-refused").exists() and not (runs / "api-forged").exists()
    # What the server allows trains: an upload (a short run).
    error, _ = client.predict(*api_form("", "api-upload", upload=handle_file(str(corpus_file)), max_steps=20),
                              api_name="/train_start")
    assert not shown_text(error), error
    folder = RunFolder(runs / "api-upload")
    deadline = time.monotonic() + TRAIN_WAIT_S
    while not folder.test_metrics.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert folder.test_metrics.is_file() and folder.has_best_model()

