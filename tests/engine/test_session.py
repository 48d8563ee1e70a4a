"""The recording session (engine/session.py): a traced run is faithful to the untraced one,
records what the contract says, restores the pipeline on every path, and handles batches and
the pipelines sdlens supports. CPU, random-weight pipelines of the real architectures, shrunk."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import diffusers
from sdlens.engine.session import generate, trace
from sdlens.testing import random_pipeline
from pipelines import DecodeSpy, FirstUNetInput, PROMPT, assert_restored, cached_pipe, call_pipe, pipe_state, task_inputs


KINDS = [("sd15", "txt2img"), ("sd15", "img2img"), ("sd15", "inpaint"), ("sd21", "txt2img"),
         ("sdxl", "txt2img"), ("sdxl", "img2img"), ("sdxl", "inpaint"), ("shapes", "txt2img")]


@pytest.mark.parametrize("arch,task", KINDS, ids=[f"{a}-{t}" for a, t in KINDS])
def test_faithful_and_decoded_latent(arch, task):
    pipe = cached_pipe(arch, task)
    size = 64
    kw = task_inputs(task, size)
    ref = call_pipe(pipe, **kw)
    state = pipe_state(pipe)
    with DecodeSpy(pipe.vae) as spy, FirstUNetInput(pipe.unet) as first:
        with trace(pipe) as tr:
            out = call_pipe(pipe, **kw)
    assert_restored(pipe, state)
    np.testing.assert_array_equal(out, ref, err_msg="tracing changed the image")
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
    assert tr.timesteps.shape == (steps,) and tr.meta["denoiser_calls"] == steps
    if task == "img2img":
        assert steps < 4 + (1 if arch == "sd15" else 0)  # strength 0.6: fewer steps
    assert tr.meta["task"] == task and tr.meta["pipeline_class"] == type(pipe).__name__
    assert tr.attention is not None and len(tr.attention.layers) == sum(
        1 for k in pipe.unet.attn_processors if ".attn2." in k)
    assert tr.pipeline is pipe


def test_sd21_is_v_prediction_and_x0_matches_ddim():
    pipe = cached_pipe("sd21")
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
            call_pipe(pipe)
    finally:
        del pipe.scheduler.step
    assert tr.meta["prediction_type"] == "v_prediction"
    torch.testing.assert_close(tr.x0, torch.stack(reported).float(), rtol=1e-5, atol=1e-5)

def test_noise_identity_and_cfg_layout():
    pipe = cached_pipe("sd15")
    with trace(pipe) as tr:
        call_pipe(pipe, guidance_scale=7.5)
    assert tr.do_cfg and tr.guidance_scale == 7.5
    g = tr.guidance_scale
    guided = tr.noise_uncond + g * (tr.noise_text - tr.noise_uncond)
    assert torch.equal(tr.noise, guided)
    assert not torch.equal(tr.noise_uncond, tr.noise_text)


def test_guidance_off_has_no_uncond_half():
    pipe = cached_pipe("sd15")
    ref = call_pipe(pipe, guidance_scale=1.0)
    with trace(pipe) as tr:
        out = call_pipe(pipe, guidance_scale=1.0)
    np.testing.assert_array_equal(out, ref)
    assert tr.do_cfg is False and tr.noise_uncond is None
    assert torch.equal(tr.noise, tr.noise_text)
    assert tr.attention[tr.attention.layers[0]].shape[1] == 1


def test_attention_rows_sum_to_one_and_match_diffusers():
    pipe = cached_pipe("sd15")
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
            call_pipe(pipe)
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
    # default ("auto": 8-bit codes, as this small trace fits 200 MB), only the prompt's tokens,
    # equal to the first positions of the full maps within 1/510 of each map's peak
    with trace(pipe) as tr:
        call_pipe(pipe)
    n = len(tr.token_ids[0])
    assert tr.attention.token_positions == list(range(n))
    d = tr.attention[layer]
    assert tr.attention.dtype == "uint8" and d.dtype == torch.float32 and d.shape[2] == n
    assert tr.meta["options"]["attention_dtype"] == "uint8"
    assert "auto" in tr.meta["estimated_storage"]["attention"]
    ref = maps[layer][:, :, :n]
    assert ((d - ref).abs() <= ref.amax(dim=(-2, -1), keepdim=True) / 510 + 1e-7).all()


def test_attention_follows_text_embeddings_changed_during_the_run():
    # the recorder reuses a layer's keys while the text embeddings stay the same tensor; a
    # callback that swaps them (step 0) or edits them in place (step 1) must show in the maps
    pipe = cached_pipe("sd15")
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
            call_pipe(pipe, callback_on_step_end=cb,
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
    pipe = cached_pipe("sd15")
    with trace(pipe, heads=True, keep_padding=True, attention_dtype=torch.float32,
               layers="mid") as tr:
        call_pipe(pipe)
    (name,) = tr.attention.layers
    m = tr.attention[name]
    heads = pipe.unet.get_submodule(name).heads
    assert m.shape[:4] == (tr.num_steps, 1, heads, 77) and tr.attention.heads
    torch.testing.assert_close(m.sum(3), torch.ones_like(m.sum(3)), atol=1e-5, rtol=0)

@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_restored_after_exception_in_callback(exc):
    pipe = cached_pipe("sd15")
    ref = call_pipe(pipe)
    state = pipe_state(pipe)

    def boom(p, i, t, kw):
        if i == 1:
            raise exc("stop")
        return kw

    with pytest.raises(exc):
        with trace(pipe):
            call_pipe(pipe, callback_on_step_end=boom)
    assert_restored(pipe, state)
    with trace(pipe) as tr:
        out = call_pipe(pipe)
    assert_restored(pipe, state)
    np.testing.assert_array_equal(out, ref)
    assert tr.num_steps > 0


def test_user_callback_still_works_and_edits_are_recorded():
    pipe = cached_pipe("sd15")
    seen, before = [], {}

    def cb(p, i, t, kw):
        seen.append(i)
        if i == 1:
            before["latents"] = kw["latents"].clone()
            return {"latents": kw["latents"] * 0.5}
        return kw

    with trace(pipe) as tr:
        call_pipe(pipe, callback_on_step_end=cb)
    assert seen == list(range(tr.num_steps))
    # the pipeline continued from the halved latents: that is what latents[2] holds
    assert torch.equal(tr.latents[2], before["latents"] * 0.5)


def test_no_device_sync_inside_attention_layers(monkeypatch):
    from sdlens.engine import sites as att_hooks

    inside = {"on": False}
    orig_record = att_hooks.SiteProcessor.__call__  # the whole site: kernel reads, maps, sink

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

    monkeypatch.setattr(att_hooks.SiteProcessor, "__call__", guarded)
    for name in ("cpu", "item", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    pipe = cached_pipe("sd15")
    with trace(pipe) as tr:
        call_pipe(pipe)
    assert len(tr.attention.steps) == tr.num_steps

def test_same_seed_same_trace():
    pipe = cached_pipe("sd15")
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

def test_batch_prompts_images_per_prompt_and_negatives():
    pipe = cached_pipe("sd15")
    prompts = ["a red circle", "a blue square on a green background"]
    kw = dict(prompt=prompts, num_images_per_prompt=2, negative_prompt=["blurry", "dark"])
    ref = call_pipe(pipe, **kw)
    with trace(pipe) as tr:
        out = call_pipe(pipe, **kw)
    np.testing.assert_array_equal(out, ref)
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
    pipe = cached_pipe("sd15")
    with trace(pipe) as tr:
        with pytest.raises(RuntimeError, match="no pipeline call"):
            tr.latents
        call_pipe(pipe, prompt="a red circle", num_inference_steps=3)
        call_pipe(pipe, prompt="a blue square", num_inference_steps=4)
    assert len(tr.runs) == 2
    assert tr.prompts == ["a blue square"] and tr.runs[0].prompts == ["a red circle"]
    assert tr.runs[0].num_steps < tr.num_steps


def test_sdxl_batch_and_tokens_line_up():
    pipe = cached_pipe("sdxl")
    with trace(pipe) as tr:
        call_pipe(pipe, prompt=["a red circle", "a blue square"], negative_prompt="ugly")
    assert tr.meta["family"] == "sdxl" and tr.latents.shape[1] == 2
    assert tr.tokens[0][1:4] == ["a</w>", "red</w>", "circle</w>"]
    assert tr.attention.token_positions == list(range(5))
    assert tr.sigmas is not None  # Euler

def test_long_prompt_warns_and_records_cut_words():
    pipe = cached_pipe("sd15")
    words = ["zebra", "giraffe", "elephant", "tiger", "lion", "monkey", "horse", "rabbit",
             "penguin", "dolphin", "café"]
    prompt = " ".join(["red circle"] * 35 + words)  # 70 tokens + 12: the last 7 are cut
    with pytest.warns(UserWarning, match="longer than 75 tokens"):
        with trace(pipe) as tr:
            call_pipe(pipe, prompt=prompt, num_inference_steps=2)
    assert len(tr.token_ids[0]) == 77
    assert tr.token_ids[0][0] == 49406 and tr.token_ids[0][-1] == 49407
    cut = tr.truncated_words[0]
    assert cut[-1] == "café" and "rabbit" in cut and "tiger" not in cut
    assert tr.attention.token_positions == list(range(77))

def test_generate_arguments():
    pipe = cached_pipe("sd15")
    tr = generate(pipe, "a red circle", seed=[5, 6], steps=3, guidance_scale=1.0,
                  num_images_per_prompt=2, layers="mid", output_type="pil")
    assert tr.meta["seeds"] == [5, 6] and tr.noise_uncond is None and len(tr.images) == 2
    assert tr.attention.layers == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    with pytest.raises(ValueError, match="seed"):
        generate(pipe, "x", seed="zero")
    with pytest.raises(ValueError, match="generator"):
        generate(pipe, "x", generator=torch.Generator())

def test_sdxl_refiner_layout_uses_tokenizer_2():
    """The SDXL refiner has only text_encoder_2 / tokenizer_2 (and aesthetic-score time ids)."""
    base = cached_pipe("sdxl", "img2img")
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
    kw = dict(task_inputs("img2img"), strength=0.5)
    ref = call_pipe(pipe, **kw)
    with trace(pipe) as tr:
        out = call_pipe(pipe, **kw)
    np.testing.assert_array_equal(out, ref)
    assert tr.meta["family"] == "sdxl-refiner"
    assert tr.tokens[0][1:-1] == base.tokenizer_2.tokenize(PROMPT)


def test_bfloat16_pipeline_lands_on_host_in_float32():
    pipe = random_pipeline("sd15", dtype=torch.bfloat16)
    ref = call_pipe(pipe, num_inference_steps=3)
    with trace(pipe) as tr:
        out = call_pipe(pipe, num_inference_steps=3)
    assert np.abs(out - ref).max() == 0
    assert tr.latents.dtype == tr.noise.dtype == tr.x0.dtype == torch.float32
    assert tr.latents.device.type == "cpu"
    maps = tr.attention
    assert maps.dtype == "uint8" and maps[maps.layers[0]].dtype == torch.float32
    assert tr.meta["dtype"] == "bfloat16"


def test_prompt_embeds_without_prompt_keeps_all_positions():
    pipe = cached_pipe("sd15")
    embeds, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    with trace(pipe) as tr:
        call_pipe(pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=neg)
    assert tr.prompts == [None] and tr.tokens == [[]]
    assert tr.attention.token_positions == list(range(77))
    with pytest.raises(ValueError, match="no token strings"):
        tr.attention.token_index("circle")


def test_heatmap_delegates_to_heatmaps_module():
    from sdlens.analysis.heatmaps import word_heatmap

    pipe = cached_pipe("sd15")
    with trace(pipe) as tr:
        call_pipe(pipe, num_inference_steps=3)
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
    ref = call_pipe(pipe, **kw)
    n_ref = len(seen)
    state = pipe_state(pipe)
    with trace(pipe) as tr:
        out = call_pipe(pipe, **kw)
        proc = pipe.unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
        assert "gain" in inspect.signature(proc.__call__).parameters
    assert_restored(pipe, state)
    assert np.abs(out - ref).max() == 0 and seen[n_ref:] == [0.5] * n_ref
    assert tr.attention is not None
    pipe.enable_attention_slicing(1)
    ref = call_pipe(pipe)
    with trace(pipe, keep_padding=True, attention_dtype=torch.float32) as tr:
        out = call_pipe(pipe)
    assert np.abs(out - ref).max() == 0
    m = tr.attention["up.3.0"]
    torch.testing.assert_close(m.sum(2), torch.ones_like(m.sum(2)), atol=1e-5, rtol=0)


def test_live_state_in_callback():
    from sdlens.engine.session import live_state

    pipe = cached_pipe("sd15")
    got = []

    def cb(p, i, t, kw):
        st = live_state(p)
        got.append((i, st["step"], st["x0"].clone(), st["prev_sample"].clone()))
        return kw

    assert live_state(pipe) is None
    with trace(pipe) as tr:
        call_pipe(pipe, callback_on_step_end=cb)
    assert live_state(pipe) is None
    assert [g[0] for g in got] == [g[1] for g in got] == list(range(tr.num_steps))
    for i, _, x0, prev in got:
        assert torch.equal(x0, tr.x0[i]) and torch.equal(prev, tr.latents[i + 1])
