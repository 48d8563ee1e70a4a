"""Downstream of the trace for Qwen-Image (joint attention over ``[text; image]``, true CFG as a
second call) and Z-Image (single stream ``[image; template; text]``, CFG in one batch, prompts
first): heatmaps with every pooling, plots, report, widgets, CFG sweeps, reweighting and
ablation at the kernel against an explicit equalizer, token_effects, compare, save / load and
``sdlens info``. Tiny random-weight beds (sdlens.testing), CPU fp32, 2 steps, 32 px."""

from __future__ import annotations

import functools
import re

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
