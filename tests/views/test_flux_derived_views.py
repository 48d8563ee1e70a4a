"""Downstream of the trace for the Flux-derived families of 2026 (Chroma, Flux.1 Kontext,
Flux.2 dev / klein): report, TraceViewer, plots, a guidance sweep, reweighting on double- and
single-stream sites, token_effects, compare and `sdlens info`. Tiny random-weight beds
(sdlens.testing), CPU fp32, 2 steps, 32 px; cheap checks that each piece runs and says the
right thing."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import sdlens
from sdlens import plot
from sdlens.analysis.compare import compare
from sdlens.analysis.guidance import guidance_kind
from sdlens.testing import call_kwargs_2026, random_pipeline
from sdlens.views.cli import describe_trace
from sdlens.views.report import build_report

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red cat on the beach"
STEPS = 2
# arch -> (guidance kind of a default call, the guidance values a sweep runs)
FAMILIES = {
    "chroma": ("cfg", [1.0, 4.0]),  # two calls per step, labelled "CFG"
    "flux-kontext": ("distilled", [2.5, 4.0]),
    "flux2": ("distilled", [2.5, 4.0]),
    "flux2-klein": ("off", [1.0, 4.0]),  # step-distilled: guidance is ignored
}
ARCHS = list(FAMILIES)


@functools.lru_cache(maxsize=None)
def pipe(arch: str):
    return random_pipeline(arch, seed=0)


def extra(arch: str) -> dict:
    """The bed's call keywords other than prompt / steps / generator / output type."""
    kw = call_kwargs_2026(arch)
    return {k: v for k, v in kw.items()
            if k not in ("prompt", "num_inference_steps", "generator", "output_type")}


@functools.lru_cache(maxsize=None)
def generated(arch: str):
    return sdlens.generate(pipe(arch), PROMPT, seed=0, steps=STEPS, **extra(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_report_viewer_plots_and_info(arch):
    from sdlens.views.widgets import TraceViewer

    tr = generated(arch)
    assert guidance_kind(tr) == FAMILIES[arch][0]
    html = build_report(tr, decoder="linear")
    assert "the model predicts velocity" in html and "cat" in html
    v = TraceViewer(tr, decoder="linear")
    assert {p["name"] for p in v.panels} >= {"x_t", "x0", "noise"}
    figs = [plot.heatmap_grid(tr), plot.overlay(tr, "cat"), plot.token_view(tr),
            plot.step_strip(tr, n=2, decoder="linear")]
    assert all(isinstance(f, Figure) for f in figs)
    assert tr.meta["family"] in describe_trace(tr)
    c = compare(tr, generated(arch))
    assert c is not None
    from sdlens.views.widgets import ABView, TokenView

    tv = TokenView(tr)  # the prompt's own pieces; no chat template
    assert {r["word"] for r in tv.rows if r["word"]} == {"a", "red", "cat", "on", "the", "beach"}
    ABView(tr, generated(arch), viewer={"decoder": "linear"})


@pytest.mark.parametrize("arch", ARCHS)
def test_guidance_sweep(arch):
    values = FAMILIES[arch][1]
    grid = sdlens.sweep(pipe(arch), PROMPT, seeds=[0], guidance_scales=values, steps=STEPS,
                        progress=False, keep_axes=("guidance", "seed"), **extra(arch))
    assert [tr.guidance_scale for tr in grid.traces[:, 0]] == values
    assert all(tr.attention.layers for tr in grid.traces[:, 0])
    from sdlens.views.widgets import GridViewer

    gv = GridViewer(grid, viewer={"decoder": "linear"})
    assert len(gv.panel.row_labels) == len(values)
    gv.select(1, 0)
    assert gv.viewer is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_reweighting_on_double_and_single_stream(arch):
    p = pipe(arch)
    base = generated(arch)
    for layers in ("double", "single"):
        steered = sdlens.generate(p, PROMPT, seed=0, steps=STEPS, reweight={"cat": 4.0},
                                  layers=layers, **extra(arch))
        assert steered.meta["reweight"]
        assert not torch.equal(steered.latents[-1], base.latents[-1])
    # a weight of 1 changes nothing
    same = sdlens.generate(p, PROMPT, seed=0, steps=STEPS, reweight={"cat": 1.0}, **extra(arch))
    torch.testing.assert_close(same.latents[-1], base.latents[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_token_effects(arch):
    kw = extra(arch)
    gs = kw.pop("guidance_scale", pipe(arch).guidance_scale if hasattr(pipe(arch), "guidance_scale") else 1.0)
    eff = sdlens.token_effects(pipe(arch), PROMPT, words=["cat"], steps=STEPS,
                               guidance_scale=gs, record=None, **kw)
    assert list(eff.words) == ["cat"]


def test_reference_view_panel():
    """The reference-map panel: a click on the output draws an overlay on each reference, a
    click on a reference one on the output, the step slider redraws; the overlays are the
    trace's ReferenceMaps.at / lands."""
    from sdlens.testing import reference_image
    from sdlens.views.widgets import ReferenceView
    from sdlens.views.widgets.frames import decode

    ref = reference_image(64)
    tr = sdlens.generate(pipe("flux-kontext"), PROMPT, seed=0, steps=STEPS, image=ref,
                         max_area=32 * 32, _auto_resize=False, height=32, width=32,
                         record=("latents", "attention", "reference_maps"))
    v = ReferenceView(tr, references=[ref], px=64)
    # the images under the overlays in grey by default (sdlens.views.overlay), the title says so
    assert v.grey and v.title.endswith("image shown in grey under the heat")
    v.grey = False
    assert "grey" not in v.title
    assert v.reference_grids == [[4, 4]] and v.output_grid == [2, 2] and v.steps == [0, 1]
    assert len(v.reference_overlays) == 1 and v.reference_overlays[0] and not v.output_overlay
    first = v.reference_overlays[0]
    v.click_output(0, 1)
    assert v.reference_overlays[0] != first
    alpha = np.asarray(decode(v.reference_overlays[0]))[..., 3].astype(float)
    want = tr.reference_maps.at(0, 1, step=1)  # the last step, where the slider starts
    cell = alpha[::16, ::16]  # 64 px / 4 patches: one pixel per reference patch
    assert np.unravel_index(cell.argmax(), cell.shape) == np.unravel_index(
        int(want.argmax()), tuple(want.shape))
    v.click_reference(0, 3, 3)
    assert v.output_overlay and v.direction == "reference 0" and not v.reference_overlays[0]
    before = v.output_overlay
    v.step = 0
    assert v.output_overlay != before
    with pytest.raises(ValueError, match="reference_maps"):
        ReferenceView(generated("flux-kontext"))
