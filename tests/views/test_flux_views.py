"""Flux.1's guidance in the views: a guidance-distilled run is "guidance 3.5 (distilled)", true
CFG is "true CFG s (guidance g)", never "CFG" / "guidance off" (analysis.guidance.guidance_text,
the one place), and its prediction is a velocity. The report, TraceViewer, ABView, Studio, a
guidance sweep's grid and GridViewer, the plots and `sdlens info`. A tiny random-weight Flux
(sdlens.testing), CPU fp32, 2 steps."""

from __future__ import annotations

import functools
import re

import pytest
from matplotlib.figure import Figure

import sdlens
from sdlens import plot
from sdlens.analysis.compare import compare
from sdlens.analysis.guidance import guidance_kind, guidance_label, guidance_text
from sdlens.testing import random_pipeline
from sdlens.views.cli import describe_trace
from sdlens.views.report import build_report

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle and a blue square"
STEPS = 2


@functools.lru_cache(maxsize=None)
def pipe():
    return random_pipeline("flux", seed=0)


@functools.lru_cache(maxsize=None)
def distilled(guidance_scale: float = 3.5):
    return sdlens.generate(pipe(), PROMPT, seed=0, steps=STEPS, guidance_scale=guidance_scale)


@functools.lru_cache(maxsize=None)
def true_cfg():
    return sdlens.generate(pipe(), PROMPT, seed=0, steps=STEPS, negative_prompt="blurry",
                           true_cfg_scale=2.0)


def test_guidance_text_names_the_kind_of_guidance():
    d, t = distilled(), true_cfg()
    assert guidance_kind(d) == "distilled" and guidance_text(d) == "guidance 3.5 (distilled)"
    assert guidance_text(d, explain=True) == "guidance 3.5 (distilled), no unconditional pass"
    assert guidance_kind(t) == "true_cfg" and guidance_text(t) == "true CFG 2 (guidance 3.5)"
    assert guidance_label(7.5) == "CFG 7.5" and guidance_label(1, "off") == "guidance off"
    assert guidance_label(4, "distilled") == "guidance 4 (distilled)"


def test_report_names_distilled_guidance_and_velocity():
    html = build_report(distilled(), decoder="linear")
    assert "<th>guidance</th><td>guidance 3.5 (distilled), no unconditional pass</td>" in html
    assert "diffusers guides only above 1" not in html and "CFG 3.5" not in html
    assert "the model predicts velocity" in html
    # the guidance section says why there is no CFG delta: the model is distilled
    part = html[html.index("<h2>Classifier-free guidance</h2>"):]
    assert "Not available for this trace: this trace has no unconditional prediction: " \
           "guidance 3.5 (distilled)" in part
    html = build_report(true_cfg(), decoder="linear")
    assert "<th>guidance</th><td>true CFG 2 (guidance 3.5)</td>" in html
    assert 'alt="guidance curves"' in html  # true CFG has both halves


def test_trace_viewer_and_ab_view():
    from sdlens.views.widgets import ABView, TraceViewer

    v = TraceViewer(distilled(), decoder="linear")
    assert "guidance 3.5 (distilled)" in v.title and "guidance off" not in v.title
    assert "no CFG delta: guidance 3.5 (distilled), no unconditional pass" in v.notes
    assert {p["name"]: p["label"] for p in v.panels}["noise"].startswith("guided velocity · ")
    assert [p["name"] for p in v.panels] == ["x_t", "x0", "noise"]
    t = TraceViewer(true_cfg(), decoder="linear")
    assert "true CFG 2 (guidance 3.5)" in t.title and "cfg_delta" in [p["name"] for p in t.panels]
    ab = ABView(distilled(), true_cfg(), viewer={"decoder": "linear"})
    heads = [col.children[0].value for col in ab.columns.children]
    assert "<span class='sdl-differs'>guidance 3.5 (distilled)</span>" in heads[0]
    assert "<span class='sdl-differs'>true CFG 2 (guidance 3.5)</span>" in heads[1]
    assert ab.differs["guidance"] == ("guidance 3.5 (distilled)", "true CFG 2 (guidance 3.5)")
    assert "guidance 3.5 (distilled)" in compare(distilled(), true_cfg()).label_a


def test_guidance_sweep_labels_and_grid_viewer():
    from sdlens.views.widgets import GridViewer

    grid = sdlens.sweep(pipe(), PROMPT, seeds=[0], guidance_scales=[2.0, 3.5], steps=STEPS,
                        progress=False, keep_axes=("guidance", "seed"))
    assert grid.guidance == "distilled"
    assert [tr.guidance_scale for tr in grid.traces[:, 0]] == [2.0, 3.5]
    assert guidance_text(grid.traces[1, 0]) == "guidance 3.5 (distilled)"
    gv = GridViewer(grid, viewer={"decoder": "linear"})
    assert gv.panel.row_labels == ["guidance 2 (distilled)", "guidance 3.5 (distilled)"]
    gv.select(1, 0)
    assert "guidance 3.5 (distilled)" in gv.detail_title.value
    assert "guidance 3.5 (distilled)" in gv.viewer.title
    fig = grid.plot()
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["guidance 2 (distilled)", "guidance 3.5 (distilled)"]
    # saved and loaded, the grid still knows its guidance is distilled
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        loaded = sdlens.load(grid.save(Path(d) / "g.sdlens"))
    assert loaded.guidance == "distilled"


def test_plots_say_velocity_and_distilled():
    d = distilled()
    strip = plot.step_strip(d, n=2, decoder="linear")
    assert "guidance 3.5 (distilled)" in strip._suptitle.get_text()
    rows = [ax.get_ylabel() for ax in strip.axes if ax.get_ylabel()]
    assert "velocity (guided)" in rows and not any("noise" in r for r in rows)
    assert "predicts velocity" in plot.scheduler_curves(d)._suptitle.get_text()
    figs = [plot.heatmap_grid(d), plot.overlay(d, "circle"), plot.token_view(d),
            plot.commitment_curves(d)]
    assert all(isinstance(f, Figure) for f in figs)
    with pytest.raises(ValueError, match=r"guidance 3\.5 \(distilled\)"):
        plot.guidance_curves(d)
    curves = plot.guidance_curves(true_cfg())
    assert "true CFG 2 (guidance 3.5)" in curves.axes[0].get_title()


def test_studio_guidance_box_and_cli_info(tmp_path):
    from sdlens.views.widgets import Studio

    s = Studio(pipe(), prompt=PROMPT, steps=STEPS)
    assert s.guidance_scale.description == "guidance (distilled)"
    assert s.guidance_scale.value == 3.5  # the pipeline's default, not CFG's 7.5
    assert "distilled" in s.guidance_note.value and "off" not in s.guidance_note.value
    assert Studio(random_pipeline("sd3", seed=0)).guidance_scale.description == "CFG scale"
    path = distilled().save(tmp_path / "run.sdlens")
    out = describe_trace(sdlens.load(path))
    assert re.search(r"steps\s+2\s+guidance 3\.5 \(distilled\)\s+seeds", out), out
    assert "the model predicts velocity (flow)" in out
