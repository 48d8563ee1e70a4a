"""The heat overlay reads on any image colour (issue 32): the image goes under the heat in grey,
so red heat on a red object stands out as well as on a grey one.

The measure: CIE76 ΔE (CIELAB distance, D65, sRGB) between a pixel of a red object under a hot
map value and one under a cold value (0), composed as the panels compose them at their default
settings. A ΔE of about 2 is a just-noticeable difference; 20 is a plainly different colour.
"""

from __future__ import annotations

import numpy as np
import pytest

from fakes import fake_trace
from sdlens.views import plot, report
from sdlens.views.overlay import GREY_NOTE, blend, compose, underlay
from sdlens.views.widgets import ReferenceView, TraceViewer
from sdlens.views.widgets.frames import MAX_ALPHA, heat_rgba

RED = (255, 0, 0)
HOT = np.linspace(0.5, 1.0, 51)  # "the map is high here": every value from half to the top
READABLE = 20.0  # ΔE: plainly different colours


def lab(rgb) -> np.ndarray:
    """sRGB uint8 (..., 3) -> CIELAB (..., 3), D65 (independent of sdlens)."""
    c = np.asarray(rgb, np.float64) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], -1)


def hot_vs_cold(composed: np.ndarray) -> np.ndarray:
    """ΔE of each hot pixel (row 0, the values HOT) from the cold pixel (row 1, value 0)."""
    return np.linalg.norm(lab(composed[0]) - lab(composed[1, :1]), axis=-1)


def red_object_with_heat():
    """A red object (1 x 51 px per row, 2 rows) and a map: row 0 hot (HOT), row 1 cold (0)."""
    image = np.empty((2, len(HOT), 3), np.uint8)
    image[:] = RED
    heat = np.stack([HOT, np.zeros_like(HOT)]).astype(np.float32)
    return image, heat


def viewer_default(name: str):
    return TraceViewer.class_traits()[name].default_value


def test_the_viewers_default_overlay_reads_on_a_red_object():
    """TraceViewer / Studio (a TraceViewer per run): the heat frame (heat_rgba, alpha growing
    with the value) at the default opacity over the image, grey by default."""
    image, heat = red_object_with_heat()
    layer = heat_rgba(heat, "jet", MAX_ALPHA)
    opacity, grey = viewer_default("opacity"), viewer_default("grey")
    assert grey is True
    shown = hot_vs_cold(compose(image, layer, opacity, grey))
    assert shown.min() >= READABLE, f"hot on red is ΔE {shown.min():.1f} from cold on red"
    # the measure tells: in colour, some hot value all but vanishes on the red object
    colour = hot_vs_cold(compose(image, layer, opacity, grey=False))
    assert colour.min() < 5, colour.min()
    # and grey makes every object colour read like a grey one (any hue, bright or dark)
    for rgb in [(0, 0, 255), (255, 255, 0), (0, 160, 0), (128, 0, 128), (40, 40, 40)]:
        image[:] = rgb
        assert hot_vs_cold(compose(image, layer, opacity)).min() >= READABLE, rgb
    with pytest.raises(ValueError, match="opacity"):
        compose(image, layer, 1.5)


def test_underlay_is_the_images_luminance():
    """CSS grayscale(1)'s weights on the sRGB values (what the browser applies)."""
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 100, 50]]], np.uint8)
    g = underlay(px)
    want = np.round(px.astype(float) @ [0.2126, 0.7152, 0.0722])
    assert np.array_equal(g[..., 0], want) and (g == g[..., :1]).all()
    assert np.array_equal(underlay(px, grey=False), px)


def test_plots_and_report_draw_the_image_grey_under_the_heat():
    tr = fake_trace()
    img = np.asarray(tr.images[0].convert("RGB"))
    fig = plot.overlay(tr, "circle")
    ax = [a for a in fig.axes if a.get_label() != "<colorbar>"][0]
    assert np.array_equal(ax.images[0].get_array(), underlay(img))
    assert GREY_NOTE in [a for a in fig.axes if a.get_label() == "<colorbar>"][0].get_ylabel()
    ax = [a for a in plot.overlay(tr, "circle", grey=False).axes
          if a.get_label() != "<colorbar>"][0]
    assert np.array_equal(ax.images[0].get_array(), img)  # the option: in colour
    grid = plot.heatmap_grid(tr, ["red", "circle"])
    axes = [a for a in grid.axes if a.get_visible() and a.get_label() != "<colorbar>"]
    assert np.array_equal(axes[0].images[0].get_array(), img)  # the image panel keeps its colour
    assert np.array_equal(axes[1].images[0].get_array(), underlay(img))
    # the report's scrubber frames: the same blend (flat alpha through the colour map)
    heat = tr.heatmap("circle").numpy()
    assert np.array_equal(np.asarray(report.overlay_image(img, heat)), blend(img, heat))
    assert np.array_equal(np.asarray(report.overlay_image(img, heat, grey=False)),
                          blend(img, heat, grey=False))
    # on the fake's red circle the report's hot pixels stand out from its cold ones in grey
    circle = tr.masks["circle"]
    both = np.stack([img[circle][:50]] * 2)  # (2, 50, 3): the circle's own pixels
    hm = np.stack([np.full(50, 1.0), np.zeros(50)]).astype(np.float32)
    assert hot_vs_cold(blend(both, hm)).min() >= READABLE
    html = report.build_report(tr, words=["circle"])
    assert GREY_NOTE in html


def test_viewers_say_grey_and_keep_the_colour_option():
    tr = fake_trace()
    v = TraceViewer(tr)
    assert v.grey is True and v.grey_note == GREY_NOTE
    assert TraceViewer(tr, grey=False).grey is False
    assert ReferenceView.class_traits()["grey"].default_value is True
