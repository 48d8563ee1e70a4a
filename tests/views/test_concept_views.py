"""Concept maps and image->text maps in every view: the plot, the HTML report, the CLI (`sdlens
trace --concepts`, `sdlens info`), TraceViewer's maps menu and Studio's concepts box. A tiny
random-weight SD3 (sdlens.testing), CPU fp32, 2 steps."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import sdlens
from sdlens import plot
from sdlens.analysis.heatmaps import word_heatmap
from sdlens.testing import random_pipeline
from sdlens.views.cli import describe_trace, main
from sdlens.views.report import build_report
from sdlens.views.widgets.frames import WINNER, decode

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle and a blue square"
CONCEPTS = ["circle", "square", "background"]  # "background": not a word of the prompt
STEPS = 2
RECORD = ("latents", "noise", "x0", "attention", "image_to_text")


@functools.lru_cache(maxsize=None)
def pipe():
    return random_pipeline("sd3", seed=0)


@functools.lru_cache(maxsize=None)
def traced():
    return sdlens.generate(pipe(), PROMPT, seed=0, steps=STEPS, guidance_scale=4.0,
                           concepts=CONCEPTS, record=RECORD)


@functools.lru_cache(maxsize=None)
def plain():
    return sdlens.generate(pipe(), PROMPT, seed=0, steps=STEPS, guidance_scale=4.0)


def _titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


# ----------------------------------------------------------------------------- plot
def test_concept_map_figure_one_panel_per_concept_and_per_block():
    tr = traced()
    fig = plot.concept_maps(tr)
    assert _titles(fig) == ["image"] + [repr(c) for c in CONCEPTS]
    assert "concept maps (all blocks)" in fig._suptitle.get_text()
    # the panels are the concepts' shares (no normalisation): they sum to 1 at every pixel
    panels = [ax.images[-1].get_array() for ax in fig.axes if ax.get_title() in
              {repr(c) for c in CONCEPTS}]
    total = sum(torch.as_tensor(p.data) for p in panels)
    torch.testing.assert_close(total, torch.ones_like(total), atol=5e-3, rtol=0)
    blocks = tr.concepts.layers
    per = plot.concept_maps(tr, per_block=True)
    assert [ax.get_ylabel() for ax in per.axes if ax.images and ax.get_ylabel()] == \
        [tr.concepts.alias(l) for l in blocks]
    assert len([ax for ax in per.axes if ax.images]) == len(blocks) * (len(CONCEPTS) + 1)
    one = plot.concept_maps(tr, concepts=["Background"], layers=blocks[0])
    assert _titles(one) == ["image", "'background'"]
    assert _titles(plot.overlay(tr, "background", maps="concepts"))[0] == "'background' (concept)"
    steps = plot.heatmap_steps(tr, "background", maps="concepts", normalize=False)
    assert _titles(steps) == ["step 1", "step 2"]
    assert steps._suptitle.get_text() == "'background' (concept map) per step"
    with pytest.raises(ValueError, match="no concept 'zebra' was recorded"):
        plot.concept_maps(tr, concepts=["zebra"])
    with pytest.raises(ValueError, match="trace with concepts="):
        plot.concept_maps(plain())


def test_image_to_text_figure():
    tr = traced()
    fig = plot.image_to_text_maps(tr, ["red", "circle"], per_block=True)
    assert _titles(fig) == ["image", "'red'", "'circle'"]
    assert "image→text maps (per block)" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="image_to_text"):
        plot.image_to_text_maps(plain())


# ----------------------------------------------------------------------------- report
def test_report_has_concept_and_image_to_text_sections():
    html = build_report(traced(), decoder="linear")
    sections = re.findall(r"<h2>(.*?)</h2>", html)
    assert "Concept maps" in sections and "Image→text maps" in sections
    part = html[html.index("<h2>Concept maps</h2>"):html.index("<h2>Image→text maps</h2>")]
    assert 'alt="concept maps"' in part and 'alt="concept maps per block"' in part
    for c in CONCEPTS:
        assert f"<tr><td>{c}</td>" in part
    assert "Not available" not in html
    # the step scrubber offers each concept beside the words
    frames = re.search(r'<script type="application/json" id="frames">(.*?)</script>', html).group(1)
    for c in CONCEPTS:
        assert f'"concept:{c}"' in frames and f'<option value="concept:{c}">' in html
    plain_html = build_report(plain(), decoder="linear")
    assert "<h2>Concept maps</h2>" not in plain_html and '"concept:' not in plain_html


# ----------------------------------------------------------------------------- widgets
def test_trace_viewer_maps_menu_shows_concepts():
    from sdlens.views.widgets import TraceViewer

    tr = traced()
    v = TraceViewer(tr, decoder="linear")
    assert [k for k, _ in v.maps_options] == ["attention", "concepts", "image_to_text"]
    assert v.maps == "attention" and "circle" in v.word_keys and "background" not in v.word_keys
    v.maps = "concepts"
    # the concepts, then the winning concept per pixel beside them
    assert v.word_keys == CONCEPTS + [WINNER] and set(v.heat) == set(CONCEPTS + [WINNER])
    assert v.heat_index == [0, 1]
    v.select_word("background")
    v.step = 1
    # the overlay is the concept's share at that step (fixed 0-1), as word_heatmap pools it
    shown = torch.tensor(np.array(decode(v.overlay())))[..., 3].float()  # alpha: the heat
    ref = word_heatmap(tr, "background", maps="concepts", per_step=True, normalize=False,
                       size=v.trace_frames.heat_size)[1]
    expect = (ref.clamp(0, 1).sqrt() * 0.85 * 255).round()
    assert (shown - expect).abs().max() <= 1
    v.maps = "image_to_text"
    assert "circle" in v.word_keys and v.word == ""
    with pytest.raises(ValueError, match="not a choice"):
        v.maps = "nothing"
    direct = TraceViewer(tr, maps="concepts", word="square", decoder="linear")
    assert direct.word == "square" and direct.displayed()["overlay"]
    # two columns on concept maps: the difference panels still diff the words' attention maps
    from sdlens.views.widgets import ABView

    ab = ABView(tr, plain(), viewer_a=TraceViewer(tr, maps="concepts", decoder="linear"),
                viewer={"decoder": "linear"})
    assert ab.viewer_a.word_keys == CONCEPTS + [WINNER] and "red" in ab.panel.heat_diff
    only = TraceViewer(plain(), decoder="linear")
    assert [k for k, _ in only.maps_options] == ["attention"]
    with pytest.raises(ValueError, match="holds no concept maps"):
        TraceViewer(plain(), maps="concepts")


def test_studio_concepts_box():
    from sdlens.views.widgets import Studio

    s = Studio(pipe(), prompt=PROMPT, steps=STEPS, guidance_scale=4.0,
               viewer={"decoder": "linear"})
    assert s.concepts is not None
    s.concepts.value = "circle, background"
    s.generate(wait=True, timeout=300)
    assert s.error is None, s.error
    tr = s.traces[-1]
    assert tr.concepts.concepts == ["circle", "background"]
    assert "concepts" in [k for k, _ in s.viewer.maps_options]
    pix = random_pipeline("pixart", seed=0)
    assert Studio(pix).concepts is None  # cross-attention: no concept pass, no box


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3c") / "model"
    pipe().save_pretrained(folder)
    return folder


def test_cli_trace_concepts_and_info(sd3_folder, tmp_path, capsys):
    run = tmp_path / "run.sdlens"
    assert main(["trace", PROMPT, "--model", str(sd3_folder), "--steps", "2", "--cfg", "4",
                 "--concepts", "circle, square,background", "--image-to-text", "--out", str(run),
                 "-q"]) == 0
    tr = sdlens.load(run)
    assert tr.concepts.concepts == CONCEPTS and tr.image_to_text is not None
    torch.testing.assert_close(tr.latents, plain().latents)  # the image is unchanged
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"concepts\s+'circle', 'square', 'background': 2 layers \(block\.0, block\.1\), "
                     r"2 steps", out), out
    assert re.search(r"image→text\s+2 layers, 2 steps", out)
    assert "concepts" not in describe_trace(plain())
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "-q"]) == 0
    assert "<h2>Concept maps</h2>" in (tmp_path / "r.html").read_text()
    assert main(["trace", PROMPT, "--model", str(sd3_folder), "--concepts", " , ",
                 "--out", str(tmp_path / "x.sdlens"), "-q"]) == 2
    assert "--concepts needs at least one concept" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the browser
_HARNESS = """
<div id="el"></div>
<script>
function revive(x) {  // {"__b64": ...} -> DataView, as anywidget hands over binary buffers
  if (Array.isArray(x)) return x.map(revive);
  if (x && typeof x === "object") {
    if ("__b64" in x) {
      const s = atob(x.__b64), a = new Uint8Array(s.length);
      for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
      return new DataView(a.buffer);
    }
    return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, revive(v)]));
  }
  return x;
}
class FakeModel {  // what the front end uses of an anywidget model
  constructor(state) { this.s = revive(state); this.h = {}; this.saved = []; }
  get(k) { return this.s[k]; }
  set(k, v) { this.s[k] = v; (this.h["change:" + k] || []).forEach((f) => f()); }
  save_changes() { this.saved.push(JSON.parse(JSON.stringify(this.s.maps))); }
  on(ev, fn) { (this.h[ev] = this.h[ev] || []).push(fn); }
  off(ev, fn) { this.h[ev] = (this.h[ev] || []).filter((f) => f !== fn); }
  update(state) { for (const [k, v] of Object.entries(revive(state))) this.set(k, v); }
}
</script>
"""


def _state(v, names) -> dict:
    import base64

    def enc(x):
        if isinstance(x, (bytes, bytearray, memoryview)):
            return {"__b64": base64.b64encode(bytes(x)).decode("ascii")}
        if isinstance(x, dict):
            return {k: enc(y) for k, y in x.items()}
        if isinstance(x, (list, tuple)):
            return [enc(y) for y in x]
        return x

    return {n: enc(getattr(v, n)) for n in names}


@pytest.mark.browser
def test_maps_menu_in_a_browser():
    """The viewer's front end (trace_viewer.js) on a stand-in model: the maps menu is there for
    a trace with concept maps, choosing "concept maps" tells the kernel, and the kernel's
    concept chips and frames then show (the chips read "concepts:", a click overlays)."""
    import json
    from pathlib import Path

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed")
    from browser import CHROMIUM_ARGS, find_chromium

    from sdlens.views.widgets import TraceViewer

    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium binary")
    v = TraceViewer(traced(), decoder="linear")
    names = v.trait_names(sync=True)
    names = [n for n in names if not n.startswith("_") and n not in ("layout", "tabbable", "tooltip",
                                                                      "comm", "keys", "log")]
    js = (Path(__import__("sdlens.views.widgets", fromlist=["x"]).__file__).parent / "static"
          / "trace_viewer.js").read_text()
    js = js.replace("export default { render };", "window.renderViewer = render;")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = b.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_content(_HARNESS)
            page.add_script_tag(content=js, type="module")
            page.wait_for_function("() => typeof window.renderViewer === 'function'")
            page.evaluate("(s) => { window.model = new FakeModel(s); window.renderViewer("
                          "{model: window.model, el: document.getElementById('el')}); }",
                          json.loads(json.dumps(_state(v, names))))
            menu = page.locator("select.sdl-maps")
            assert menu.is_visible()
            assert [o.get_attribute("value") for o in menu.locator("option").all()] == \
                ["attention", "concepts", "image_to_text"]
            assert page.locator(".sdl-chips-label").inner_text().strip() == "words:"
            menu.select_option("concepts")
            assert page.evaluate("() => window.model.saved.at(-1)") == "concepts"
            v.maps = "concepts"  # the kernel's answer: the concepts' chips and frames
            page.evaluate("(s) => window.model.update(s)",
                          _state(v, ["heat", "heat_index", "layer_options", "layers", "words"]))
            assert page.locator(".sdl-chips-label").inner_text().strip() == "concepts:"
            assert page.locator(".sdl-chip").all_inner_texts() == CONCEPTS + ["winning concept per pixel"]
            page.locator(".sdl-chip[data-word='background']").click()
            overlay = page.locator(".sdl-overlay[data-panel='image-overlay']")
            assert (overlay.get_attribute("src") or "").startswith("blob:")
            assert "'background'" in page.locator(".sdl-panel[data-panel='image'] .sdl-caption").inner_text()
            assert errors == []
        finally:
            b.close()
