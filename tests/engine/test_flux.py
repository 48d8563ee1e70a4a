"""Flux.1 traced like the UNet models: random-weight pipelines (2 double + 2 single blocks),
CPU fp32, 3 steps, 64 px."""

from __future__ import annotations

import functools

import pytest
import torch

import diffusers.models.transformers.transformer_flux as flux_module
import sdlens
from sdlens.analysis.tokens import trace_words
from sdlens.engine.arch import adapter_for, naming_for
from sdlens.engine.arch.flux import FluxAdapter
from sdlens.engine.options import estimate_trace_bytes
from pipelines import assert_restored, pipe_state, run_latents
from sdlens.testing import random_pipeline

PROMPT = "a red circle and a blue square"
NEGATIVE = "a green triangle"
STEPS = 3


@functools.lru_cache(maxsize=None)
def pipe_of(task: str = "txt2img"):
    return random_pipeline("flux", task=task, seed=0)


run = functools.partial(run_latents, prompt=PROMPT, steps=STEPS)


@functools.lru_cache(maxsize=None)
def traced(true_cfg: bool = False):
    pipe = pipe_of()
    kw = dict(negative_prompt=NEGATIVE, true_cfg_scale=2.5) if true_cfg else {}
    plain, _ = run(pipe, False, **kw)
    out, tr = run(pipe, True, **kw)
    return pipe, plain, out, tr


def unpack(pipe, packed):
    return pipe._unpack_latents(packed, 64, 64, pipe.vae_scale_factor)


@pytest.mark.parametrize("true_cfg", [False, True])
def test_traced_run_is_the_untraced_run(true_cfg):
    pipe, plain, out, tr = traced(true_cfg)
    assert torch.equal(plain, out)
    assert tr.meta["family"] == "flux" and tr.prediction_type == "flow"
    # the packed 2x2 latents are unpacked as the pipeline unpacks them for the VAE
    assert tr.latents.shape == (STEPS + 1, 1, 16, 8, 8)
    assert torch.equal(tr.latents[-1], unpack(pipe, out).float())
    assert tr.noise.shape == tr.x0.shape == (STEPS, 1, 16, 8, 8)


def test_guidance_distilled_has_no_unconditional_pass():
    pipe, _, _, tr = traced()
    assert tr.noise_uncond is None and not tr.do_cfg
    assert tr.guidance_scale == 3.5 == tr.meta["distilled_guidance"]
    assert tr.meta["guidance_scale"] == 3.5 and tr.meta["true_cfg_scale"] == 1.0
    assert tr.meta["denoiser_calls"] == STEPS
    torch.testing.assert_close(tr.noise, tr.noise_text, rtol=0, atol=0)


def test_true_cfg_records_both_calls():
    pipe, _, _, tr = traced(true_cfg=True)
    assert tr.do_cfg and tr.noise_uncond is not None and tr.meta["denoiser_calls"] == 2 * STEPS
    assert tr.guidance_scale == 2.5 == tr.meta["true_cfg_scale"]
    assert tr.meta["distilled_guidance"] == 3.5
    guided = tr.noise_uncond + 2.5 * (tr.noise_text - tr.noise_uncond)
    torch.testing.assert_close(tr.noise, guided, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tr.noise_uncond, tr.noise_text)
    # the prompt's call is the one the maps come from: they equal the plain run's first step
    # (same x_T, same prompt), whatever the negative call does
    _, _, _, plain = traced()
    layer = tr.attention.layers[0]
    torch.testing.assert_close(tr.attention[layer][0], plain.attention[layer][0])
    assert tr.negative_prompts == [NEGATIVE]


@pytest.mark.parametrize("true_cfg", [False, True])
def test_flow_x0_and_last_step(true_cfg):
    pipe, _, _, tr = traced(true_cfg)
    s = tr.sigmas[:, None, None, None, None]
    torch.testing.assert_close(tr.x0, tr.latents[:-1] - s * tr.noise)
    torch.testing.assert_close(tr.x0[-1], tr.latents[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tr.sigmas, pipe.scheduler.sigmas[:STEPS].float())


def test_every_double_and_single_block_recorded():
    pipe, _, _, tr = traced()
    cfg = pipe.transformer.config
    maps = tr.attention
    double = [f"transformer_blocks.{i}.attn" for i in range(cfg.num_layers)]
    single = [f"single_transformer_blocks.{i}.attn" for i in range(cfg.num_single_layers)]
    assert maps.layers == double + single and len(maps.layers) == 4
    assert "skipped" not in tr.meta
    assert maps.names("double") == double and maps.names("single") == single
    assert maps.names("blocks") == maps.layers
    assert maps.alias(single[1]) == "single.1" and maps.names("double.1") == [double[1]]
    assert all(maps.resolution(layer) == (4, 4) for layer in maps.layers)  # 8x8 latents / 2
    n_t5 = tr.text_segments[0][0]["tokens"]
    assert tr.text_segments[0][0]["encoder"] == "t5" and maps.token_positions == list(range(n_t5))
    for layer in maps.layers:  # a part of each row: the rest went to the image keys
        m = maps[layer].float()
        assert m.shape == (STEPS, 1, n_t5, 4, 4)  # (4-bit codes: values under 1/30 of a
        assert (m >= 0).all() and (m.amax(dim=(-2, -1)) > 0).all()  # map's peak may read 0)
        assert (m.sum(2) < 1).all()


def processor_softmax(monkeypatch) -> list:
    """The softmax of every attention call the Flux processors make, (B, heads, S, S) over the
    [text; image] sequence from their own RoPE-rotated q / k, read where they hand them to the
    attention function; appended to the returned list as the calls happen."""
    seen = []
    original = flux_module.dispatch_attention_fn

    def spy(query, key, value, **kw):  # (B, S, heads, d), [text; image]
        scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float())
        seen.append((scores * query.shape[-1] ** -0.5).softmax(-1))
        return original(query, key, value, **kw)

    monkeypatch.setattr(flux_module, "dispatch_attention_fn", spy)
    return seen


def test_recorded_maps_are_the_processors_softmax(monkeypatch):
    """The maps are the text columns of the softmax the processor computes, from its own RoPE-
    rotated q / k (read where it hands them to the attention function), in every block kind."""
    pipe = pipe_of()
    seen = processor_softmax(monkeypatch)
    with sdlens.trace(pipe, heads=True, keep_padding=True, attention_dtype=torch.float32,
                      steps=[0]) as tr:
        pipe(PROMPT, num_inference_steps=1, output_type="latent", max_sequence_length=32,
             generator=torch.Generator().manual_seed(0))
    maps = tr.attention
    assert len(seen) == len(maps.layers) == 4 and maps.token_positions == list(range(32))
    for layer, probs in zip(maps.layers, seen):
        ref = probs[:, :, 32:, :32].transpose(-1, -2)  # image queries, text keys
        got = maps[layer][0].flatten(-2)  # (B, heads, T, HW)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_heatmap_of_every_word():
    _, _, _, tr = traced()
    words = trace_words(tr)
    assert [w.text for w in words] == ["a", "red", "circle", "and", "a", "blue", "square"]
    for w in words:
        assert w.encoders == ("t5",)
        hm = tr.heatmap(w.text, occurrence=w.occurrence)
        assert hm.shape == (64, 64) and torch.isfinite(torch.as_tensor(hm)).all()
    maps = tr.attention
    layer = "single_transformer_blocks.1.attn"
    idx = maps.token_index("circle")
    torch.testing.assert_close(maps.get(layer, token="circle"),
                               maps[layer][:, :, idx].float().mean(2))


def test_missing_word_is_a_one_line_error():
    _, _, _, tr = traced()
    with pytest.raises(ValueError) as e:
        tr.heatmap("zebra")
    assert "\n" not in str(e.value) and "'red'" in str(e.value)


def test_save_load_round_trip(tmp_path):
    _, _, _, tr = traced(true_cfg=True)
    back = sdlens.load(tr.save(tmp_path / "flux.sdlens"))
    assert back.meta["family"] == "flux" and back.text_segments == tr.text_segments
    assert back.tokens == tr.tokens and back.do_cfg and back.guidance_scale == 2.5
    assert back.attention.layers == tr.attention.layers
    assert back.attention.names("single") == tr.attention.names("single")
    torch.testing.assert_close(back.heatmap("square"), tr.heatmap("square"))
    torch.testing.assert_close(back.noise_uncond, tr.noise_uncond)
    torch.testing.assert_close(back.x0, tr.x0)


@pytest.mark.parametrize("true_cfg", [False, True])
def test_restored_after_an_exception_mid_run(true_cfg):
    pipe = pipe_of()
    before = pipe_state(pipe)
    kw = dict(negative_prompt=NEGATIVE, true_cfg_scale=2.5) if true_cfg else {}

    def stop(p, i, t, cb):
        if i == 1:
            raise KeyboardInterrupt
        return cb

    with pytest.raises(KeyboardInterrupt):
        with sdlens.trace(pipe):
            pipe(PROMPT, num_inference_steps=STEPS, output_type="latent",
                 callback_on_step_end=stop, **kw)
    assert_restored(pipe, before)
    plain, _ = run(pipe, False, **kw)
    assert torch.equal(plain, traced(true_cfg)[1])


def test_naming_without_a_pipeline():
    naming = naming_for("flux")
    assert naming is FluxAdapter.naming
    assert naming.alias("transformer_blocks.3.attn") == "double.3"
    assert naming.alias("single_transformer_blocks.37.attn") == "single.37"
    assert naming.expand("single.2") == "single_transformer_blocks.2"
    assert naming.group("single_transformer_blocks.0.attn") == "single"
    assert naming.group("transformer_blocks.0.attn") == "double"
    sites = ["single_transformer_blocks.10.attn", "single_transformer_blocks.2.attn",
             "transformer_blocks.18.attn", "transformer_blocks.0.attn"]
    assert sorted(sites, key=naming.sort_key) == sites[::-1]


def test_size_estimate():
    pipe = pipe_of()
    adapter = adapter_for(pipe)
    assert adapter.latent_channels() == 16 and adapter.default_latent_hw() == (8, 8)
    est = estimate_trace_bytes(pipe, steps=STEPS)  # defaults: no CFG, all 512 T5 positions
    assert estimate_trace_bytes(pipe, num_inference_steps=STEPS) == est  # dynamic shifting
    per = 16 * 8 * 8 * 4
    # no CFG: noise_text is noise (one tensor)
    assert est["latents"] == (STEPS + 1) * per and est["noise"] == STEPS * per
    assert est["attention"] == STEPS * 4 * 512 * (4 * 4 + 4)  # 4 sites, "auto": 8-bit codes + scale
    _, _, _, tr = traced()  # the recorded tensors are what was estimated
    n = len(tr.attention.token_positions)
    got = estimate_trace_bytes(pipe, steps=STEPS, n_tokens=n)
    assert got["attention"] == tr.nbytes()["attention"] and got["latents"] == tr.latents.numel() * 4
    assert tr.noise_text is tr.noise and got["noise"] == tr.nbytes()["noise"] == tr.noise.nbytes


def test_img2img_and_inpaint():
    for task in ("img2img", "inpaint"):
        pipe = pipe_of(task)
        kw = dict(image=torch.rand(1, 3, 64, 64), strength=0.5)
        if task == "inpaint":
            mask = torch.zeros(1, 1, 64, 64)
            mask[..., 16:48, 16:48] = 1
            kw["mask_image"] = mask
        plain, _ = run(pipe, False, **kw)
        out, tr = run(pipe, True, **kw)
        assert torch.equal(plain, out) and tr.num_steps == 2 and tr.meta["task"] == task
        assert torch.equal(tr.latents[-1], unpack(pipe, out).float())  # re-blended latents
        assert len(tr.attention.layers) == 4


def test_unsupported_transformers_are_one_type_error():
    for name in ("HiDreamImageTransformer2DModel", "Lumina2Transformer2DModel",
                 "CogView4Transformer2DModel"):
        transformer = type(name, (torch.nn.Module,), {})()
        pipe = type(name.replace("Transformer2DModel", "Pipeline"), (), {"transformer": transformer})()
        with pytest.raises(TypeError) as e:
            sdlens.trace(pipe)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and "FluxPipeline" in msg
    # Flux.1's transformer in a pipeline of another layout: traced as that family, or refused
    kontext = type("FluxKontextPipeline", (), {"transformer": pipe_of().transformer})()
    assert adapter_for(kontext).family() == "flux-kontext"
    fill = type("FluxFillPipeline", (), {"transformer": pipe_of().transformer})()
    with pytest.raises(TypeError, match="FluxFillPipeline.*FluxTransformer2DModel.*FluxPipeline"):
        sdlens.trace(fill)


def test_last_x0_preview_is_the_pipelines_image():
    pipe = pipe_of()
    from sdlens.analysis.previews import preview

    tr = sdlens.generate(pipe, PROMPT, seed=0, steps=2)  # the VAE decodes the unpacked x0
    assert (torch.as_tensor(list(preview(tr, "x0", step=-1).getdata()))
            == torch.as_tensor(list(tr.images[0].getdata()))).all()


def test_guidance_value_sweep_cells_are_single_runs():
    pipe = pipe_of()
    grid = sdlens.sweep(pipe, PROMPT, seeds=[0], guidance_scales=[2.0, 4.0], steps=2,
                        record="full", progress=False)  # one call per guidance value
    for g in (2.0, 4.0):
        cell = grid.trace(guidance=g)
        single = sdlens.generate(pipe, PROMPT, seed=0, steps=2, guidance_scale=g)
        assert not cell.do_cfg and cell.guidance_scale == single.guidance_scale == g
        torch.testing.assert_close(cell.latents, single.latents)
    assert not torch.equal(grid.trace(guidance=2.0).latents, grid.trace(guidance=4.0).latents)


def test_prompt_2_is_what_t5_reads():
    pipe = pipe_of()
    with sdlens.trace(pipe) as tr:
        pipe("a cat", prompt_2="a red circle on the beach", num_inference_steps=1,
             output_type="latent")
    assert tr.prompts == ["a cat"]
    assert [w.text for w in trace_words(tr)] == ["a", "red", "circle", "on", "the", "beach"]
    assert tr.heatmap("beach").shape == (64, 64)


def test_single_blocks_alone():
    """The single-stream sites take T from the double-stream calls, recorded or not."""
    pipe = pipe_of()
    with sdlens.trace(pipe, layers="single") as tr:
        pipe(PROMPT, num_inference_steps=2, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    _, _, _, full = traced()
    assert tr.attention.layers == full.attention.names("single") and "skipped" not in tr.meta
    layer = tr.attention.layers[-1]
    torch.testing.assert_close(tr.attention[layer][0], full.attention[layer][0])


def test_fused_projections():
    """After ``fuse_qkv_projections()`` (one ``to_qkv``) the maps are the same."""
    pipe = random_pipeline("flux", seed=0)
    pipe.transformer.fuse_qkv_projections()
    assert pipe.transformer.single_transformer_blocks[0].attn.fused_projections
    _, tr = run(pipe, True)
    _, _, _, plain = traced()
    for layer in plain.attention.layers:
        torch.testing.assert_close(tr.attention[layer], plain.attention[layer])


# ---------------------------------------------------------------- joint-attention extras
CONCEPTS = ["circle", "square", "background", "zebra"]  # "background", "zebra": not in the prompt


@functools.lru_cache(maxsize=None)
def concept_traced(true_cfg: bool = False):
    pipe = pipe_of()
    kw = dict(negative_prompt=NEGATIVE, true_cfg_scale=2.5) if true_cfg else {}
    plain, _ = run(pipe, False, num_inference_steps=2, **kw)
    # sdlens's variant: the stream through the single-stream blocks too (the paper's default:
    # tests/engine/test_concept_paper.py)
    with sdlens.trace(pipe, concepts=CONCEPTS, concept_method="sdlens",
                      record=("latents", "attention", "image_to_text")) as tr:
        out, _ = run(pipe, False, num_inference_steps=2, **kw)
    return pipe, plain, out, tr.runs[-1]


@pytest.mark.parametrize("true_cfg", [False, True])
def test_concept_maps_leave_the_image_unchanged(true_cfg):
    pipe, plain, out, tr = concept_traced(true_cfg)
    assert torch.equal(plain, out) and torch.equal(tr.latents[-1], unpack(pipe, out).float())
    assert "skipped" not in tr.meta
    cfg = pipe.transformer.config
    concepts = tr.concepts  # every double-stream block, then every single-stream block
    assert concepts.layers == [f"transformer_blocks.{i}.attn" for i in range(cfg.num_layers)] + [
        f"single_transformer_blocks.{i}.attn" for i in range(cfg.num_single_layers)]
    assert concepts.concepts == CONCEPTS and concepts.steps == [0, 1]
    for layer in concepts.layers:  # (steps, batch, concepts, h, w), a softmax over concepts
        m = concepts[layer].float()
        assert m.shape == (2, 1, len(CONCEPTS), 4, 4)
        torch.testing.assert_close(m.sum(2), torch.ones(2, 1, 4, 4), atol=2e-3, rtol=0)
    if true_cfg:  # maps from the prompt's call: those of the run without the negative call
        _, _, _, single = concept_traced()
        for layer in concepts.layers:
            torch.testing.assert_close(concepts[layer][0], single.concepts[layer][0])
            torch.testing.assert_close(tr.image_to_text[layer][0], single.image_to_text[layer][0])


def test_concept_heatmaps_of_double_and_single_blocks():
    _, _, _, tr = concept_traced()
    for layers in (None, "double", "single"):
        raw = {c: tr.heatmap(c, maps="concepts", normalize=False, layers=layers)
               for c in CONCEPTS}
        assert all(h.shape == (64, 64) for h in raw.values())
        torch.testing.assert_close(sum(raw.values()), torch.ones(64, 64), atol=2e-3, rtol=0)
    zebra = tr.heatmap("zebra", maps="concepts", layers="single.1")  # absent from the prompt
    assert zebra.shape == (64, 64) and zebra.min() == 0 and zebra.max() == 1
    assert not torch.allclose(tr.concepts["double.0"], tr.concepts["single.1"])


def test_concept_step_is_the_blocks_text_stream():
    """With the prompt's own text stream as the 'concepts' (their keys are then the text keys,
    and every text position has the same rotary embedding: zero txt_ids), the concept step is
    the block's text path: its next stream is the block's text output, its image output the
    block's image attention output (before to_out / proj_out), in both block kinds."""
    pipe = pipe_of()
    adapter = adapter_for(pipe)
    tr = pipe.transformer
    torch.manual_seed(0)
    dim = tr.config.num_attention_heads * tr.config.attention_head_dim
    t, (h, w) = 7, (4, 4)
    hs, ehs, temb = torch.randn(2, h * w, dim), torch.randn(2, t, dim), torch.randn(2, dim)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros(h * w), rows.flatten(), cols.flatten()], 1)
    rope = tr.pos_embed(torch.cat([torch.zeros(t, 3), img_ids]))
    blocks = adapter.concept_blocks()
    assert [s for s, _ in blocks] == adapter.sites() and len(blocks) == 4
    for site, block in blocks:
        seen = []
        if site.startswith("single"):
            handle = block.attn.register_forward_hook(lambda m, a, o: seen.append(o[:, t:]))
        else:
            handle = block.attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        kwargs = dict(hidden_states=hs, encoder_hidden_states=ehs, temb=temb,
                      image_rotary_emb=rope)
        with torch.no_grad():
            text_out, _ = block(**kwargs)
            step = adapter.concept_step(block, ehs[1:], (), kwargs, slice(1, 2), True)
        handle.remove()
        torch.testing.assert_close(step.image, seen[0][1:], atol=1e-5, rtol=1e-5)
        assert step.concepts.shape == (1, t, dim) and step.image.shape == (1, h * w, dim)
        if block is tr.single_transformer_blocks[-1]:
            assert step.stream is None  # the last block: nothing reads the stream after it
        else:
            torch.testing.assert_close(step.stream, text_out[1:], atol=1e-5, rtol=1e-5)


def test_image_to_text_maps_are_the_processors_softmax(monkeypatch):
    """Each text token's attention to the image: the image columns of the text queries' rows of
    the softmax the processor computes from its RoPE-rotated q / k, in every block kind."""
    pipe = pipe_of()
    seen = processor_softmax(monkeypatch)
    with sdlens.trace(pipe, heads=True, keep_padding=True, attention_dtype=torch.float32,
                      steps=[0], record=("latents", "image_to_text")) as tr:
        pipe(PROMPT, num_inference_steps=1, output_type="latent", max_sequence_length=32,
             generator=torch.Generator().manual_seed(0))
    maps = tr.image_to_text
    assert len(seen) == len(maps.layers) == 4 and maps.token_positions == list(range(32))
    for layer, probs in zip(maps.layers, seen):
        got = maps[layer][0].flatten(-2)  # (B, heads, T, HW)
        torch.testing.assert_close(got, probs[:, :, :32, 32:], rtol=1e-4, atol=1e-6)
    assert tr.heatmap("red", maps="image_to_text").shape == (64, 64)


def equalized(pipe, positions, weight, calls=None):
    """The equalizer written out: dispatch_attention_fn replaced by an explicit softmax whose
    image-query rows' columns at ``positions`` are multiplied by ``weight`` (not renormalised),
    in every block (during the transformer calls ``calls`` counts as the prompt's)."""
    def attention(query, key, value, **kw):
        probs = (torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float())
                 * query.shape[-1] ** -0.5).softmax(-1)
        if calls is None or calls[-1] == "text":
            probs[:, :, 32:, positions] *= weight
        return torch.einsum("bhqk,bkhd->bqhd", probs, value.float()).to(query.dtype)
    return attention


@pytest.mark.parametrize("true_cfg", [False, True])
def test_reweighting_is_the_equalizer(monkeypatch, true_cfg):
    from sdlens.engine.text import word_positions

    pipe = pipe_of()
    kw = dict(negative_prompt=NEGATIVE, true_cfg_scale=2.5) if true_cfg else {}
    gen = dict(seed=0, steps=2, output_type="latent", max_sequence_length=32, **kw)
    plain, _ = run(pipe, False, num_inference_steps=2, max_sequence_length=32, **kw)
    one = sdlens.generate(pipe, PROMPT, reweight={"red": 1.0}, **gen)
    assert torch.equal(one.latents[-1], unpack(pipe, plain).float())  # an exact no-op
    four = sdlens.generate(pipe, PROMPT, reweight={"red": 4.0}, **gen)
    assert four.meta["reweight"]["weights"] == {"red": 4.0}
    assert not torch.allclose(four.latents[-1], one.latents[-1], atol=1e-3)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a: calls.append("uncond" if true_cfg and len(calls) % 2 else "text"))
    monkeypatch.setattr(flux_module, "dispatch_attention_fn",
                        equalized(pipe, word_positions(pipe, PROMPT, "red"), 4.0, calls))
    try:
        ref, _ = run(pipe, False, num_inference_steps=2, max_sequence_length=32, **kw)
    finally:
        handle.remove()
    assert len(calls) == (4 if true_cfg else 2)
    torch.testing.assert_close(four.latents[-1], unpack(pipe, ref).float(), rtol=1e-4, atol=1e-5)


def test_token_effects():
    fx = sdlens.token_effects(pipe_of(), "a red circle", seed=0, steps=2, guidance_scale=3.5)
    assert fx.words == ["a", "red", "circle"] and fx.image.shape == (64, 64, 3)
    assert all(fx.maps[w].shape == (64, 64) and fx.effects[w] > 0 for w in fx.words)
