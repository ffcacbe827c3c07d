"""End to end, the Train tab: `minillm ui` in a subprocess, driven by a real headless Chromium (Playwright).

A tiny training from an uploaded file runs to its end with its loss curve filling in, and the new run loads
in the Generate tab and generates; a longer one is stopped (saved), resumed and finishes; a bad file shows
its error. The picture of the Train tab during a run goes to a temporary folder, or to
$MINILLM_TRAIN_SCREENSHOT (`make screenshot` refreshes the README's docs/ui_train.png that way).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import require_browser
from test_ui_browser import (
    OFFLINE_ENV,
    generate_in_page,
    set_value,
    ui_server,
)

from minillm.run_folder import RunFolder

SCREENSHOT_ENV = "MINILLM_TRAIN_SCREENSHOT"
TRAIN_WAIT_MS = 120_000  # the longest a tiny training (data, steps, final test) may take here
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("train_ui_runs")


@pytest.fixture(scope="module")
def server(runs_dir, tmp_path_factory):
    """`minillm ui --runs-dir RUNS` (no run loaded) in a subprocess; always stopped at the end."""
    require_browser()
    log_path = tmp_path_factory.mktemp("train_ui_server") / "server.log"
    # One thread: the server's training shares the 2 cores with Chromium (see conftest.single_thread).
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    with ui_server(["--runs-dir", str(runs_dir)], log_path, env) as (url, _):
        yield url


@pytest.fixture
def page(browser, server):
    """A fresh tab on the UI, showing the Train tab."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train_plan").get_by_text("estimated time").wait_for()  # the default form's plan
    yield page
    context.close()


def choose(page, elem_id: str, value: str) -> None:
    """Pick a value in a dropdown."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=value, exact=True).click()


def fill_form(page, out: str, preset: str = "tiny", **values) -> None:
    choose(page, "train_preset", preset)
    page.wait_for_function("() => document.querySelector('#train_max_steps input').value === '60'")
    for name, value in {"train_out": out, **values}.items():
        set_value(page, name, value)


def upload(page, path: Path) -> None:
    page.locator("#train_file input[type=file]").set_input_files(str(path))
    page.wait_for_function(f"() => document.querySelector('#train_data_path textarea, #train_data_path input')"
                           f".value.endsWith({path.name!r})")


def status_text(page) -> str:
    return page.locator("#train_status").inner_text()


def wait_for_status(page, pattern: str, timeout: int = TRAIN_WAIT_MS) -> str:
    page.wait_for_function("pattern => new RegExp(pattern).test(document.querySelector('#train_status').innerText)",
                           arg=pattern, timeout=timeout)
    return status_text(page)


def curve_points(page) -> tuple[int, int]:
    caption = page.locator("#train_plot").inner_text()
    found = re.search(r"(\d+) train and (\d+) validation points", caption)
    assert found, caption
    return int(found.group(1)), int(found.group(2))


def test_train_to_the_end_then_load_and_generate(page, corpus_file, runs_dir):
    upload(page, corpus_file)
    fill_form(page, "browser-tiny")
    page.locator("#train_plan").get_by_text("plan: 60 steps").wait_for()
    assert "corpus.txt" in page.locator("#train_plan").inner_text()
    page.locator("#train_start").click()
    text = wait_for_status(page, r"Finished")
    assert "60 / 60" in text and "test loss" in text, text
    train_points, val_points = curve_points(page)
    assert train_points == 12 and val_points == 3  # every 5 steps, every 20 steps
    assert not page.locator("#train_error").is_visible()

    # One click: the Generate tab with the new run loaded, its loss curve and test metrics beside it.
    page.locator("#train_load").click()
    info = page.locator("#model_info")
    info.get_by_text(str(RunFolder(runs_dir / "browser-tiny").best_model)).wait_for()
    assert "Test loss" in info.inner_text()
    page.locator("#run_curve img").wait_for()
    output, stats = generate_in_page(page, "the cat", {"max_new_tokens": 20, "seed": 3})
    assert "Generated" in stats and output.startswith("the cat")


def test_stop_saves_then_resume_finishes(page, runs_dir, tmp_path):
    # Tiny Shakespeare (the default data), for a run that would take long: stopped once the curve has points.
    fill_form(page, "browser-stop", train_max_steps=100_000)
    page.locator("#train_plan").get_by_text("plan: 100,000 steps").wait_for()
    page.locator("#train_start").click()
    page.wait_for_function("""() => {
        const m = /(\\d+) train and (\\d+) validation/.exec(document.querySelector('#train_plot').innerText);
        return m && +m[1] >= 20 && +m[2] >= 2;
    }""", timeout=TRAIN_WAIT_MS)
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "ui_train.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(1500)  # (the picture only: the plot draws the newest points)
    page.mouse.move(0, 0)
    page.evaluate("document.activeElement?.blur()")
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG")

    page.locator("#train_stop").click()
    text = wait_for_status(page, r"Stopped at step")
    stopped_at = int(re.search(r"Stopped at step ([\d,]+)", text).group(1).replace(",", ""))
    folder = RunFolder(runs_dir / "browser-stop")
    assert folder.last_checkpoint.is_file() and folder.has_best_model()
    assert 0 < stopped_at < 100_000

    set_value(page, "train_max_steps", stopped_at + 10)
    page.locator("#train_resume").click()
    text = wait_for_status(page, rf"Finished[\s\S]*{stopped_at + 10:,} / {stopped_at + 10:,}")
    assert "max_steps" in text
    assert not page.locator("#train_error").is_visible()


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"\x00\x01\x02", "looks binary")])
def test_a_bad_file_shows_its_error_and_starts_nothing(page, tmp_path, runs_dir, content, message):
    bad = tmp_path / f"bad{len(content)}.txt"
    bad.write_bytes(content)
    upload(page, bad)
    error = page.locator("#train_error")
    error.get_by_text(message).wait_for()
    fill_form(page, "browser-bad")
    page.locator("#train_start").click()
    error.get_by_text(message).wait_for()
    assert "Traceback" not in page.content()
    assert not (runs_dir / "browser-bad").exists()


def test_start_from_a_run_or_a_folder_typed_in(page, tiny_run, corpus_file, runs_dir):
    """"Start from" lists the runs of the runs folder as they are when it is opened; a folder typed in that
    does not exist is the plan's error; a run started from a run has its shape and records where it started."""
    import json
    import shutil

    source = runs_dir / "browser-source"
    shutil.copytree(tiny_run, source)  # (after the page was built: the list is refreshed when opened)
    upload(page, corpus_file)
    fill_form(page, "browser-from", train_d_model=64)
    typed = page.locator("#train_init_from input").first
    typed.fill(str(runs_dir / "nowhere"))
    typed.press("Enter")  # a value of one's own (a folder on the server)
    # (each change of the form asks for a plan, one at a time, the last one kept: a busy machine takes a while)
    page.locator("#train_error").get_by_text("no such folder").wait_for(timeout=TRAIN_WAIT_MS)
    typed.fill("")  # (the list shows the runs whose path holds what is typed)
    choose(page, "train_init_from", str(source))
    page.locator("#train_plan").get_by_text("d_model 32").wait_for(timeout=TRAIN_WAIT_MS)  # not the form's 64
    assert not page.locator("#train_error").is_visible()
    page.locator("#train_start").click()
    text = wait_for_status(page, r"Finished")
    assert "60 / 60" in text, text
    record = json.loads(RunFolder(runs_dir / "browser-from").best_config.read_text())["init_from"]
    assert (record["kind"], record["path"]) == ("run", str(source.resolve()))
