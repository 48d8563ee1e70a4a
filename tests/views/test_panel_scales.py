"""Panels that never overstate, in a browser: concept maps on their fixed 0-1 share scale by
default (min-max only when chosen, and then the legend says so), the winning concept per pixel
beside them, the A/B view's maps menu and word in sync with a difference panel that knows
concepts, captions that wrap instead of being cut, and the image grey under a filled heat (the
TraceViewer's "grey image" box, ReferenceView). The front ends render in a bare Chromium
page synced with their kernel widgets (``tests/widget_page.py``); a tiny random-weight SD3 with
concept maps, CPU, 2 steps."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

import sdlens
from sdlens.analysis.heatmaps import word_heatmap
from sdlens.testing import random_pipeline
from sdlens.views.widgets import ABView, TraceViewer
from sdlens.views.overlay import GREY_NOTE
from sdlens.views.widgets.frames import MAX_ALPHA, WINNER, decode

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_thread")]

PROMPT = "a red circle and a blue square"
CONCEPTS = ["circle", "square", "background"]


@functools.lru_cache(maxsize=None)
def pipe():
    return random_pipeline("sd3", seed=0)


@functools.lru_cache(maxsize=None)
def run(cfg: float = 3.0):
    """A traced run, saved and loaded: no VAE at hand, so no linear preview is fitted (seconds
    of CPU per test) and x_t / x0 show their first channels, said so."""
    import tempfile

    tr = sdlens.generate(pipe(), PROMPT, seed=0, steps=2, guidance_scale=cfg, concepts=CONCEPTS)
    return sdlens.load(tr.save(Path(tempfile.mkdtemp(prefix="sdlens-panels-")) / "run.sdlens"))


def _legend(page, root: str = "") -> str:
    return page.locator(f"{root} .sdl-legend-text").first.inner_text()


def test_concept_maps_show_their_share_by_default_and_say_their_scale():
    from widget_page import WidgetPage, chromium_page

    tr = run()
    v = TraceViewer(tr, maps="concepts", decoder="channels")
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
        assert legend == ("'square': share among the concepts at this step, fixed 0–1 · "
                          f"{GREY_NOTE}"), legend
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
        assert _legend(page) == f"'square': per step, min–max (stretched: not its share) · {GREY_NOTE}"
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
        assert _legend(page) == f"'circle': per step, min–max · {GREY_NOTE}"

        # under a filled heat the image is grey (CSS grayscale: sdlens.views.overlay); the
        # "grey image" box or viewer.grey = False shows it in colour, outline mode keeps colour
        def filt(panel):
            return page.locator(f".sdl-frame[data-panel='{panel}']").first.evaluate(
                "e => getComputedStyle(e).filter")
        assert filt("image") == filt("x0") == "grayscale(1)"
        assert filt("x_t") == "none"  # no overlay on x_t
        page.locator("input.sdl-grey").uncheck()
        wp.settle()
        assert v.grey is False and filt("image") == "none"
        assert _legend(page) == "'circle': per step, min–max"
        v.grey = True
        wp.settle()
        assert page.locator("input.sdl-grey").is_checked() and filt("image") == "grayscale(1)"
        page.locator("select.sdl-style").select_option("outline")
        wp.settle()
        assert filt("image") == "none"
        v.word = ""
        wp.settle()
        assert filt("image") == "none"  # no heat: the image in colour
        assert wp.errors == []


_COLUMNS = ("<div id='panel'></div><div class='sdl-ab-columns' style='display:flex;width:100%'>"
            "<div style='width:50%;overflow:hidden'><div class='head'>A</div><div id='a'></div></div>"
            "<div style='width:50%;overflow:hidden'><div class='head'>B</div><div id='b'></div></div>"
            "</div>")


def _ab_page(page, ab):
    from widget_page import WidgetPage

    return WidgetPage(page, {"panel": ab.panel, "a": ab.viewer_a, "b": ab.viewer_b},
                      links=ab._links, html=_COLUMNS)


def test_ab_columns_share_the_maps_menu_and_word_and_the_difference_knows_concepts():
    from widget_page import chromium_page

    ab = ABView(run(3.0), run(5.0), viewer={"decoder": "channels"})
    assert ab.panel.differs == [["CFG", "3", "5"]]  # the headers' word, not "guidance"
    with chromium_page() as page:
        wp = _ab_page(page, ab)
        A, B = "#a", "#b"
        assert "CFG: A 3 · B 5" in page.locator(".sdl-ab .sdl-differs").first.inner_text()
        page.locator(f"{A} select.sdl-maps").select_option("concepts")
        wp.settle()
        assert ab.viewer_b.maps == "concepts"
        assert page.locator(f"{B} select.sdl-maps").input_value() == "concepts"
        assert page.locator(f"{B} .sdl-chip").count() == len(CONCEPTS) + 1
        page.locator(f"{A} .sdl-chip[data-word='background']").click()
        wp.settle()
        assert ab.viewer_a.word == ab.viewer_b.word == ab.panel.word == "background"
        for col in (A, B):  # each column overlays what its legend names
            assert page.locator(f"{col} .sdl-overlay[data-panel='image-overlay']").is_visible()
            assert _legend(page, col) == \
                f"'background': share among the concepts at this step, fixed 0–1 · {GREY_NOTE}"
        cap = page.locator(".sdl-ab .sdl-panel[data-panel='heat-diff'] .sdl-caption").inner_text()
        assert cap == "'background': share A − share B (fixed −1 … 1)", cap
        assert page.locator(".sdl-frame[data-panel='heat-diff']").evaluate(
            "e => e.style.visibility") == "visible"
        # B's menu back to word maps: A follows, and neither shows a legend without an overlay
        page.locator(f"{B} select.sdl-maps").select_option("attention")
        wp.settle()
        assert ab.viewer_a.maps == "attention" and ab.viewer_a.word == ab.viewer_b.word == ""
        for col in (A, B):
            assert not page.locator(f"{col} .sdl-overlay[data-panel='image-overlay']").is_visible()
            assert _legend(page, col).startswith("click a word")
        page.locator(f"{B} .sdl-chip[data-word='circle']").click()
        wp.settle()
        assert ab.viewer_a.word == "circle"
        assert page.locator(f"{A} .sdl-chip-on").inner_text() == "circle"
        assert wp.errors == []


def test_captions_wrap_and_are_never_cut():
    from widget_page import chromium_page

    ab = ABView(run(3.0), run(5.0), viewer={"decoder": "channels"}, display_px=96)
    ab.viewer_a.maps = "concepts"
    ab.viewer_a.select_word("background")
    with chromium_page(width=900) as page:
        wp = _ab_page(page, ab)
        wp.settle()
        caps = page.locator(".sdl-caption")
        assert caps.count() >= 10
        texts = caps.all_inner_texts()
        assert any("'background' (this step)" in t for t in texts), texts
        assert any(t.endswith("for all steps)") for t in texts), texts
        cut = page.evaluate("() => [...document.querySelectorAll('.sdl-caption')]"
                            ".filter(e => e.scrollHeight > e.clientHeight + 1 || "
                            "e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)")
        assert cut == [], f"captions cut: {cut}"
        # every caption's whole text is its tooltip too
        assert page.evaluate("() => [...document.querySelectorAll('.sdl-caption')]"
                             ".every(e => e.title === e.textContent)")
        # a long title keeps to one line in each column (whole on hover): the panels line up
        tops = page.evaluate("() => ['#a', '#b'].map(c => document.querySelector("
                             "c + \" .sdl-frame[data-panel='x0']\").getBoundingClientRect().top)")
        assert abs(tops[0] - tops[1]) < 1, tops
        assert wp.errors == []


def test_keys_step_after_a_menu_and_leave_other_sliders_and_the_page_alone():
    from widget_page import WidgetPage, chromium_page

    v = TraceViewer(run(), decoder="channels", step=0)
    with chromium_page(height=400) as page:
        wp = WidgetPage(page, {"v": v}, html="<div id='v'></div><div style='height:3000px'></div>")
        step = "() => document.querySelector(\".sdl-frame[data-panel='x0']\").dataset.step"
        page.locator("select.sdl-mode").select_option("sum")  # a menu, then the arrows step
        page.keyboard.press("ArrowRight")
        assert page.evaluate(step) == "1"
        page.keyboard.press("ArrowLeft")
        assert page.evaluate(step) == "0"
        page.locator("input.sdl-opacity").focus()  # the opacity slider keeps its own arrows
        before = page.locator("input.sdl-opacity").input_value()
        page.keyboard.press("ArrowRight")
        assert page.evaluate(step) == "0"
        assert page.locator("input.sdl-opacity").input_value() != before
        page.locator(".sdl-frame[data-panel='x0']").click()  # ↑/↓ do not scroll the page
        page.keyboard.press("ArrowDown")
        page.keyboard.press("ArrowDown")
        assert page.evaluate("() => window.scrollY") == 0
        wp.settle()
        assert v.heat_mode == "sum" and v.step == 0 and wp.errors == []


def test_reference_view_draws_the_image_under_an_overlay_grey():
    """ReferenceView: the image under a heat overlay is grey (sdlens.views.overlay), the one
    without an overlay keeps its colour; ``grey=False`` shows both in colour."""
    from widget_page import WidgetPage, chromium_page

    from sdlens.testing import reference_image
    from sdlens.views.widgets import ReferenceView

    ref = reference_image(64)
    tr = sdlens.generate(random_pipeline("flux-kontext", seed=0), PROMPT, seed=0, steps=2,
                         image=ref, max_area=32 * 32, _auto_resize=False, height=32, width=32,
                         record=("latents", "attention", "reference_maps"))
    v = ReferenceView(tr, references=[ref], px=64)

    def filters(page):
        return page.locator(".sdl-refview img:not([style*='absolute'])").evaluate_all(
            "es => es.map(e => getComputedStyle(e).filter)")

    with chromium_page() as page:
        wp = WidgetPage(page, {"v": v})
        assert filters(page) == ["none", "grayscale(1)"]  # output, image 1 (under its overlay)
        v.click_reference(0, 1, 1)
        wp.settle()
        assert filters(page) == ["grayscale(1)", "none"]  # now the output holds the overlay
        v.grey = False
        wp.settle()
        assert filters(page) == ["none", "none"]
        assert "grey" not in page.locator(".sdl-refview .sdl-title").inner_text()
        assert wp.errors == []
