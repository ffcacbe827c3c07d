"""End to end, the Train tab: `minillm ui` in a subprocess, driven by a real headless Chromium (Playwright).

A tiny training from an uploaded file runs to its end with its loss curve filling in, and the new run loads
in the Generate tab and generates; a page opened afterwards (a reload is the same) shows the whole curve
with its legend and the run's own settings, and at a phone's width (390 px) the table, the curve and the
Generate button are usable; a longer one is stopped (saved), resumed and finishes; a bad file shows its
error. The picture of the Train tab during a run goes to a temporary folder, or to
$MINILLM_TRAIN_SCREENSHOT (`make screenshot` refreshes the README's docs/ui_train.png that way); the
pictures of a reopened page and of a phone go to $MINILLM_SCREENSHOT_DIR when it is set.
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
SCREENSHOT_DIR_ENV = "MINILLM_SCREENSHOT_DIR"  # where the reopened and phone-width pictures go (to look at)
PHONE = {"width": 390, "height": 844}  # an iPhone 12-14's viewport, in CSS pixels
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
    # The plan of the form as the page opens it (the defaults, or the last run's settings).
    page.wait_for_function("() => document.querySelector('#train_plan').innerText.trim().length > 0")
    yield page
    context.close()


def choose(page, elem_id: str, value: str) -> None:
    """Pick a value in a dropdown."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=value, exact=True).click()


def fill_form(page, out: str, preset: str = "tiny", **values) -> None:
    """The tiny preset (its values arrive at once: wait for its width), 60 steps unless `values` say
    otherwise, and the run's name. (A page may open with the last run's settings, another preset's or not.)"""
    choose(page, "train_preset", preset)
    page.wait_for_function("() => document.querySelector('#train_d_model input').value === '32'")
    for name, value in {"train_max_steps": 60, "train_out": out, **values}.items():
        set_value(page, name, value)


def upload(page, path: Path) -> None:
    """Upload a file: the Data file box names it (not the server's temporary path)."""
    page.locator("#train_file input[type=file]").set_input_files(str(path))
    page.wait_for_function(f"() => document.querySelector('#train_data_path textarea, #train_data_path input')"
                           f".value === {path.name + ' (uploaded)'!r}")


def open_train_tab(browser, url: str, viewport: dict):
    """A new page (as a reload makes one) on the Train tab: (its context, the page)."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    return context, page


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get(SCREENSHOT_DIR_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def within_width(locator) -> bool:
    """Whether an element lies within a phone's screen across (no sideways scrolling to see it)."""
    box = locator.bounding_box()
    return box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]


def legend_boxes(page) -> dict:
    """The legend's labels in the curve, with their boxes and the plot's (the SVG keeps its text as text)."""
    return page.evaluate("""() => {
        const plot = document.querySelector('#train_plot');
        const box = el => { const r = el.getBoundingClientRect();
                            return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; };
        const labels = {};
        for (const text of plot.querySelectorAll('figure.curve > svg text')) {
            const words = text.textContent.trim();
            if (words === 'train loss' || words === 'val loss') labels[words] = box(text);
        }
        return {labels, svg: box(plot.querySelector('figure.curve > svg')), plot: box(plot)};
    }""")


def assert_legend_shown(page) -> None:
    found = legend_boxes(page)
    assert set(found["labels"]) == {"train loss", "val loss"}, found
    for label in found["labels"].values():  # drawn, with a size, inside the chart and the page's block
        assert label["right"] > label["left"] and label["bottom"] > label["top"], found
        for outer in (found["svg"], found["plot"]):
            assert outer["left"] <= label["left"] and label["right"] <= outer["right"], found
            assert outer["top"] <= label["top"] and label["bottom"] <= outer["bottom"], found


def broken_cells(page, elem_id: str, first_column_only: bool = False) -> list[str]:
    """The cells of a table (of its first column) whose text runs over more than one line or out of the cell."""
    cells = f"#{elem_id} :is(td, th)" + (":first-child" if first_column_only else "")
    return page.evaluate("""cells => {
        const broken = [];
        for (const cell of document.querySelectorAll(cells)) {
            const range = document.createRange();
            range.selectNodeContents(cell);
            const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
            if (tops.size > 1 || cell.scrollWidth > cell.clientWidth + 1) broken.push(cell.innerText);
        }
        return broken;
    }""", cells)


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

    assert_legend_shown(page)

    # One click: the Generate tab with the new run loaded, its loss curve and test metrics beside it.
    page.locator("#train_load").click()
    info = page.locator("#model_info")
    info.get_by_text(str(RunFolder(runs_dir / "browser-tiny").best_model)).wait_for()
    assert "Test loss" in info.inner_text()
    page.locator("#run_curve img").wait_for()
    output, stats = generate_in_page(page, "the cat", {"max_new_tokens": 20, "seed": 3})
    assert "Generated" in stats and output.startswith("the cat")


def test_a_page_opened_later_shows_the_runs_curve_legend_and_settings(browser, server, tmp_path):
    """(After the run above: the server's last training is browser-tiny, 60 steps, finished.)"""
    context, page = open_train_tab(browser, server, {"width": 1280, "height": 1000})
    try:
        wait_for_status(page, r"Finished[\s\S]*browser-tiny", WAIT_MS)
        page.wait_for_function("() => document.querySelector('#train_plot figure.curve > svg')")
        assert curve_points(page) == (12, 3)  # the whole curve, not an empty chart or its first points
        assert_legend_shown(page)
        # The form shows that run's settings (the tiny preset's, its name), not the defaults.
        page.wait_for_function("() => document.querySelector('#train_out input, #train_out textarea').value"
                               " === 'browser-tiny'")
        assert page.locator("#train_max_steps input").input_value() == "60"
        assert page.locator("#train_preset input").first.input_value() == "tiny"
        assert page.locator("#train_data_path textarea, #train_data_path input").first.input_value() == (
            "corpus.txt (uploaded)")
        page.locator("#train_plan").get_by_text("upload it here for the plan of a new run").wait_for()
        assert not page.locator("#train_error").is_visible()
        page.mouse.move(0, 0)
        page.screenshot(path=str(screenshot_path(tmp_path, "train_reopened.png")), full_page=True)
    finally:
        context.close()


def test_both_tabs_are_usable_at_a_phones_width(browser, server, tmp_path):
    """(After the first run above.) At 390 px: the progress table's figures whole, the curve and its legend
    within the screen's width, and in the Generate tab the Generate button on the first screen."""
    context, page = open_train_tab(browser, server, PHONE)
    try:
        wait_for_status(page, r"Finished", WAIT_MS)
        page.wait_for_function("() => document.querySelector('#train_plot figure.curve > svg')")
        assert broken_cells(page, "train_status") == []
        assert within_width(page.locator("#train_status table"))
        assert_legend_shown(page)
        assert within_width(page.locator("#train_plot figure.curve > svg"))
        page.screenshot(path=str(screenshot_path(tmp_path, "train_phone.png")), full_page=True)

        page.locator("#train_load").click()  # the run, loaded in the Generate tab
        page.locator("#model_info").get_by_text("Test loss").wait_for()
        page.locator("#run_curve img").wait_for()
        # Below the output and the settings: the run's details, whole names, all within the width.
        assert broken_cells(page, "model_info", first_column_only=True) == []
        assert within_width(page.locator("#model_info table")) and within_width(page.locator("#run_curve img"))
        assert page.evaluate("() => [...document.querySelectorAll('#model_info, #train_status')]"
                             ".every(box => box.scrollWidth <= box.clientWidth)")  # nothing to scroll sideways
        page.evaluate("window.scrollTo(0, 0)")
        button = page.locator("#generate_button").bounding_box()
        assert button["y"] + button["height"] <= PHONE["height"], button  # on the first screen
        prompt = page.locator("#prompt").bounding_box()
        assert prompt["y"] < button["y"]
        page.screenshot(path=str(screenshot_path(tmp_path, "generate_phone.png")), full_page=True)
        output, stats = generate_in_page(page, "the cat", {"max_new_tokens": 10, "seed": 1})
        assert "Generated" in stats
    finally:
        context.close()


def test_stop_saves_then_resume_finishes(page, runs_dir, tmp_path):
    # Tiny Shakespeare (the default data), for a run that would take long: stopped once the curve has points.
    fill_form(page, "browser-stop", train_max_steps=100_000, train_data_path="")  # blank: the bundled corpus
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
    assert f"{bad.name} {message}" in error.inner_text()  # named by its name, not the server's temporary path
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
    text = wait_for_status(page, r"Finished[^\n]*browser-from")  # (not an earlier test's training)
    assert "60 / 60" in text, text
    record = json.loads(RunFolder(runs_dir / "browser-from").best_config.read_text())["init_from"]
    assert (record["kind"], record["path"]) == ("run", str(source.resolve()))
