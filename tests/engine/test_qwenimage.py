"""Qwen-Image traced like Flux.1: the random-weight bed (3 joint blocks), CPU fp32, 2 steps, 32 px
(2x2 packed latents of 4x4)."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

import sdlens
from sdlens.analysis.tokens import trace_words
from sdlens.engine.arch import adapter_for
from sdlens.testing import call_kwargs_2026, random_pipeline
from pipelines import assert_restored, pipe_state
from test_kernel_maps import KernelSpy, explicit

PROMPT = "a red cat on the beach"
NEGATIVE = "a dog"
STEPS = 2


@functools.lru_cache(maxsize=None)
def bed():
    return random_pipeline("qwen-image", seed=0)


def kwargs(true_cfg: bool, **kw):
    guided = dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0) if true_cfg else {}
    return call_kwargs_2026("qwen-image", steps=STEPS, **{"prompt": PROMPT, **guided, **kw})


@functools.lru_cache(maxsize=None)
def traced(true_cfg: bool):
    pipe = bed()
    plain = pipe(**kwargs(true_cfg)).images
    with sdlens.trace(pipe, attention_dtype=torch.float32) as tr:
        out = pipe(**kwargs(true_cfg)).images
    return pipe, plain, out, tr.runs[-1]


def pack(pipe, x):  # (B, C, h, w) -> the pipeline's packed (B, h/2 * w/2, 4C)
    b, c, h, w = x.shape
    return pipe._pack_latents(x, b, c, h, w)


@pytest.mark.parametrize("true_cfg", [False, True])
def test_traced_run_is_the_untraced_run(true_cfg):
    pipe, plain, out, tr = traced(true_cfg)
    assert torch.equal(plain, out)
    assert tr.meta["family"] == "qwen-image" and tr.prediction_type == "flow"
    assert tr.latents.shape == (STEPS + 1, 1, 16, 4, 4)
    assert torch.equal(pack(pipe, tr.latents[-1]), out.float())
    assert tr.noise.shape == tr.x0.shape == (STEPS, 1, 16, 4, 4)


def test_without_a_negative_prompt_there_is_no_guidance():
    _, _, _, tr = traced(False)
    assert not tr.do_cfg and tr.noise_uncond is None
    assert math.isnan(tr.guidance_scale)  # none: the trace stores it as nan
    assert tr.meta["denoiser_calls"] == STEPS
    torch.testing.assert_close(tr.noise, tr.noise_text, rtol=0, atol=0)


def test_true_cfg_is_two_calls_and_the_guided_identity():
    pipe, _, _, tr = traced(True)
    assert tr.do_cfg and tr.meta["denoiser_calls"] == 2 * STEPS
    assert tr.guidance_scale == 4.0 == tr.meta["true_cfg_scale"]
    assert tr.negative_prompts == [NEGATIVE]
    for s in range(STEPS):  # neg + g (pos - neg), rescaled per packed token to |pos|
        text, uncond = pack(pipe, tr.noise_text[s]), pack(pipe, tr.noise_uncond[s])
        comb = uncond + 4.0 * (text - uncond)
        guided = comb * (text.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
        torch.testing.assert_close(pack(pipe, tr.noise[s]), guided, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tr.noise_uncond, tr.noise_text)
    # the maps are the prompt's call's: the same as the unguided run's first step
    _, _, _, plain = traced(False)
    layer = tr.attention.layers[0]
    torch.testing.assert_close(tr.attention[layer][0], plain.attention[layer][0])


@pytest.mark.parametrize("true_cfg", [False, True])
def test_flow_x0_and_last_step(true_cfg):
    _, _, _, tr = traced(true_cfg)
    s = tr.sigmas[:, None, None, None, None]
    torch.testing.assert_close(tr.x0, tr.latents[:-1] - s * tr.noise)
    torch.testing.assert_close(tr.x0[-1], tr.latents[-1], rtol=1e-5, atol=1e-5)


def test_every_block_recorded_and_the_template_left_out():
    pipe, _, _, tr = traced(False)
    maps = tr.attention
    assert maps.layers == [f"transformer_blocks.{i}.attn"
                           for i in range(pipe.transformer.config.num_layers)]
    assert "skipped" not in tr.meta and maps.names("block.1") == [maps.layers[1]]
    # the prompt's pieces only: no system prompt, no <|im_end|> / assistant
    assert [w.text for w in trace_words(tr)] == PROMPT.split()
    assert maps.token_positions == list(range(len(tr.tokens[0]))) and len(tr.tokens[0]) == 6
    for layer in maps.layers:
        m = maps[layer]
        assert m.shape == (STEPS, 1, 6, 2, 2) and (m >= 0).all() and (m.sum(2) < 1).all()


def test_full_size_sites_on_the_meta_device():
    pipe = random_pipeline("qwen-image", scale=1, device="meta")
    adapter = adapter_for(pipe)
    n = pipe.transformer.config.num_layers
    assert n == 60 and adapter.sites() == [f"transformer_blocks.{i}.attn" for i in range(n)]


def maps_with_spy(pipe, **call):
    adapter = adapter_for(pipe)
    spy = KernelSpy(adapter.denoiser, adapter.sites())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="sdlens")  # nothing skipped
            with spy, sdlens.trace(pipe, attention_dtype=torch.float32) as tr:
                pipe(**call)
    finally:
        spy.remove()
    return tr.runs[-1], spy


@pytest.mark.parametrize("true_cfg", [False, True])
def test_maps_equal_the_explicit_softmax(true_cfg):
    pipe = bed()
    tr, spy = maps_with_spy(pipe, **kwargs(true_cfg))
    per_step = 2 if true_cfg else 1
    maps, n = tr.attention, 0
    for layer in maps.layers:
        for i, step in enumerate(maps.steps):
            q, k, mask, scale = spy.calls[(per_step * step, layer)][0]  # the prompt's call
            n_text = k.shape[2] - 4  # [text; image], 2x2 image tokens
            p = explicit(q, k, mask, scale)[:, :, n_text:, :n_text]
            want = p[..., maps.token_positions].mean(1).transpose(-1, -2)
            torch.testing.assert_close(maps[layer][i].double().flatten(-2), want,
                                       atol=1e-6, rtol=0)
            n += 1
    assert n == len(maps.layers) * STEPS


def test_prompts_of_different_lengths_mask_the_padding():
    """Two prompts of different lengths: the pipeline pads the shorter and passes a mask; the
    kernel's mask is in the explicit softmax."""
    pipe = bed()
    prompts = [PROMPT, "a cat"]
    tr, spy = maps_with_spy(pipe, **kwargs(False, prompt=prompts))
    maps = tr.attention
    assert [len(t) for t in tr.tokens] == [6, 2]
    for layer in maps.layers:
        for i, step in enumerate(maps.steps):
            q, k, mask, scale = spy.calls[(step, layer)][0]
            assert mask is not None  # bool, or SDPA's additive form where sdlens asked the
            # fused op for the log-sum-exp
            n_text = k.shape[2] - 4
            p = explicit(q, k, mask, scale)[:, :, n_text:, :n_text]
            want = p[..., maps.token_positions].mean(1).transpose(-1, -2)
            torch.testing.assert_close(maps[layer][i].double().flatten(-2), want,
                                       atol=1e-6, rtol=0)
    assert tr.heatmap("cat", batch=1).shape == (32, 32)


def test_heatmap_of_every_word():
    _, _, _, tr = traced(False)
    for w in trace_words(tr):
        hm = torch.as_tensor(tr.heatmap(w.text, occurrence=w.occurrence))
        assert hm.shape == (32, 32) and torch.isfinite(hm).all() and hm.max() > 0


def test_save_load_round_trip(tmp_path):
    _, _, _, tr = traced(True)
    back = sdlens.load(tr.save(tmp_path / "qwen.sdlens"))
    assert back.meta["family"] == "qwen-image" and back.tokens == tr.tokens
    assert back.do_cfg and back.guidance_scale == 4.0
    assert back.attention.layers == tr.attention.layers
    torch.testing.assert_close(back.heatmap("cat"), tr.heatmap("cat"))
    torch.testing.assert_close(back.noise_uncond, tr.noise_uncond)
    torch.testing.assert_close(back.x0, tr.x0)


@pytest.mark.parametrize("true_cfg", [False, True])
def test_restored_after_an_exception_mid_run(true_cfg):
    pipe = bed()
    before = pipe_state(pipe)

    def stop(p, i, t, cb):
        if i == 1:
            raise KeyboardInterrupt
        return cb

    with pytest.raises(KeyboardInterrupt):
        with sdlens.trace(pipe):
            pipe(**kwargs(true_cfg), callback_on_step_end=stop)
    assert_restored(pipe, before)
    assert torch.equal(pipe(**kwargs(true_cfg)).images, traced(true_cfg)[1])


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint(task):
    import diffusers

    from sdlens.testing import reference_image

    cls = {"img2img": diffusers.QwenImageImg2ImgPipeline,
           "inpaint": diffusers.QwenImageInpaintPipeline}[task]
    pipe = cls(**bed().components)
    image = reference_image(32, 0)
    extra = dict(image=image, strength=0.9)
    if task == "inpaint":
        extra["mask_image"] = image.convert("L")
    plain = pipe(**kwargs(True, **extra)).images
    with sdlens.trace(pipe) as tr:
        out = pipe(**kwargs(True, **extra)).images
    assert torch.equal(plain, out)
    assert tr.attention.layers == adapter_for(pipe).sites() and "skipped" not in tr.meta
    assert tr.heatmap("beach").shape == (32, 32)
