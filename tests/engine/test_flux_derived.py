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
from sdlens.testing import call_kwargs_2026, random_pipeline, reference_image
from pipelines import assert_restored, pipe_state
from test_kernel_maps import KernelSpy, explicit

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2
TEXT = 512  # T5 / Mistral / Qwen3 positions at the pipelines' max_sequence_length
IMAGE = 4  # 32 px: 4x4 latents, 2x2 patches
# case -> what the test knows of it: the bed (arch, variant, call keywords), the pipeline,
# family, latent channels, full-size (double, single) blocks, reference tokens per call,
# denoiser calls per step, guidance
FAMILIES = {
    "chroma": dict(pipeline="ChromaPipeline", family="chroma", channels=16, blocks=(19, 38),
                   refs=0, calls=2, guidance="true_cfg"),
    "flux-kontext": dict(pipeline="FluxKontextPipeline", family="flux-kontext", channels=16,
                         blocks=(19, 38), refs=4, calls=1, guidance="distilled"),
    "flux-kontext-cfg": dict(arch="flux-kontext", kw=lambda: dict(true_cfg_scale=2.0,
                                                                   negative_prompt="blurry"),
                             pipeline="FluxKontextPipeline", family="flux-kontext", channels=16,
                             blocks=(19, 38), refs=4, calls=2, guidance="true_cfg", scale=2.0),
    "flux2": dict(pipeline="Flux2Pipeline", family="flux2", channels=32, blocks=(8, 48),
                  refs=0, calls=1, guidance="distilled"),
    "flux2+ref": dict(arch="flux2", kw=lambda: dict(image=[reference_image(64)]),
                      pipeline="Flux2Pipeline", family="flux2", channels=32, blocks=(8, 48),
                      refs=16, calls=1, guidance="distilled"),  # 64 px: 4x4 patches
    "flux2-klein": dict(pipeline="Flux2KleinPipeline", family="flux2-klein", channels=32,
                        blocks=(5, 20), refs=0, calls=1, guidance="none"),
    "flux2-klein-base": dict(arch="flux2-klein", variant="base-4b", pipeline="Flux2KleinPipeline",
                             family="flux2-klein", channels=32, blocks=(5, 20), refs=0, calls=2,
                             guidance="true_cfg"),
}
ARCHS = list(FAMILIES)


def arch_of(case: str) -> str:
    return FAMILIES[case].get("arch", case)


@functools.lru_cache(maxsize=None)
def pipe_of(case: str):
    return random_pipeline(arch_of(case), seed=0, variant=FAMILIES[case].get("variant"))


def call(case: str, **kw) -> dict:
    extra = FAMILIES[case].get("kw", dict)()
    return call_kwargs_2026(arch_of(case), steps=STEPS, **extra, **kw)


def final_latents(case: str, pipe, out: torch.Tensor) -> torch.Tensor:
    """The pipeline's latents after the last step, (B, C, h, w), from its ``output_type=
    "latent"`` output, with the pipeline's own functions: Flux.1's packing; Flux.2-dev's packed
    patches (row-major ids); klein's de-normalised, unpatchified latents (normalised back)."""
    family = FAMILIES[case]["family"]
    if family in ("chroma", "flux-kontext"):
        return pipe._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
    if family == "flux2":
        ids = pipe._prepare_latent_ids(torch.zeros(out.shape[0], 1, 2, 2))
        return pipe._unpatchify_latents(pipe._unpack_latents_with_ids(out, ids))
    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return pipe._unpatchify_latents((pipe._patchify_latents(out) - mean) / std)


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
    final = final_latents(arch, pipe, out)
    torch.testing.assert_close(tr.latents[-1], final.float(), rtol=1e-5, atol=1e-5)
    s = tr.sigmas[:, None, None, None, None]
    torch.testing.assert_close(tr.x0, tr.latents[:-1] - s * tr.noise)
    torch.testing.assert_close(tr.x0[-1], tr.latents[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_guidance_as_it_is(arch):
    pipe, _, _, tr, _ = traced(arch)
    kind = FAMILIES[arch]["guidance"]
    if kind == "true_cfg":  # two calls per step: the prompt's, then the negative's
        g = FAMILIES[arch].get("scale") or pipe.guidance_scale  # the default guidance_scale
        assert tr.do_cfg and tr.guidance_scale == g
        guided = tr.noise_uncond + g * (tr.noise_text - tr.noise_uncond)
        torch.testing.assert_close(tr.noise, guided, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tr.noise_uncond, tr.noise_text)
    else:  # one call: distilled (its guidance value recorded) or none
        assert not tr.do_cfg and tr.noise_uncond is None
        torch.testing.assert_close(tr.noise, tr.noise_text, rtol=0, atol=0)
        if kind == "distilled":
            assert tr.guidance_scale == tr.meta["distilled_guidance"] == pipe.guidance_scale
        else:
            assert "distilled_guidance" not in tr.meta and tr.guidance_scale != tr.guidance_scale


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
    full = random_pipeline(arch_of(arch), scale=1, device="meta",
                           variant=FAMILIES[arch].get("variant"))
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
    assert 0 < len(kept) < TEXT and kept == list(range(kept[0], kept[-1] + 1))  # no padding
    n = 0
    for layer in tr.attention.layers:
        for i, step in enumerate(tr.attention.steps):
            q, k, mask, scale = spy.calls[(step * f["calls"], layer)][0]  # the prompt's call
            assert q.shape[2] == k.shape[2] == TEXT + IMAGE + f["refs"]
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
    words = trace_words(tr)  # the chat templates' tokens are no words
    assert [w.text for w in words] == ["a", "red", "cat", "on", "the", "beach"]
    for w in words:
        hm = tr.heatmap(w.text, occurrence=w.occurrence)
        assert hm.shape == (32, 32) and torch.isfinite(torch.as_tensor(hm)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_recorded_positions_hold_the_prompts_pieces(arch):
    """The kept positions are where the text encoder read the prompt's own pieces (the chat
    template around them left out): read from the encoder's input ids."""
    pipe, _, _, tr, _ = traced(arch)
    seen = []
    t5 = getattr(pipe, "text_encoder_2", None) is not None  # Kontext: CLIP pooled, T5 attended
    encoder = pipe.text_encoder_2 if t5 else pipe.text_encoder
    tokenizer = pipe.tokenizer_2 if t5 else pipe.tokenizer
    handle = encoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("input_ids", a[0] if a else None)), with_kwargs=True)
    try:
        pipe(**call(arch))
    finally:
        handle.remove()
    ids = seen[0][0].tolist()
    prompt = tokenizer("a red cat on the beach", add_special_tokens=False).input_ids
    kept = tr.attention.token_positions
    pieces = [ids[p] for p in kept]
    assert pieces[: len(prompt)] == prompt and len(pieces) - len(prompt) <= 1  # T5: + </s>
    assert [tr.token_ids[0][p] for p in kept] == pieces


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    _, _, _, tr, _ = traced(arch)
    back = sdlens.load(tr.save(tmp_path / f"{arch}.sdlens"))
    assert back.meta["family"] == tr.meta["family"] and back.tokens == tr.tokens
    assert back.do_cfg == tr.do_cfg
    assert repr(back.guidance_scale) == repr(tr.guidance_scale)  # NaN: no guidance (klein)
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


def test_klein_inpaint():
    """``Flux2KleinInpaintPipeline`` on the klein bed's components: traced == untraced, every
    site recorded, the words the prompt's."""
    import diffusers

    pipe = diffusers.Flux2KleinInpaintPipeline(**pipe_of("flux2-klein").components)
    mask = reference_image(32, seed=1).convert("L").point(lambda v: 255 if v > 127 else 0)
    kw = lambda: call_kwargs_2026("flux2-klein", steps=STEPS, image=reference_image(32),  # noqa: E731
                                  mask_image=mask, strength=1.0)
    plain = pipe(**kw()).images
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sdlens")
        with sdlens.trace(pipe) as tr:
            out = pipe(**kw()).images
    tr = tr.runs[-1]
    assert torch.equal(plain, out) and tr.meta["family"] == "flux2-klein"
    assert tr.latents.shape == (STEPS + 1, 1, 32, 4, 4) and len(tr.attention.layers) == 4
    assert [w.text for w in trace_words(tr)] == ["a", "red", "cat", "on", "the", "beach"]


def test_a_tokenizer_that_adds_a_bos_keeps_the_prompts_positions():
    """FLUX.2-dev's real tokenizer puts ``<s>`` before a bare prompt (the bed's does not): the
    words and the recorded positions stay the prompt's pieces where the encoder read them."""
    import copy

    import diffusers
    from tokenizers.processors import TemplateProcessing

    base = pipe_of("flux2")
    tok = copy.deepcopy(base.tokenizer)
    bos = tok.convert_tokens_to_ids("<s>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok("a red cat").input_ids[0] == bos
    pipe = diffusers.Flux2Pipeline(**{**base.components, "tokenizer": tok})
    seen = []
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("input_ids", a[0] if a else None)), with_kwargs=True)
    try:
        with sdlens.trace(pipe) as tr:
            pipe(**call("flux2"))
    finally:
        handle.remove()
    tr = tr.runs[-1]
    assert [w.text for w in trace_words(tr)] == ["a", "red", "cat", "on", "the", "beach"]
    ids = seen[0][0].tolist()
    prompt = tok("a red cat on the beach", add_special_tokens=False).input_ids
    for w in trace_words(tr):
        assert [ids[p] for p in w.positions] == [tr.token_ids[0][p] for p in w.positions]
    kept = tr.attention.token_positions
    assert [ids[p] for p in kept][-len(prompt):] == prompt


@pytest.mark.parametrize("case", ["flux2", "flux2-klein"])
def test_a_max_sequence_length_shorter_than_the_template(case):
    """``max_sequence_length`` shorter than the chat template's opening (diffusers' fast tests
    call FLUX.2-dev with 8: its system prompt alone is longer): the pipeline cuts the whole
    prompt; the traced run is the untraced one, the trace holds no words and names them cut."""
    pipe = pipe_of(case)
    kw = lambda: call(case, max_sequence_length=2)  # noqa: E731
    plain = pipe(**kw()).images
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sdlens.trace(pipe) as tr:
            out = pipe(**kw()).images
    tr = tr.runs[-1]
    assert torch.equal(plain, out) and tr.latents.shape[0] == STEPS + 1
    assert trace_words(tr) == [] and tr.truncated_words[0] == ["a", "red", "cat", "on", "the",
                                                               "beach"]
    assert [str(w.message) for w in caught if "sdlens" in str(w.message)
            and "cannot tell the tokens" in str(w.message)] == []


@pytest.mark.parametrize("case", ["flux2", "flux2-klein"])
def test_prompt_embeds_without_a_tokenizer(case):
    """A pipeline without tokenizer / text encoder, called with ``prompt_embeds`` (diffusers'
    ``test_encode_prompt_works_in_isolation``): traced == untraced, the words not known."""
    import diffusers

    base = pipe_of(case)
    embeds = base.encode_prompt(prompt="a red cat on the beach", device="cpu",
                                max_sequence_length=TEXT)[0]
    cls = getattr(diffusers, FAMILIES[case]["pipeline"])
    pipe = cls(**{**base.components, "tokenizer": None, "text_encoder": None})
    # (klein with guidance would encode the negative prompt ""; the text encoder is gone)
    extra = dict(guidance_scale=1.0) if case == "flux2-klein" else {}
    kw = lambda: call(case, prompt=None, prompt_embeds=embeds.clone(), **extra)  # noqa: E731
    plain = pipe(**kw()).images
    with sdlens.trace(pipe) as tr:
        out = pipe(**kw()).images
    tr = tr.runs[-1]
    assert torch.equal(plain, out) and tr.meta.get("words_unknown")
    assert tr.latents.shape[0] == STEPS + 1 and trace_words(tr) == []


def test_a_prompt_sdlens_cannot_tokenize_is_recorded_without_words(monkeypatch):
    """Whatever fails in cutting a prompt into the text axis's tokens (here: the segmenter
    raises) is not the call's failure: one warning, the run recorded, its words not known."""
    import sdlens.engine.session as session

    def broken(prompt, parts):
        raise RuntimeError("a prompt sdlens does not understand")

    monkeypatch.setattr(session, "tokenize_segments", broken)
    pipe = pipe_of("flux2-klein")
    plain = pipe(**call("flux2-klein")).images
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sdlens.trace(pipe) as tr:
            out = pipe(**call("flux2-klein")).images
    tr = tr.runs[-1]
    assert torch.equal(plain, out) and tr.meta.get("words_unknown") and trace_words(tr) == []
    assert len([w for w in caught if "cannot tell the tokens" in str(w.message)]) == 1
