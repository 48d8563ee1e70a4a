"""The Flux-derived families of 2026 traced as Flux.1 is: Chroma (T5 only, a float text mask,
true CFG with two calls), Flux.1 Kontext (a reference image's tokens after the noise), Flux.2
dev / klein (Mistral-3 / Qwen3 text, reference images). Random-weight beds
(``sdlens.testing.random_pipeline``), CPU fp32, 2 steps, 32 px (latents 4x4, 2x2 patches);
full-size configs on the meta device for the site counts.

The kernel layout each test expects is written here from diffusers' source (the
``docs/kernel-layouts-2026.md`` table), not asked of sdlens: ``[text (512), image, reference
0, ...]`` at every double- and single-stream site."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import sdlens
from sdlens.analysis.tokens import trace_words
from sdlens.engine.arch import adapter_for, naming_for
from sdlens.testing import call_kwargs_2026, random_pipeline
from pipelines import assert_restored, pipe_state
from test_kernel_maps import KernelSpy, explicit

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2
TEXT = 512  # T5 / Mistral / Qwen3 positions at the pipelines' max_sequence_length
IMAGE = 4  # 32 px: 4x4 latents, 2x2 patches
# arch -> what the test knows of it: the pipeline, family, latent channels, full-size (double,
# single) blocks, reference tokens per call, denoiser calls per step, guidance
FAMILIES = {
    "chroma": dict(pipeline="ChromaPipeline", family="chroma", channels=16, blocks=(19, 38),
                   refs=0, calls=2, guidance="true_cfg"),
    "flux-kontext": dict(pipeline="FluxKontextPipeline", family="flux-kontext", channels=16,
                         blocks=(19, 38), refs=1, calls=1, guidance="distilled"),
}
ARCHS = list(FAMILIES)


@functools.lru_cache(maxsize=None)
def pipe_of(arch: str):
    return random_pipeline(arch, seed=0)


def call(arch: str, **kw) -> dict:
    return call_kwargs_2026(arch, steps=STEPS, **kw)


@functools.lru_cache(maxsize=None)
def traced(arch: str):
    """(pipe, untraced latents, traced latents, trace, kernel spy) of one 2-step call."""
    pipe = pipe_of(arch)
    plain = pipe(**call(arch)).images
    adapter = adapter_for(pipe)
    spy = KernelSpy(adapter.denoiser, adapter.sites())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="sdlens")  # nothing skipped
            with spy, sdlens.trace(pipe, attention_dtype=torch.float32,
                                   record=("latents", "noise", "x0", "attention",
                                           "image_to_text")) as tr:
                out = pipe(**call(arch)).images
    finally:
        spy.remove()
    return pipe, plain, out, tr.runs[-1], spy


@pytest.mark.parametrize("arch", ARCHS)
def test_traced_run_is_the_untraced_run(arch):
    pipe, plain, out, tr, _ = traced(arch)
    f = FAMILIES[arch]
    assert torch.equal(plain, out)
    assert type(pipe).__name__ == f["pipeline"] and tr.meta["family"] == f["family"]
    assert tr.prediction_type == "flow"
    assert tr.latents.shape == (STEPS + 1, 1, f["channels"], 4, 4)
    assert tr.noise.shape == tr.x0.shape == (STEPS, 1, f["channels"], 4, 4)
    assert tr.meta["denoiser_calls"] == STEPS * f["calls"]


@pytest.mark.parametrize("arch", ARCHS)
def test_last_x0_is_the_final_latents_and_flow_x0(arch):
    pipe, _, out, tr, _ = traced(arch)
    final = adapter_for(pipe).spatial(out, (4, 4)) if out.ndim == 3 else out
    if arch != "flux2" and out.ndim == 3:  # the pipeline's own unpacking agrees
        torch.testing.assert_close(final, pipe._unpack_latents(out, 32, 32, pipe.vae_scale_factor))
    assert torch.equal(tr.latents[-1], final.float())
    s = tr.sigmas[:, None, None, None, None]
    torch.testing.assert_close(tr.x0, tr.latents[:-1] - s * tr.noise)
    torch.testing.assert_close(tr.x0[-1], tr.latents[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_guidance_as_it_is(arch):
    pipe, _, _, tr, _ = traced(arch)
    kind = FAMILIES[arch]["guidance"]
    if kind == "true_cfg":  # two calls per step: the prompt's, then the negative's
        g = float(call(arch).get("guidance_scale") or pipe.guidance_scale)
        assert tr.do_cfg and tr.guidance_scale == g
        guided = tr.noise_uncond + g * (tr.noise_text - tr.noise_uncond)
        torch.testing.assert_close(tr.noise, guided, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tr.noise_uncond, tr.noise_text)
    else:
        assert not tr.do_cfg and tr.noise_uncond is None
        torch.testing.assert_close(tr.noise, tr.noise_text, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_text_seeing_site_recorded_and_counted_on_the_full_config(arch):
    pipe, _, _, tr, _ = traced(arch)
    cfg = pipe.transformer.config
    double = [f"transformer_blocks.{i}.attn" for i in range(cfg.num_layers)]
    single = [f"single_transformer_blocks.{i}.attn" for i in range(cfg.num_single_layers)]
    maps = tr.attention
    assert maps.layers == double + single and "skipped" not in tr.meta
    assert maps.names("double") == double and maps.names("single") == single
    assert all(maps.resolution(layer) == (2, 2) for layer in maps.layers)
    assert tr.image_to_text.layers == maps.layers
    full = random_pipeline(arch, scale=1, device="meta")
    sites = adapter_for(full).sites()
    n_double, n_single = FAMILIES[arch]["blocks"]
    assert full.transformer.config.num_layers == n_double
    assert full.transformer.config.num_single_layers == n_single
    assert len(sites) == n_double + n_single
    assert sum(s.startswith("single_") for s in sites) == n_single


@pytest.mark.parametrize("arch", ARCHS)
def test_maps_equal_the_explicit_float64_softmax(arch):
    """Each recorded map: the image queries' (text rows of the batch) probabilities on the kept
    text keys, from the q / k / mask the kernel saw, float64, heads averaged; image->text: the
    kept text queries' probabilities on the image keys."""
    pipe, _, _, tr, spy = traced(arch)
    f = FAMILIES[arch]
    img, txt = slice(TEXT, TEXT + IMAGE), slice(0, TEXT)
    kept = tr.attention.token_positions
    assert 0 < len(kept) < TEXT and kept == list(range(len(kept)))  # padding left out
    n = 0
    for layer in tr.attention.layers:
        for i, step in enumerate(tr.attention.steps):
            q, k, mask, scale = spy.calls[(step * f["calls"], layer)][0]  # the prompt's call
            assert q.shape[2] == k.shape[2] == TEXT + IMAGE * (1 + f["refs"])
            p = explicit(q, k, mask, scale)
            want = p[:, :, img][..., txt][..., kept].mean(1).transpose(-1, -2)
            got = tr.attention[layer][i].double().flatten(-2)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
            want = p[:, :, txt][..., img][:, :, kept].mean(1)
            got = tr.image_to_text[layer][i].double().flatten(-2)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
            n += 1
    assert n == len(tr.attention.layers) * STEPS


@pytest.mark.parametrize("arch", ARCHS)
def test_heatmap_of_every_word(arch):
    _, _, _, tr, _ = traced(arch)
    words = trace_words(tr)
    assert [w.text for w in words] == ["a", "red", "cat", "on", "the", "beach"]
    for w in words:
        hm = tr.heatmap(w.text, occurrence=w.occurrence)
        assert hm.shape == (32, 32) and torch.isfinite(torch.as_tensor(hm)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    _, _, _, tr, _ = traced(arch)
    back = sdlens.load(tr.save(tmp_path / f"{arch}.sdlens"))
    assert back.meta["family"] == tr.meta["family"] and back.tokens == tr.tokens
    assert back.do_cfg == tr.do_cfg and back.guidance_scale == tr.guidance_scale
    assert back.attention.layers == tr.attention.layers
    assert back.attention.names("single") == tr.attention.names("single")
    torch.testing.assert_close(back.heatmap("cat"), tr.heatmap("cat"))
    torch.testing.assert_close(back.x0, tr.x0)
    assert naming_for(tr.meta["family"]).alias("single_transformer_blocks.1.attn") == "single.1"


@pytest.mark.parametrize("arch", ARCHS)
def test_restored_after_an_exception_mid_run(arch):
    pipe, plain, _, _, _ = traced(arch)
    before = pipe_state(pipe)

    def stop(p, i, t, cb):
        if i == 1:
            raise KeyboardInterrupt
        return cb

    with pytest.raises(KeyboardInterrupt):
        with sdlens.trace(pipe):
            pipe(**call(arch, callback_on_step_end=stop))
    assert_restored(pipe, before)
    assert torch.equal(pipe(**call(arch)).images, plain)


def test_still_unsupported_families_are_one_type_error():
    for name in ("HiDreamImageTransformer2DModel", "HunyuanImageTransformer2DModel",
                 "Lumina2Transformer2DModel", "CogView4Transformer2DModel"):
        transformer = type(name, (torch.nn.Module,), {})()
        pipe = type(name.replace("Transformer2DModel", "Pipeline"), (),
                    {"transformer": transformer})()
        with pytest.raises(TypeError) as e:
            sdlens.trace(pipe)
        msg = str(e.value)
        assert "\n" not in msg and name in msg
        assert all(FAMILIES[a]["pipeline"] in msg for a in ARCHS)
