"""Qwen-Image-Edit (``QwenImageEditPipeline``: true CFG; and two prompts of different lengths,
each with its image, so a text mask) and ``QwenImageEditPlusPipeline`` (two reference images)
traced: the random-weight bed (3 joint blocks), CPU fp32, 2 steps, a 32 px output
(2x2 packed latents of 4x4); every reference is VAE-encoded at ~1 MP (64 x 64 patches, reference
maps sum-pooled to 32 x 32). Maps and reference maps checked against an explicit float64 softmax
from the q / k the kernel saw; the words against the ids Qwen2.5-VL was given."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import diffusers
import sdlens
from sdlens.analysis.tokens import trace_words
from sdlens.engine.arch import adapter_for
from sdlens.testing import call_kwargs_2026, random_pipeline, reference_image
from pipelines import assert_restored, pipe_state
from test_kernel_maps import KernelSpy, explicit

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red cat on the beach"
SHORT = "a cat"
NEGATIVE = "a dog"
STEPS = 2
RECORD = ("latents", "noise", "x0", "attention", "reference_maps")
DROPPED = 64  # the template tokens the edit pipelines drop before the text axis
# case -> (pipeline class, call keywords, reference count, prompts)
CASES = {
    "edit": ("QwenImageEditPipeline",
             lambda: dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0), 1, [PROMPT]),
    # a list of images, one per prompt: Qwen2.5-VL sees each at its own size (32 px: 4 tokens)
    "edit-batch": ("QwenImageEditPipeline",
                   lambda: dict(prompt=[PROMPT, SHORT], image=[reference_image(32)] * 2), 1,
                   [PROMPT, SHORT]),
    "plus": ("QwenImageEditPlusPipeline",  # one prompt: EditPlus takes no batch
             lambda: dict(image=[reference_image(32, 0), reference_image(48, 1)]), 2, [PROMPT]),
}


@functools.lru_cache(maxsize=None)
def pipe_of(name: str):
    base = random_pipeline("qwen-image-edit", seed=0)
    return base if type(base).__name__ == name else getattr(diffusers, name)(**base.components)


def kwargs(case: str) -> dict:
    return call_kwargs_2026("qwen-image-edit", steps=STEPS,
                            **{"prompt": PROMPT, **CASES[case][1]()})


@functools.lru_cache(maxsize=None)
def traced(case: str):
    """(pipe, untraced latents, trace, kernel spy, Qwen2.5-VL's input ids per call and prompt,
    padding left out)."""
    pipe = pipe_of(CASES[case][0])
    plain = pipe(**kwargs(case)).images
    adapter = adapter_for(pipe)
    spy = KernelSpy(adapter.denoiser, adapter.sites())
    ids = []
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda m, a, kw: ids.append([i[k.bool()].tolist() for i, k in
                                     zip(kw["input_ids"], kw["attention_mask"])]),
        with_kwargs=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="sdlens")  # nothing skipped
            with spy, sdlens.trace(pipe, record=RECORD, attention_dtype=torch.float32) as tr:
                out = pipe(**kwargs(case)).images
    finally:
        spy.remove()
        hook.remove()
    assert torch.equal(plain, out), "tracing changed the image"
    return pipe, plain, tr.runs[-1], spy, ids


def pack(pipe, x):  # (B, C, h, w) -> the pipeline's packed (B, h/2 * w/2, 4C)
    b, c, h, w = x.shape
    return pipe._pack_latents(x, b, c, h, w)


@pytest.mark.parametrize("case", list(CASES))
def test_traced_run_is_the_untraced_run(case):
    pipe, plain, tr, _, _ = traced(case)
    assert tr.meta["family"] == "qwen-image-edit" and tr.prediction_type == "flow"
    assert tr.meta["pipeline_class"] == CASES[case][0]
    b = len(CASES[case][3])
    assert tr.latents.shape == (STEPS + 1, b, 16, 4, 4)  # the output only, not the references
    assert torch.equal(pack(pipe, tr.latents[-1]), plain.float())
    assert tr.noise.shape == tr.x0.shape == (STEPS, b, 16, 4, 4)
    s = tr.sigmas[:, None, None, None, None]
    torch.testing.assert_close(tr.x0, tr.latents[:-1] - s * tr.noise)
    torch.testing.assert_close(tr.x0[-1], tr.latents[-1], rtol=1e-5, atol=1e-5)


def test_true_cfg_is_two_calls_and_the_guided_identity():
    pipe, _, tr, _, _ = traced("edit")
    assert tr.do_cfg and tr.meta["denoiser_calls"] == 2 * STEPS
    assert tr.guidance_scale == 4.0 == tr.meta["true_cfg_scale"]
    for s in range(STEPS):  # neg + g (pos - neg), rescaled per packed token to |pos|
        text, uncond = pack(pipe, tr.noise_text[s]), pack(pipe, tr.noise_uncond[s])
        comb = uncond + 4.0 * (text - uncond)
        guided = comb * (text.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
        torch.testing.assert_close(pack(pipe, tr.noise[s]), guided, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tr.noise_uncond, tr.noise_text)
    _, _, plus, _, _ = traced("plus")  # no negative prompt: one call, no guidance
    assert not plus.do_cfg and plus.noise_uncond is None and plus.meta["denoiser_calls"] == STEPS


@pytest.mark.parametrize("case", list(CASES))
def test_words_are_the_prompt_after_the_vision_tokens(case):
    """The text axis holds the images' vision tokens (EditPlus: "Picture i: " labels too), then
    the prompt: the words are the prompt's pieces, at the positions Qwen2.5-VL gave them."""
    pipe, _, tr, _, ids = traced(case)
    tok = pipe.tokenizer
    marks = tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    for b, prompt in enumerate(CASES[case][3]):
        assert [w.text for w in trace_words(tr, b)] == prompt.split()
        vision, text = tr.text_segments[b]
        assert vision["encoder"] == "vision" and vision["tokens"] == 0
        n = len(tok(prompt).input_ids)
        assert text["start"] == vision["length"] and text["tokens"] == n
        axis = ids[0][b][DROPPED:]  # the prompt's call's text, as the transformer sees it
        assert axis[vision["length"] - 1] == marks[2]
        assert axis.count(marks[0]) == CASES[case][2]
        assert axis.count(marks[1]) == (4 if case == "edit-batch" else 1225 if case == "edit"
                                        else 2 * 196)  # 28 px a token, 1 MP / 384² px
        own = list(range(text["start"], text["start"] + n))
        assert [axis[p] for p in own] == [tr.token_ids[b][p] for p in own] \
            == tok(prompt).input_ids
        assert len(axis) == text["start"] + n + 5  # then the template's 5 closing tokens
        for w in trace_words(tr, b):
            hm = torch.as_tensor(tr.heatmap(w.text, occurrence=w.occurrence, batch=b))
            assert hm.shape == (32, 32) and torch.isfinite(hm).all() and hm.max() > 0
    # the maps keep the longest prompt's positions (the shorter's padding is masked)
    first = tr.text_segments[0][1]
    assert tr.attention.token_positions == list(range(first["start"],
                                                      first["start"] + first["tokens"]))


@pytest.mark.parametrize("case", list(CASES))
def test_maps_and_reference_maps_equal_the_explicit_softmax(case):
    """Every block, every step: the output patches' text columns (kept positions, heads
    averaged) and each reference's columns (sum-pooled 2x2 to 32 x 32) of the float64 softmax
    over [text, image, reference 0, ...] keys (the text mask included), from the prompt's
    call's q / k."""
    _, _, tr, spy, _ = traced(case)
    n_refs = CASES[case][2]
    per_step = 2 if tr.do_cfg else 1
    maps, refs = tr.attention, tr.reference_maps
    assert maps.layers == refs.layers == [f"transformer_blocks.{i}.attn" for i in range(3)]
    assert refs.grids == [(32, 32)] * n_refs
    n = 0
    for layer in maps.layers:
        for i, step in enumerate(maps.steps):
            q, k, mask, scale = spy.calls[(per_step * step, layer)][0]
            assert (mask is not None) == (len(CASES[case][3]) > 1)
            n_text = k.shape[2] - 4 - 4096 * n_refs  # [text, 2x2 image, 64x64 references]
            image = slice(n_text, n_text + 4)
            if mask is not None and mask.shape[-2] != 1:
                mask = mask[..., image, :]
            p = explicit(q[:, :, image], k, mask, scale).mean(1)  # (B, 4, L) heads averaged
            want = p[..., maps.token_positions].transpose(-1, -2)
            torch.testing.assert_close(maps[layer][i].double().flatten(-2), want,
                                       atol=1e-6, rtol=0)
            for r in range(n_refs):
                start = n_text + 4 + 4096 * r
                full = p[..., start: start + 4096].unflatten(-1, (32, 2, 32, 2))
                got = refs.reference(layer, r)[i].double()  # (B, 32, 32, h, w)
                torch.testing.assert_close(got.flatten(-2).permute(0, 3, 1, 2),
                                           full.sum((-3, -1)), atol=1e-6, rtol=0)
            n += 1
    assert n == 3 * STEPS and "skipped" not in tr.meta


def test_image_heatmaps_are_the_reference_shares():
    _, _, tr, _, _ = traced("plus")
    for i in (0, 1):
        share = tr.reference_maps.share(index=i)  # (h, w): summed over the reference's patches
        torch.testing.assert_close(tr.heatmap(f"image {i + 1}", normalize=False, size=2), share,
                                   rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="image 2"):
        tr.heatmap("image 3")


def test_full_size_sites_on_the_meta_device():
    """The real transformer (Qwen-Image's: 60 blocks) under both edit pipelines."""
    pipe = random_pipeline("qwen-image-edit", scale=1, device="meta")
    plus = diffusers.QwenImageEditPlusPipeline(**pipe.components)
    sites = [f"transformer_blocks.{i}.attn" for i in range(60)]
    for p in (pipe, plus):
        adapter = adapter_for(p)
        assert adapter.family() == "qwen-image-edit" and adapter.sites() == sites


def test_save_load_round_trip(tmp_path):
    _, _, tr, _, _ = traced("edit")
    back = sdlens.load(tr.save(tmp_path / "edit.sdlens"))
    assert back.meta["family"] == "qwen-image-edit" and back.tokens == tr.tokens
    assert back.text_segments == tr.text_segments and back.do_cfg
    assert [w.text for w in trace_words(back)] == PROMPT.split()
    assert back.reference_maps.grids == tr.reference_maps.grids
    for layer in tr.reference_maps.layers:
        assert torch.equal(back.reference_maps[layer], tr.reference_maps[layer])
    torch.testing.assert_close(back.heatmap("cat"), tr.heatmap("cat"))
    torch.testing.assert_close(back.heatmap("image 1"), tr.heatmap("image 1"))
    torch.testing.assert_close(back.noise_uncond, tr.noise_uncond)


def test_restored_after_an_exception_mid_run():
    pipe, plain, _, _, _ = traced("edit")
    before = pipe_state(pipe)

    def stop(p, i, t, cb):
        if i == 1:
            raise KeyboardInterrupt
        return cb

    with pytest.raises(KeyboardInterrupt):
        with sdlens.trace(pipe, record=RECORD):
            pipe(**kwargs("edit"), callback_on_step_end=stop)
    assert_restored(pipe, before)
    assert torch.equal(pipe(**kwargs("edit")).images, plain)


@pytest.mark.parametrize("case", ["edit", "plus"])
def test_concept_maps_of_the_generated_image(case):
    """Concept maps on the edit pipelines: each concept is encoded beside the call's reference
    images (as the prompt is: its pieces after the "vision" segment), attends to the image stream
    (references included, as the prompt does) and maps the generated image only; the image is
    the untraced one and the maps are each patch's distribution over the concepts."""
    pipe = pipe_of(CASES[case][0])
    kw = kwargs(case)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = pipe(**{**kw, "generator": g()}).images
    concepts = ["cat", "zebra"]
    with sdlens.trace(pipe, concepts=concepts, record=("latents",)) as tr:
        out = pipe(**{**kw, "generator": g()}).images
    assert torch.equal(plain, out)
    run = tr.runs[-1]
    assert "skipped" not in run.meta
    for layer in run.concepts.layers:  # (steps, batch, concepts, h, w) of the 4x4 latents / 2
        m = run.concepts[layer].float()
        assert m.shape == (STEPS, 1, 2, 2, 2)
        torch.testing.assert_close(m.sum(2), torch.ones(STEPS, 1, 2, 2), atol=2e-3, rtol=0)
    assert run.heatmap("zebra", maps="concepts").shape == (32, 32)
    # the first piece of "cat" encoded beside the images is the paper's concept vector
    from sdlens.engine.joint import concept_vectors

    adapter = adapter_for(pipe)
    assert adapter.paper_first_piece
    vectors = concept_vectors(adapter, concepts, kw, first=True)
    text = adapter.concept_text(concepts, kw)
    vision = adapter.text_parts(kw)[0][2]
    assert vision > 0
    torch.testing.assert_close(vectors[0], text[0, vision].float())


def test_reweighting_places_the_words_after_the_images():
    """Token reweighting on the edit pipelines: the words are found where the call's reference
    images put them on the text axis (after the "vision" segment), weight 1 is the untraced
    image, and weight 0 on a word changes it."""
    from sdlens.analysis.tokens import find_word

    pipe = pipe_of("QwenImageEditPipeline")
    kw = {k: v for k, v in kwargs("edit").items()
          if k not in ("prompt", "num_inference_steps", "generator", "negative_prompt",
                       "true_cfg_scale")}
    plain = sdlens.generate(pipe, PROMPT, seed=0, steps=STEPS, record=("latents", "attention"),
                            **kw)
    same = sdlens.generate(pipe, PROMPT, seed=0, steps=STEPS, record=("latents",),
                           reweight={"cat": 1.0}, **kw)
    torch.testing.assert_close(same.latents, plain.latents, atol=0, rtol=0)
    cut = sdlens.generate(pipe, PROMPT, seed=0, steps=STEPS, record=("latents",),
                          reweight={"cat": 0.0}, **kw)
    assert not torch.equal(cut.latents[-1], plain.latents[-1])
    positions = list(find_word(plain, "cat").positions)
    assert positions[0] > adapter_for(pipe).text_parts(kw)[0][2] > 0  # after the images' tokens
    assert cut.meta["reweight"]["positions"] == positions


# ---------------------------------------------------------------- Qwen-Image-Edit-2511
@functools.lru_cache(maxsize=None)
def pipe_2511():
    """EditPlus on a ``zero_cond_t`` transformer: the step's modulation for the text and the
    generated patches, t = 0's for the reference patches (``modulate_index``)."""
    pipe = random_pipeline("qwen-image-edit", variant="2511", seed=0)
    assert type(pipe).__name__ == "QwenImageEditPlusPipeline"
    assert pipe.transformer.config.zero_cond_t
    return pipe


def kwargs_2511(**kw) -> dict:
    return call_kwargs_2026("qwen-image-edit", steps=STEPS, prompt=PROMPT,
                            image=[reference_image(32, 0)], **kw)


def test_2511_concept_pass_is_the_blocks_own_path_and_changes_nothing():
    """Under ``zero_cond_t``: traced with concepts == untraced, nothing skipped, the maps sum to
    1; and with the prompt's own text stream as the concepts (every text position rotated as
    the first, as the concepts are), each block's concept step is the block's own computation:
    its next stream the block's text output, its image output the generated patches' attention
    output, whose keys include the references modulated at t = 0."""
    from test_concepts_2026 import block_outputs, flat_text_rope

    pipe = pipe_2511()
    adapter = adapter_for(pipe)
    blocks = adapter.concept_blocks()
    calls, inputs = [], {}

    def on_block(site, module, args, kw):
        inputs.setdefault(site, dict(kw))  # the first call's

    handles = [pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)]
    handles += [block.register_forward_pre_hook(functools.partial(on_block, site),
                                                with_kwargs=True) for site, block in blocks]
    try:
        plain = pipe(**kwargs_2511()).images
    finally:
        for h in handles:
            h.remove()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sdlens")  # nothing skipped
        with sdlens.trace(pipe, concepts=["cat", "zebra"],
                          record=("latents", "attention", "reference_maps")) as tr:
            out = pipe(**kwargs_2511()).images
    assert torch.equal(plain, out)
    run = tr.runs[-1]
    assert "skipped" not in run.meta and run.reference_maps is not None
    for layer in run.concepts.layers:
        m = run.concepts[layer].float()  # (steps, batch, concepts, 2, 2)
        torch.testing.assert_close(m.sum(2), torch.ones(STEPS, 1, 2, 2), atol=2e-3, rtol=0)

    call_kwargs, rows = calls[0], slice(0, 1)
    noise = int(call_kwargs["hidden_states"].shape[1]) - 64 * 64  # one ~1 MP reference after it
    for site, block in blocks:
        kw = dict(inputs[site])
        assert kw["temb"].shape[0] == 2 * kw["hidden_states"].shape[0]
        index = kw["modulate_index"][0]
        assert index[:noise].eq(0).all() and index[noise:].eq(1).all()
        t = int(kw["encoder_hidden_states"].shape[1])
        kw["image_rotary_emb"] = flat_text_rope(kw["image_rotary_emb"], t)
        with torch.no_grad():
            text_out, image_out = block_outputs(block, kw, t, noise)
            step = adapter.concept_step(block, kw["encoder_hidden_states"][rows], (), kw, rows,
                                        True, call_kwargs=call_kwargs)
        torch.testing.assert_close(step.image, image_out, atol=1e-5, rtol=1e-5)
        if site != blocks[-1][0]:
            torch.testing.assert_close(step.stream, text_out, atol=1e-5, rtol=1e-5)
