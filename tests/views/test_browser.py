"""A real browser: JupyterLab on localhost, Chromium via Playwright, the TraceViewer in a notebook.

The notebook traces a tiny random-weight SD 1.5 pipeline with the real trace engine, shows a
TraceViewer, and the test then moves the step slider with the keyboard and clicks a word chip,
asserting each time that the displayed image changed (img src and screenshot bytes) and that the
kernel saw the new state. Screenshots go to ``test-artifacts/`` (CI artefacts).

Without a browser (or Playwright / JupyterLab) the test FAILS when ``CI`` is set and skips
otherwise.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _missing(reason: str):
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"browser test cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[dev]')")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _missing("jupyterlab is not installed (pip install -e '.[dev]')")
    from browser import find_chromium

    exe = find_chromium()
    if exe is None:
        _missing("no Chromium binary (apt-get install chromium, or set SDLENS_CHROMIUM)")
    return exe


NOTEBOOK = [
    "from sdlens import generate\n"
    "from sdlens.testing import random_pipeline\n"
    "from sdlens.widgets import TraceViewer",
    "pipe = random_pipeline('sd15', scale=0.05)\n"
    "trace = generate(pipe, 'a red circle and a blue square', seed=0, steps=8)",
    "viewer = TraceViewer(trace)\nviewer",
]


def _src(page, panel: str) -> str:
    return page.locator(f".sdl-frame[data-panel='{panel}']").first.get_attribute("src") or ""


def _run_cell(page, code: str, timeout_ms: int = 60_000) -> str:
    """Add a cell at the end of the notebook, run it, return its output text."""
    cells = page.locator(".jp-Notebook .jp-Cell")
    n = cells.count()
    cells.nth(n - 1).locator(".jp-InputPrompt").click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")  # new cell below (command mode)
    page.wait_for_function(f"() => document.querySelectorAll('.jp-Notebook .jp-Cell').length > {n}")
    page.keyboard.press("Enter")  # edit mode
    page.keyboard.type(code)
    page.keyboard.press("Shift+Enter")
    out = page.locator(".jp-Notebook .jp-Cell").nth(n).locator(".jp-OutputArea-output")
    out.first.wait_for(state="visible", timeout=timeout_ms)
    return out.first.inner_text()


def test_trace_viewer_in_jupyterlab(chromium, tmp_path):
    from browser import JupyterLab, browser, open_and_run, write_notebook

    ARTIFACTS.mkdir(exist_ok=True)
    write_notebook(tmp_path / "viewer.ipynb", NOTEBOOK)
    with JupyterLab(tmp_path, log=ARTIFACTS / "jupyterlab.log") as lab, browser(chromium) as b:
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            open_and_run(page, lab.url("viewer.ipynb"), wait_for=".sdl-viewer .sdl-frame[data-panel='x0']")
            page.wait_for_function("() => document.querySelector(\".sdl-frame[data-panel='x0']\").complete")
            panels = page.locator(".sdl-panels").first
            page.screenshot(path=str(ARTIFACTS / "browser-01-loaded.png"))
            n_steps = int(page.locator(".sdl-slider").first.get_attribute("max")) + 1
            assert n_steps >= 8
            last = page.locator(".sdl-frame[data-panel='x0']").first.get_attribute("data-step")
            assert last == str(n_steps - 1)  # the viewer opens at the last step
            src0, shot0 = _src(page, "x0"), panels.screenshot()
            assert src0.startswith("blob:")

            # --- move the step slider (keyboard, as a user does)
            page.locator(".sdl-slider").first.focus()
            page.keyboard.press("Home")
            page.wait_for_function(
                "() => document.querySelector(\".sdl-frame[data-panel='x0']\").dataset.step === '0'")
            page.wait_for_function("() => document.querySelector(\".sdl-frame[data-panel='x0']\").complete")
            src1, shot1 = _src(page, "x0"), panels.screenshot()
            (ARTIFACTS / "browser-02-step0.png").write_bytes(page.screenshot())
            assert src1 != src0, "the x0 image did not change when the slider moved"
            assert shot1 != shot0, "the screen did not change when the slider moved"
            assert _src(page, "x_t") != "" and "step 1/" in page.locator(".sdl-step-label").first.inner_text()

            # --- click a word chip: its heatmap overlays the x0 preview and the output image
            overlay = page.locator(".sdl-overlay[data-panel='x0-overlay']").first
            assert not overlay.is_visible()
            page.locator(".sdl-chip[data-word='circle']").first.click()
            overlay.wait_for(state="visible")
            page.wait_for_function("() => document.querySelector(\".sdl-overlay[data-panel='x0-overlay']\").complete")
            shot2 = panels.screenshot()
            (ARTIFACTS / "browser-03-word.png").write_bytes(page.screenshot())
            assert (overlay.get_attribute("src") or "").startswith("blob:")
            assert shot2 != shot1, "clicking a word chip did not change the picture"
            assert "sdl-chip-on" in (page.locator(".sdl-chip[data-word='circle']").first.get_attribute("class") or "")

            # --- another step changes the overlay too (the per-step heatmap)
            ov0 = overlay.get_attribute("src")
            page.locator(".sdl-slider").first.focus()
            page.keyboard.press("End")
            page.wait_for_function(
                f"() => document.querySelector(\".sdl-frame[data-panel='x0']\").dataset.step === '{n_steps - 1}'")
            assert overlay.get_attribute("src") != ov0

            # --- the kernel saw the slider and the click
            page.keyboard.press("Home")
            page.wait_for_timeout(500)
            text = _run_cell(page, "print(f'step={viewer.step} word={viewer.word}')")
            page.screenshot(path=str(ARTIFACTS / "browser-04-kernel.png"))
            assert re.search(r"step=0 word=circle", text), text
            assert not errors, f"errors in the page: {errors}"
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "browser-failure.png"))
            raise
