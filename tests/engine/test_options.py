"""RecordOptions and the size estimate: bad options refused clearly, max_bytes refused before
the run, the estimate equal to what is recorded."""

from __future__ import annotations


import pytest
import torch

import diffusers
from sdlens.engine.options import RecordOptions, TraceTooLarge
from sdlens.engine.session import generate, trace
from sdlens.testing import random_pipeline
from pipelines import assert_restored, cached_pipe, call_pipe, pipe_state


def test_bad_options_give_clear_errors():
    with pytest.raises(ValueError, match="allowed: latents, noise, x0, attention"):
        RecordOptions(record=("latents", "pixels"))
    with pytest.raises(ValueError, match="layers"):
        RecordOptions(layers=2.5)
    with pytest.raises(ValueError, match="slice"):
        RecordOptions(steps=5)
    with pytest.raises(ValueError, match="heads"):
        RecordOptions(heads="yes")
    with pytest.raises(ValueError, match="max_bytes"):
        RecordOptions(max_bytes=-1)
    with pytest.raises(ValueError, match="attention_dtype"):
        RecordOptions(attention_dtype=torch.int8)
    pipe = cached_pipe("sd15")
    with pytest.raises(ValueError, match="unknown option"):
        trace(pipe, layer="up")
    state = pipe_state(pipe)
    with pytest.raises(ValueError, match="unknown attention layer 'sideways'.*available layers"):
        with trace(pipe, layers="sideways"):
            call_pipe(pipe)
    with pytest.raises(ValueError, match="out of range for this run of 4 steps"):
        with trace(pipe, steps=[10]):
            call_pipe(pipe, num_inference_steps=3)
    assert_restored(pipe, state)


def test_max_bytes_refusal_before_the_run():
    pipe = cached_pipe("sd15")
    state = pipe_state(pipe)
    calls = []
    h = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(TraceTooLarge, match=r"max_bytes.*layers=.*steps="):
            with trace(pipe, max_bytes=10_000):
                call_pipe(pipe)
    finally:
        h.remove()
    assert calls == []  # refused before the first UNet forward ran
    assert_restored(pipe, state)
    with trace(pipe, max_bytes=10_000, record=("latents",)) as tr:  # small enough
        call_pipe(pipe)
    assert tr.latents is not None

def test_estimate_equals_recorded_size():
    pipe = cached_pipe("sd15")
    with trace(pipe, layers=["up", "mid"], steps=slice(0, None, 2)) as tr:
        call_pipe(pipe, prompt=["a red circle", "a blue square"], num_inference_steps=4)
    est = tr.meta["estimated_bytes"]
    assert est["latents"] == tr.latents.nbytes and est["x0"] == tr.x0.nbytes
    assert est["noise"] == tr.noise.nbytes + tr.noise_text.nbytes + tr.noise_uncond.nbytes
    assert est["attention"] == tr.nbytes()["attention"] > 0  # 4-bit codes + a scale per map


def test_default_trace_of_full_size_sd15_is_under_100_mb():
    """The real SD 1.5 UNet built on the meta device (no memory): 50 steps, 512 px, a typical
    prompt (12 tokens with start/end), CFG on."""
    from types import SimpleNamespace

    from sdlens.engine.options import estimate_trace_bytes
    from sdlens.testing import _SD15

    cfg = dict(_SD15["unet"])
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=768, **cfg)
    pipe = SimpleNamespace(unet=unet, scheduler=diffusers.DDIMScheduler(),
                           tokenizer=cached_pipe("sd15").tokenizer)
    est = estimate_trace_bytes(pipe, batch=1, steps=50, latent_hw=(64, 64), n_tokens=12)
    assert sum(est.values()) < 100e6, est
    # "auto": 8-bit codes (a byte a value, as the trace fits 200 MB) and a float32 scale per map
    assert est.attention_dtype == torch.uint8
    assert est["attention"] == 50 * 12 * sum(n * (hw + 4) for n, hw in (
        (5, 64 * 64), (5, 32 * 32), (5, 16 * 16), (1, 8 * 8)))
    heads = estimate_trace_bytes(pipe, batch=1, steps=50, latent_hw=(64, 64), n_tokens=12,
                                 options=RecordOptions(heads=True, attention_dtype=torch.uint8))
    assert heads["attention"] == 8 * est["attention"]


def test_size_estimate_counts_the_schedulers_real_steps():
    """PNDM (SD 1.5's default, skip_prk_steps) takes num_inference_steps + 1 steps, Heun 2n - 1:
    the estimate from num_inference_steps counts what the recorder will store."""
    from types import SimpleNamespace

    from sdlens.engine.options import estimate_trace_bytes, scheduler_steps

    base = cached_pipe("sd15")
    pndm = diffusers.PNDMScheduler.from_config(base.scheduler.config, skip_prk_steps=True)
    heun = diffusers.HeunDiscreteScheduler.from_config(base.scheduler.config)
    assert scheduler_steps(pndm, 10) == 11
    assert scheduler_steps(heun, 10) == 19
    # Flux's scheduler shifts its timesteps by the image size (mu); their count does not change
    flux = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    assert scheduler_steps(flux, 28) == 28
    for sched, n in ((pndm, 11), (heun, 19)):
        pipe = SimpleNamespace(unet=base.unet, scheduler=sched, tokenizer=base.tokenizer)
        assert estimate_trace_bytes(pipe, num_inference_steps=10, n_tokens=5) == \
            estimate_trace_bytes(pipe, steps=n, n_tokens=5)
    run = random_pipeline("sd15")
    run.scheduler = pndm
    tr = generate(run, "a cat", seed=0, steps=10, guidance_scale=7.5)
    assert len(tr.timesteps) == 11
    est = estimate_trace_bytes(run, num_inference_steps=10, n_tokens=len(tr.tokens[0]) + 2,
                               latent_hw=tuple(tr.latents.shape[-2:]))
    assert est["latents"] == tr.latents.numel() * 4
    assert est["noise"] == 3 * tr.noise.numel() * 4
