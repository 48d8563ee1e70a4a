"""Panels that never overstate, in a browser: concept maps on their fixed 0-1 share scale by
default (min-max only when chosen, and then the legend says so), the winning concept per pixel
beside them, the A/B view's maps menu and word in sync with a difference panel that knows
concepts, and captions that wrap instead of being cut. The front ends render in a bare Chromium
page synced with their kernel widgets (``tests/widget_page.py``); a tiny random-weight SD3 with
concept maps, CPU, 2 steps."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import sdlens
from sdlens.analysis.heatmaps import word_heatmap
from sdlens.testing import random_pipeline
from sdlens.views.widgets import ABView, TraceViewer
from sdlens.views.widgets.frames import MAX_ALPHA, WINNER, decode

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_thread")]

PROMPT = "a red circle and a blue square"
CONCEPTS = ["circle", "square", "background"]


@functools.lru_cache(maxsize=None)
def run(cfg: float = 3.0):
    return sdlens.generate(random_pipeline("sd3", seed=0), PROMPT, seed=0, steps=2,
                           guidance_scale=cfg, concepts=CONCEPTS)


def _legend(page, root: str = "") -> str:
    return page.locator(f"{root} .sdl-legend-text").first.inner_text()


def test_concept_maps_show_their_share_by_default_and_say_their_scale():
    from widget_page import WidgetPage, chromium_page

    tr = run()
    v = TraceViewer(tr, maps="concepts", decoder="linear")
    assert v.concept_scale == "share"
    v.select_word("square")
    # the kernel's frame is the share itself (alpha = sqrt(share) * MAX_ALPHA), not stretched
    share = word_heatmap(tr, "square", maps="concepts", per_step=True, normalize=False,
                         size=v.trace_frames.heat_size)[v.heat_index[v.step]]
    alpha = np.asarray(decode(v.overlay()))[..., 3] / 255.0 / MAX_ALPHA
    np.testing.assert_allclose(alpha ** 2, share.clamp(0, 1).numpy(), atol=0.02)
    assert alpha.max() < 0.98  # a flat share does not turn full red
    v.select_word("")
    with chromium_page() as page:
        wp = WidgetPage(page, {"v": v})
        page.locator(".sdl-chip[data-word='square']").click()
        wp.settle()
        assert v.word == "square"
        legend = _legend(page)
        assert legend == "'square': share among the concepts at this step, fixed 0–1", legend
        assert "its share" in page.locator(".sdl-chip[data-word='square']").get_attribute("title")
        page.locator(".sdl-panel[data-panel='image'] .sdl-stack").hover()
        page.wait_for_function("() => /share here: \\d\\.\\d\\d/.test("
                               "document.querySelector('.sdl-value').textContent)")

        # min-max only when asked, and then the legend says it is stretched
        scale = page.locator("select.sdl-scale")
        assert scale.is_visible()
        scale.select_option("minmax")
        wp.settle()
        assert v.concept_scale == "minmax"
        assert _legend(page) == "'square': per step, min–max (stretched: not its share)"
        assert "not its share" in page.locator(".sdl-chip[data-word='square']").get_attribute("title")
        scale.select_option("share")
        wp.settle()

        # the winning concept per pixel, beside the concepts: swatches instead of a colour bar
        page.locator(f".sdl-chip[data-word='{WINNER}']").click()
        wp.settle()
        assert v.word == WINNER
        assert page.locator(".sdl-swatch").all_inner_texts() == CONCEPTS
        assert not page.locator(".sdl-colorbar").first.is_visible()
        assert _legend(page).startswith("winning concept per pixel (largest share")
        page.locator(".sdl-panel[data-panel='image'] .sdl-stack").hover(position={"x": 20, "y": 20})
        page.wait_for_function("() => /wins here: '(circle|square|background)'/.test("
                               "document.querySelector('.sdl-value').textContent)")
        # the winner frame is the argmax of the shares
        shares = torch.stack([word_heatmap(tr, c, maps="concepts", per_step=True, normalize=False,
                                           size=v.trace_frames.heat_size)[v.heat_index[v.step]]
                              for c in CONCEPTS])
        rgb = np.asarray(decode(v.overlay()))[..., :3]
        cols = dict(v.words[-1]["colors"])
        want = np.array([[int(cols[c][i:i + 2], 16) for i in (1, 3, 5)] for c in CONCEPTS])
        agree = (rgb == want[shares.argmax(0).numpy()]).all(-1).mean()
        assert agree > 0.99, agree

        # word maps keep their min-max scale, and say so
        page.locator("select.sdl-maps").select_option("attention")
        wp.settle()
        assert not page.locator("select.sdl-scale").is_visible()
        page.locator(".sdl-chip[data-word='circle']").click()
        wp.settle()
        assert _legend(page) == "'circle': per step, min–max"
        assert wp.errors == []
