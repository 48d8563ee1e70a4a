"""Concept maps (ConceptAttention) on the joint-attention families of 2026: Flux.2 (dev and klein:
double-stream and fused single-stream blocks), Qwen-Image (dual-stream blocks), Chroma (Flux.1's
blocks, the approximator's modulation), Flux.1 Kontext (a reference image in the image stream)
and Z-Image (one stream: the pass runs beside its main layers). Random weights, CPU fp32, 2
steps, 32 px (``sdlens.testing.call_kwargs_2026``)."""

from __future__ import annotations

import functools

import pytest
import torch

import sdlens
from sdlens.engine.arch import adapter_for
from sdlens.engine.joint import concept_pieces, concept_vectors
from sdlens.testing import call_kwargs_2026, random_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red cat on the beach"
CONCEPTS = ["cat", "beach", "zebra"]  # "zebra": not in the prompt
ARCHS = ["flux2", "flux2-klein", "qwen-image", "chroma", "flux-kontext", "z-image"]
FLUX_LIKE = ARCHS[:-1]  # their blocks are called with keyword arguments
METHODS = ["conceptattention", "sdlens"]
STEPS = 2


@functools.lru_cache(maxsize=None)
def pipe_of(arch: str):
    return random_pipeline(arch, seed=0)


def call(pipe, arch: str, **kw):
    return pipe(**call_kwargs_2026(arch, steps=STEPS, prompt=PROMPT, **kw)).images


@functools.lru_cache(maxsize=None)
def traced(arch: str, method: str):
    pipe = pipe_of(arch)
    plain = call(pipe, arch)
    with sdlens.trace(pipe, concepts=CONCEPTS, concept_method=method,
                      record=("latents", "attention")) as tr:
        out = call(pipe, arch)
    return pipe, plain, out, tr.runs[-1]


def double_sites(pipe) -> list[str]:
    return [f"transformer_blocks.{i}.attn" for i in range(len(pipe.transformer.transformer_blocks))]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_concept_maps_leave_the_image_unchanged_and_sum_to_one(arch, method):
    pipe, plain, out, tr = traced(arch, method)
    assert torch.equal(plain, out)
    assert "skipped" not in tr.meta
    concepts = tr.concepts
    assert concepts.concepts == CONCEPTS and concepts.steps == list(range(STEPS))
    adapter = adapter_for(pipe)
    if method == "conceptattention":  # double-stream blocks only; the last four by default
        paper = [site for site, _ in adapter.paper_concept_blocks()]
        assert concepts.layers == paper and concepts.default_layers == paper[-4:]
        if arch != "z-image":  # (no double-stream blocks: its main layers)
            assert paper == double_sites(pipe)
    else:  # every block: double-stream, then single-stream
        assert concepts.layers == adapter.sites() and concepts.default_layers is None
    for layer in concepts.layers:  # (steps, batch, concepts, h, w), a softmax over concepts
        m = concepts[layer].float()
        assert m.shape == (STEPS, 1, len(CONCEPTS), 2, 2)
        torch.testing.assert_close(m.sum(2), torch.ones(STEPS, 1, 2, 2), atol=2e-3, rtol=0)
    raw = {c: tr.heatmap(c, maps="concepts", normalize=False) for c in CONCEPTS}
    assert all(h.shape == (32, 32) for h in raw.values())  # the image's resolution
    torch.testing.assert_close(sum(raw.values()), torch.ones(32, 32), atol=2e-3, rtol=0)
    zebra = tr.heatmap("Zebra", maps="concepts")  # absent from the prompt; names ignore case
    assert zebra.min() == 0 and zebra.max() == 1


# ---------------------------------------------------------------- the step is the block's text path
def flat_text_rope(rope, t: int):
    """Every text position rotated as the first one (as the concepts are): Flux-style (cos,
    sin) over [text; image] rows, or Qwen-Image's (image freqs, text freqs)."""
    a, b = rope
    if a.shape[0] == b.shape[0] and not torch.is_complex(a):  # (cos, sin)
        return tuple(torch.cat([x[:1].expand(t, -1), x[t:]]) for x in rope)
    return a, b[:1].expand(b.shape[0], -1)


def capture(pipe, arch: str, blocks):
    """One untraced call: the first denoiser call's keyword arguments and each block's."""
    calls, inputs = [], {}

    def on_call(module, args, kwargs):
        calls.append(dict(kwargs))
        return None

    def on_block(site, module, args, kwargs):
        inputs.setdefault(site, dict(kwargs))  # the first call's (the prompt's)

    handles = [pipe.transformer.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [block.register_forward_pre_hook(functools.partial(on_block, site),
                                                with_kwargs=True) for site, block in blocks]
    try:
        call(pipe, arch)  # (one step: Qwen-Image's scheduler gives a NaN timestep)
    finally:
        for h in handles:
            h.remove()
    return calls[0], inputs


def block_outputs(block, kwargs: dict, t: int, noise: int):
    """(the block's text output, its image patches' attention output before the output
    projection), from running the block."""
    attn, seen = block.attn, []
    if hasattr(block, "norm1_context") or hasattr(block, "txt_mod"):  # double-stream
        handle = attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.append(a[0][:, :noise]))
    elif hasattr(attn, "to_qkv_mlp_proj"):  # Flux.2's single-stream: to_out over [attn; mlp]
        handle = attn.to_out.register_forward_pre_hook(
            lambda m, a: seen.append(a[0][:, t:t + noise, :attn.inner_dim]))
    else:  # Flux.1's / Chroma's single-stream: the attention module's output, joined rows
        handle = attn.register_forward_hook(lambda m, a, o: seen.append(o[:, t:t + noise]))
    try:
        out = block(**kwargs)
    finally:
        handle.remove()
    text = out[0] if isinstance(out, tuple) else out[:, :t]
    return text, seen[0]


@pytest.mark.parametrize("arch", FLUX_LIKE)
def test_concept_step_is_the_blocks_text_stream(arch):
    """With the prompt's own text stream as the 'concepts' and every text position rotated as
    the first (the concepts' rotation; Flux.1's and Chroma's text already is), each block's
    concept step is the block's text path: its next stream the block's text output, its image
    output the block's image patches' attention output (before the output projection), in
    every block kind, with Kontext's reference patches in the image stream and Chroma's mask."""
    pipe = pipe_of(arch)
    adapter = adapter_for(pipe)
    blocks = adapter.concept_blocks()
    assert [s for s, _ in blocks] == adapter.sites()
    call_kwargs, inputs = capture(pipe, arch, blocks)
    t = int(call_kwargs["encoder_hidden_states"].shape[1])
    n_image = int(call_kwargs["hidden_states"].shape[1])
    # Kontext: the reference's patches (as many as the image's) follow the image's
    noise = n_image // 2 if arch == "flux-kontext" else n_image
    rows = slice(0, 1)
    for site, block in blocks:
        kw = dict(inputs[site])
        kw["image_rotary_emb"] = flat_text_rope(kw["image_rotary_emb"], t)
        joined = kw.get("encoder_hidden_states", 0) is None or "encoder_hidden_states" not in kw
        stream = kw["hidden_states"][:, :t] if joined else kw["encoder_hidden_states"]
        masks = [kw.get("attention_mask")]
        if masks[0] is not None:  # Chroma: the image output with the mask, the stream without
            assert (masks[0] == 0).any()  # padding masked: the mask matters
            masks.append(None)
        for mask in masks:
            if "attention_mask" in kw:
                kw["attention_mask"] = mask
            with torch.no_grad():
                text_out, image_out = block_outputs(block, kw, t, noise)
                step = adapter.concept_step(block, stream[rows], (), kw, rows, True,
                                            call_kwargs=call_kwargs)
            torch.testing.assert_close(step.image, image_out, atol=1e-5, rtol=1e-5)
            assert step.concepts.shape[:2] == (1, t) and step.image.shape[1] == noise
            if mask is not None:
                continue
            if site == blocks[-1][0]:
                assert step.stream is None  # the last block: nothing reads the stream after it
            else:
                torch.testing.assert_close(step.stream, text_out, atol=1e-5, rtol=1e-5)


def test_zimage_concept_step_is_the_layers_caption_path():
    """Z-Image's single stream: with the prompt's caption tokens as the 'concepts' (every caption
    position rotated as the first), each main layer's concept step is the layer's own update of
    those tokens, its image output the patches' attention output before ``to_out``; the
    refiners' pass of a one-token caption is the refiner layer's own."""
    pipe = pipe_of("z-image")
    adapter, tr = adapter_for(pipe), pipe_of("z-image").transformer
    blocks = adapter.concept_blocks()
    assert [s for s, _ in blocks] == adapter.sites()
    calls, inputs = [], {}

    def on_call(module, args, kwargs):
        calls.append({**dict(enumerate(args)), **kwargs})

    def on_layer(site, module, args, kwargs):
        inputs.setdefault(site, args)

    handles = [tr.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [b.register_forward_pre_hook(functools.partial(on_layer, s), with_kwargs=True)
                for s, b in blocks]
    try:
        call(pipe, "z-image")
    finally:
        for h in handles:
            h.remove()
    x0 = calls[0][0][0]  # the first latents, (16, 1, h, w)
    n_image = (x0.shape[2] // 2) * (x0.shape[3] // 2)
    start = n_image + (-n_image) % 32  # the caption, after the image's padding
    for site, layer in blocks:
        x, mask, freqs, adaln = inputs[site][:4]
        end = int(mask[0].sum()) if mask is not None else x.shape[1]  # row 0: the prompt's
        freqs = freqs.clone()
        freqs[:, start:] = freqs[:, start:start + 1]
        seen = []
        handle = layer.attention.to_out[0].register_forward_pre_hook(
            lambda m, a: seen.append(a[0][:1, :n_image]))
        with torch.no_grad():
            out = layer(x, mask, freqs, adaln)
            handle.remove()
            step = adapter.concept_step(layer, x[:1, start:end], (x, mask, freqs, adaln), {},
                                        slice(0, 1), True, call_kwargs=calls[0])
        torch.testing.assert_close(step.image, seen[0], atol=1e-5, rtol=1e-5)
        if site == blocks[-1][0]:
            assert step.stream is None
        else:
            torch.testing.assert_close(step.stream, out[:1, start:end], atol=1e-5, rtol=1e-5)
    refiner = tr.context_refiner[0]  # a caption of one token attends to itself only
    one = torch.randn(1, 1, tr.cap_embedder[0].weight.shape[0])
    with torch.no_grad():
        emb = tr.cap_embedder(one)
        want = emb
        for layer in tr.context_refiner:
            want = layer(want, None, torch.ones(1, 1, freqs.shape[-1], dtype=freqs.dtype))
        torch.testing.assert_close(adapter.concept_stream(one), want, atol=1e-5, rtol=1e-5)
    assert refiner.modulation is False


# ---------------------------------------------------------------- the paper's recipe, transferred
@pytest.mark.parametrize("arch", ["flux2", "flux2-klein", "qwen-image", "z-image"])
def test_paper_concepts_are_each_concepts_first_piece(arch):
    """Causal, chat-templated encoders: a concept is its own encoding at its first piece (the
    template's first position is the same vector for every concept)."""
    adapter = adapter_for(pipe_of(arch))
    assert adapter.paper_first_piece
    with torch.no_grad():
        vectors = concept_vectors(adapter, CONCEPTS, {}, first=True)
        text = adapter.concept_text(CONCEPTS, {})
    assert vectors.shape == (len(CONCEPTS), text.shape[-1])
    for i, c in enumerate(CONCEPTS):
        first = concept_pieces(adapter, c, {}, text.shape[1])[0]
        torch.testing.assert_close(vectors[i], text[i, first].float())
    assert not torch.allclose(vectors[0], vectors[1])
    if arch.startswith("flux2"):  # (Qwen-Image's pipeline and Z-Image's concept_text drop the
        torch.testing.assert_close(text[0, 0], text[1, 0])  # template's opening)


def test_chroma_and_flux2_keep_their_own_modulation_kontext_swaps_the_pooled_vector():
    """The paper's "zero pooled vector": no change where the modulation has no pooled text
    (Chroma's approximator, Flux.2's time + guidance); Kontext (Flux.1's) swaps it."""
    temb = torch.randn(1, 64)
    for arch in ("chroma", "flux2-klein"):
        assert adapter_for(pipe_of(arch)).paper_concept_temb(temb, {}, slice(0, 1)) is None
    kontext = adapter_for(pipe_of("flux-kontext"))
    tr = pipe_of("flux-kontext").transformer
    pooled = torch.randn(1, tr.config.pooled_projection_dim)
    dim = tr.config.num_attention_heads * tr.config.attention_head_dim
    temb = torch.randn(1, dim)
    with torch.no_grad():
        got = kontext.paper_concept_temb(temb, {"pooled_projections": pooled}, slice(0, 1))
        embed = tr.time_text_embed.text_embedder
        want = temb - embed(pooled) + embed(torch.zeros_like(pooled))
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- errors, files, views
def test_errors_are_one_line():
    _, _, _, tr = traced("flux2-klein", "conceptattention")
    with pytest.raises(ValueError, match="concepts is empty") as e:
        sdlens.trace(pipe_of("flux2-klein"), concepts=[])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'tiger'") as e:
        tr.heatmap("tiger", maps="concepts")
    assert "\n" not in str(e.value)
    pixart = random_pipeline("pixart", seed=0)
    with pytest.raises(TypeError, match="Flux.2, Qwen-Image, Z-Image.*PixArt.*Pipeline") as e:
        sdlens.trace(pixart, concepts=["cat"])
    assert "\n" not in str(e.value)


def test_save_load_and_views(tmp_path):
    from sdlens import plot
    from sdlens.views.widgets import TraceViewer

    _, _, _, tr = traced("chroma", "conceptattention")
    back = sdlens.load(tr.save(tmp_path / "c.sdlens"))
    assert back.concepts.concepts == CONCEPTS and back.concepts.layers == tr.concepts.layers
    assert back.concepts.method == "conceptattention"
    assert back.concepts.default_layers == tr.concepts.default_layers
    for c in CONCEPTS:
        torch.testing.assert_close(back.heatmap(c, maps="concepts"), tr.heatmap(c, maps="concepts"))
    fig = plot.concept_maps(back)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()][-3:] == [repr(c) for c in CONCEPTS]
    v = TraceViewer(back, maps="concepts")
    assert "concepts" in [k for k, _ in v.maps_options] and v.word_keys[:3] == CONCEPTS
