"""End to end: `minillm ui RUN_DIR` in a subprocess, driven by a real headless Chromium through Playwright.

The page must load the run, stream a generation that equals what `minillm generate` prints for the same
settings and seed, stop a long generation, and show errors in the page. The screenshot of the page after
a generation is saved to a temporary folder, or to $MINILLM_SCREENSHOT (`make screenshot` refreshes the
README's docs/ui.png that way; the tests never rewrite a tracked file). Outside CI the test skips when
Chromium or Playwright is missing; under CI (CI=true) that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from conftest import require_browser

from minillm.checkpoint import load_run
from minillm.models import count_parameters
from minillm.run_folder import BEST_CONFIG_FILE, BEST_MODEL_FILE, TOKENIZER_FILE
from minillm.serve.limits import ServerLimits

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT_ENV = "MINILLM_SCREENSHOT"  # where to save the page's picture (default: the test's tmp_path)
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
SERVER_START_TIMEOUT_S = 60
WAIT_MS = 20_000  # the longest any single page step (a load, a generation) may take
PROMPT = "the cat"
ENDLESS_LOGIT_SCALE = 10.0
SETTINGS = {"max_new_tokens": 40, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.1,
            "seed": 1234}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = log_path.read_text()[-3000:]
            raise AssertionError(f"`minillm ui` exited with {process.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"`minillm ui` did not serve {url} within {SERVER_START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
    """A copy of the trained tiny run in its own runs folder (the page lists it in the run picker)."""
    runs = tmp_path_factory.mktemp("ui_runs")
    return Path(shutil.copytree(tiny_run, runs / "tiny"))


@pytest.fixture(scope="module")
def endless_run(run_dir):
    """A run whose model never ends its text by itself, to stop it: an untrained model, scaled up for
    peaked logits, with an all-zero end-of-text embedding (EOS's logit is always 0, so with top-k=5 it is
    never among the 5 largest)."""
    from minillm.checkpoint import read_model_config, save_best
    from minillm.models import build_model
    from minillm.tokenizers import load_tokenizer

    config, meta = read_model_config(run_dir / BEST_CONFIG_FILE)
    # Wider and deeper than the tiny run, so 1000 tokens take about a second: time enough to press Stop
    # before the generation ends by itself, even on a fast, quiet machine.
    config = config.replace(d_model=256, n_layers=4, n_heads=4, d_ff=None)
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(ENDLESS_LOGIT_SCALE)
        model.lm_head.weight[config.eos_id] = 0.0
    endless = run_dir.parent / "endless"
    save_best(endless, model, config, meta["tokenizer_type"], {"step": 0, "val_loss": None})
    load_tokenizer(run_dir / TOKENIZER_FILE).save(endless / TOKENIZER_FILE)
    return endless


@pytest.fixture(scope="module")
def server(server_process):
    return server_process[0]


@contextlib.contextmanager
def ui_server(args: list[str], log_path: Path, env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """`minillm ui ARGS --port P` in a subprocess while the block runs: (its URL, the process); always stopped."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "minillm", "ui", *args, "--port", str(port)],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log_path)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server_process(run_dir, tmp_path_factory):
    """`minillm ui RUN_DIR` in a subprocess: (its URL, the process)."""
    require_browser()
    log_path = tmp_path_factory.mktemp("ui_server") / "server.log"
    with ui_server([str(run_dir), "--runs-dir", str(run_dir.parent)], log_path, {**os.environ, **OFFLINE_ENV}) as up:
        yield up


@pytest.fixture
def page(browser, server):
    """A fresh tab on the UI; any request that leaves this machine is blocked and recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    outside = []

    def local_only(route):
        host = urlparse(route.request.url).hostname
        if host in ("127.0.0.1", "localhost") or route.request.url.startswith("data:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", local_only)
    page.set_default_timeout(WAIT_MS)
    page.goto(server)
    page.outside_requests = outside
    yield page
    context.close()


def field(page, elem_id: str):
    """The input inside a component: the elem_id sits on its wrapper (a slider's number box, a text box)."""
    selectors = [f"#{elem_id} {inner}" for inner in ("input[type=number]", "input[type=text]", "textarea")]
    return page.locator(", ".join(selectors)).first


def set_value(page, elem_id: str, value) -> None:
    box = field(page, elem_id)
    box.fill(str(value))
    box.press("Tab")  # commit it, as leaving the box does


def record_button_states(page, elem_id: str) -> None:
    """Collect every "label|state" the button goes through into window.buttonStates (a load is too
    quick to catch by polling)."""
    page.evaluate("""id => {
        const button = document.getElementById(id);
        window.buttonStates = [];
        const record = () => window.buttonStates.push(
            button.innerText.trim() + "|" + (button.disabled ? "disabled" : "enabled"));
        new MutationObserver(record).observe(button, {attributes: true, childList: true, subtree: true,
                                                       characterData: true});
    }""", elem_id)


def generate_in_page(page, prompt: str, settings: dict) -> tuple[str, str]:
    field(page, "prompt").fill(prompt)
    for name, value in settings.items():
        set_value(page, name, value)
    before = page.locator("#stats").inner_text()
    page.locator("#generate_button").click()
    wait_until_generated(page, before)
    return field(page, "output").input_value(), page.locator("#stats").inner_text()


def wait_until_generated(page, stats_before: str) -> None:
    """Until a new tokens/s line is shown (the time in it differs from any earlier one) and Generate can
    be pressed again."""
    page.wait_for_function(
        """before => {
            const stats = document.querySelector('#stats')?.innerText || '';
            return /tokens\\/s/.test(stats) && stats !== before
                && !document.querySelector('#generate_button').disabled;
        }""", arg=stats_before)


def cli_generate(run_dir: Path, prompt: str, settings: dict) -> str:
    """What `minillm generate` prints (prompt + continuation) for the same prompt, settings and seed."""
    args = [sys.executable, "-m", "minillm", "generate", str(run_dir), "--prompt", prompt]
    for name, value in settings.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    result = subprocess.run(args, cwd=REPO, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")  # the CLI ends its output with one newline
    return result.stdout[:-1]


def test_load_generate_matches_cli_and_screenshot(page, run_dir, tmp_path):
    n_params = f"{count_parameters(load_run(run_dir).model):,}"
    # `minillm ui RUN_DIR` pre-filled the paths and loaded the run when the page opened.
    page.locator("#model_info").get_by_text(n_params).wait_for()
    assert field(page, "model_path").input_value() == str(run_dir / BEST_MODEL_FILE)

    # Load it again through the page, as a user would, recording what the button shows meanwhile.
    field(page, "model_path").fill(str(run_dir / BEST_MODEL_FILE))
    field(page, "tokenizer_path").fill(str(run_dir / TOKENIZER_FILE))
    record_button_states(page, "load_button")
    page.locator("#load_button").click()
    # Until the button has said it was loading and is back (the click may reach a busy server late).
    page.wait_for_function("() => window.buttonStates.includes('Loading…|disabled')"
                           " && !document.querySelector('#load_button').disabled"
                           " && /Load model/.test(document.querySelector('#load_button').innerText)")
    page.locator("#model_info").get_by_text(n_params).wait_for()
    assert not page.locator("#error").is_visible()
    # While loading, the button said so and could not be pressed again (the wait above saw it).

    output, stats = generate_in_page(page, PROMPT, SETTINGS)
    assert re.search(r"Generated \d+ tokens in [\d.]+ s: [\d.]+ tokens/s \(seed 1234\)", stats), stats
    assert output.startswith(PROMPT) and len(output) > len(PROMPT)
    assert output == cli_generate(run_dir, PROMPT, SETTINGS)

    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "ui.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)  # no hover or focus highlight in the picture
    page.evaluate("document.activeElement?.blur()")
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert page.outside_requests == [], f"the page tried to reach the internet: {page.outside_requests}"


def test_stop_keeps_the_text_and_the_app_ready(page, run_dir, endless_run):
    n_params = f"{count_parameters(load_run(run_dir).model):,}"
    page.locator("#model_info").get_by_text(n_params).wait_for()
    field(page, "model_path").fill(str(endless_run / BEST_MODEL_FILE))
    field(page, "tokenizer_path").fill(str(endless_run / TOKENIZER_FILE))
    page.locator("#load_button").click()
    page.locator("#model_info").get_by_text(str(endless_run / BEST_MODEL_FILE)).wait_for()
    field(page, "prompt").fill(PROMPT)
    for name, value in {"max_new_tokens": 1000, "top_k": 5, "seed": 5}.items():
        set_value(page, name, value)
    page.locator("#generate_button").click()
    # Stop once some text has streamed in.
    page.wait_for_function(
        f"() => (document.querySelector('#output textarea')?.value || '').length > {len(PROMPT) + 5}")
    page.locator("#stop_button").click()
    wait_until_generated(page, "")
    stats = page.locator("#stats").inner_text()
    n_tokens = int(re.search(r"(\d+) tokens in", stats).group(1))
    assert "Stopped after" in stats and n_tokens < 1000, stats
    assert field(page, "output").input_value().startswith(PROMPT)
    # Ready for the next request.
    output, stats = generate_in_page(page, PROMPT, {"max_new_tokens": 10, "seed": 6})
    assert "Generated" in stats and output.startswith(PROMPT)


def test_bad_path_shows_an_error_and_the_app_keeps_working(page, run_dir):
    n_params = f"{count_parameters(load_run(run_dir).model):,}"
    page.locator("#model_info").get_by_text(n_params).wait_for()
    field(page, "model_path").fill("/no/such/folder/best_model.pt")
    page.locator("#load_button").click()
    error = page.locator("#error")
    error.get_by_text("is not the best_model.pt of a run").wait_for()
    assert "/no/such/folder/best_model.pt" in error.inner_text()
    assert "Traceback" not in page.content()
    # The model loaded before is still there: generating works and clears the error.
    output, stats = generate_in_page(page, PROMPT, {"max_new_tokens": 8, "seed": 1})
    assert "Generated" in stats and not error.is_visible()


def test_a_new_page_lists_the_runs_made_since_the_server_started(browser, server, run_dir):
    later = Path(shutil.copytree(run_dir, run_dir.parent / "made-later"))  # (the server runs already)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(server)
        page.locator("#model_info").get_by_text("Parameters").wait_for()  # (the run of `minillm ui RUN_DIR`)
        page.locator("#run_picker input").first.click()
        page.get_by_role("option", name=str(later), exact=True).wait_for()  # without pressing Refresh
    finally:
        context.close()
        shutil.rmtree(later)


def test_api_is_driven_by_gradio_client(server, run_dir):
    """Each event has an api_name: a script can load and generate, in its own session, like a tab."""
    from gradio_client import Client

    client = Client(server, analytics_enabled=False, verbose=False, download_files=False)
    info, *_ = client.predict(str(run_dir / BEST_MODEL_FILE), str(run_dir / TOKENIZER_FILE),
                              api_name="/load_model")
    assert f"{count_parameters(load_run(run_dir).model):,}" in info
    output, stats, *_ = client.predict(PROMPT, "", *SETTINGS.values(), api_name="/generate")
    assert output == cli_generate(run_dir, PROMPT, SETTINGS) and "tokens/s" in stats


def client_for(url: str):
    from gradio_client import Client

    return Client(url, analytics_enabled=False, verbose=False, download_files=False)


def resident_mb(process: subprocess.Popen) -> float:
    """The server's resident memory (Linux /proc), in MB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc")


@pytest.fixture(scope="module")
def big_runs(run_dir):
    """Six runs of a model of about 50 MB: one trained-size model saved once, its weights hard-linked into
    six run folders (six different files as far as the server can tell)."""
    from minillm.checkpoint import read_model_config, save_best
    from minillm.models import build_model

    config, meta = read_model_config(run_dir / BEST_CONFIG_FILE)
    config = config.replace(d_model=512, n_layers=4, n_heads=8, d_ff=None)
    model = build_model(config)
    first = run_dir.parent / "big0"
    save_best(first, model, config, meta["tokenizer_type"], {"step": 0, "val_loss": None})
    shutil.copy(run_dir / TOKENIZER_FILE, first / TOKENIZER_FILE)
    runs = [first]
    for i in range(1, 6):
        folder = run_dir.parent / f"big{i}"
        folder.mkdir()
        os.link(first / BEST_MODEL_FILE, folder / BEST_MODEL_FILE)
        for name in (BEST_CONFIG_FILE, TOKENIZER_FILE):
            shutil.copy(first / name, folder / name)
        runs.append(folder)
    return runs, (first / BEST_MODEL_FILE).stat().st_size / 2**20


MAX_LOADED_RUNS = ServerLimits().max_loaded_runs  # the server's (`minillm ui` keeps the defaults)
RELEASE_TIMEOUT_S = 60


def test_many_api_sessions_keep_memory_bounded_and_closed_ones_release_it(server_process, big_runs):
    url, process = server_process
    runs, model_mb = big_runs
    baseline = resident_mb(process)
    clients, peak = [], 0.0
    for i in range(3 * len(runs)):  # 18 sessions over 6 runs: each session kept its own copy before
        client = client_for(url)
        run = runs[i % len(runs)]
        info, *_ = client.predict(str(run / BEST_MODEL_FILE), str(run / TOKENIZER_FILE), api_name="/load_model")
        assert "Parameters" in info
        clients.append(client)
        peak = max(peak, resident_mb(process) - baseline)
    # At most MAX_LOADED_RUNS models (plus the one loading and the allocator's slack), not one per session.
    assert peak < (MAX_LOADED_RUNS + 4) * model_mb, (peak, model_mb)
    # A session whose model was pushed out still generates (it is loaded again from the same files).
    output, stats, *_ = clients[0].predict(PROMPT, "", 5, 1.0, 0, 1.0, 1.0, 1, api_name="/generate")
    assert "Generated" in stats
    loaded = resident_mb(process)
    for client in clients:
        client.close()
    # Once the sessions are gone (Gradio's unload event), their models are released: the memory of at
    # least all but one of them goes back to the system.
    released = (MAX_LOADED_RUNS - 1) * model_mb
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while loaded - resident_mb(process) < released and time.monotonic() < deadline:
        time.sleep(0.5)
    assert loaded - resident_mb(process) >= released, (loaded, resident_mb(process), model_mb)


def shown_text(value) -> str:
    """A Markdown output as gradio_client returns it: its text, or an update (a dict) carrying one."""
    if isinstance(value, dict):
        return value.get("value") or "" if value.get("visible", True) else ""
    return value or ""


def test_one_session_queuing_many_generations_does_not_hold_up_another(server, endless_run):
    greedy, polite = client_for(server), client_for(server)
    for client in (greedy, polite):
        client.predict(str(endless_run / BEST_MODEL_FILE), str(endless_run / TOKENIZER_FILE),
                       api_name="/load_model")
    long_settings = (1000, 1.0, 5, 1.0, 1.0, 5)  # never ends by itself before 1000 tokens
    jobs = [greedy.submit(PROMPT, "", *long_settings, api_name="/generate") for _ in range(4)]
    # The polite client's short request, queued after the greedy one's four long ones.
    short = polite.predict(PROMPT, "", 5, 1.0, 5, 1.0, 1.0, 6, api_name="/generate")
    assert "Generated 5 tokens" in short[1]
    # It ran while the greedy client's first generation was still going: stopping that one now stops it
    # (it did not have to end first), and the other three were refused at once.
    greedy.predict(api_name="/stop")
    results = [job.result() for job in jobs]
    refused = [r for r in results if "already generating" in shown_text(r[2])]
    ran = [r for r in results if "already generating" not in shown_text(r[2])]
    assert len(refused) == 3 and len(ran) == 1, results
    assert "Stopped after" in ran[0][1], ran[0][1]
