"""Shared helpers for tests that trace small random-weight pipelines (tests/engine, tests/trace)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from sdlens.engine.arch import adapter_for
from PIL import Image

from sdlens.testing import random_pipeline

PROMPT = "a red circle and a blue square"


@functools.lru_cache(maxsize=None)
def cached_pipe(arch: str, task: str = "txt2img", prediction_type: str | None = None):
    return random_pipeline(arch, task=task, prediction_type=prediction_type, seed=0)


def task_inputs(task: str, size: int = 64) -> dict:
    kw = {}
    if task in ("img2img", "inpaint"):
        arr = np.zeros((size, size, 3), np.uint8)
        arr[8:40, 8:40] = (220, 30, 30)
        arr[30:60, 30:60] = (30, 30, 220)
        kw["image"] = Image.fromarray(arr)
    if task == "inpaint":
        m = np.zeros((size, size), np.uint8)
        m[16:48, 16:48] = 255
        kw["mask_image"] = Image.fromarray(m)
    if task == "img2img":
        kw["strength"] = 0.6
    return kw


def call_pipe(pipe, seed=0, **kw):
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("output_type", "np")
    kw.setdefault("prompt", PROMPT)
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


def run_latents(pipe, traced: bool, prompt: str, steps: int, **kw):
    """One call of ``pipe`` with latents out, seed 0: ``(latents, trace)``, the trace None when
    untraced (the faithfulness tests compare the two)."""
    import sdlens

    kw = {"prompt": prompt, "num_inference_steps": steps, "output_type": "latent",
          "generator": torch.Generator().manual_seed(0), **kw}
    if not traced:
        return pipe(**kw).images, None
    with sdlens.trace(pipe) as tr:
        out = pipe(**kw).images
    return out, tr.runs[-1]


def pipe_state(pipe):
    """What sdlens must leave as it found it: the class, the denoiser's processors and hooks
    (UNet or transformer, from the backbone's adapter), ``scheduler.step``."""
    den = adapter_for(pipe).denoiser
    return (type(pipe), dict(den.attn_processors), dict(den._forward_hooks),
            dict(den._forward_pre_hooks), "step" in vars(pipe.scheduler))


def assert_restored(pipe, state):
    cls, procs, fwd, pre, had_step = state
    assert type(pipe) is cls
    den = adapter_for(pipe).denoiser
    now = den.attn_processors
    assert now.keys() == procs.keys()
    assert all(now[k] is procs[k] for k in procs), "processor objects were not restored"
    assert dict(den._forward_hooks) == fwd and dict(den._forward_pre_hooks) == pre
    assert ("step" in vars(pipe.scheduler)) == had_step
    assert pipe.scheduler.step.__func__ is type(pipe.scheduler).step


class DecodeSpy:
    """Capture what the pipeline hands to vae.decode (instance attribute, removed after)."""

    def __init__(self, vae):
        self.vae, self.inputs = vae, []

    def __enter__(self):
        orig = self.vae.decode

        def decode(z, *a, **k):
            self.inputs.append(z.detach().clone())
            return orig(z, *a, **k)

        self.vae.decode = decode
        return self

    def __exit__(self, *exc):
        del self.vae.decode


class FirstUNetInput:
    def __init__(self, unet):
        self.unet, self.sample = unet, None

    def __enter__(self):
        def hook(module, args, kwargs):
            if self.sample is None:
                self.sample = (args[0] if args else kwargs["sample"]).detach().clone()
        self.handle = self.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
