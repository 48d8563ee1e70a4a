"""Figures: what they draw is the data they were given."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from fakes import fake_trace
from sdlens.analysis.compare import compare
from sdlens.analysis.guidance import guidance_stats, scheduler_view
from sdlens.analysis.heatmaps import commitment
from sdlens.analysis.tokens import token_view
from sdlens.views import plot
from sdlens.views.overlay import underlay
from sdlens.trace import replace


@pytest.fixture(scope="module")
def tr():
    t = fake_trace()
    return replace(t, meta={**t.meta, "family": "sd1"})  # the SD 1.x linear decoder for previews


def _png(fig: Figure) -> Image.Image:
    data = plot.to_png(fig, dpi=50)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def _main_axes(fig: Figure):
    return [a for a in fig.axes if a.get_visible() and a.get_label() != "<colorbar>"]


def test_heatmap_grid_shows_each_words_map(tr):
    fig = plot.heatmap_grid(tr, ncols=3)
    assert isinstance(fig, Figure)
    axes = _main_axes(fig)
    titles = [a.get_title() for a in axes]
    assert titles == ["image", "'a'", "'red'", "'circle'", "'and'", "'blue'", "'square'"]
    # the overlay drawn for 'circle' is the heatmap itself, over the image
    circle = axes[3]
    assert np.allclose(circle.images[-1].get_array(), tr.heatmap("circle").numpy())
    # ... over the image in grey (hue is the heat's: sdlens.views.overlay)
    assert np.array_equal(circle.images[0].get_array(), underlay(np.asarray(tr.images[0])))
    assert any(a.get_label() == "<colorbar>" for a in fig.axes)
    assert "sdlens pooling" in fig._suptitle.get_text()
    assert _png(fig).size[0] > 100
    daam = plot.heatmap_grid(tr, words=["circle"], pooling="daam")
    assert np.allclose(_main_axes(daam)[1].images[-1].get_array(),
                       tr.heatmap("circle", pooling="daam").numpy())
    with pytest.raises(ValueError, match="not a word"):
        plot.heatmap_grid(tr, words=["dog"])
    with pytest.raises(ValueError, match="ncols"):
        plot.heatmap_grid(tr, ncols=0)


def test_overlay_draws_into_the_given_axes(tr):
    fig = Figure()
    ax = fig.add_subplot()
    out = plot.overlay(tr, "square", ax=ax, steps=[9])
    assert out is fig and ax.get_title() == "'square'"
    assert np.allclose(ax.images[-1].get_array(), tr.heatmap("square", steps=[9]).numpy())
    t2 = fake_trace("a dreambeach circle", word_regions={"dream": "circle", "beach": "square"})
    fig2 = plot.overlay(t2, "dreambeach")
    assert "dream + beach" in _main_axes(fig2)[0].get_title()  # the sub-word merge is shown


def test_heatmap_steps(tr):
    fig = plot.heatmap_steps(tr, "circle", n=5)
    axes = _main_axes(fig)
    assert [a.get_title() for a in axes] == ["step 1", "step 3", "step 5", "step 8", "step 10"]  # 1..N
    per = tr.heatmap("circle", per_step=True, steps=[0, 2, 4, 7, 9]).numpy()
    assert np.allclose(axes[2].images[-1].get_array(), per[2])


def test_step_strip(tr):
    fig = plot.step_strip(tr, n=4)
    axes = _main_axes(fig)
    assert len(axes) == 4 * 4
    assert [a.get_title().split("\n")[0] for a in axes[:4]] == ["step 1", "step 4", "step 7",
                                                                  "step 10"]
    ylabels = [axes[i * 4].get_ylabel() for i in range(4)]
    assert ylabels == ["x_t (latents)", "x0 (predicted)", "noise (guided)", "|CFG delta|"]
    # the CFG row is the per-pixel norm of text - uncond
    delta = (tr.noise_text[6, 0] - tr.noise_uncond[6, 0]).norm(dim=0).numpy()
    assert np.allclose(axes[3 * 4 + 2].images[0].get_array(), delta, atol=1e-5)
    _png(fig)
    one = plot.step_strip(tr, steps=[2, 5], rows=["x0"])
    assert len(_main_axes(one)) == 2
    nocfg = replace(tr, noise_uncond=None)
    assert len(_main_axes(plot.step_strip(nocfg, n=2))) == 3 * 2  # no CFG row without guidance
    with pytest.raises(ValueError, match="rows must be"):
        plot.step_strip(tr, rows=["latent"])
    with pytest.raises(ValueError, match="out of range"):
        plot.step_strip(tr, steps=[12])


def test_token_view_bars_are_the_attention_shares(tr):
    fig = plot.token_view(tr)
    ax = _main_axes(fig)[0]
    heights = [p.get_height() for p in ax.patches]
    shares = [r.attention for r in token_view(tr).rows[1:] if r.attention is not None]
    assert np.allclose(heights, shares)
    assert "7 of 75 tokens" in ax.get_title()
    t = replace(fake_trace(), truncated_words=[["zebra", "giraffe"]])
    assert "CUT" in _main_axes(plot.token_view(t))[0].get_title()


def test_curves(tr):
    fig = plot.scheduler_curves(tr)
    v = scheduler_view(tr)
    ax_t = _main_axes(fig)[0]
    assert np.allclose(ax_t.lines[0].get_ydata(), v.timesteps)
    assert "DDIMScheduler" in fig._suptitle.get_text()

    fig = plot.guidance_curves(tr)
    st = guidance_stats(tr)
    assert np.allclose(_main_axes(fig)[0].lines[0].get_ydata(), st.delta_rms)

    fig = plot.commitment_curves(tr, words=["circle", "square"])
    ax = _main_axes(fig)[0]
    assert np.allclose(ax.lines[0].get_ydata(), commitment(tr, "circle").correlation)
    assert "(step 5)" in ax.lines[0].get_label()  # index 4, shown 1..N
    assert commitment(tr, "circle").plot().axes  # the result object plots itself

    fig = plot.guidance_strip(tr, 5, scales=[1, 7.5, 12])
    assert [a.get_title() for a in _main_axes(fig)] == ["cfg 1", "cfg 7.5 (recorded)", "cfg 12"]


def test_compare_names_what_differs_and_never_parted():
    a = fake_trace()
    same = compare(a, a)
    assert same.parting_step is None and same.within_noise and same.differs == {}
    assert "never parted: the x0 distance stays within noise" in same.summary()
    assert "parting step" not in same.summary()
    # float noise (the same run computed in another order) is not a parting
    jitter = replace(a, x0=a.x0 * (1 + 1e-6), latents=a.latents * (1 + 1e-6))
    noisy = compare(a, jitter)
    assert noisy.parting_step is None and noisy.within_noise
    fig = noisy.plot()
    assert any("never parted" in t.get_text() for t in _main_axes(fig)[0].texts)
    b = replace(a, meta={**a.meta, "scheduler_class": "EulerDiscreteScheduler"})
    assert compare(replace(a, meta={**a.meta, "scheduler_class": "DDIMScheduler"}), b).differs == {
        "scheduler": ("DDIM", "EulerDiscrete")}
    assert "differs in: scheduler 'DDIM' vs 'EulerDiscrete'" in compare(
        replace(a, meta={**a.meta, "scheduler_class": "DDIMScheduler"}), b).summary()


def test_plots_count_steps_from_one(tr):
    fig = plot.scheduler_curves(tr)
    assert list(_main_axes(fig)[0].lines[0].get_xdata()) == list(range(1, len(tr.timesteps) + 1))
    fig = plot.guidance_curves(tr)
    assert _main_axes(fig)[0].lines[0].get_xdata()[0] == 1
    fig = plot.guidance_strip(tr, 5, scales=[1, 7.5])
    assert "x0 at step 6 " in fig._suptitle.get_text()


def test_comparison_plot():
    a, b = fake_trace(), fake_trace(commit_step=7)
    c = compare(a, b)
    fig = c.plot()
    left, right = _main_axes(fig)[:2]
    assert np.allclose(left.lines[0].get_ydata(), c.x0_relative)
    assert {l.get_label() for l in right.lines} >= {"'circle'", "'square'"}
    _png(fig)
