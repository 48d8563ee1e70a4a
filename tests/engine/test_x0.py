"""x0 as the one schedule table computes it agrees with every scheduler's own, for every
prediction type, and a recorded run replays through the scheduler from its recorded noise."""

from __future__ import annotations


import pytest
import torch

import diffusers
from sdlens.engine.session import trace
from pipelines import cached_pipe, call_pipe


SCHEDULERS = ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
              "PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
              "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"]


def _reference_x0(sched, model_output, t, sample, out):
    """diffusers' own x0 for this step (computed before the scheduler's state advances)."""
    name = type(sched).__name__
    if name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        return None  # filled in by the caller (needs the pre-step state)
    if name == "PNDMScheduler":  # PNDM returns none: use DDIM's (same alpha schedule)
        ddim = diffusers.DDIMScheduler.from_config(sched.config, clip_sample=False)
        ddim.set_timesteps(len(sched.timesteps))
        return ddim.step(model_output, t, sample).pred_original_sample
    return out[1] if isinstance(out, tuple) else out.pred_original_sample


# x0 = model_output for "sample": checked on three schedulers (diffusers' LMS, PNDM and Euler
# ancestral do not implement prediction_type="sample").
X0_CASES = [(s, p) for s in SCHEDULERS for p in ("epsilon", "v_prediction")] + [
    (s, "sample") for s in ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")]


@pytest.mark.parametrize("scheduler,prediction_type", X0_CASES, ids=[f"{s}-{p}" for s, p in X0_CASES])
def test_x0_agrees_with_scheduler(scheduler, prediction_type):
    pipe = cached_pipe("sd15")
    saved = pipe.scheduler
    cls = getattr(diffusers, scheduler)
    pipe.scheduler = cls.from_config(saved.config, prediction_type=prediction_type)
    refs = []
    orig = pipe.scheduler.step

    def spy(model_output, t, sample, *a, **k):
        s = pipe.scheduler
        pre = None
        if scheduler in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
            if s.step_index is None:
                s._init_step_index(t)
            pre = s.convert_model_output(model_output, sample=sample)
        out = orig(model_output, t, sample, *a, **k)
        refs.append(pre if pre is not None else _reference_x0(s, model_output, t, sample, out))
        return out

    pipe.scheduler.step = spy
    try:
        with trace(pipe) as tr:
            call_pipe(pipe, num_inference_steps=3)
    finally:
        pipe.scheduler = saved
    assert tr.meta["scheduler_class"] == scheduler
    assert len(refs) == tr.num_steps
    torch.testing.assert_close(tr.x0, torch.stack(refs).float(), rtol=1e-4, atol=1e-4)
    if scheduler in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                     "KDPM2AncestralDiscreteScheduler"):
        assert tr.num_steps == 2 * 3 - 1  # two UNet calls per timestep but the first
    if scheduler.startswith(("Euler", "LMS", "Heun", "KDPM2")):
        assert tr.sigmas is not None and tr.sigmas.shape == (tr.num_steps,)
    elif scheduler in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler"):
        assert tr.sigmas is None


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "PNDMScheduler",
                                       "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"])
def test_replay_scheduler_from_recorded_noise(scheduler):
    pipe = cached_pipe("sd15")
    saved = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(saved.config)
    try:
        with trace(pipe) as tr:
            call_pipe(pipe, num_inference_steps=5)
    finally:
        pipe.scheduler = saved
    fresh = getattr(diffusers, scheduler).from_config(saved.config)
    fresh.set_timesteps(5)
    assert len(fresh.timesteps) == tr.num_steps
    torch.testing.assert_close(fresh.timesteps.float(), tr.timesteps)
    for i, t in enumerate(fresh.timesteps):
        prev = fresh.step(tr.noise[i], t, tr.latents[i]).prev_sample
        torch.testing.assert_close(prev, tr.latents[i + 1], rtol=1e-5, atol=1e-5)
