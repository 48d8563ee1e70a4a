"""Downstream of the trace for Qwen-Image (joint attention over ``[text; image]``, true CFG as a
second call) and Z-Image (single stream ``[image; template; text]``, CFG in one batch, prompts
first): heatmaps with every pooling, plots, report, widgets, CFG sweeps, reweighting and
ablation at the kernel against an explicit equalizer, token_effects, compare, save / load and
``sdlens info``. Tiny random-weight beds (sdlens.testing), CPU fp32, 2 steps, 32 px."""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import sdlens
from sdlens import plot
from sdlens.analysis.guidance import guidance_kind
from sdlens.analysis.heatmaps import POOLINGS, word_heatmap
from sdlens.engine.text import word_positions
from sdlens.testing import call_kwargs_2026, random_pipeline
from sdlens.views.cli import describe_trace, main
from sdlens.views.report import build_report

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red cat on the beach"
NEGATIVE = "a dog"
STEPS = 2
ARCHS = ("qwen-image", "z-image")
# each family's guided call: Qwen-Image guides with a negative prompt (true CFG, its
# true_cfg_scale, which sdlens' guidance_scale sets); Z-Image guides above 0
GUIDED = {"qwen-image": dict(negative_prompt=NEGATIVE, guidance_scale=4.0),
          "z-image": dict(guidance_scale=4.0)}


@functools.lru_cache(maxsize=None)
def pipe(arch: str):
    return random_pipeline(arch, seed=0)


def extra(arch: str) -> dict:
    """The bed's call keywords other than prompt / steps / generator / output type."""
    kw = call_kwargs_2026(arch)
    return {k: v for k, v in kw.items()
            if k not in ("prompt", "num_inference_steps", "generator", "output_type")}


@functools.lru_cache(maxsize=None)
def generated(arch: str, seed: int = 0):
    return sdlens.generate(pipe(arch), PROMPT, seed=seed, steps=STEPS, **GUIDED[arch],
                           **extra(arch))


def plain_latents(arch: str, **call) -> torch.Tensor:
    """The untraced run's final latents, as the trace holds them (B, 16, 4, 4)."""
    p = pipe(arch)
    g = dict(GUIDED[arch])
    if arch == "qwen-image":
        g["true_cfg_scale"] = g.pop("guidance_scale")
    out = p(**call_kwargs_2026(arch, steps=STEPS, **g, **call)).images
    if arch == "qwen-image":  # packed (B, 4, 64) -> (B, 16, 4, 4)
        from sdlens.engine.arch import adapter_for

        return adapter_for(p).spatial(out, (4, 4)).float()
    return out.float()


# ----------------------------------------------------------------------------- reweighting
IMAGE_TOKENS = 4  # 32 px: 4x4 latents, 2x2 patches


class Equalizer:
    """The equalizer written out: the attention kernel of the family's processor replaced by a
    float64 softmax over all keys whose image-query rows' column ``col`` is multiplied by
    ``weight`` (not renormalised), in the prompts' rows of the batch, in the sites' calls only
    (not Z-Image's refiners), not in true CFG's negative call. ``seen`` keeps the image rows'
    probabilities on ``col`` before the edit, head-averaged: (B, 4) per site call."""

    def __init__(self, arch: str, col, weight: float):
        self.arch, self.col, self.weight = arch, col, weight
        self.site = False
        self.calls = 0  # denoiser calls
        self.seen: list[torch.Tensor] = []

    def install(self, monkeypatch, p):
        if self.arch == "qwen-image":
            import diffusers.models.transformers.transformer_qwenimage as module
            sites = [b.attn for b in p.transformer.transformer_blocks]
        else:
            import diffusers.models.transformers.transformer_z_image as module
            sites = [layer.attention for layer in p.transformer.layers]
        monkeypatch.setattr(module, "dispatch_attention_fn", self.attention)
        handles = [p.transformer.register_forward_pre_hook(self.count)]
        for m in sites:
            handles.append(m.register_forward_pre_hook(lambda *_: setattr(self, "site", True)))
            handles.append(m.register_forward_hook(lambda *_: setattr(self, "site", False)))
        return handles

    def count(self, *_):
        self.calls += 1

    def attention(self, query, key, value, attn_mask=None, **_):
        q, k, v = (t.transpose(1, 2).double() for t in (query, key, value))  # (B, H, S, D)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == \
                torch.bool else scores + attn_mask.double()
        probs = scores.softmax(-1)
        negative_call = self.arch == "qwen-image" and self.calls % 2 == 0  # true CFG's second
        if self.site and not negative_call:
            n = q.shape[0] // 2 if self.arch == "z-image" else q.shape[0]  # prompts first
            s = q.shape[2]
            rows = slice(s - IMAGE_TOKENS, s) if self.arch == "qwen-image" \
                else slice(0, IMAGE_TOKENS)
            col = self.col(s)
            self.seen.append(probs[:n, :, rows, col].mean(1).float())
            probs[:n, :, rows, col] *= self.weight
        return (probs @ v).transpose(1, 2).to(query.dtype)


def text_column(arch: str, position: int):
    """The kernel column of text position ``position``, given the sequence length: Qwen-Image
    ``[text; image]``; Z-Image ``[image padded to 32; <|im_start|> user \\n; text ...]``."""
    if arch == "qwen-image":
        return lambda s: position
    return lambda s: 32 + 3 + position


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_one_and_no_op_edits_are_the_untraced_run(arch):
    plain = plain_latents(arch)
    for edit in (dict(reweight={"cat": 1.0}), dict(reweight={"red": 1.0, "beach": 1.0}),
                 dict(reweight={"cat": 4.0}, reweight_steps=(STEPS, None))):  # after the run
        tr = sdlens.generate(pipe(arch), PROMPT, seed=0, steps=STEPS, **GUIDED[arch],
                             **extra(arch), **edit)
        assert tr.meta["reweight"]["weights"] == {k: float(v) for k, v in edit["reweight"].items()}
        assert torch.equal(tr.latents[-1], plain)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("weight", [4.0, 0.0])  # 0: the word ablated at the kernel
def test_reweighting_is_the_equalizer(arch, weight, monkeypatch):
    """The steered run equals the explicit equalizer's; its recorded maps are the model's
    attention before the edit (the equalizer's own probabilities), so the attention the model
    used on the word is ``weight`` times the recorded map: more for 4, none for 0."""
    p = pipe(arch)
    pos = word_positions(p, PROMPT, "cat")
    assert pos == [2]
    run = dict(seed=0, steps=STEPS, attention_dtype=torch.float32, **GUIDED[arch], **extra(arch))
    steered = sdlens.generate(p, PROMPT, reweight={"cat": weight}, **run)
    base = sdlens.generate(p, PROMPT, **run)
    assert steered.meta["reweight"]["positions"] == pos
    assert (steered.latents[-1] - base.latents[-1]).abs().max() > 1e-4
    eq = Equalizer(arch, text_column(arch, pos[0]), weight)
    handles = eq.install(monkeypatch, p)
    try:
        ref = plain_latents(arch)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(steered.latents[-1], ref, rtol=1e-4, atol=1e-5)
    maps = steered.attention
    layers = len(maps.layers)
    assert len(eq.seen) == STEPS * layers
    for step in range(STEPS):
        for i, layer in enumerate(maps.layers):
            recorded = maps[layer][step][:, pos[0]].flatten(-2)  # (B, 4)
            torch.testing.assert_close(recorded, eq.seen[step * layers + i], rtol=1e-4,
                                       atol=1e-6)
    # the first site of the first step is recorded before any edit reached it
    first = maps.layers[0]
    torch.testing.assert_close(maps[first][0], base.attention[first][0], rtol=0, atol=1e-6)
    later = maps.layers[-1]
    assert (maps[later][-1][:, pos[0]] - base.attention[later][-1][:, pos[0]]).abs().max() > 1e-5


# ----------------------------------------------------------------------------- heatmaps
@functools.lru_cache(maxsize=None)
def with_heads(arch: str):
    return sdlens.generate(pipe(arch), PROMPT, seed=0, steps=STEPS, heads=True,
                           attention_dtype=torch.float32, **GUIDED[arch], **extra(arch),
                           record=("latents", "x0", "noise", "attention", "image_to_text"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_heatmaps_every_pooling_and_layer_choice(arch, pooling):
    from sdlens.views.widgets.frames import layer_options, layer_selector

    tr = generated(arch)
    keys = [k for k, _ in layer_options(tr)]
    assert "all" in keys and len(keys) >= 1 + len(tr.attention.layers)
    for word in ("red", "cat", "beach"):
        for key in keys:
            h = word_heatmap(tr, word, layers=layer_selector(key), pooling=pooling)
            assert h.shape == (32, 32) and torch.isfinite(h).all()
            assert float(h.min()) == 0 and float(h.max()) == 1  # min-max normalised
        per = word_heatmap(tr, word, pooling=pooling, per_step=True)
        assert per.shape == (STEPS, 32, 32)
        for step in range(STEPS):
            torch.testing.assert_close(per[step], word_heatmap(tr, word, steps=step,
                                                               pooling=pooling))
    assert word_heatmap(tr, "red cat", pooling=pooling, size=16).shape == (16, 16)  # a phrase
    raw = word_heatmap(tr, "cat", pooling=pooling, normalize=False)
    assert 0 < float(raw.max()) < 1  # attention probabilities: a share of the joint softmax
    # heads kept: their mean is the head-averaged map; one head is a map of its own
    th = with_heads(arch)
    torch.testing.assert_close(word_heatmap(th, "cat", pooling=pooling, normalize=False,
                                            size=4) if pooling == "sdlens" else
                               word_heatmap(th, "cat", pooling=pooling),
                               word_heatmap(th, "cat", pooling=pooling, normalize=False,
                                            size=4, heads=[0, 1]) if pooling == "sdlens" else
                               word_heatmap(th, "cat", pooling=pooling, heads=[0, 1]))
    assert word_heatmap(th, "cat", pooling=pooling, heads=1).shape == (32, 32)
    # the word's attention to the image (its text queries' rows), pooled the same way
    i2t = word_heatmap(th, "cat", pooling=pooling, maps="image_to_text")
    assert i2t.shape == (32, 32) and float(i2t.max()) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_sdlens_pooling_is_the_mean_of_the_upsampled_layers(arch):
    """At the maps' own 2x2 grid: the word's recorded maps averaged over steps and layers."""
    tr = with_heads(arch)
    maps = tr.attention
    cat = word_positions(pipe(arch), PROMPT, "cat")[0]
    want = torch.stack([maps[layer][:, 0, :, cat].float().mean((0, 1))
                        for layer in maps.layers]).mean(0)  # (2, 2)
    got = word_heatmap(tr, "cat", size=2, normalize=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    i2t = tr.image_to_text
    want = torch.stack([i2t[layer][:, 0, :, cat].float().mean((0, 1))
                        for layer in i2t.layers]).mean(0)
    torch.testing.assert_close(word_heatmap(tr, "cat", size=2, normalize=False,
                                            maps="image_to_text"), want, rtol=1e-5, atol=1e-7)
    assert isinstance(plot.image_to_text_maps(tr), Figure)


# ----------------------------------------------------------------------------- plots, report
@pytest.mark.parametrize("arch", ARCHS)
def test_report_and_plots(arch):
    tr = generated(arch)
    assert guidance_kind(tr) == "cfg" and tr.guidance_scale == 4.0
    html = build_report(tr, decoder="linear")
    assert "Not available" not in html and "the model predicts velocity" in html
    for section in ("Image and word heatmaps", "Step by step", "Tokens",
                    "Classifier-free guidance", "Scheduler"):
        assert f"<h2>{section}</h2>" in html
    assert "<th>guidance</th><td>CFG 4</td>" in html
    tokens = html.split("<h2>Tokens</h2>")[1].split("<h2>")[0]
    assert "<code>Ġcat</code>" in tokens and "6 of 512 prompt tokens" in tokens
    assert "im_start" not in tokens and "im_end" not in tokens  # no chat template
    figs = [plot.overlay(tr, "cat"), plot.heatmap_grid(tr), plot.heatmap_steps(tr, "cat"),
            plot.step_strip(tr, n=2, decoder="linear"), plot.guidance_strip(tr, 0, scales=(1, 4)),
            plot.guidance_curves(tr), plot.scheduler_curves(tr), plot.commitment_curves(tr),
            plot.token_view(tr)]
    assert all(isinstance(f, Figure) for f in figs)
    assert [ax.get_ylabel() for ax in figs[3].axes if ax.get_ylabel()][:4] == [
        "x_t (latents)", "x0 (predicted)", "velocity (guided)", "|CFG delta|"]
    ticks = [t.get_text() for t in figs[-1].axes[0].get_xticklabels()]
    assert [t for t in ticks if t] and not any("im_" in t for t in ticks)


def test_unguided_runs_say_why_by_the_familys_rule():
    from sdlens.analysis.guidance import guidance_text
    from sdlens.views.widgets import TraceViewer

    q = sdlens.generate(pipe("qwen-image"), PROMPT, seed=0, steps=STEPS, **extra("qwen-image"))
    z = sdlens.generate(pipe("z-image"), PROMPT, seed=0, steps=STEPS, guidance_scale=0.0,
                        **extra("z-image"))
    assert guidance_text(q, explain=True) == \
        "guidance off (Qwen-Image guides with a negative prompt and true_cfg_scale above 1)"
    assert guidance_text(z, explain=True) == "guidance off (scale 0; Z-Image guides above 0)"
    assert "no CFG delta: guidance off (scale 0; Z-Image guides above 0)" in \
        TraceViewer(z, decoder="linear").notes
    # Z-Image guides below 1 (no warning); its 1 is guidance too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low = sdlens.generate(pipe("z-image"), PROMPT, seed=0, steps=STEPS, guidance_scale=0.5,
                              **extra("z-image"))
    assert low.do_cfg and guidance_text(low) == "CFG 0.5"


# ----------------------------------------------------------------------------- widgets
@pytest.mark.parametrize("arch", ARCHS)
def test_trace_viewer_token_view_and_ab_view(arch):
    from sdlens.analysis.previews import previews
    from sdlens.analysis.tokens import trace_words
    from sdlens.views.widgets import ABView, TokenView, TraceViewer

    tr = generated(arch)
    v = TraceViewer(tr, decoder="linear")
    assert [p["name"] for p in v.panels] == ["x_t", "x0", "noise", "cfg_delta"]
    assert all(len(v.frames[p]) == STEPS for p in v.frames) and v.notes == []
    assert "CFG 4" in v.title
    words = [w.name for w in trace_words(tr, punctuation=False)]
    assert words == PROMPT.split() and [w["key"] for w in v.words] == words
    assert set(v.heat) == set(words)
    v.select_word("cat")
    v.layers = tr.attention.layers[1]
    assert dict(v.layer_options)[tr.attention.layers[1]].endswith("(2x2)")
    # the VAE decode (Qwen-Image's VAE has a frame axis) is the pipeline's own image
    auto = TraceViewer(tr)
    assert auto.decoder == "vae"
    last = np.asarray(previews(tr, "latents", [STEPS], decoder="vae")[0], dtype=np.int16)
    assert np.abs(last - np.asarray(tr.images[0], dtype=np.int16)).max() <= 1
    tv = TokenView(tr)  # the prompt's pieces, no template tokens
    assert [r["word"] for r in tv.rows if r["word"]] == PROMPT.split()
    assert all(0 < r["attention"] < 1 for r in tv.rows if r["word"])
    ab = ABView(tr, generated(arch, seed=1), viewer={"decoder": "linear"})
    assert ab.differs == {"seed": (0, 1)} and len(ab.panel.x0_diff) == STEPS


@pytest.mark.parametrize("arch", ARCHS)
def test_studio_runs_the_familys_guidance(arch):
    from sdlens.views.widgets import Studio

    neg = GUIDED[arch].get("negative_prompt", "")
    st = Studio(pipe(arch), prompt=PROMPT, negative_prompt=neg, steps=STEPS, guidance_scale=4.0,
                pipe_kwargs=extra(arch), viewer={"decoder": "linear"})
    assert st.guidance_note.value == ""
    st.generate(wait=True, timeout=120)
    assert st.error is None, st.error
    tr = st.traces[-1]
    assert torch.equal(tr.latents, generated(arch).latents)  # the same run as generate()'s
    assert tr.do_cfg and len(st.streamed) == STEPS
    if arch == "qwen-image":  # true CFG needs the negative prompt: the note says so
        st.negative_prompt.value = ""
        assert "only with a negative prompt" in st.guidance_note.value
    else:  # Z-Image: 0 is off, 0.5 guides
        st.guidance_scale.value = 0.0
        assert "0 = no guidance" in st.guidance_note.value
        st.guidance_scale.value = 0.5
        assert st.guidance_note.value == ""


# ----------------------------------------------------------------------------- sweeps
def single(arch: str, g: float, seed: int = 0) -> np.ndarray:
    """The reference: one plain diffusers call at guidance ``g`` (Qwen-Image's true_cfg_scale)."""
    kw = call_kwargs_2026(arch, steps=STEPS, seed=seed, output_type="np")
    if arch == "qwen-image":
        kw.update(negative_prompt=NEGATIVE, true_cfg_scale=g)
    else:
        kw.update(guidance_scale=g)
    return pipe(arch)(**kw).images[0]


SCALES = {"qwen-image": [1.0, 4.0], "z-image": [0.0, 0.5, 4.0]}  # Z-Image guides above 0


@pytest.mark.parametrize("arch", ARCHS)
def test_cfg_sweep_equals_single_runs(arch):
    from sdlens.views.widgets import GridViewer

    values = SCALES[arch]
    neg = GUIDED[arch].get("negative_prompt")
    grid = sdlens.sweep(pipe(arch), PROMPT, seeds=[0], guidance_scales=values, steps=STEPS,
                        progress=False, keep_axes=("guidance", "seed"), negative_prompt=neg,
                        height=32, width=32)
    # Qwen-Image: one call per value (its guided prediction is rescaled); Z-Image's guided
    # values share one call (per-sample guidance on pos + g (pos - neg))
    assert grid.meta["batches"] == 2  # Z-Image: 0 unguided, 0.5 and 4 in one call
    for j, g in enumerate(values):
        np.testing.assert_allclose(grid.arrays[j, 0], single(arch, g), atol=1e-4, rtol=0)
        tr = grid.traces[j, 0]
        assert tr.guidance_scale == g and tr.do_cfg == (g > (1 if arch == "qwen-image" else 0))
        assert tr.attention.layers
    assert np.abs(grid.arrays[0, 0] - grid.arrays[-1, 0]).max() > 1e-3  # guidance did something
    gv = GridViewer(grid, viewer={"decoder": "linear"})
    assert [r.split("\n")[0] for r in gv.panel.row_labels] == [f"CFG {g:g}" for g in values]
    gv.select(len(values) - 1, 0)
    assert gv.viewer is not None and "CFG 4" in gv.viewer.title


def test_qwen_image_cfg_sweep_needs_a_negative_prompt():
    with pytest.raises(ValueError, match="negative prompt"):
        sdlens.sweep(pipe("qwen-image"), PROMPT, guidance_scales=[1.0, 4.0], steps=STEPS,
                     progress=False, height=32, width=32)
    with pytest.raises(TypeError, match="true_cfg_scale"):
        sdlens.sweep(pipe("qwen-image"), PROMPT, steps=STEPS, progress=False, height=32,
                     width=32, true_cfg_scale=4.0)
    grid = sdlens.sweep(pipe("qwen-image"), PROMPT, seeds=[0, 1], steps=STEPS, progress=False,
                        height=32, width=32, record=None)  # a seed sweep: unguided
    np.testing.assert_allclose(grid.arrays[0], pipe("qwen-image")(
        **call_kwargs_2026("qwen-image", steps=STEPS, output_type="np")).images[0],
        atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- effects, compare
@pytest.mark.parametrize("arch", ARCHS)
def test_token_effects_and_compare(arch):
    kw = dict(GUIDED[arch])
    eff = sdlens.token_effects(pipe(arch), PROMPT, words=["cat", "beach"], steps=STEPS,
                               record=None, **kw, **extra(arch))
    assert eff.words == ["cat", "beach"] and eff.image.shape == (32, 32, 3)
    without = call_kwargs_2026(arch, steps=STEPS, output_type="np", prompt="a red on the beach")
    if arch == "qwen-image":
        without.update(negative_prompt=NEGATIVE, true_cfg_scale=4.0)
    else:
        without.update(guidance_scale=4.0)
    np.testing.assert_allclose(eff.ablated["cat"], pipe(arch)(**without).images[0], atol=1e-4,
                               rtol=0)
    np.testing.assert_allclose(eff.image, single(arch, 4.0), atol=1e-4, rtol=0)
    assert all(eff.effects[w] > 0 for w in eff.words)
    with pytest.raises(ValueError, match="chat templates"):
        sdlens.token_effects(pipe(arch), PROMPT, words=["cat"], mode="pad", steps=STEPS, **kw,
                             **extra(arch))
    cmp = sdlens.compare(generated(arch), generated(arch, seed=1))
    assert cmp.differs == {"seed": (0, 1)}
    assert not sdlens.compare(generated(arch), generated(arch)).differs
    assert isinstance(plot.comparison(cmp), Figure)


# ----------------------------------------------------------------------------- save, load, CLI
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_and_sdlens_info(arch, tmp_path, capsys):
    from sdlens.views.widgets import ABView, TokenView, TraceViewer

    tr = generated(arch)
    path = tr.save(tmp_path / "run.sdlens")
    back = sdlens.load(path)
    assert back.meta["family"] == arch and back.tokens == tr.tokens
    assert back.do_cfg and back.guidance_scale == 4.0
    torch.testing.assert_close(back.heatmap("cat"), tr.heatmap("cat"), rtol=0, atol=1e-3)
    assert TokenView(back).rows == TokenView(tr).rows
    v = TraceViewer(back)  # no pipeline, no VAE: the latents' channels, said so
    assert v.decoder == "channels" and all(len(v.frames[p]) == STEPS for p in v.frames)
    assert [p["label"] for p in v.panels][0] == "x_t (latents) · first 3 latent channels"
    other = sdlens.load(generated(arch, seed=1).save(tmp_path / "run1.sdlens"))
    assert ABView(back, other).differs == {"seed": (0, 1)}
    info = describe_trace(back)
    assert f"(family {arch}, task txt2img)" in info and "the model predicts velocity (flow)" in info
    assert "CFG 4" in info
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"file         {path}") and out.strip().endswith(info.strip())
    site = back.attention.layers[1]
    assert re.search(rf"{re.escape(back.attention.naming.alias(site))}\s+2x2\s+"
                     rf"{re.escape(site)}", out)


# ----------------------------------------------------------------------------- Qwen-Image tasks
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_qwen_image_img2img_and_inpaint_views(task):
    import diffusers

    from sdlens.testing import reference_image
    from sdlens.views.widgets import TraceViewer

    cls = {"img2img": diffusers.QwenImageImg2ImgPipeline,
           "inpaint": diffusers.QwenImageInpaintPipeline}[task]
    p = cls(**pipe("qwen-image").components)
    image = reference_image(32, 0)
    kw = dict(image=image, strength=0.9, height=32, width=32, negative_prompt=NEGATIVE,
              guidance_scale=4.0)
    if task == "inpaint":
        kw["mask_image"] = image.convert("L")
    tr = sdlens.generate(p, PROMPT, seed=0, steps=STEPS, **kw)
    assert tr.meta["task"] == task and tr.do_cfg and tr.guidance_scale == 4.0
    v = TraceViewer(tr)
    assert v.decoder == "vae" and all(len(v.frames[x]) == len(tr.x0) for x in ("x0", "noise"))
    assert f"task {task}" in describe_trace(tr)
    if task == "inpaint":  # the report of an editing task (one: the report is slow to draw)
        assert "Not available" not in build_report(tr, decoder="linear")
    same = sdlens.generate(p, PROMPT, seed=0, steps=STEPS, reweight={"cat": 1.0}, **kw)
    assert torch.equal(same.latents, tr.latents)
    steered = sdlens.generate(p, PROMPT, seed=0, steps=STEPS, reweight={"cat": 4.0}, **kw)
    assert (steered.latents[-1] - tr.latents[-1]).abs().max() > 1e-4
