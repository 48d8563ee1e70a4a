"""The same guarantees on a CUDA device (skipped where there is none: CI and most laptops).

What a GPU adds that the CPU tests cannot see: fp16 SDPA kernels, asynchronous device-to-host
copies of the recordings (they must land complete and unchanged), and device syncs (none may
happen inside an attention layer). Run on a GPU machine with ``pytest tests/engine/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdlens
from sdlens.analysis.heatmaps import iou
from sdlens.engine import sites as att_hooks
from sdlens.testing import random_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPT = "a red circle and a blue square"


def _images(pipe, prompt=PROMPT, seed=0, *, steps, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                output_type="np", **kw).images


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_shipped_model_traced_equals_untraced_on_cuda(dtype):
    pipe = sdlens.load_pipeline(device="cuda", dtype=dtype)
    assert pipe.unet.device.type == "cuda" and pipe.unet.dtype == dtype
    ref = _images(pipe, steps=25, guidance_scale=7.5)
    with sdlens.trace(pipe) as tr:
        out = _images(pipe, steps=25, guidance_scale=7.5)
    assert np.abs(out - ref).max() <= 1e-5, "tracing changed the image on cuda"
    # the recordings are complete host tensors (the non-blocking copies were waited for)
    assert tr.latents.device.type == "cpu" and tr.latents.dtype == torch.float32
    assert tr.latents.shape[0] == 26 and torch.isfinite(tr.latents).all()
    assert torch.isfinite(tr.noise).all() and torch.isfinite(tr.x0).all()
    maps = tr.attention
    for layer in maps.layers:
        m = maps[layer]
        assert m.device.type == "cpu" and torch.isfinite(m.float()).all()
    h = tr.heatmap("circle")
    assert h.shape[-2:] == (64, 64) and float(h.max()) == pytest.approx(1.0)
    # the last recorded latents are exactly the ones the pipeline returns (a copy read before its
    # transfer finished would not be)
    with sdlens.trace(pipe) as tr2:
        final = pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=25,
                     guidance_scale=7.5, output_type="latent").images
    assert final.device.type == "cuda"
    torch.testing.assert_close(tr2.latents[-1], final.float().cpu(), rtol=0, atol=0)


def test_shipped_model_heatmaps_on_cuda_match_cpu():
    cpu = sdlens.generate(sdlens.load_pipeline(device="cpu"), "a yellow triangle", seed=3)
    gpu = sdlens.generate(sdlens.load_pipeline(device="cuda", dtype=torch.float32),
                          "a yellow triangle", seed=3)
    # same seeds (CPU generator): the same picture up to kernel rounding
    a = np.asarray(cpu.images[0], dtype=np.float32)
    b = np.asarray(gpu.images[0], dtype=np.float32)
    assert np.abs(a - b).mean() < 2.0, "the CUDA image differs from the CPU one"
    for word in ("yellow", "triangle"):
        hc, hg = cpu.heatmap(word), gpu.heatmap(word)
        assert iou(hg, (hc.numpy() >= 0.4)) > 0.8, word


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_random_archs_fp16_traced_equals_untraced(arch):
    pipe = random_pipeline(arch, scale=0.1, device="cuda", dtype=torch.float16)
    ref = _images(pipe, steps=4)
    with sdlens.trace(pipe) as tr:
        out = _images(pipe, steps=4)
    assert np.abs(out - ref).max() <= 1e-5, "tracing changed the image on cuda"
    layer = tr.attention.layers[0]
    full = sdlens.generate(pipe, PROMPT, seed=0, steps=4, keep_padding=True,
                           attention_dtype=torch.float32).attention[layer]
    torch.testing.assert_close(full.sum(2), torch.ones_like(full.sum(2)), rtol=0, atol=2e-3)
    assert tr.meta["denoiser_calls"] == tr.num_steps  # PNDM: 4 steps are 5 UNet calls


def test_no_device_sync_inside_attention_layers_on_cuda(monkeypatch):
    """Recording must not stall the GPU: CUDA's sync debug mode raises on any synchronising call
    (a ``.cpu()``, ``.item()``, blocking copy) made while an attention layer records."""
    orig = att_hooks.SiteProcessor.__call__  # the whole site: kernel reads, maps, sink

    def guarded(self, *a, **k):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return orig(self, *a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    pipe = random_pipeline("sd15", scale=0.1, device="cuda", dtype=torch.float16)
    # the kernel's fused route is checked once per shape against SDPA (one sync, at first use)
    sdlens.generate(pipe, PROMPT, seed=0, steps=1)
    monkeypatch.setattr(att_hooks.SiteProcessor, "__call__", guarded)
    tr = sdlens.generate(pipe, PROMPT, seed=0, steps=4)
    assert len(tr.attention.steps) == tr.num_steps


def test_sweep_and_steering_on_cuda(tmp_path):
    pipe = sdlens.load_pipeline(device="cuda", dtype=torch.float32)
    grid = sdlens.sweep(pipe, "a red circle", seeds=[0, 1], guidance_scales=[1, 7.5], steps=10,
                        progress=False)
    assert grid.shape == (2, 2)
    for g in (1, 7.5):
        for seed in (0, 1):
            single = _images(pipe, "a red circle", seed=seed, steps=10, guidance_scale=g)[0]
            cell = grid.arrays[grid.index(guidance=g, seed=seed)]
            assert np.abs(cell - single).max() < 2e-2, (g, seed)
    path = grid.save(tmp_path / "grid.sdlens")
    back = sdlens.load(path)
    assert np.array_equal(back.arrays, grid.arrays)
    steered, base = sdlens.reweight(pipe, "a red circle", {"red": 0.0}, baseline=True, seed=0)
    red = lambda t: np.asarray(t.images[0], np.float32)[..., 0].mean()  # noqa: E731
    assert red(steered) != red(base)
    effects = sdlens.token_effects(pipe, "a red circle", seed=0, steps=10)
    assert len(effects.words) >= 3


# ---------------------------------------------------------------- the transformer recorders
@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformer_traced_equals_untraced_and_maps_match_cpu_on_cuda(arch, dtype):
    """SD3's joint and Flux's double- and single-stream sites on CUDA: the kernel's fused route
    (flash / memory-efficient / cuDNN, with its lse) leaves the latents as untraced, and the
    maps agree with the CPU trace of the same weights."""
    kw = dict(num_inference_steps=2, output_type="latent",
              **({"max_sequence_length": 32} if arch == "flux" else {}))
    cpu = random_pipeline(arch, seed=0)
    gpu = random_pipeline(arch, seed=0, device="cuda", dtype=dtype)
    ref = gpu(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    with sdlens.trace(gpu, attention_dtype=torch.float32) as tr:
        out = gpu(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(out, ref), "tracing changed the latents on cuda"
    assert "skipped" not in tr.meta
    with sdlens.trace(cpu, attention_dtype=torch.float32) as want:
        cpu(PROMPT, generator=torch.Generator().manual_seed(0), **kw)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for layer in want.attention.layers:
        torch.testing.assert_close(tr.attention[layer], want.attention[layer], atol=tol, rtol=0)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_no_device_sync_inside_transformer_sites_on_cuda(monkeypatch, arch):
    """The joint recorder reads the kernel's lse on the device: no sync inside a site (after the
    first call of each kernel signature, which is checked against SDPA once)."""
    pipe = random_pipeline(arch, seed=0, device="cuda", dtype=torch.float16)
    kw = dict(num_inference_steps=2, output_type="latent",
              **({"max_sequence_length": 32} if arch == "flux" else {}))
    with sdlens.trace(pipe, record=("latents", "attention", "image_to_text")):
        pipe(PROMPT, **kw)  # the one-time check of each kernel signature
    orig = att_hooks.SiteProcessor.__call__

    def guarded(self, *a, **k):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return orig(self, *a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(att_hooks.SiteProcessor, "__call__", guarded)
    with sdlens.trace(pipe, record=("latents", "attention", "image_to_text")) as tr:
        pipe(PROMPT, **kw)
    assert len(tr.attention.steps) == tr.num_steps and tr.image_to_text is not None
