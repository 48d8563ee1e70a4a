"""ControlNet pipelines (SD: txt2img, img2img, inpaint, multi-ControlNet; SDXL): traced images equal
untraced ones, the pipeline is restored, maps recorded, the conditioning scale in meta and, with
``record`` "controlnet", the residuals' RMS per net, block and step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers
import sdlens
from sdlens.analysis.controlnet import controlnet_residuals
from sdlens.engine.options import RECORDABLE

KINDS = (*RECORDABLE, "controlnet")  # everything a ControlNet pipeline can record
from sdlens.testing import controlnet_for, random_pipeline
from pipelines import PROMPT, assert_restored, pipe_state, task_inputs

CLASSES = {("sd15", "txt2img"): "StableDiffusionControlNetPipeline",
           ("sd15", "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
           ("sd15", "inpaint"): "StableDiffusionControlNetInpaintPipeline",
           ("sdxl", "txt2img"): "StableDiffusionXLControlNetPipeline"}


def control_pipe(arch="sd15", task="txt2img", nets=1):
    base = random_pipeline(arch, task=task, seed=0)
    control = [controlnet_for(base, seed=i) for i in range(nets)]
    comps = dict(base.components, controlnet=control[0] if nets == 1
                 else diffusers.MultiControlNetModel(control))
    for k in ("image_encoder",):
        comps.setdefault(k, None)
    pipe = getattr(diffusers, CLASSES[arch, task])(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def condition(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def call(pipe, task, nets=1, **kw):
    kw.update(task_inputs(task))
    cond = [condition(seed=i) for i in range(nets)]
    if task == "txt2img":
        kw["image"] = cond[0] if nets == 1 else cond
    else:
        kw["control_image"] = cond[0] if nets == 1 else cond
    return pipe(PROMPT, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("arch,task,nets", [("sd15", "txt2img", 1), ("sd15", "img2img", 1),
                                            ("sd15", "inpaint", 1), ("sd15", "txt2img", 2),
                                            ("sdxl", "txt2img", 1)])
def test_controlnet_traced_faithfully(arch, task, nets):
    pipe = control_pipe(arch, task, nets)
    scale = 0.7 if nets == 1 else [0.7, 0.4]
    plain = call(pipe, task, nets, controlnet_conditioning_scale=scale)
    state = pipe_state(pipe)
    with sdlens.trace(pipe, record=KINDS) as tr:
        traced = call(pipe, task, nets, controlnet_conditioning_scale=scale)
    assert_restored(pipe, state)
    nets_ = getattr(pipe.controlnet, "nets", [pipe.controlnet])
    assert all(not n._forward_hooks for n in nets_)
    np.testing.assert_array_equal(plain, traced)
    t = tr.runs[-1]
    assert t.attention.layers and "skipped" not in t.meta
    assert t.meta["controlnet"]["conditioning_scale"] == (scale if nets > 1 else 0.7)
    res = controlnet_residuals(t)
    n_blocks = len(pipe.controlnet.nets[0].controlnet_down_blocks if nets > 1
                   else pipe.controlnet.controlnet_down_blocks) + 1
    assert res.rms.shape == (len(t.timesteps), 1, nets, n_blocks)
    assert res.blocks[-1] == "mid" and len(res.blocks) == n_blocks
    assert torch.isfinite(res.rms).all() and (res.rms > 0).all()


def test_controlnet_residuals_follow_the_scale_and_are_opt_in():
    pipe = control_pipe()
    with sdlens.trace(pipe) as tr:
        call(pipe, "txt2img", controlnet_conditioning_scale=1.0)
    with pytest.raises(ValueError, match="controlnet"):
        controlnet_residuals(tr.runs[-1])
    with sdlens.trace(pipe, record=KINDS) as tr:
        call(pipe, "txt2img", controlnet_conditioning_scale=1.0)
        call(pipe, "txt2img", controlnet_conditioning_scale=0.5)
    full, half = (controlnet_residuals(r).rms for r in tr.runs)
    # the residuals are scaled inside the ControlNet: the first step's are exactly halved
    torch.testing.assert_close(half[0], full[0] * 0.5)


def test_controlnet_residuals_plot():
    from sdlens.views import plot

    pipe = control_pipe(nets=2)
    with sdlens.trace(pipe, record=KINDS) as tr:
        call(pipe, "txt2img", nets=2)
    fig = plot.controlnet_residuals(tr.runs[-1])
    blocks = len(pipe.controlnet.nets[0].controlnet_down_blocks) + 1
    assert fig.axes[0].get_images()[0].get_array().shape == (len(tr.runs[-1].timesteps), blocks)


def test_controlnet_guess_mode():
    """Guess mode runs the net on the conditional rows only: traced faithfully, residuals kept."""
    pipe = control_pipe()
    plain = call(pipe, "txt2img", guess_mode=True)
    with sdlens.trace(pipe, record=KINDS) as tr:
        traced = call(pipe, "txt2img", guess_mode=True)
    np.testing.assert_array_equal(plain, traced)
    t = tr.runs[-1]
    assert t.meta["controlnet"]["guess_mode"] is True
    assert torch.isfinite(controlnet_residuals(t).rms).all()
