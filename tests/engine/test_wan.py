"""Wan 2.1 / 2.2 video traces: the test beds, the adapter, the frame axis through the Trace.

Tiny random-weight pipelines (2 blocks, 9 frames at 32 x 32: 3 latent frames of 4 x 4, maps
(3, 2, 2)); the full-size ones are built on the meta device."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from PIL import Image

import sdlens
from sdlens.analysis.heatmaps import word_activity
from sdlens.engine.arch import adapter_for
from sdlens.engine.text import word_positions
from sdlens.testing import random_pipeline, wan_pipeline
from sdlens.trace.compact import map_bytes
from test_kernel_maps import KernelSpy, explicit

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle on the beach"
CALL = dict(prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=3,
            output_type="latent")


@functools.lru_cache(maxsize=None)
def pipe_of(arch: str):
    return random_pipeline(arch, seed=0)


def inputs(arch: str) -> dict:
    return dict(image=Image.new("RGB", (32, 32), (200, 30, 30))) if arch == "wan-i2v" else {}


def traced(arch: str, spy_sites: bool = False, **options):
    """(trace, untraced latents, traced latents, spy or None)."""
    pipe = pipe_of(arch)
    call = {**CALL, **inputs(arch)}
    plain = pipe(generator=torch.Generator().manual_seed(0), **call).frames
    spy = None
    if spy_sites:
        adapter = adapter_for(pipe)
        spy = KernelSpy(adapter.denoiser, adapter.sites())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="sdlens")  # nothing skipped
            if spy is not None:
                with spy, sdlens.trace(pipe, attention_dtype=torch.float32, **options) as tr:
                    out = pipe(generator=torch.Generator().manual_seed(0), **call).frames
            else:
                with sdlens.trace(pipe, **options) as tr:
                    out = pipe(generator=torch.Generator().manual_seed(0), **call).frames
    finally:
        if spy is not None:
            spy.remove()
    return tr.runs[-1], plain, out, spy


@pytest.mark.parametrize("arch", ["wan", "wan-i2v", "wan22"])
def test_traced_video_equals_untraced_and_the_trace_has_frames(arch):
    tr, plain, out, _ = traced(arch)
    assert torch.equal(plain, out), "tracing changed the video"
    pipe = pipe_of(arch)
    blocks = pipe.transformer.config.num_layers
    # (steps + 1, batch, C, latent frames, h, w); the last latents are what the pipeline returned
    assert tuple(tr.latents.shape) == (4, 1, 16, 3, 4, 4)
    assert torch.equal(tr.latents[-1], out)
    assert torch.equal(tr.x0[-1], out)  # the last x0 is the final latents (flow, sigma -> 0)
    for name in ("noise", "noise_text", "noise_uncond", "x0"):
        assert tuple(getattr(tr, name).shape) == (3, 1, 16, 3, 4, 4), name
    assert tr.do_cfg and tr.meta["denoiser_calls"] == 2 * 3  # CFG: two transformer calls a step
    assert tr.meta["latent_frames"] == 3 and tr.meta["num_frames"] == 9
    assert tr.meta["vae_scale_factor_temporal"] == 4
    # every cross-attention site, counted against the config, at (frames, h / 2, w / 2)
    maps = tr.attention
    assert maps.layers == [f"blocks.{i}.attn2" for i in range(blocks)]
    assert all(maps.resolution(l) == (3, 2, 2) for l in maps.layers)
    assert maps.steps == [0]  # Wan's default: maps every 5th step
    words = [t for t in tr.tokens[0]]
    assert words[-1 if arch != "wan-i2v" else -6] == "</s>"  # padding left out
    n_img = 5 if arch == "wan-i2v" else 0  # I2V: the image-context tokens, a segment after the text
    assert maps[maps.layers[0]].shape == (1, 1, len(tr.tokens[0]), 3, 2, 2)
    assert sum(t.startswith("<image prompt 0:") for t in tr.tokens[0]) == n_img
    if arch == "wan-i2v":
        assert tr.meta["image_context"] == {"tokens": [5]} and "ip_adapter" not in tr.meta


def test_wan22_records_both_experts_under_one_trace():
    tr, plain, out, _ = traced("wan22", steps=slice(None))
    pipe = pipe_of("wan22")
    boundary = 0.875 * pipe.scheduler.config.num_train_timesteps
    want = ["transformer" if float(t) >= boundary else "transformer_2" for t in tr.timesteps]
    assert "transformer_2" in want and "transformer" in want  # the test covers a switch
    assert tr.meta["denoiser_steps"] == want
    assert tr.meta["switch_step"] == want.index("transformer_2")
    assert tr.meta["boundary_ratio"] == 0.875 and tr.meta["guidance_scale_2"] == 5.0
    assert tr.attention.steps == [0, 1, 2]  # maps from both experts
    # the low-noise expert's maps are its own: they differ from what the first expert would give
    assert tr.attention[tr.attention.layers[0]].isfinite().all()


def test_wan22_maps_come_from_the_expert_that_ran():
    """Each recorded step's maps equal the explicit softmax of the kernel call of the expert
    that predicted the step (the spy watches both)."""
    pipe = pipe_of("wan22")
    adapter = adapter_for(pipe)
    spies = [KernelSpy(m, adapter.sites()) for m in adapter.denoisers()]
    call = dict(CALL)
    try:
        with spies[0], spies[1], sdlens.trace(pipe, attention_dtype=torch.float32,
                                              steps=slice(None)) as tr:
            pipe(generator=torch.Generator().manual_seed(0), **call)
    finally:
        for s in spies:
            s.remove()
    tr = tr.runs[-1]
    names = tr.meta["denoiser_steps"]
    calls = {"transformer": 0, "transformer_2": 0}
    layer = tr.attention.layers[-1]
    for step, name in enumerate(names):
        spy = spies[0 if name == "transformer" else 1]
        q, k, mask, scale = spy.calls[(calls[name], layer)][0]  # the text call of the step
        calls[name] += 2
        p = explicit(q, k, mask, scale).mean(1)[..., tr.attention.token_positions]
        got = tr.attention[layer][step].double().flatten(-3)  # (B, T, F h w)
        torch.testing.assert_close(got, p.transpose(-1, -2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["wan", "wan-i2v"])
def test_maps_equal_the_explicit_softmax_of_the_kernels_q_k(arch):
    """q / k captured independently at SDPA; per step the text (conditional) call comes first.
    I2V: the image-context call comes first in a site call, with its own softmax."""
    tr, _, _, spy = traced(arch, spy_sites=True, steps=slice(None))
    maps = tr.attention
    n_text = len(maps.token_positions) - (5 if arch == "wan-i2v" else 0)
    checked = 0
    for layer in maps.layers:
        for i, step in enumerate(maps.steps):
            calls = spy.calls[(2 * step, layer)]  # denoiser call 2s: the prompt's
            if arch == "wan-i2v":
                (qi, ki, mi, si), (q, k, m, s) = calls[:2]
                assert ki.shape[2] == 5 and k.shape[2] == 512
                image = explicit(qi, ki, mi, si).mean(1)
            else:
                (q, k, m, s), image = calls[0], None
                assert k.shape[2] == 512  # every UMT5 position is a key (padding zeroed)
            text = explicit(q, k, m, s).mean(1)[..., maps.token_positions[:n_text]]
            want = text if image is None else torch.cat([text, image], -1)
            got = maps[layer][i].double().flatten(-3)
            torch.testing.assert_close(got, want.transpose(-1, -2), atol=1e-6, rtol=0)
            checked += 1
    assert checked == len(maps.layers) * 3


def test_a_word_acting_on_one_frame_shows_on_that_frame():
    """Constructed: at every site, the queries of latent frame 1's patches are set to a vector
    that scores the word "beach"'s key high and every other distinct key 0 (the key of each
    text position is computed from the site's own projections); the other frames keep theirs.
    The word's heatmap and activity then sit on frame 1."""
    pipe = pipe_of("wan")
    adapter = adapter_for(pipe)
    target = word_positions(pipe, PROMPT, "beach")
    assert len(target) == 1
    frames, hw = 3, 4  # latent frames; patches per frame (2 x 2)
    handles = []

    def edit(attn):
        keys = {}

        def pre(module, args, kwargs):
            ehs = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
            keys["k"] = attn.norm_k(attn.to_k(ehs)).unflatten(-1, (attn.heads, -1))

        def post(module, args, out):
            k = keys["k"]  # (B, L, heads, d)
            q = out.unflatten(-1, (attn.heads, -1)).clone()
            for b in range(k.shape[0]):
                for h in range(attn.heads):
                    distinct, inverse = torch.unique(k[b, :, h], dim=0, return_inverse=True)
                    goal = torch.zeros(distinct.shape[0])
                    goal[inverse[target[0]]] = 30.0 * k.shape[-1] ** 0.5  # SDPA's scale
                    vec = torch.linalg.lstsq(distinct, goal[:, None]).solution[:, 0]
                    q[b, hw: 2 * hw, h] = vec
            return q.flatten(-2)

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.norm_q.register_forward_hook(post))

    for site in adapter.sites():
        edit(pipe.transformer.get_submodule(site))
    try:
        tr = sdlens.generate(pipe, PROMPT, seed=0, steps=2, num_frames=9, height=32, width=32,
                             output_type="latent", attention_steps=slice(None),
                             attention_dtype=torch.float32)
    finally:
        for h in handles:
            h.remove()
    activity = word_activity(tr, "beach")
    assert activity.shape == (frames,)
    assert activity[1] > 0.9 and activity[0] < 0.1 and activity[2] < 0.1, activity
    heat = tr.heatmap("beach")  # (frames, H, W), normalised over the clip
    assert heat.shape == (frames, 32, 32)
    assert heat[1].min() > 0.9 and heat[0].max() < 0.1 and heat[2].max() < 0.1
    other = word_activity(tr, "red")
    assert other[1] < 0.05  # frame 1's patches look at "beach" only


def test_heatmap_frame_and_per_step_options():
    tr, _, _, _ = traced("wan", steps=slice(None))
    clip = tr.heatmap("circle")
    assert clip.shape == (3, 32, 32) and 0 <= float(clip.min()) and float(clip.max()) == 1.0
    torch.testing.assert_close(tr.heatmap("circle", frame=2), clip[2])
    torch.testing.assert_close(tr.heatmap("circle", frame=-1), clip[2])
    per = tr.heatmap("circle", per_step=True)
    assert per.shape == (3, 3, 32, 32)
    assert tr.heatmap("circle", per_step=True, frame=0).shape == (3, 32, 32)
    assert word_activity(tr, "circle", per_step=True).shape == (3, 3)
    with pytest.raises(ValueError, match="latent frames"):
        tr.heatmap("circle", frame=3)
    with pytest.raises(ValueError, match="video"):
        tr.heatmap("circle", pooling="daam")


def test_video_trace_saves_and_loads_lazily(tmp_path):
    tr, _, _, _ = traced("wan")
    back = sdlens.load(tr.save(tmp_path / "wan.sdlens"))
    assert back.meta["latent_frames"] == 3
    for name in ("latents", "noise", "noise_text", "noise_uncond", "x0"):
        assert torch.equal(getattr(back, name), getattr(tr, name)), name
    layer = tr.attention.layers[0]
    assert back.attention.resolution(layer) == (3, 2, 2)
    assert torch.equal(back.attention[layer], tr.attention[layer])
    torch.testing.assert_close(back.heatmap("circle"), tr.heatmap("circle"))


def test_trace_build_checks_the_frame_axis():
    tr, _, _, _ = traced("wan")
    fields = tr.fields()
    bad = dict(fields, latents=fields["latents"][:, :, :, :2])  # 2 frames, meta says 3
    with pytest.raises(ValueError, match="latents"):
        type(tr).build(**bad)
    image_like = dict(fields, meta={k: v for k, v in fields["meta"].items() if k != "latent_frames"})
    with pytest.raises(ValueError, match="latents"):  # 6 dims in an image trace
        type(tr).build(**image_like)


def test_size_estimate_matches_a_video_trace_and_the_default_wan_trace():
    from sdlens.engine.options import RecordOptions, estimate_trace_bytes

    tr, _, _, _ = traced("wan", steps=slice(None))
    est = tr.meta["estimated_bytes"]
    assert est["latents"] == tr.latents.nbytes and est["x0"] == tr.x0.nbytes
    assert est["noise"] == tr.noise.nbytes + tr.noise_text.nbytes + tr.noise_uncond.nbytes
    held = tr.nbytes()  # the maps as stored: "auto" picks 8-bit codes for this small trace
    assert est["attention"] == held["attention"]
    assert tr.meta["estimated_storage"]["attention"].startswith("uint8 codes")
    shapes = [tr.attention[l].shape for l in tr.attention.layers]  # (S, B, T, F, h, w)
    assert all(len(s) == 6 for s in shapes)
    assert held["attention"] == sum(math.prod(s[:3]) * map_bytes(math.prod(s[3:]), 8)
                                    for s in shapes)
    # the real Wan 2.1 1.3B at its defaults (480 x 832, 81 frames: 21 x 60 x 104 latents),
    # 50 steps, CFG, a 20-token prompt; built on the meta device
    with torch.device("meta"):
        full = wan_pipeline("wan", scale=1.0)
    default = estimate_trace_bytes(full, batch=1, steps=50, n_tokens=20)
    every = estimate_trace_bytes(full, batch=1, steps=50, n_tokens=20,
                                 options=RecordOptions(steps=slice(None)))
    per = 16 * 21 * 60 * 104 * 4
    assert default["latents"] == 51 * per and default["x0"] == 50 * per
    # "auto": the latents alone pass 200 MB, so 4-bit codes (a 21 x 30 x 52 map: 16380 bytes
    # of codes + a 4-byte scale), with maps at every 5th step (the video rule) on top
    assert default.attention_dtype == every.attention_dtype == torch.uint4
    assert every["attention"] == 50 * 30 * 20 * (21 * 30 * 52 // 2 + 4)  # steps x sites x tokens
    assert default["attention"] == every["attention"] // 5  # maps at every 5th step by default
    assert 2.15e9 < sum(default.values()) < 2.25e9 and 2.55e9 < sum(every.values()) < 2.65e9


def test_full_size_wan_parameter_counts():
    """The real configs, on the meta device: Wan 2.1 T2V 1.3B, 14B, I2V 14B, Wan 2.2 A14B."""
    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):
        small = wan_pipeline("wan", scale=1.0, size="1.3B")
        assert 1.40e9 < count(small.transformer) < 1.44e9
        assert 5.6e9 < count(small.text_encoder) < 5.8e9  # UMT5-XXL's encoder
        assert 1.2e8 < count(small.vae) < 1.3e8
        big = wan_pipeline("wan", scale=1.0, size="14B")
        assert 14.2e9 < count(big.transformer) < 14.4e9
        i2v = wan_pipeline("wan-i2v", scale=1.0)
        assert 16.3e9 < count(i2v.transformer) < 16.5e9 and i2v.transformer.config.in_channels == 36
        two = wan_pipeline("wan22", scale=1.0)
        assert count(two.transformer) == count(two.transformer_2) == count(big.transformer)
        assert two.config.boundary_ratio == 0.875


def test_heatmap_video_export_opens_with_the_clips_frames_and_size(tmp_path):
    from sdlens.analysis.previews import decode_clip
    from sdlens.analysis.video import latent_frames_of_clip

    tr, _, _, _ = traced("wan")
    assert latent_frames_of_clip(tr) == [0, 1, 1, 1, 1, 2, 2, 2, 2]  # 9 frames, 4x in time
    clip = decode_clip(tr)  # the traced pipeline's VAE
    assert clip.shape == (9, 32, 32, 3) and clip.dtype.name == "uint8"
    path = sdlens.plot.heatmap_video(tr, "circle", tmp_path / "circle.gif", fps=4)
    with Image.open(path) as gif:
        assert gif.n_frames == 9 and gif.size == (32, 32)
        assert gif.info["duration"] == 250
    fig = sdlens.plot.word_activity(tr, ["red", "circle"])
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[0].lines[0].get_xdata()) == 3
    # previews of one latent frame: the channels preview, or the VAE's first clip frame of it
    from sdlens.analysis.previews import preview_array

    assert preview_array(tr, "x0", frame=2).shape == (32, 32, 3)
    assert (preview_array(tr, "x0", frame=1, decoder="vae") == clip[1]).all()
    # from the CLI, for a saved trace (no pipeline: the latents' channel preview)
    from sdlens.views.cli import main

    saved = tr.save(tmp_path / "clip.sdlens")
    assert main(["video", str(saved), "--word", "beach", "--fps", "2"]) == 0
    with Image.open(tmp_path / "clip-beach.gif") as gif:
        # without a VAE each latent frame is one still (the GIF merges equal frames): 3 stills
        # lasting 1, 4 and 4 video frames at 2 fps
        assert gif.n_frames == 3 and gif.size == (32, 32)
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
        assert durations == [500, 2000, 2000]
    with pytest.raises(ValueError, match="GIF"):
        sdlens.plot.heatmap_video(tr, "circle", tmp_path / "circle.mp4")


def test_trace_viewer_has_a_frame_axis():
    from sdlens.widgets import TraceViewer

    tr, _, _, _ = traced("wan", steps=slice(None))
    v = TraceViewer(tr, word="beach", max_side=32, heat_side=16)
    assert v.n_frames == 3 and v.frame == 0 and "↑/↓ frame" in v.help
    assert all(len(f) == 3 * 3 for f in v.frames.values())  # steps x frames, step-major
    assert {"x_t", "x0", "noise", "cfg_delta"} <= set(v.frames)
    assert len(v.heat["beach"]["steps"]) == 9 and len(v.heat["beach"]["sum_frames"]) == 3
    first = v.displayed()
    v.frame = 2
    moved = v.displayed()
    assert moved["x0"] == v.frames["x0"][v.step * 3 + 2] and moved["x0"] != first["x0"]
    assert moved["overlay"] != first["overlay"]
    v.step = 0
    assert v.displayed()["x0"] == v.frames["x0"][2]
    with pytest.raises(Exception, match="frame"):
        v.frame = 3


def test_report_of_a_video_trace_has_a_clip_per_word(tmp_path):
    from sdlens.views.report import write_report

    tr, _, _, _ = traced("wan")
    text = write_report(tr, tmp_path / "wan.html").read_text()
    assert text.count("data:image/gif;base64,") == 6  # a, red, circle, on, the, beach
    assert "Each word over the clip" in text and "Words over time" in text
    assert "Not available" not in text


@pytest.mark.parametrize("arch", ["wan", "wan22"])
def test_video_sweep_cells_equal_single_runs(arch):
    """Two guidance scales in one batch: the per-sample guidance rewrites the negative call's
    output (Wan runs the halves as two calls), on both of Wan 2.2's experts."""
    import numpy as np

    pipe = pipe_of(arch)
    kw = dict(num_frames=9, height=32, width=32)
    grid = sdlens.sweep(pipe, PROMPT, seeds=[0], guidance_scales=[3.0, 5.0], steps=3,
                        progress=False, **kw)
    assert grid.video and grid.arrays.shape == (2, 9, 32, 32, 3)
    for j, gs in enumerate([3.0, 5.0]):
        ref = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), guidance_scale=gs,
                   num_inference_steps=3, output_type="np", **kw).frames[0]
        assert np.abs(grid.arrays[j] - ref).max() < 1e-4
        tr = grid.trace(guidance=gs)
        assert tr.latents.shape[3] == 3 and tr.guidance_scale == gs
    assert len(grid.images[0]) == 9 and grid.images[0][0].size == (32, 32)
    assert len(grid.plot(frame=4).axes) == 2
    with pytest.raises(ValueError, match="frame=99 is out of range"):
        grid.plot(frame=99)
    with pytest.raises(ValueError, match="video pipeline's sweep runs in memory only"):
        sdlens.sweep(pipe, PROMPT, seeds=[0], steps=1, progress=False, out="unused", **kw)
    if arch == "wan":  # the GridViewer plays the clips: each cell an animated GIF
        import io

        from sdlens.widgets import GridViewer

        gv = GridViewer(grid)
        assert len(gv.panel.thumbs) == 2
        with Image.open(io.BytesIO(gv.panel.thumbs[0])) as gif:
            assert gif.format == "GIF" and gif.n_frames > 1


class _WanEqualizer:
    """The equalizer written out on Wan's cross-attention: ``dispatch_attention_fn`` replaced
    by a float64 softmax over the text keys whose columns ``cols`` are multiplied by ``weight`` in
    the ``attn2`` calls of the experts in ``experts``, in the prompt's call of each step (the
    first of the step's two calls), at the steps ``steps``."""

    def __init__(self, pipe, cols: list[int], weight: float, steps: set[int]):
        self.cols, self.weight, self.steps = cols, weight, steps
        self.calls = 0  # denoiser calls (two per step: the prompt's, then the negative one)
        self.site = False
        self.edits = 0
        self.handles = []
        for model in (pipe.transformer, pipe.transformer_2):
            self.handles.append(model.register_forward_pre_hook(self.count))
            for block in model.blocks:
                self.handles.append(block.attn2.register_forward_pre_hook(
                    lambda *_: setattr(self, "site", True)))
                self.handles.append(block.attn2.register_forward_hook(
                    lambda *_: setattr(self, "site", False)))

    def count(self, *_):
        self.calls += 1

    def attention(self, query, key, value, attn_mask=None, **_):
        q, k, v = (t.transpose(1, 2).double() for t in (query, key, value))  # (B, H, L, D)
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        step, prompt_call = (self.calls - 1) // 2, (self.calls - 1) % 2 == 0
        if self.site and prompt_call and step in self.steps:
            probs[..., self.cols] *= self.weight
            self.edits += 1
        return (probs @ v).transpose(1, 2).to(query.dtype)


@pytest.mark.parametrize("which", ["second expert", "both experts"])
def test_wan22_reweighting_steers_both_experts(which, monkeypatch):
    """Reweighting reaches the low-noise expert too: a weight of 1 is the untraced video; 4 on
    the second expert's steps (or on every step) equals the explicit equalizer there."""
    import diffusers.models.transformers.transformer_wan as wan_module

    pipe = pipe_of("wan22")
    plain = pipe(generator=torch.Generator().manual_seed(0), **CALL).frames
    run = dict(seed=0, steps=3, num_frames=9, height=32, width=32, output_type="latent")
    same = sdlens.generate(pipe, PROMPT, reweight={"red": 1.0}, **run)
    assert torch.equal(same.latents[-1], plain)
    switch = same.meta["switch_step"]
    window = (switch, None) if which == "second expert" else None
    steered = sdlens.generate(pipe, PROMPT, reweight={"red": 4.0}, reweight_steps=window, **run)
    assert (steered.latents[-1] - plain).abs().max() > 1e-4
    pos = word_positions(pipe, PROMPT, "red")
    assert pos == steered.meta["reweight"]["positions"] and len(pos) == 2  # UMT5: r, ed
    steps = set(range(switch if which == "second expert" else 0, 3))
    eq = _WanEqualizer(pipe, pos, 4.0, steps)
    monkeypatch.setattr(wan_module, "dispatch_attention_fn", eq.attention)
    try:
        ref = pipe(generator=torch.Generator().manual_seed(0), **CALL).frames
    finally:
        for h in eq.handles:
            h.remove()
    blocks = pipe.transformer.config.num_layers
    assert eq.calls == 6 and eq.edits == blocks * len(steps)
    torch.testing.assert_close(steered.latents[-1], ref.float(), rtol=1e-4, atol=1e-5)
