"""Tracing engine (issue 3): faithfulness, correctness, restoration, round trip, bad input.

All on CPU with random-weight pipelines of the real architectures, shrunk (sdlens.testing).
"""

from __future__ import annotations

import functools
import json
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers
from sdlens.engine.arch import adapter_for, naming_for
from sdlens.engine.arch.unet import UNetAdapter
from sdlens.engine.options import RecordOptions, TraceTooLarge
from sdlens.engine.session import generate, trace
from sdlens.engine.sites import Hooks
from sdlens.pipeline import describe
from sdlens.testing import random_pipeline
from sdlens.trace import FORMAT_VERSION, load

PROMPT = "a red circle and a blue square"


@functools.lru_cache(maxsize=None)
def _pipe(arch: str, task: str = "txt2img", prediction_type: str | None = None):
    return random_pipeline(arch, task=task, prediction_type=prediction_type, seed=0)


def _inputs(task: str, size: int = 64) -> dict:
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


def _call(pipe, seed=0, **kw):
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("output_type", "np")
    kw.setdefault("prompt", PROMPT)
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


def _state(pipe):
    unet = pipe.unet
    return (type(pipe), dict(unet.attn_processors), dict(unet._forward_hooks),
            dict(unet._forward_pre_hooks), "step" in vars(pipe.scheduler))


def _assert_restored(pipe, state):
    cls, procs, fwd, pre, had_step = state
    assert type(pipe) is cls
    now = pipe.unet.attn_processors
    assert now.keys() == procs.keys()
    assert all(now[k] is procs[k] for k in procs), "processor objects were not restored"
    assert dict(pipe.unet._forward_hooks) == fwd and dict(pipe.unet._forward_pre_hooks) == pre
    assert ("step" in vars(pipe.scheduler)) == had_step
    assert pipe.scheduler.step.__func__ is type(pipe.scheduler).step


class _DecodeSpy:
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


class _FirstUNetInput:
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


# ============================================================================ faithfulness
KINDS = [("sd15", "txt2img"), ("sd15", "img2img"), ("sd15", "inpaint"), ("sd21", "txt2img"),
         ("sdxl", "txt2img"), ("sdxl", "img2img"), ("sdxl", "inpaint"), ("shapes", "txt2img")]


@pytest.mark.parametrize("arch,task", KINDS, ids=[f"{a}-{t}" for a, t in KINDS])
def test_faithful_and_decoded_latent(arch, task):
    pipe = _pipe(arch, task)
    size = 64
    kw = _inputs(task, size)
    ref = _call(pipe, **kw)
    state = _state(pipe)
    with _DecodeSpy(pipe.vae) as spy, _FirstUNetInput(pipe.unet) as first:
        with trace(pipe) as tr:
            out = _call(pipe, **kw)
    _assert_restored(pipe, state)
    assert np.abs(out - ref).max() <= 1e-5, "tracing changed the image"
    assert len(tr.images) == 1
    np.testing.assert_array_equal(np.asarray(tr.images[0]),
                                  (np.clip(out[0], 0, 1) * 255).round().astype(np.uint8))
    # latents[-1] is exactly what was decoded
    sf = pipe.vae.config.scaling_factor
    assert len(spy.inputs) == 1
    torch.testing.assert_close(tr.latents[-1], spy.inputs[0].float() * sf, rtol=1e-6, atol=1e-6)
    # latents[0] is what the first UNet call was given (img2img: the noised init image)
    b = tr.latents.shape[1]
    unet_in = first.sample[:b, :4]
    if tr.sigmas is not None:  # k-diffusion schedulers scale the model input
        unet_in = unet_in * (tr.sigmas[0] ** 2 + 1) ** 0.5
    torch.testing.assert_close(tr.latents[0], unet_in.float(), rtol=1e-5, atol=1e-5)
    steps = tr.num_steps
    assert tr.latents.shape[0] == steps + 1 and tr.noise.shape[0] == steps == tr.x0.shape[0]
    assert tr.timesteps.shape == (steps,) and tr.meta["unet_calls"] == steps
    if task == "img2img":
        assert steps < 4 + (1 if arch == "sd15" else 0)  # strength 0.6: fewer steps
    assert tr.meta["task"] == task and tr.meta["pipeline_class"] == type(pipe).__name__
    assert tr.attention is not None and len(tr.attention.layers) == sum(
        1 for k in pipe.unet.attn_processors if ".attn2." in k)
    assert tr.pipeline is pipe


def test_sd21_is_v_prediction_and_x0_matches_ddim():
    pipe = _pipe("sd21")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    reported = []
    orig = pipe.scheduler.step

    def spy(*a, **k):
        out = orig(*a, **k)
        reported.append(out[1] if isinstance(out, tuple) else out.pred_original_sample)
        return out

    pipe.scheduler.step = spy
    try:
        with trace(pipe) as tr:
            _call(pipe)
    finally:
        del pipe.scheduler.step
    assert tr.meta["prediction_type"] == "v_prediction"
    torch.testing.assert_close(tr.x0, torch.stack(reported).float(), rtol=1e-5, atol=1e-5)


# ============================================================================ correctness
def test_noise_identity_and_cfg_layout():
    pipe = _pipe("sd15")
    with trace(pipe) as tr:
        _call(pipe, guidance_scale=7.5)
    assert tr.do_cfg and tr.guidance_scale == 7.5
    g = tr.guidance_scale
    guided = tr.noise_uncond + g * (tr.noise_text - tr.noise_uncond)
    assert torch.equal(tr.noise, guided)
    assert not torch.equal(tr.noise_uncond, tr.noise_text)


def test_guidance_off_has_no_uncond_half():
    pipe = _pipe("sd15")
    ref = _call(pipe, guidance_scale=1.0)
    with trace(pipe) as tr:
        out = _call(pipe, guidance_scale=1.0)
    assert np.abs(out - ref).max() <= 1e-5
    assert tr.do_cfg is False and tr.noise_uncond is None
    assert torch.equal(tr.noise, tr.noise_text)
    assert tr.attention[tr.attention.layers[0]].shape[1] == 1


def test_attention_rows_sum_to_one_and_match_diffusers():
    pipe = _pipe("sd15")
    layer = "up_blocks.3.attentions.0.transformer_blocks.0.attn2"
    attn = pipe.unet.get_submodule(layer)
    captured = []

    def hook(module, args, kwargs):  # diffusers' own attention probabilities (classic path)
        hs = args[0] if args else kwargs["hidden_states"]
        ehs = kwargs["encoder_hidden_states"]
        q = module.head_to_batch_dim(module.to_q(hs))
        k = module.head_to_batch_dim(module.to_k(ehs))
        p = module.get_attention_scores(q, k)  # (B*heads, HW, K)
        captured.append(p.view(hs.shape[0], module.heads, *p.shape[1:]))

    h = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with trace(pipe, keep_padding=True, attention_dtype=torch.float32) as full:
            _call(pipe)
    finally:
        h.remove()
    maps = full.attention
    assert maps.token_positions == list(range(77))
    for name in maps.layers:
        m = maps[name]
        assert m.shape[2] == 77 and m.dtype == torch.float32
        torch.testing.assert_close(m.sum(2), torch.ones_like(m.sum(2)), rtol=0, atol=1e-5)
    # equal to diffusers' probabilities of the text half, heads averaged
    ref = torch.stack([c[1:].mean(1) for c in captured])  # CFG: (uncond, cond); keep cond
    h_, w_ = maps.resolution(layer)
    ref = ref.transpose(-1, -2).reshape(len(captured), 1, 77, h_, w_)
    torch.testing.assert_close(maps[layer], ref, rtol=1e-4, atol=1e-6)
    # default: fp16, only the prompt's tokens, equal to the first positions of the full maps
    with trace(pipe) as tr:
        _call(pipe)
    n = len(tr.token_ids[0])
    assert tr.attention.token_positions == list(range(n))
    d = tr.attention[layer]
    assert d.dtype == torch.float16 and d.shape[2] == n
    torch.testing.assert_close(d.float(), maps[layer][:, :, :n], rtol=2e-3, atol=2e-3)
    assert (d.float().sum(2) < 1.0 + 1e-3).all()


def test_attention_follows_text_embeddings_changed_during_the_run():
    # the recorder reuses a layer's keys while the text embeddings stay the same tensor; a
    # callback that swaps them (step 0) or edits them in place (step 1) must show in the maps
    pipe = _pipe("sd15")
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = pipe.unet.get_submodule(layer)
    captured = []

    def hook(module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        q = module.head_to_batch_dim(module.to_q(hs))
        k = module.head_to_batch_dim(module.to_k(kwargs["encoder_hidden_states"]))
        p = module.get_attention_scores(q, k)
        captured.append(p.view(hs.shape[0], module.heads, *p.shape[1:])[1:].mean(1))

    def cb(p, i, t, kw):
        if i == 0:
            return {"prompt_embeds": kw["prompt_embeds"] * 1.5}
        if i == 1:
            kw["prompt_embeds"].mul_(-1.0)
        return {}

    h = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with trace(pipe, keep_padding=True, attention_dtype=torch.float32) as tr:
            _call(pipe, callback_on_step_end=cb,
                  callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    finally:
        h.remove()
    h_, w_ = tr.attention.resolution(layer)
    ref = torch.stack(captured).transpose(-1, -2).reshape(len(captured), 1, 77, h_, w_)
    torch.testing.assert_close(tr.attention[layer], ref, rtol=1e-4, atol=1e-6)
    steps = tr.attention[layer]
    assert not torch.allclose(steps[1], steps[0], atol=1e-3)  # the edits did change the maps
    assert not torch.allclose(steps[2], steps[1], atol=1e-3)


def test_heads_kept():
    pipe = _pipe("sd15")
    with trace(pipe, heads=True, keep_padding=True, attention_dtype=torch.float32,
               layers="mid") as tr:
        _call(pipe)
    (name,) = tr.attention.layers
    m = tr.attention[name]
    heads = pipe.unet.get_submodule(name).heads
    assert m.shape[:4] == (tr.num_steps, 1, heads, 77) and tr.attention.heads
    torch.testing.assert_close(m.sum(3), torch.ones_like(m.sum(3)), atol=1e-5, rtol=0)


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
    pipe = _pipe("sd15")
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
            _call(pipe, num_inference_steps=3)
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
    pipe = _pipe("sd15")
    saved = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(saved.config)
    try:
        with trace(pipe) as tr:
            _call(pipe, num_inference_steps=5)
    finally:
        pipe.scheduler = saved
    fresh = getattr(diffusers, scheduler).from_config(saved.config)
    fresh.set_timesteps(5)
    assert len(fresh.timesteps) == tr.num_steps
    torch.testing.assert_close(fresh.timesteps.float(), tr.timesteps)
    for i, t in enumerate(fresh.timesteps):
        prev = fresh.step(tr.noise[i], t, tr.latents[i]).prev_sample
        torch.testing.assert_close(prev, tr.latents[i + 1], rtol=1e-5, atol=1e-5)


# ============================================================================ restoration
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_restored_after_exception_in_callback(exc):
    pipe = _pipe("sd15")
    ref = _call(pipe)
    state = _state(pipe)

    def boom(p, i, t, kw):
        if i == 1:
            raise exc("stop")
        return kw

    with pytest.raises(exc):
        with trace(pipe):
            _call(pipe, callback_on_step_end=boom)
    _assert_restored(pipe, state)
    with trace(pipe) as tr:
        out = _call(pipe)
    _assert_restored(pipe, state)
    assert np.abs(out - ref).max() <= 1e-5 and tr.num_steps > 0


def test_user_callback_still_works_and_edits_are_recorded():
    pipe = _pipe("sd15")
    seen, before = [], {}

    def cb(p, i, t, kw):
        seen.append(i)
        if i == 1:
            before["latents"] = kw["latents"].clone()
            return {"latents": kw["latents"] * 0.5}
        return kw

    with trace(pipe) as tr:
        _call(pipe, callback_on_step_end=cb)
    assert seen == list(range(tr.num_steps))
    # the pipeline continued from the halved latents: that is what latents[2] holds
    assert torch.equal(tr.latents[2], before["latents"] * 0.5)


def test_no_device_sync_inside_attention_layers(monkeypatch):
    from sdlens.engine import sites as att_hooks

    inside = {"on": False}
    orig_record = att_hooks.AttentionRecorder.record

    def guarded(self, *a, **k):
        inside["on"] = True
        try:
            return orig_record(self, *a, **k)
        finally:
            inside["on"] = False

    def forbid(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            if inside["on"]:
                raise AssertionError(f"Tensor.{name}() called inside an attention layer")
            return orig(self, *a, **k)
        return f

    monkeypatch.setattr(att_hooks.AttentionRecorder, "record", guarded)
    for name in ("cpu", "item", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    pipe = _pipe("sd15")
    with trace(pipe) as tr:
        _call(pipe)
    assert len(tr.attention.steps) == tr.num_steps


# ============================================================================ determinism
def test_same_seed_same_trace():
    pipe = _pipe("sd15")
    a = generate(pipe, PROMPT, seed=3, steps=4)
    b = generate(pipe, PROMPT, seed=3, steps=4)
    c = generate(pipe, PROMPT, seed=4, steps=4)
    for name in ("latents", "noise", "noise_text", "noise_uncond", "x0", "timesteps"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for layer in a.attention.layers:
        assert torch.equal(a.attention[layer], b.attention[layer])
    assert not torch.equal(a.latents, c.latents)
    assert a.meta["seeds"] == [3] and c.meta["seeds"] == [4]
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


# ============================================================================ batches
def test_batch_prompts_images_per_prompt_and_negatives():
    pipe = _pipe("sd15")
    prompts = ["a red circle", "a blue square on a green background"]
    kw = dict(prompt=prompts, num_images_per_prompt=2, negative_prompt=["blurry", "dark"])
    ref = _call(pipe, **kw)
    with trace(pipe) as tr:
        out = _call(pipe, **kw)
    assert np.abs(out - ref).max() <= 1e-5
    assert tr.prompts == [prompts[0]] * 2 + [prompts[1]] * 2
    assert tr.negative_prompts == ["blurry", "blurry", "dark", "dark"]
    assert tr.latents.shape[1] == 4 and len(tr.images) == 4
    assert [len(t) for t in tr.token_ids] == [5, 5, 9, 9]
    assert tr.tokens[2][:3] == ["<|startoftext|>", "a</w>", "blue</w>"] and tr.tokens[2][-1] == "<|endoftext|>"
    maps = tr.attention
    assert maps.token_positions == list(range(9))
    assert maps[maps.layers[0]].shape[1:3] == (4, 9)
    guided = tr.noise_uncond + tr.guidance_scale * (tr.noise_text - tr.noise_uncond)
    assert torch.equal(tr.noise, guided)


def test_several_calls_in_one_block():
    pipe = _pipe("sd15")
    with trace(pipe) as tr:
        with pytest.raises(RuntimeError, match="no pipeline call"):
            tr.latents
        _call(pipe, prompt="a red circle", num_inference_steps=3)
        _call(pipe, prompt="a blue square", num_inference_steps=4)
    assert len(tr.runs) == 2
    assert tr.prompts == ["a blue square"] and tr.runs[0].prompts == ["a red circle"]
    assert tr.runs[0].num_steps < tr.num_steps


def test_sdxl_batch_and_tokens_line_up():
    pipe = _pipe("sdxl")
    with trace(pipe) as tr:
        _call(pipe, prompt=["a red circle", "a blue square"], negative_prompt="ugly")
    assert tr.meta["family"] == "sdxl" and tr.latents.shape[1] == 2
    assert tr.tokens[0][1:4] == ["a</w>", "red</w>", "circle</w>"]
    assert tr.attention.token_positions == list(range(5))
    assert tr.sigmas is not None  # Euler


# ============================================================================ tokens
def test_long_prompt_warns_and_records_cut_words():
    pipe = _pipe("sd15")
    words = ["zebra", "giraffe", "elephant", "tiger", "lion", "monkey", "horse", "rabbit",
             "penguin", "dolphin", "café"]
    prompt = " ".join(["red circle"] * 35 + words)  # 70 tokens + 12: the last 7 are cut
    with pytest.warns(UserWarning, match="longer than 75 tokens"):
        with trace(pipe) as tr:
            _call(pipe, prompt=prompt, num_inference_steps=2)
    assert len(tr.token_ids[0]) == 77
    assert tr.token_ids[0][0] == 49406 and tr.token_ids[0][-1] == 49407
    cut = tr.truncated_words[0]
    assert cut[-1] == "café" and "rabbit" in cut and "tiger" not in cut
    assert tr.attention.token_positions == list(range(77))


# ============================================================================ selection
def test_layer_and_step_selection():
    pipe = _pipe("sd15")
    with trace(pipe, layers="up", steps=slice(None, None, 2)) as tr:
        _call(pipe, num_inference_steps=5)
    maps = tr.attention
    assert maps.layers and all(l.startswith("up_blocks.") for l in maps.layers)
    assert maps.steps == list(range(0, tr.num_steps, 2))
    assert maps[maps.layers[0]].shape[0] == len(maps.steps)
    with trace(pipe, layers=["down.1.0", 8], steps=[0, -1]) as tr2:
        _call(pipe, num_inference_steps=5)
    m2 = tr2.attention
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2" in m2.layers
    assert all(max(m2.resolution(l)) == 8 or l.startswith("down_blocks.1.") for l in m2.layers)
    assert m2.steps == [0, tr2.num_steps - 1]
    with trace(pipe, record=("latents",)) as tr3:
        _call(pipe)
    assert tr3.attention is None and tr3.noise is None and tr3.x0 is None
    assert tr3.latents is not None


def test_attention_maps_api():
    pipe = _pipe("sd15")
    with trace(pipe) as tr:
        _call(pipe, num_inference_steps=3)
    maps = tr.attention
    assert maps.resolution("mid") == (1, 1)
    assert maps.resolution("down.0.0") == (8, 8)
    assert maps.alias("down_blocks.1.attentions.0.transformer_blocks.0.attn2") == "down.1.0"
    assert list(maps.select("down")) == [l for l in maps.layers if l.startswith("down_blocks")]
    assert set(maps.select(8)) == {l for l in maps.layers if maps.resolution(l) == (8, 8)}
    assert list(maps.select(None)) == maps.layers
    with pytest.raises(ValueError, match="available layers.*down.0.0"):
        maps.select("down.7.0")
    with pytest.raises(ValueError, match="available resolutions"):
        maps.select(13)
    with pytest.raises(IndexError, match="not recorded|out of range"):
        maps.get(maps.layers[0], step=99)
    with pytest.raises(ValueError, match="its words.*'circle'"):
        maps.token_index("triangle")
    circle = maps.get("up.3.0", step=-1, token="circle", batch=0)
    assert circle.shape == (8, 8)
    full = maps["up.3.0"]
    assert tr.tokens[0][3] == "circle</w>"
    torch.testing.assert_close(circle, full[-1, 0, 3].float())
    assert maps.token_index(0) == [0]


# ============================================================================ bad input
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
    pipe = _pipe("sd15")
    with pytest.raises(ValueError, match="unknown option"):
        trace(pipe, layer="up")
    state = _state(pipe)
    with pytest.raises(ValueError, match="unknown attention layer 'sideways'.*available layers"):
        with trace(pipe, layers="sideways"):
            _call(pipe)
    with pytest.raises(ValueError, match="out of range for this run of 4 steps"):
        with trace(pipe, steps=[10]):
            _call(pipe, num_inference_steps=3)
    _assert_restored(pipe, state)


def test_max_bytes_refusal_before_the_run():
    pipe = _pipe("sd15")
    state = _state(pipe)
    calls = []
    h = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(TraceTooLarge, match=r"max_bytes.*layers=.*steps="):
            with trace(pipe, max_bytes=10_000):
                _call(pipe)
    finally:
        h.remove()
    assert calls == []  # refused before the first UNet forward ran
    _assert_restored(pipe, state)
    with trace(pipe, max_bytes=10_000, record=("latents",)) as tr:  # small enough
        _call(pipe)
    assert tr.latents is not None


def test_unet_adapter():
    pipe = _pipe("sd15")
    adapter = adapter_for(pipe)
    assert isinstance(adapter, UNetAdapter) and adapter.denoiser is pipe.unet
    sites = adapter.sites()
    assert sites == sorted(k[: -len(".processor")] for k in pipe.unet.attn_processors
                           if k.endswith(".attn2.processor")) != []  # (down < mid < up, here)
    assert [adapter.site_of(k) for k in pipe.unet.attn_processors if ".attn1." in k] == \
        [None] * len(sites)
    res = adapter.resolutions((8, 8))
    assert res[sites[0]] == (8, 8) and res["mid_block.attentions.0.transformer_blocks.0.attn2"] == (1, 1)
    assert adapter.heads(sites[0]) == pipe.unet.get_submodule(sites[0]).heads
    assert adapter.family() == "sd1" and adapter.default_latent_hw() == (8, 8)
    assert adapter.latent_channels() == 4 and adapter.max_text_tokens == 77
    x = torch.arange(6.0)[:, None]
    assert adapter.cfg_rows(3) == {"uncond": slice(0, 3), "text": slice(3, 6)}
    halves = adapter.split_cfg(x)
    assert halves["uncond"].flatten().tolist() == [0, 1, 2] and halves["text"][0].item() == 3
    seen = []
    with Hooks() as hooks:
        hooks.forward_pre_hook(adapter.denoiser, lambda m, a, k: seen.append(
            ("in", adapter.denoiser_input(a, k).shape[0])), with_kwargs=True)
        hooks.forward_hook(adapter.denoiser, lambda m, a, k, o: seen.append(
            ("out", adapter.denoiser_output(o).shape[0])), with_kwargs=True)
        _call(pipe, num_inference_steps=1, guidance_scale=1.0)
    assert seen == [("in", 1), ("out", 1)]
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks


def test_unet_naming_without_a_pipeline():
    naming = naming_for("sdxl")
    assert naming is naming_for(None) is naming_for("shapes")
    site = "up_blocks.1.attentions.2.transformer_blocks.3.attn2"
    assert naming.alias(site) == "up.1.2.3" and naming.expand("up.1.2.3") + ".attn2" == site
    assert naming.alias("mid_block.attentions.0.transformer_blocks.0.attn2") == "mid"
    assert naming.expand("mid") == "mid_block" and naming.expand("sideways") is None
    assert naming.expand("down.1.0.0.0") is None
    assert [naming.group(s) for s in ("down_blocks.2.attentions.0.transformer_blocks.0.attn2",
                                      "mid_block.attentions.0.transformer_blocks.0.attn2", site)] \
        == ["down", "mid", "up"]
    assert sorted([site, "mid_block.x", "down_blocks.10.y", "down_blocks.2.y"],
                  key=naming.sort_key) == ["down_blocks.2.y", "down_blocks.10.y", "mid_block.x", site]
    with pytest.raises(ValueError, match="unknown model family 'kandinsky'.*sd1"):
        naming_for("kandinsky")
    # saved traces resolve selectors through their family's naming
    from sdlens.trace import AttentionMaps

    maps = AttentionMaps({site: torch.zeros(1, 1, 3, 2, 2)}, {site: (2, 2)}, [0], [0, 1, 2],
                         family="sdxl")
    assert maps.names("up.1") == [site] and maps.alias(site) == "up.1.2.3"
    with pytest.raises(ValueError, match="unknown model family"):
        AttentionMaps({}, {}, [], [], family="kandinsky")


def test_unsupported_pipelines():
    class FakeSD3:
        transformer = object()

    with pytest.raises(TypeError, match="transformer.*StableDiffusionPipeline"):
        trace(FakeSD3())
    with pytest.raises(TypeError, match="transformer.*StableDiffusionPipeline"):
        describe(FakeSD3())
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, mid_block_type=None, layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=32)
    pipe = _pipe("sd15")

    class NoCross:
        def __init__(self):
            self.unet, self.scheduler, self.tokenizer = unet, pipe.scheduler, pipe.tokenizer

    with pytest.raises(TypeError, match="no cross-attention"):
        trace(NoCross())


# ============================================================================ save / load
def test_save_load_round_trip(tmp_path):
    pipe = _pipe("sd15")
    tr = generate(pipe, ["a red circle", "a blue square"], seed=1, steps=3, negative_prompt="ugly")
    path = tr.save(tmp_path / "run.sdlens")
    assert path.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    t0 = time.perf_counter()
    back = load(path)
    assert time.perf_counter() - t0 < 1.0
    assert back._cache == {}  # lazy: nothing read yet
    assert back.pipeline is None
    for name in ("latents", "noise", "noise_text", "noise_uncond", "x0", "timesteps"):
        assert torch.equal(getattr(back, name), getattr(tr, name)), name
    assert back.sigmas is None and tr.sigmas is None
    assert back.prompts == tr.prompts and back.negative_prompts == tr.negative_prompts
    assert back.tokens == tr.tokens and back.token_ids == tr.token_ids
    assert back.truncated_words == tr.truncated_words
    assert back.meta == json.loads(json.dumps(tr.meta))
    assert back.meta["seeds"] == [1] and back.meta["diffusers_version"] == diffusers.__version__
    assert back.guidance_scale == tr.guidance_scale and back.do_cfg == tr.do_cfg
    assert back.attention.layers == tr.attention.layers
    assert back.attention.steps == tr.attention.steps
    assert back.attention.token_positions == tr.attention.token_positions
    for layer in tr.attention.layers:
        assert back.attention.resolution(layer) == tr.attention.resolution(layer)
        assert torch.equal(back.attention[layer], tr.attention[layer])
    assert len(back.images) == 2
    for a, b in zip(back.images, tr.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # saving a loaded trace again (onto itself) works
    back.save(path)
    again = load(path)
    assert torch.equal(again.latents, tr.latents)
    # tensors other modules add (e.g. sdlens.experiments.refiner's 'parts/...') survive a round trip
    from sdlens.trace import replace

    extra = replace(tr, extra_tensors={"parts/x": torch.arange(3.0)})
    extra.save(tmp_path / "extra.sdlens")
    assert torch.equal(load(tmp_path / "extra.sdlens")._tensor("parts/x"), torch.arange(3.0))


def test_load_errors(tmp_path):
    from safetensors.torch import save_file

    pipe = _pipe("sd15")
    tr = generate(pipe, "a red circle", seed=0, steps=2)
    path = tr.save(tmp_path / "ok.sdlens")
    data = path.read_bytes()
    cut = tmp_path / "cut.sdlens"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated|too short"):
        load(cut)
    # a newer format version
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["format_version"] = str(FORMAT_VERSION + 1)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    newer = tmp_path / "newer.sdlens"
    newer.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ValueError, match="newer sdlens.*upgrade"):
        load(newer)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="not an sdlens trace"):
        load(other)
    junk = tmp_path / "junk.sdlens"
    junk.write_bytes(b"PK\x03\x04 this is a zip file or anything else" * 10)
    with pytest.raises(ValueError, match="not an sdlens trace"):
        load(junk)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.sdlens")


def test_generate_arguments():
    pipe = _pipe("sd15")
    tr = generate(pipe, "a red circle", seed=[5, 6], steps=3, guidance_scale=1.0,
                  num_images_per_prompt=2, layers="mid", output_type="pil")
    assert tr.meta["seeds"] == [5, 6] and tr.noise_uncond is None and len(tr.images) == 2
    assert tr.attention.layers == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    with pytest.raises(ValueError, match="seed"):
        generate(pipe, "x", seed="zero")
    with pytest.raises(ValueError, match="generator"):
        generate(pipe, "x", generator=torch.Generator())


# ============================================================================ size estimate
def test_estimate_equals_recorded_size():
    pipe = _pipe("sd15")
    with trace(pipe, layers=["up", "mid"], steps=slice(0, None, 2)) as tr:
        _call(pipe, prompt=["a red circle", "a blue square"], num_inference_steps=4)
    est = tr.meta["estimated_bytes"]
    assert est["latents"] == tr.latents.nbytes and est["x0"] == tr.x0.nbytes
    assert est["noise"] == tr.noise.nbytes + tr.noise_text.nbytes + tr.noise_uncond.nbytes
    maps = tr.attention
    assert est["attention"] == sum(maps[l].nbytes for l in maps.layers) > 0


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
                           tokenizer=_pipe("sd15").tokenizer)
    est = estimate_trace_bytes(pipe, batch=1, steps=50, latent_hw=(64, 64), n_tokens=12)
    assert sum(est.values()) < 100e6, est
    assert est["attention"] == 50 * 12 * 2 * (5 * 64 * 64 + 5 * 32 * 32 + 5 * 16 * 16 + 8 * 8)
    heads = estimate_trace_bytes(pipe, batch=1, steps=50, latent_hw=(64, 64), n_tokens=12,
                                 options=RecordOptions(heads=True))
    assert heads["attention"] == 8 * est["attention"]


def test_size_estimate_counts_the_schedulers_real_steps():
    """PNDM (SD 1.5's default, skip_prk_steps) takes num_inference_steps + 1 steps, Heun 2n - 1:
    the estimate from num_inference_steps counts what the recorder will store."""
    from types import SimpleNamespace

    from sdlens.engine.options import estimate_trace_bytes, scheduler_steps

    base = _pipe("sd15")
    pndm = diffusers.PNDMScheduler.from_config(base.scheduler.config, skip_prk_steps=True)
    heun = diffusers.HeunDiscreteScheduler.from_config(base.scheduler.config)
    assert scheduler_steps(pndm, 10) == 11
    assert scheduler_steps(heun, 10) == 19
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


# ============================================================================ more pipelines
def test_sdxl_refiner_layout_uses_tokenizer_2():
    """The SDXL refiner has only text_encoder_2 / tokenizer_2 (and aesthetic-score time ids)."""
    base = _pipe("sdxl", "img2img")
    te2 = base.text_encoder_2
    cfg = dict(base.unet.config)
    cfg["cross_attention_dim"] = te2.config.hidden_size
    cfg["projection_class_embeddings_input_dim"] = 5 * cfg["addition_time_embed_dim"] + \
        te2.config.projection_dim
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(cfg)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=te2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler,
        requires_aesthetics_score=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(_inputs("img2img"), strength=0.5)
    ref = _call(pipe, **kw)
    with trace(pipe) as tr:
        out = _call(pipe, **kw)
    assert np.abs(out - ref).max() <= 1e-5
    assert tr.meta["family"] == "sdxl-refiner"
    assert tr.tokens[0][1:-1] == base.tokenizer_2.tokenize(PROMPT)


def test_bfloat16_pipeline_lands_on_host_in_float32():
    pipe = random_pipeline("sd15", dtype=torch.bfloat16)
    ref = _call(pipe, num_inference_steps=3)
    with trace(pipe) as tr:
        out = _call(pipe, num_inference_steps=3)
    assert np.abs(out - ref).max() == 0
    assert tr.latents.dtype == tr.noise.dtype == tr.x0.dtype == torch.float32
    assert tr.latents.device.type == "cpu"
    maps = tr.attention
    assert maps[maps.layers[0]].dtype == torch.float16
    assert tr.meta["dtype"] == "bfloat16"


def test_prompt_embeds_without_prompt_keeps_all_positions():
    pipe = _pipe("sd15")
    embeds, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    with trace(pipe) as tr:
        _call(pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=neg)
    assert tr.prompts == [None] and tr.tokens == [[]]
    assert tr.attention.token_positions == list(range(77))
    with pytest.raises(ValueError, match="no token strings"):
        tr.attention.token_index("circle")


def test_heatmap_delegates_to_heatmaps_module():
    from sdlens.analysis.heatmaps import word_heatmap

    pipe = _pipe("sd15")
    with trace(pipe) as tr:
        _call(pipe, num_inference_steps=3)
    hm = tr.heatmap("circle", size=16)
    assert torch.equal(hm, word_heatmap(tr, "circle", size=16))
    with pytest.raises(ValueError, match="circle"):  # the message lists the prompt's words
        tr.heatmap("triangle")


def test_wraps_custom_and_sliced_processors():
    """The recording processor wraps whatever was installed: its extra cross_attention_kwargs
    still reach it, attention slicing keeps working, images stay identical."""
    import inspect

    from diffusers.models.attention_processor import AttnProcessor2_0

    seen = []

    class Custom(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     temb=None, gain=1.0):
            seen.append(gain)
            return AttnProcessor2_0.__call__(self, attn, hidden_states, encoder_hidden_states,
                                             attention_mask, temb) * gain

    pipe = random_pipeline("sd15", seed=1)
    pipe.unet.set_attn_processor(Custom())
    kw = dict(cross_attention_kwargs={"gain": 0.5})
    ref = _call(pipe, **kw)
    n_ref = len(seen)
    state = _state(pipe)
    with trace(pipe) as tr:
        out = _call(pipe, **kw)
        proc = pipe.unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
        assert "gain" in inspect.signature(proc.__call__).parameters
    _assert_restored(pipe, state)
    assert np.abs(out - ref).max() == 0 and seen[n_ref:] == [0.5] * n_ref
    assert tr.attention is not None
    pipe.enable_attention_slicing(1)
    ref = _call(pipe)
    with trace(pipe, keep_padding=True, attention_dtype=torch.float32) as tr:
        out = _call(pipe)
    assert np.abs(out - ref).max() == 0
    m = tr.attention["up.3.0"]
    torch.testing.assert_close(m.sum(2), torch.ones_like(m.sum(2)), atol=1e-5, rtol=0)


def test_live_state_in_callback():
    from sdlens.engine.session import live_state

    pipe = _pipe("sd15")
    got = []

    def cb(p, i, t, kw):
        st = live_state(p)
        got.append((i, st["step"], st["x0"].clone(), st["prev_sample"].clone()))
        return kw

    assert live_state(pipe) is None
    with trace(pipe) as tr:
        _call(pipe, callback_on_step_end=cb)
    assert live_state(pipe) is None
    assert [g[0] for g in got] == [g[1] for g in got] == list(range(tr.num_steps))
    for i, _, x0, prev in got:
        assert torch.equal(x0, tr.x0[i]) and torch.equal(prev, tr.latents[i + 1])
