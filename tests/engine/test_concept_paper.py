"""Concept maps the paper's way (ConceptAttention's code, concept_method="conceptattention", the
default): the computation ported here, independently of sdlens's concept pass, from the paper's
Flux path (``concept_attention/flux``: ModifiedDoubleStreamBlock, embed_concepts, the pipeline's
``compute_heatmaps_from_vectors``) and SD3 path (``concept_attention/sd3``: encode_concepts, the
custom joint block, ``_compute_heatmaps``), on the random-weight test beds, must match
``trace.heatmap(c, maps="concepts")`` with default arguments (r >= 0.99)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import sdlens
from sdlens.testing import random_pipeline

PROMPT = "a red circle and a blue square"
CONCEPTS = ["circle", "square", "sky"]  # one token each in CLIP and T5
STEPS = 2


@functools.lru_cache(maxsize=None)
def pipe_of(arch: str):
    return random_pipeline(arch, seed=0)


def run(pipe, **kw):
    return pipe(prompt=PROMPT, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).images


def capture(pipe, blocks, **kw) -> tuple[list[dict], list[list[dict]]]:
    """An untraced call; per transformer call its keyword arguments, and per block its inputs."""
    calls, inputs = [], []

    def on_call(module, args, kwargs):
        calls.append(dict(kwargs))
        inputs.append([])

    def on_block(module, args, kwargs):
        inputs[-1].append(dict(kwargs))

    handles = [pipe.transformer.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [b.register_forward_pre_hook(on_block, with_kwargs=True) for b in blocks]
    try:
        run(pipe, **kw)
    finally:
        for h in handles:
            h.remove()
    return calls, inputs


def heads(x, n):  # (B, L, H*D) -> (B, H, L, D)
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


def flat(x):  # (B, H, L, D) -> (B, L, H*D)
    return x.transpose(1, 2).flatten(2)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def upsampled(maps: torch.Tensor, size: int = 64) -> torch.Tensor:
    """(C, h, w) -> (C, size, size), as a heatmap is upsampled."""
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0]


@torch.no_grad()
def flux_paper_maps(pipe) -> torch.Tensor:
    """(C, h, w): the paper's Flux heatmap (softmax per step and block, mean over the steps and
    the last four double-stream blocks, batch row 0)."""
    from diffusers.models.embeddings import apply_rotary_emb

    tr = pipe.transformer
    blocks = list(tr.transformer_blocks)
    calls, inputs = capture(pipe, blocks)
    # embed_concepts: each concept's own T5 encoding, its first token; y = zeros
    first = torch.stack([pipe.encode_prompt(prompt=c, prompt_2=None, max_sequence_length=512)[0][0, 0]
                         for c in CONCEPTS])[None]
    chosen = range(max(0, len(blocks) - 4), len(blocks))
    per = []
    for call, block_inputs in zip(calls, inputs):
        dtype = call["hidden_states"].dtype
        t = call["timestep"].to(dtype) * 1000
        y0 = torch.zeros_like(call["pooled_projections"])
        if call.get("guidance") is not None:
            cvec = tr.time_text_embed(t, call["guidance"].to(dtype) * 1000, y0)
        else:
            cvec = tr.time_text_embed(t, y0)
        concepts = tr.context_embedder(first)
        for i, (block, kw) in enumerate(zip(blocks, block_inputs)):
            a, n = block.attn, block.attn.heads
            img, txt, temb = kw["hidden_states"][:1], kw["encoder_hidden_states"][:1], kw["temb"][:1]
            cos, sin = kw["image_rotary_emb"]
            nt = txt.shape[1]
            x = block.norm1(img, emb=temb)[0]
            tx = block.norm1_context(txt, emb=temb)[0]
            cx, c_gate, c_shift, c_scale, c_gate_mlp = block.norm1_context(concepts, emb=cvec)

            def qkv(v, added):
                if added:
                    return (a.norm_added_q(heads(a.add_q_proj(v), n)),
                            a.norm_added_k(heads(a.add_k_proj(v), n)), heads(a.add_v_proj(v), n))
                return a.norm_q(heads(a.to_q(v), n)), a.norm_k(heads(a.to_k(v), n)), heads(a.to_v(v), n)

            (iq, ik, iv), (tq, tk, tv), (cq, ck, cv) = qkv(x, False), qkv(tx, True), qkv(cx, True)
            pe = (cos, sin)
            q, k = torch.cat([tq, iq], 2), torch.cat([tk, ik], 2)
            q, k = apply_rotary_emb(q, pe, sequence_dim=2), apply_rotary_emb(k, pe, sequence_dim=2)
            img_attn = flat(F.scaled_dot_product_attention(q, k, torch.cat([tv, iv], 2)))[:, nt:]
            # concept ids are zeros, as the text's: the first text position's rotation
            c = len(CONCEPTS)
            cpe = (torch.cat([cos[:1].expand(c, -1), cos[nt:]]),
                   torch.cat([sin[:1].expand(c, -1), sin[nt:]]))
            q, k = torch.cat([cq, iq], 2), torch.cat([ck, ik], 2)
            q, k = apply_rotary_emb(q, cpe, sequence_dim=2), apply_rotary_emb(k, cpe, sequence_dim=2)
            concept_attn = flat(F.scaled_dot_product_attention(q, k, torch.cat([cv, iv], 2)))[:, :c]
            if i in chosen:
                scores = torch.einsum("bcd,bpd->bcp", concept_attn.float(), img_attn.float())
                per.append(scores.softmax(1)[0])
            concepts = concepts + c_gate.unsqueeze(1) * a.to_add_out(concept_attn)
            ff_in = block.norm2_context(concepts) * (1 + c_scale[:, None]) + c_shift[:, None]
            concepts = concepts + c_gate_mlp.unsqueeze(1) * block.ff_context(ff_in)
    side = int(per[0].shape[-1] ** 0.5)
    return torch.stack(per).mean(0).unflatten(-1, (side, side))


@torch.no_grad()
def sd3_paper_maps(pipe) -> torch.Tensor:
    """(C, h, w): the paper's SD3 heatmap (one joint prompt of the concepts, its first C + 1
    positions; the image attends to [image; concepts]; vectors averaged over time, start token
    dropped, concept vectors L2-normalised, softmax, mean over all blocks, batch row 0)."""
    tr = pipe.transformer
    blocks = list(tr.transformer_blocks)
    # guidance 1: no CFG, so the transformer's batch row 0 is the image (the paper's row 0)
    calls, inputs = capture(pipe, blocks, guidance_scale=1.0)
    embeds = pipe.encode_prompt(prompt=" ".join(CONCEPTS), prompt_2=None, prompt_3=None,
                                do_classifier_free_guidance=False)[0][:, : len(CONCEPTS) + 1]
    image_vecs, concept_vecs = [], []  # (steps, layers, 1, L, D)
    for call, block_inputs in zip(calls, inputs):
        concepts = tr.context_embedder(embeds)
        im_l, co_l = [], []
        for block, kw in zip(blocks, block_inputs):
            a, n = block.attn, block.attn.heads
            hs, temb = kw["hidden_states"], kw["temb"]
            x = block.norm1(hs, emb=temb)[0]
            if block.context_pre_only:
                cx = block.norm1_context(concepts, temb)
            else:
                cx, c_gate, c_shift, c_scale, c_gate_mlp = block.norm1_context(concepts, emb=temb)

            def opt(norm, v):
                return v if norm is None else norm(v)

            q = torch.cat([opt(a.norm_q, heads(a.to_q(x), n)),
                           opt(a.norm_added_q, heads(a.add_q_proj(cx), n))], 2)
            k = torch.cat([opt(a.norm_k, heads(a.to_k(x), n)),
                           opt(a.norm_added_k, heads(a.add_k_proj(cx), n))], 2)
            v = torch.cat([heads(a.to_v(x), n), heads(a.add_v_proj(cx), n)], 2)
            out = flat(F.scaled_dot_product_attention(q, k, v))
            hw = hs.shape[1]
            im_l.append(out[:, :hw])
            co_l.append(out[:, hw:])
            if not block.context_pre_only:
                concepts = concepts + c_gate.unsqueeze(1) * a.to_add_out(out[:, hw:])
                ff_in = block.norm2_context(concepts) * (1 + c_scale[:, None]) + c_shift[:, None]
                concepts = concepts + c_gate_mlp.unsqueeze(1) * block.ff_context(ff_in)
        image_vecs.append(torch.stack(im_l))
        concept_vecs.append(torch.stack(co_l))
    image = torch.stack(image_vecs).float().mean(0)  # (layers, B, HW, D)
    concept = torch.stack(concept_vecs).float().mean(0)[:, :, 1:]  # the start token dropped
    concept = concept / (concept.norm(dim=-1, keepdim=True) + 1e-8)
    maps = torch.einsum("lbcd,lbpd->lbcp", concept, image).softmax(-2).mean(0)[0]
    side = int(maps.shape[-1] ** 0.5)
    return maps.unflatten(-1, (side, side))


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_default_concept_heatmaps_are_the_papers(arch):
    pipe = pipe_of(arch)
    paper = upsampled((flux_paper_maps if arch == "flux" else sd3_paper_maps)(pipe))
    kw = {} if arch == "flux" else {"guidance_scale": 1.0}
    with sdlens.trace(pipe, concepts=CONCEPTS) as tr:
        run(pipe, **kw)
    t = tr.runs[-1]
    assert t.concepts.method == "conceptattention"
    for i, c in enumerate(CONCEPTS):
        r = correlation(t.heatmap(c, maps="concepts"), paper[i])
        assert r >= 0.99, (arch, c, r)
    # sdlens's own variant is another computation (its maps differ from the paper's)
    with sdlens.trace(pipe, concepts=CONCEPTS, concept_method="sdlens") as tr2:
        run(pipe, **kw)
    own = tr2.runs[-1]
    assert own.concepts.method == "sdlens"
    assert not torch.allclose(own.heatmap(CONCEPTS[0], maps="concepts"),
                              t.heatmap(CONCEPTS[0], maps="concepts"), atol=1e-3)


def test_paper_method_defaults_are_saved(tmp_path):
    pipe = pipe_of("flux")
    with sdlens.trace(pipe, concepts=CONCEPTS) as tr:
        run(pipe)
    t = tr.runs[-1]
    n = len(pipe.transformer.transformer_blocks)
    assert t.concepts.layers == [f"transformer_blocks.{i}.attn" for i in range(n)]  # double only
    assert t.concepts.default_layers == [f"transformer_blocks.{i}.attn"
                                         for i in range(max(0, n - 4), n)]
    back = sdlens.load(t.save(tmp_path / "c.sdlens"))
    assert back.concepts.method == "conceptattention"
    assert back.concepts.default_layers == t.concepts.default_layers
    torch.testing.assert_close(back.heatmap("sky", maps="concepts"), t.heatmap("sky", maps="concepts"))
    with pytest.raises(ValueError, match="concept_method"):
        sdlens.trace(pipe, concepts=CONCEPTS, concept_method="daam")
