"""Widget logic in Python, on real traces (tiny random-weight pipelines, the real trace engine):
frames produced, state changes, clicks and slider moves as the front end sends them (comm
messages), Studio streaming / interrupt / A/B, GridViewer cells, TokenView."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import traitlets
from PIL import Image

from sdlens.engine.session import generate
from sdlens.testing import random_pipeline
from sdlens.widgets import GridViewer, Studio, TokenView, TraceViewer, trace_mimebundle
from sdlens.views.widgets.frames import decode, heat_rgba

PROMPT = "a red circle and a blue square"


def _arr(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGBA" if b[:4] == b"\x89PNG" else "RGB"))


def _front_end_sends(widget, **state) -> None:
    """Deliver a state update exactly as the browser's widget manager sends it."""
    widget._handle_msg({"content": {"data": {"method": "update", "state": state, "buffer_paths": []}},
                        "buffers": []})


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("sd15", scale=0.05)


@pytest.fixture(scope="module")
def trace(pipe):
    return generate(pipe, PROMPT, seed=0, steps=5)


@pytest.fixture(scope="module")
def viewer(trace):
    return TraceViewer(trace)


# ------------------------------------------------------------------------------ TraceViewer
def test_viewer_frames_are_the_traces_previews(viewer, trace):
    from sdlens.analysis.previews import preview

    n = len(trace.timesteps)
    assert viewer.n_steps == n and viewer.step == n - 1  # opens at the last step
    assert [p["name"] for p in viewer.panels] == ["x_t", "x0", "noise", "cfg_delta"]
    for name, frames in viewer.frames.items():
        assert len(frames) == n, name
        assert all(isinstance(b, bytes) and b[:4] == b"\x89PNG" for b in frames)
    h, w = trace.images[0].size[1], trace.images[0].size[0]
    for k in (0, n // 2, n - 1):
        got = _arr(viewer.frames["x0"][k])[..., :3]
        want = np.asarray(preview(trace, "x0", k, size=(h, w)))
        assert got.shape == want.shape and np.array_equal(got, want)
        got = _arr(viewer.frames["x_t"][k])[..., :3]
        assert np.array_equal(got, np.asarray(preview(trace, "latents", k, size=(h, w))))
    # noise / delta frames are at the latent resolution and change from step to step
    assert _arr(viewer.frames["noise"][0]).shape[:2] == tuple(trace.noise.shape[-2:])
    assert viewer.frames["cfg_delta"][0] != viewer.frames["cfg_delta"][-1]
    assert np.array_equal(_arr(viewer.image)[..., :3], np.asarray(trace.images[0].convert("RGB")))


def test_viewer_frames_travel_as_binary_buffers(viewer):
    from ipywidgets.widgets.widget import _remove_buffers

    state, paths, buffers = _remove_buffers(viewer.get_state())
    n_frames = sum(len(f) for f in viewer.frames.values())
    n_heat = sum(len(h["steps"]) + 1 for h in viewer.heat.values())
    assert len(buffers) == n_frames + n_heat + 1  # + the output image
    assert ["frames", "x0", 0] in paths
    assert state["frames"]["x0"][0] is None  # not in the JSON part
    assert sum(len(b) for b in buffers) == viewer.frame_bytes()


def test_viewer_words_and_heatmaps(viewer, trace):
    from sdlens.analysis.heatmaps import word_heatmap

    assert viewer.word_keys == ["a", "red", "circle", "and", "a#2", "blue", "square"]
    assert viewer.overlay() is None
    for key, h in viewer.heat.items():
        assert len(h["steps"]) == len(trace.attention.steps)
    # the frame is the colormapped heatmap of the word at that step
    k = 2
    want = heat_rgba(word_heatmap(trace, "circle", steps=k, size=viewer._frames.heat_size))
    assert np.array_equal(_arr(viewer.heat["circle"]["steps"][k]), want)
    want = heat_rgba(word_heatmap(trace, "circle", size=viewer._frames.heat_size))
    assert np.array_equal(_arr(viewer.heat["circle"]["sum"]), want)
    # the second "a" is its own chip, with its own map
    assert viewer.heat["a#2"]["sum"] != viewer.heat["a"]["sum"]


def test_viewer_state_changes_switch_the_displayed_frames(trace):
    v = TraceViewer(trace)
    before = v.displayed()
    assert before["overlay"] is None
    _front_end_sends(v, step=1)  # the slider moved
    assert v.step == 1
    now = v.displayed()
    assert now["x0"] == v.frames["x0"][1] and now["x0"] != before["x0"]
    assert now["image"] == before["image"]
    _front_end_sends(v, word="circle")  # a chip was clicked
    ov1 = v.displayed()["overlay"]
    assert ov1 == v.heat["circle"]["steps"][v.heat_index[1]]
    _front_end_sends(v, step=3)
    assert v.displayed()["overlay"] == v.heat["circle"]["steps"][v.heat_index[3]] != ov1
    _front_end_sends(v, heat_mode="sum")
    assert v.displayed()["overlay"] == v.heat["circle"]["sum"]
    v.select_word("SQUARE")  # case-insensitive, from Python
    assert v.word == "square"
    v.select_word(None)
    assert v.displayed()["overlay"] is None


def test_viewer_rejects_bad_state(trace):
    v = TraceViewer(trace)
    with pytest.raises(traitlets.TraitError, match="out of range"):
        v.step = v.n_steps
    with pytest.raises(traitlets.TraitError, match="not a word"):
        v.word = "triangle"
    with pytest.raises(ValueError, match="words"):
        v.select_word("triangle")
    with pytest.raises(traitlets.TraitError, match="heat_mode"):
        v.heat_mode = "max"
    with pytest.raises(ValueError, match="choices"):
        v.layers = "sideways"
    assert v.layers == "all"
    with pytest.raises(ValueError, match="step"):
        TraceViewer(trace, step=99)
    with pytest.raises(ValueError, match="layers"):
        TraceViewer(trace, layers="nope")
    with pytest.raises(TypeError):
        TraceViewer("not a trace")


def test_viewer_layer_choice_recomputes_heatmaps(trace):
    from sdlens.analysis.heatmaps import word_heatmap

    v = TraceViewer(trace, word="circle")
    keys = [k for k, _ in v.layer_options]
    assert keys[0] == "all" and "res:8" in keys and "up" in keys
    all_sum = v.heat["circle"]["sum"]
    _front_end_sends(v, layers="res:8")
    assert v.word == "circle"  # the selection survives
    want = heat_rgba(word_heatmap(trace, "circle", layers=8, size=v._frames.heat_size))
    assert np.array_equal(_arr(v.heat["circle"]["sum"]), want)
    assert v.heat["circle"]["sum"] != all_sum
    layer = trace.attention.layers[0]
    v.layers = layer  # a single layer by module path
    want = heat_rgba(word_heatmap(trace, "circle", layers=layer, size=v._frames.heat_size))
    assert np.array_equal(_arr(v.heat["circle"]["sum"]), want)
    v.layers = "all"
    assert v.heat["circle"]["sum"] == all_sum  # cached


def test_viewer_batch_items(pipe):
    tr = generate(pipe, ["a red circle", "a blue square on the left"], seed=[1, 2], steps=3)
    v = TraceViewer(tr)
    assert len(v.batch_options) == 2
    assert "red circle" in v.title and "seed 1" in v.title
    x0_first = v.frames["x0"][-1]
    _front_end_sends(v, batch=1)
    assert "blue square" in v.title and "seed 2" in v.title
    assert "left" in v.word_keys and "red" not in v.word_keys
    assert v.frames["x0"][-1] != x0_first
    with pytest.raises(ValueError, match="out of range"):
        v.batch = 2
    assert v.batch == 1


def test_viewer_without_cfg_or_attention(pipe):
    tr = generate(pipe, PROMPT, seed=0, steps=3, guidance_scale=1.0)
    v = TraceViewer(tr)
    assert "cfg_delta" not in v.frames and "noise" in v.frames
    assert v.notes == ["no CFG delta: guidance off (scale 1; diffusers guides only above 1)"]
    assert "guidance off" in v.title and "CFG" not in v.title
    tr2 = generate(pipe, PROMPT, seed=0, steps=3, record=("latents", "x0"))
    v2 = TraceViewer(tr2)
    assert list(v2.frames) == ["x_t", "x0"] and v2.words == [] and v2.heat == {}
    assert any("attention" in n for n in v2.notes)
    assert v2.displayed()["overlay"] is None


def test_trace_displays_as_a_viewer(trace):
    bundle = trace._repr_mimebundle_()  # what a notebook calls to show a Trace
    if isinstance(bundle, tuple):
        bundle = bundle[0]
    assert "application/vnd.jupyter.widget-view+json" in bundle
    bundle = trace_mimebundle(trace)
    if isinstance(bundle, tuple):  # (data, metadata), as IPython accepts from _repr_mimebundle_
        bundle = bundle[0]
    view = bundle["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] and "text/plain" in bundle


def test_import_sdlens_loads_no_widget_packages():
    # the Trace's display imports the widgets on first use (the front door sets Trace.display_hook)
    code = ("import sys, sdlens; from sdlens.trace.core import Trace; "
            "assert Trace.display_hook is not None; "
            "print(sorted(m for m in ('anywidget', 'ipywidgets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


def test_frame_size_cap_and_jpeg(trace):
    v = TraceViewer(trace, max_side=32, fmt="jpeg")  # max_side caps the image size (64 here)
    assert v.frames["x0"][0][:2] == b"\xff\xd8"
    assert decode(v.frames["x0"][0]).size == (32, 32)
    assert decode(v.image).size == (32, 32)


def test_viewer_labels_say_what_is_shown(trace, pipe):
    # by default a cheap VAE at hand (this small one) decodes x_t / x0, and the label says so
    assert {p["name"]: p["label"] for p in TraceViewer(trace).panels}["x0"] == \
        "x0 prediction · VAE decode"
    v = TraceViewer(trace, decoder="linear")
    labels = {p["name"]: p["label"] for p in v.panels}
    assert labels["x_t"] == "x_t (latents) · linear preview"
    assert labels["x0"] == "x0 prediction · linear preview"
    # the live trace keeps its pipeline: a VAE decode is on offer, made on first use
    assert v.decoder_options == [["linear", "linear preview"], ["vae", "VAE decode"]]
    linear = v.frames["x0"][-1]
    _front_end_sends(v, decoder="vae")
    assert {p["name"]: p["label"] for p in v.panels}["x0"] == "x0 prediction · VAE decode"
    from sdlens.analysis.previews import preview

    want = np.asarray(preview(trace, "x0", -1, decoder="vae", size=64))
    assert np.abs(_arr(v.frames["x0"][-1])[..., :3].astype(int) - want.astype(int)).max() <= 1
    assert v.frames["x0"][-1] != linear
    _front_end_sends(v, decoder="linear")
    assert v.frames["x0"][-1] == linear  # cached
    # the legend: colour bar, normalisation in words, an opacity that keeps the object readable
    assert v.colorbar.startswith("linear-gradient(to right, rgb(0,0,128) 0%")
    assert v.heat_norms == {"step": "per step, min–max", "sum": "summed over steps, min–max"}
    assert v.opacity <= 0.5 and v.overlay_style == "fill"
    assert "←/→ step" in v.help and "space play/pause" in v.help and "Home/End" in v.help
    _front_end_sends(v, overlay_style="outline")
    assert v.overlay_style == "outline"
    with pytest.raises(traitlets.TraitError, match="overlay_style"):
        v.overlay_style = "dots"
    with pytest.raises(ValueError, match="decoder"):
        TraceViewer(trace, decoder="magic")


def test_viewer_notes_give_the_real_reason(pipe):
    from sdlens.experiments.sweep import sweep

    grid = sweep(pipe, "a red circle", seeds=[0], guidance_scales=[1.0, 7.5], steps=3, progress=False)
    guided = TraceViewer(grid.traces[1])  # CFG 7.5, but a light trace: no noise
    assert "CFG 7.5" in guided.title
    assert guided.notes == ["noise not recorded: sweeps record light traces; `record=...` keeps it "
                            "(no guided-noise or CFG-delta panel)"]
    assert not any("guidance" in n for n in guided.notes)
    # an empty prompt is unconditional sampling: no chips, and the viewer says why
    tr = generate(pipe, "", seed=0, steps=2)
    v = TraceViewer(tr)
    assert v.words == [] and "empty prompt: no words to map" in v.notes


def test_guidance_below_one_warns_and_seeds_are_checked(pipe):
    with pytest.warns(UserWarning, match="guidance_scale=-1 is below 1"):
        tr = generate(pipe, PROMPT, seed=0, steps=2, guidance_scale=-1)
    assert not tr.do_cfg and "guidance off" in TraceViewer(tr).title
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(pipe, PROMPT, seed=0, steps=2, guidance_scale=1.0)  # 1 stays quiet
    for seed in (-3, 2 ** 64, [0, -1]):
        with pytest.raises(ValueError, match=r"outside 0\.\.2\*\*64-1"):
            generate(pipe, PROMPT, seed=seed, steps=2)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        generate(pipe, PROMPT, seed=0, steps=0)
    big = generate(pipe, PROMPT, seed=2 ** 64 - 1, steps=2)
    assert big.meta["seeds"] == [2 ** 64 - 1] and f"seed {2 ** 64 - 1}" in TraceViewer(big).title


def test_ab_view_columns_shared_step_and_difference(pipe):
    from sdlens.pipeline import make_scheduler
    from sdlens.widgets import ABView

    original = pipe.scheduler
    try:
        pipe.scheduler = make_scheduler("ddim", original.config)
        a = generate(pipe, PROMPT, seed=0, steps=4)
        pipe.scheduler = make_scheduler("euler", original.config)
        b = generate(pipe, PROMPT, seed=0, steps=4)
    finally:
        pipe.scheduler = original
    ab = ABView(a, b)
    assert ab.panel.differs == [["scheduler", "DDIM", "EulerDiscrete"]]
    assert [c.children[1] for c in ab.columns.children] == [ab.viewer_a, ab.viewer_b]
    assert "<span class='sdl-differs'>scheduler EulerDiscrete</span>" in ab.columns.children[1].children[0].value
    assert ab.panel.n_steps == 4 and len(ab.panel.x0_diff) == 4
    # the x0 difference: |x0_A - x0_B| in the linear preview, brightest at the largest difference
    assert ab.panel.x0_scale > 0
    assert set(ab.panel.heat_diff) == set(ab.viewer_a.word_keys)
    ab.step = 2
    assert ab.viewer_a.step == ab.viewer_b.step == ab.panel.step == 2
    same = ABView(a, a)
    assert same.panel.differs == [] and same.panel.summary.startswith("never parted")
    assert _arr(same.panel.x0_diff[0])[..., :3].max() == _arr(same.panel.x0_diff[-1])[..., :3].max()


# ------------------------------------------------------------------------------ Studio
def test_studio_streams_x0_and_becomes_a_viewer_then_ab(pipe):
    from sdlens.analysis.previews import preview

    s = Studio(pipe, steps=4, seed=3)
    s.generate_button.click()  # the Generate button: runs in a background thread
    s.wait(300)
    assert s.error is None, s.error
    tr = s.traces[-1]
    n = len(tr.timesteps)
    assert len(s.streamed) == n and s.progress.value == n == s.progress.max
    # the last streamed frame is the x0 prediction of the last step (streamed as the instant
    # linear preview while the run goes on)
    live = _arr(s.streamed[-1])[..., :3]
    want = np.asarray(preview(tr, "x0", -1, decoder="linear", size=live.shape[:2]))
    assert np.abs(live.astype(int) - want.astype(int)).max() <= 1
    assert s.live.value == s.streamed[-1]
    assert isinstance(s.viewer, TraceViewer) and s.viewer.trace is tr
    assert s.live_box.layout.display == "none" and len(s.results.children) == 1
    assert tr.meta["seeds"] == [3] and tr.guidance_scale == 7.5

    s.guidance_scale.value = 3.0
    s.generate(wait=True, timeout=300)
    assert len(s.runs) == 2 and s.results.children == (s.ab,)
    assert s.ab_diff() == {"guidance_scale": (7.5, 3.0)}
    # A/B: two columns, one slider, the differing setting highlighted in both headers
    col_a, col_b = s.ab.columns.children
    assert col_a.children[1] is s.runs[0]["viewer"] and col_b.children[1] is s.runs[1]["viewer"]
    assert "<span class='sdl-differs'>CFG 3</span>" in col_b.children[0].value
    assert "<span class='sdl-differs'>CFG 7.5</span>" in col_a.children[0].value
    assert s.ab.panel.differs == [["CFG", "7.5", "3"]]  # the headers' word for it
    assert len(s.ab.panel.x0_diff) == n
    s.ab.step = 1
    assert s.runs[0]["viewer"].step == s.runs[1]["viewer"].step == 1
    assert s.traces[1].guidance_scale == 3.0
    assert not torch.equal(s.traces[0].x0, s.traces[1].x0)
    s.seed.value = 4
    s.generate(wait=True, timeout=300)
    assert len(s.runs) == 2 and s.ab_diff() == {"seed": (3, 4)}  # keeps the last two


def test_studio_interrupt_restores_the_pipeline(pipe):
    s = Studio(pipe, steps=20)
    procs = dict(pipe.unet.attn_processors)
    cls = type(pipe)
    scheduler = pipe.scheduler

    def press_interrupt(change):  # runs in the sampling thread, as the kernel would in between
        if change["new"] == 2:
            s.interrupt_button.click()

    s.progress.observe(press_interrupt, names="value")
    s.scheduler.value = "euler"
    s.generate()
    s.wait(300)
    assert s.interrupted_at == 2 and s.runs == [] and s.error is None
    assert "interrupted" in s.status.value
    assert len(s.streamed) == 2
    assert type(pipe) is cls and "step" not in vars(pipe.scheduler)
    assert pipe.scheduler is scheduler  # the scheduler choice is undone
    assert all(pipe.unet.attn_processors[k] is v for k, v in procs.items())
    assert not s.generate_button.disabled and s.interrupt_button.disabled
    # and the pipeline still works, traced or not
    s.progress.unobserve(press_interrupt, names="value")
    s.steps.value = 3
    s.generate(wait=True, timeout=300)
    assert s.error is None and len(s.runs) == 1
    assert s.traces[0].meta["scheduler_class"] == "EulerDiscreteScheduler"
    assert pipe.scheduler is scheduler


def test_studio_reports_errors_in_the_panel(pipe):
    s = Studio(pipe, steps=2)
    s.steps.value = 0  # a number box: 0 stays 0 (a slider would clamp it to 1 silently)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        s.generate()
    assert s.steps.value == 0 and "not run: steps must be at least 1" in s.status.value
    s.generate_button.click()  # the button shows the message and raises nothing
    assert "not run" in s.status.value and s.runs == []
    s.steps.value = 2
    s.seed.value = -3
    with pytest.raises(ValueError, match=r"outside 0\.\.2\*\*64-1"):
        s.generate()
    assert "18446744073709551613" in s.status.value and s.runs == []  # says what torch would do
    s.seed.value = 0
    with pytest.raises(ValueError, match="outside"):
        Studio(pipe, seed=-1)
    with pytest.raises(ValueError, match="steps"):
        Studio(pipe, steps=0)
    s.prompt.value = PROMPT
    s.steps.value = 2
    s.record_kwargs = {"layers": "no-such-layer"}
    s.generate(wait=True, timeout=300)
    assert s.error is not None and "no-such-layer" in s.status.value
    assert s.runs == [] and not s.running
    with pytest.raises(ValueError, match="scheduler"):
        Studio(pipe, scheduler="warp")


# ------------------------------------------------------------------------------ GridViewer
def test_grid_viewer_labels_and_cell_clicks(pipe):
    from sdlens.experiments.sweep import sweep

    grid = sweep(pipe, "a red circle", seeds=[0, 1], guidance_scales=[1.0, 7.5], steps=3, progress=False)
    g = GridViewer(grid)
    assert g.panel.row_labels == ["CFG 1", "CFG 7.5"]
    assert g.panel.col_labels == ["seed 0", "seed 1"]
    assert len(g.panel.thumbs) == 4
    assert np.array_equal(_arr(g.panel.thumbs[2])[..., :3], np.asarray(grid.images[1, 0].convert("RGB")))
    assert g.viewer is None
    _front_end_sends(g.panel, selected=3)  # a click on row 1, column 1
    assert g.viewer is not None and g.viewer.trace is grid.traces[1, 1]
    assert "seed 1" in g.detail_title.value or "seed" in g.detail_title.value
    v = g.select(0, 1)
    assert g.selected == 1 and v.trace is grid.traces[0, 1]
    assert g.select(1, 1) is g.viewer_at(3)  # built once per cell
    with pytest.raises(ValueError, match="out of range"):
        g.panel.selected = 4


# ------------------------------------------------------------------------------ TokenView
def test_token_view(trace, pipe):
    tv = TokenView(trace)
    ids = [r["id"] for r in tv.rows]
    assert ids == trace.token_ids[0]
    shares = [r["share"] for r in tv.rows if r["share"] is not None]
    assert len(shares) == len(trace.token_ids[0]) - 2 and abs(sum(shares) - 1) < 1e-6
    assert "7 of 75" in tv.title
    _front_end_sends(tv, hovered=3)
    assert tv.hover_text() == f"position 3 · id {trace.token_ids[0][3]} · token 'circle</w>' · word 'circle'"
    with pytest.warns(UserWarning, match="longer than 75 tokens"):
        long = generate(pipe, " ".join(["red circle"] * 45), seed=0, steps=2, record=("latents",))
    tl = TokenView(long)
    cut = [r for r in tl.rows if r["cut"]]
    assert cut and [r["text"] for r in cut] == long.truncated_words[0]
    assert "cut by the 77-token limit" in tl.footer and "no attention" in tl.footer
