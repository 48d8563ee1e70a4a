"""A real browser: a video trace's TraceViewer in JupyterLab (Chromium via Playwright).

The notebook traces a tiny random-weight Wan 2.1 pipeline (9 frames at 32 x 32: 3 latent
frames) and shows a TraceViewer; the test moves the frame slider and the step slider and asserts
each time that the picture changed, that the kernel saw it, and that the arrow keys (↑/↓ frame,
←/→ step) never reach JupyterLab. Without a browser the test FAILS when ``CI`` is set and skips
otherwise (as tests/views/test_browser.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_browser import ARTIFACTS, _run_cell, _src, chromium  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NOTEBOOK = [
    "from sdlens import generate\n"
    "from sdlens.testing import random_pipeline\n"
    "from sdlens.widgets import TraceViewer",
    "pipe = random_pipeline('wan')\n"
    "trace = generate(pipe, 'a red circle on the beach', seed=0, steps=3, num_frames=9, "
    "height=32, width=32, output_type='latent', attention_steps=slice(None))",
    "viewer = TraceViewer(trace, word='circle')\nviewer",
]

X0 = ".sdl-viewer .sdl-frame[data-panel='x0']"
ATTR = "(a) => document.querySelector(\"" + X0.replace('"', '\\"') + "\").dataset[a]"


def test_video_viewer_frame_and_step_sliders(chromium, tmp_path):  # noqa: F811
    from browser import JupyterLab, browser, open_and_run, write_notebook

    ARTIFACTS.mkdir(exist_ok=True)
    write_notebook(tmp_path / "video.ipynb", NOTEBOOK)
    with JupyterLab(tmp_path, log=ARTIFACTS / "jupyterlab-video.log") as lab, \
            browser(chromium) as b:
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        open_and_run(page, lab.url("video.ipynb"), wait_for=X0)
        page.wait_for_function(f"() => document.querySelector(\"{X0}\").complete")
        panels = page.locator(".sdl-panels").first
        frame_slider = page.locator(".sdl-frame-slider").first
        assert frame_slider.is_visible() and frame_slider.get_attribute("max") == "2"
        assert "frame 1/3" in page.locator(".sdl-frame-label").first.inner_text()
        src0, shot0, ov0 = _src(page, "x0"), panels.screenshot(), \
            page.locator(".sdl-overlay[data-panel='x0-overlay']").first.get_attribute("src")

        # --- the frame slider moves the picture (and the word's overlay)
        frame_slider.focus()
        page.keyboard.press("ArrowUp")
        page.wait_for_function(f"() => ({ATTR})('frame') === '1'")
        page.wait_for_function(f"() => document.querySelector(\"{X0}\").complete")
        src1, shot1 = _src(page, "x0"), panels.screenshot()
        (ARTIFACTS / "browser-video-01-frame.png").write_bytes(page.screenshot())
        assert src1 != src0 and shot1 != shot0, "the frame slider did not change the picture"
        ov1 = page.locator(".sdl-overlay[data-panel='x0-overlay']").first.get_attribute("src")
        assert ov1 != ov0, "the overlay did not follow the frame"
        assert "frame 2/3" in page.locator(".sdl-frame-label").first.inner_text()

        # --- the step slider moves it too, the frame stays
        page.keyboard.press("Home")
        page.wait_for_function(f"() => ({ATTR})('step') === '0'")
        assert page.evaluate(ATTR, "frame") == "1"
        shot2 = panels.screenshot()
        assert _src(page, "x0") != src1 and shot2 != shot1, "the step slider did not move it"

        # --- the kernel saw both
        page.wait_for_timeout(500)
        page.evaluate("() => document.activeElement.blur()")  # the panel keeps keys while focused
        text = _run_cell(page, "print(f'step={viewer.step} frame={viewer.frame}')")
        assert re.search(r"step=0 frame=1", text), text

        # --- the keys stay in the panel: JupyterLab never sees ↑/↓/←/→
        page.evaluate("() => { window.__seen = []; document.addEventListener('keydown', "
                      "e => window.__seen.push(e.key)); }")
        active_cell = ("() => [...document.querySelectorAll('.jp-Notebook .jp-Cell')]"
                       ".findIndex(c => c.classList.contains('jp-mod-active'))")
        page.locator(X0).first.click()
        active = page.evaluate(active_cell)
        page.keyboard.press("ArrowUp")
        page.keyboard.press("ArrowUp")
        assert page.evaluate(ATTR, "frame") == "2"  # clamped at the last frame
        page.keyboard.press("ArrowDown")
        assert page.evaluate(ATTR, "frame") == "1"
        page.keyboard.press("ArrowRight")
        assert page.evaluate(ATTR, "step") == "1"
        assert page.evaluate("() => window.__seen") == [], "keys reached JupyterLab"
        assert page.evaluate(active_cell) == active, "the keys moved JupyterLab's active cell"
        assert "↑/↓ frame" in page.locator(".sdl-viewer .sdl-help").first.inner_text()
        assert not errors, errors
