"""SD3 / SD3.5 (MMDiT) traced like the UNet models: random-weight pipelines, CPU fp32, 2-3 steps."""

from __future__ import annotations

import functools

import pytest
import torch

import sdlens
from sdlens.analysis.tokens import tokenize_segments, trace_words
from sdlens.engine.arch import adapter_for
from pipelines import assert_restored, pipe_state, run_latents
from sdlens.testing import random_pipeline

PROMPT = "a red circle and a blue square"
STEPS = 3


@functools.lru_cache(maxsize=None)
def pipe_of(arch: str, t5: bool = True, task: str = "txt2img"):
    return random_pipeline(arch, task=task, t5=t5, seed=0)


run = functools.partial(run_latents, prompt=PROMPT, steps=STEPS)


@functools.lru_cache(maxsize=None)
def traced(arch: str, t5: bool = True):
    pipe = pipe_of(arch, t5)
    plain, _ = run(pipe, False)
    out, tr = run(pipe, True)
    return pipe, plain, out, tr


@pytest.mark.parametrize("arch", ["sd3", "sd35"])
def test_traced_run_is_the_untraced_run(arch):
    pipe, plain, out, tr = traced(arch)
    assert torch.equal(plain, out)
    assert torch.equal(tr.latents[-1], out.float())
    assert tr.meta["family"] == arch and tr.prediction_type == "flow"
    assert tr.latents.shape == (STEPS + 1, 1, 16, 8, 8)


@pytest.mark.parametrize("arch", ["sd3", "sd35"])
def test_guidance_identity_and_flow_x0(arch):
    pipe, _, out, tr = traced(arch)
    assert tr.do_cfg and tr.noise_uncond is not None
    g = tr.guidance_scale
    guided = tr.noise_uncond + g * (tr.noise_text - tr.noise_uncond)
    torch.testing.assert_close(tr.noise, guided, rtol=1e-5, atol=1e-5)
    # sigmas are the scheduler's (shifted) ones, x0 = x_t - sigma v, and the last x0 is the result
    sched = pipe.scheduler
    torch.testing.assert_close(tr.sigmas, sched.sigmas[:STEPS].float())
    s = tr.sigmas[:, None, None, None, None]
    torch.testing.assert_close(tr.x0, tr.latents[:-1] - s * tr.noise)
    torch.testing.assert_close(tr.x0[-1], tr.latents[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd3", "sd35"])
def test_every_joint_attention_site_recorded(arch):
    pipe, _, _, tr = traced(arch)
    cfg = pipe.transformer.config
    maps = tr.attention
    assert maps.layers == [f"transformer_blocks.{i}.attn" for i in range(cfg.num_layers)]
    assert not any("attn2" in layer for layer in maps.layers)
    if arch == "sd35":  # the dual-attention blocks' image-only attn2 exists and is not a site
        assert cfg.dual_attention_layers and pipe.transformer.transformer_blocks[0].attn2 is not None
    patches = (8 // cfg.patch_size, 8 // cfg.patch_size)
    assert all(maps.resolution(layer) == patches for layer in maps.layers)
    assert maps.alias("transformer_blocks.1.attn") == "block.1"
    assert maps.names("block.1") == maps.names("1") == ["transformer_blocks.1.attn"]
    assert maps.names("blocks") == maps.layers
    n_clip, n_t5 = (seg["tokens"] for seg in tr.text_segments[0])
    assert maps.token_positions == list(range(n_clip)) + list(range(77, 77 + n_t5))
    m = maps[maps.layers[0]].float()  # (steps, batch, tokens, h, w): a part of each row
    assert m.shape == (STEPS, 1, n_clip + n_t5) + patches
    # (4-bit codes: values under 1/30 of a map's peak may read 0)
    assert (m.sum(2) < 1).all() and (m >= 0).all() and (m.amax(dim=(-2, -1)) > 0).all()


@pytest.mark.parametrize("arch", ["sd3", "sd35"])
def test_heatmap_of_every_word(arch):
    _, _, _, tr = traced(arch)
    words = trace_words(tr)
    assert [w.text for w in words] == ["a", "red", "circle", "and", "a", "blue", "square"]
    for w in words:  # each word pooled over its CLIP token and its T5 pieces
        assert w.encoders == ("clip", "t5") and min(w.positions) < 77 <= max(w.positions)
        hm = tr.heatmap(w.text, occurrence=w.occurrence)
        assert hm.shape == (64, 64) and torch.isfinite(torch.as_tensor(hm)).all()
    red = next(w for w in words if w.text == "red")
    maps = tr.attention
    layer = maps.layers[0]
    idx = maps.token_index("red")
    assert [maps.token_positions[i] for i in idx] == list(red.positions)
    torch.testing.assert_close(maps.get(layer, token="red"),
                               maps[layer][:, :, idx].float().mean(2))


def test_missing_word_is_a_one_line_error():
    _, _, _, tr = traced("sd3")
    with pytest.raises(ValueError) as e:
        tr.heatmap("zebra")
    assert "\n" not in str(e.value) and "'red'" in str(e.value)


def test_joint_probabilities_are_the_text_columns_of_the_full_softmax():
    """The recorder's maths on one kernel call laid out [image; text]: the text columns of the
    softmax over all keys, from the kernel's lse (fused route) and from the exact route."""
    from sdlens.engine import kernel
    from sdlens.engine.arch.base import joint_layout
    from sdlens.engine.sites import segment_probabilities

    torch.manual_seed(1)
    q, k = torch.randn(2, 2, 26, 16), torch.randn(2, 2, 26, 16)
    layout = joint_layout(("image", "text"), {"image": 16, "text": 10}, 26, 26)
    ref = (q @ k.transpose(-1, -2) / 4).softmax(-1)[:, :, :16, 16:]  # image rows, text columns
    _, lse = kernel.attention((q, k, k), {})
    exact = kernel.logsumexp_rows(q, k, None, False, None, chunk_bytes=4 * 2 * 2 * 26 * 3)
    for lse_ in (lse, exact):
        call = kernel.KernelCall(q, k, k, None, 0.25, False, lse_, 0)
        got = segment_probabilities(call, slice(None), layout.queries["image"], layout.keys["text"])
        torch.testing.assert_close(got, ref.transpose(-1, -2), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    _, _, _, tr = traced("sd35")
    back = sdlens.load(tr.save(tmp_path / "sd35.sdlens"))
    assert back.text_segments == tr.text_segments and back.prediction_type == "flow"
    assert back.tokens == tr.tokens and back.meta["family"] == "sd35"
    assert back.attention.token_positions == tr.attention.token_positions
    torch.testing.assert_close(back.heatmap("square"), tr.heatmap("square"))
    torch.testing.assert_close(back.x0, tr.x0)


def test_restored_after_an_exception_mid_run():
    pipe = pipe_of("sd3")
    before = pipe_state(pipe)

    def stop(p, i, t, kw):
        if i == 1:
            raise KeyboardInterrupt
        return kw

    with pytest.raises(KeyboardInterrupt):
        with sdlens.trace(pipe):
            pipe(PROMPT, num_inference_steps=STEPS, output_type="latent",
                 callback_on_step_end=stop)
    assert_restored(pipe, before)
    plain, _ = run(pipe, False)
    assert torch.equal(plain, traced("sd3")[1])


def test_without_t5():
    pipe, plain, out, tr = traced("sd3", t5=False)
    assert pipe.text_encoder_3 is None and torch.equal(plain, out)
    assert [s["tokens"] for s in tr.text_segments[0]] == [9, 0]
    assert tr.attention.token_positions == list(range(9))
    assert all(w.encoders == ("clip",) for w in trace_words(tr))
    assert tr.heatmap("red circle").shape == (64, 64)
    with sdlens.trace(pipe, keep_padding=True) as tr2:  # all 77 + 256 positions, zeros included
        pipe(PROMPT, num_inference_steps=1, output_type="latent")
    assert tr2.attention.token_positions == list(range(77 + 256))


def test_words_past_clip_are_found_in_t5():
    pipe = pipe_of("sd3")
    prompt = " ".join(["red"] * 80 + ["robot"])
    view = tokenize_segments(prompt, adapter_for(pipe).text_parts({"max_sequence_length": 512}))
    clip, t5 = view.segments
    assert clip["tokens"] == 77 and t5["start"] == 77 and t5["tokens"] > 81
    robot = next(w for w in view.words if w.text == "robot")
    assert robot.encoders == ("t5",) and min(robot.positions) > 77
    assert "robot" not in view.truncated_words  # T5 carries it
    assert next(w for w in view.words if w.name == "red#80").encoders == ("t5",)


def test_skip_layer_guidance_call_is_not_a_step():
    pipe = pipe_of("sd35")
    kw = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
              skip_layer_guidance_stop=1.0)
    plain, _ = run(pipe, False, **kw)
    out, tr = run(pipe, True, **kw)
    assert torch.equal(plain, out) and tr.num_steps == STEPS
    assert tr.meta["denoiser_calls"] == STEPS


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint(task):
    pipe = pipe_of("sd3", task=task)
    kw = dict(image=torch.rand(1, 3, 64, 64), strength=0.5)
    if task == "inpaint":
        mask = torch.zeros(1, 1, 64, 64)
        mask[..., 16:48, 16:48] = 1
        kw["mask_image"] = mask
    plain, _ = run(pipe, False, **kw)
    out, tr = run(pipe, True, **kw)
    assert torch.equal(plain, out) and tr.num_steps == 2
    assert torch.equal(tr.latents[-1], out.float())  # inpainting's re-blended latents
    assert tr.meta["task"] == task and len(tr.attention.layers) == 2


def test_unsupported_transformer_pipeline_is_a_type_error():
    class HiDreamImageTransformer2DModel(torch.nn.Module):
        pass

    class HiDreamImagePipeline:
        transformer = HiDreamImageTransformer2DModel()

    with pytest.raises(TypeError, match="HiDreamImageTransformer2DModel.*StableDiffusion3Pipeline"):
        sdlens.trace(HiDreamImagePipeline())


def test_generate_reweights_joint_attention():
    pipe = pipe_of("sd3")
    plain = sdlens.generate(pipe, PROMPT, steps=2, output_type="latent")
    same = sdlens.generate(pipe, PROMPT, steps=2, output_type="latent", reweight={"red": 1.0})
    steered = sdlens.generate(pipe, PROMPT, steps=2, output_type="latent", reweight={"red": 3.0})
    assert torch.equal(plain.latents, same.latents)
    assert not torch.equal(plain.latents, steered.latents)
    first = dict(steps=0, layers="block.0")  # recorded before the first edit
    assert torch.equal(plain.heatmap("red", **first), steered.heatmap("red", **first))


def test_token_view_says_which_encoder_saw_each_token():
    from sdlens.analysis.tokens import token_view

    _, _, _, tr = traced("sd3")
    view = token_view(tr)
    n_clip = tr.text_segments[0][0]["tokens"]
    assert {r.encoder for r in view.rows[:n_clip]} == {"clip"}
    assert {r.encoder for r in view.rows[77:]} == {"t5"}
    assert view.to_dict()["segments"] == tr.text_segments[0]
    att = sum(r.attention for r in view.rows if r.attention is not None)
    assert 0 < att < 1  # the text share of joint attention: the rest went to the image keys


def test_cfg_sweep_cells_are_single_runs():
    pipe = pipe_of("sd3")
    grid = sdlens.sweep(pipe, PROMPT, seeds=[0], guidance_scales=[1.0, 4.0], steps=2,
                        record="full", progress=False)
    for g in (1.0, 4.0):
        cell = grid.trace(guidance=g)
        single = sdlens.generate(pipe, PROMPT, seed=0, steps=2, guidance_scale=g)
        assert cell.do_cfg == single.do_cfg == (g > 1) and cell.prediction_type == "flow"
        torch.testing.assert_close(cell.latents, single.latents, rtol=1e-4, atol=1e-4)
        assert cell.attention.token_positions == single.attention.token_positions
        torch.testing.assert_close(cell.heatmap("red"), single.heatmap("red"), rtol=1e-3,
                                   atol=1e-3)


def test_batch_of_prompts_and_embeddings():
    from sdlens.trace.ops import select_batch

    pipe = pipe_of("sd3")
    prompts = ["a red circle", "a large blue square on the beach at night"]
    tr = sdlens.generate(pipe, prompts, seed=0, steps=2, num_images_per_prompt=2)
    (c0, t0), (c1, t1) = ([s["tokens"] for s in tr.text_segments[b]] for b in (0, 2))
    assert c0 < c1 and t0 < t1
    assert tr.attention.token_positions == list(range(c1)) + list(range(77, 77 + t1))
    one = select_batch(tr, 2)
    assert one.text_segments == [tr.text_segments[2]]
    torch.testing.assert_close(one.heatmap("beach"), tr.heatmap("beach", batch=2))
    embeds = pipe.encode_prompt(prompts[0], None, None, do_classifier_free_guidance=True)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds")
    with sdlens.trace(pipe) as tr2:  # no prompt: no tokens, every position kept
        pipe(**dict(zip(names, embeds)), num_inference_steps=1, output_type="latent")
    assert tr2.attention.token_positions == list(range(77 + 256)) and tr2.tokens == [[]]
