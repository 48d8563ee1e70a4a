"""Concept maps (ConceptAttention) and image->text maps on joint attention (SD3 / SD3.5): random
weights, CPU fp32, 2 steps."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import sdlens
from sdlens.engine.arch import adapter_for
from sdlens.engine.joint import concept_maps
from sdlens.testing import random_pipeline
from sdlens.trace.ops import select_batch, slice_steps

PROMPT = "a red circle and a blue square"
CONCEPTS = ["circle", "square", "background", "zebra"]  # "background", "zebra": not in the prompt
STEPS = 2


@functools.lru_cache(maxsize=None)
def pipe_of(arch: str, t5: bool = True):
    return random_pipeline(arch, t5=t5, seed=0)


def call(pipe, **kw):
    return pipe(**{"prompt": PROMPT, "num_inference_steps": STEPS, "output_type": "latent",
                   "generator": torch.Generator().manual_seed(0), **kw}).images


@functools.lru_cache(maxsize=None)
def traced(arch: str, t5: bool = True, method: str = "conceptattention"):
    pipe = pipe_of(arch, t5)
    plain = call(pipe)
    with sdlens.trace(pipe, concepts=CONCEPTS, concept_method=method,
                      record=("latents", "attention", "image_to_text")) as tr:
        out = call(pipe)
    return pipe, plain, out, tr.runs[-1]


@pytest.mark.parametrize("arch", ["sd3", "sd35"])
def test_concept_maps_leave_the_image_unchanged(arch):
    pipe, plain, out, tr = traced(arch)
    assert torch.equal(plain, out) and torch.equal(tr.latents[-1], out.float())
    assert "skipped" not in tr.meta
    concepts = tr.concepts
    n_blocks = pipe.transformer.config.num_layers
    assert concepts.concepts == CONCEPTS and concepts.steps == list(range(STEPS))
    assert concepts.layers == [f"transformer_blocks.{i}.attn" for i in range(n_blocks)]
    for layer in concepts.layers:  # (steps, batch, concepts, h, w), a softmax over concepts
        m = concepts[layer].float()
        assert m.shape == (STEPS, 1, len(CONCEPTS), 4, 4)
        torch.testing.assert_close(m.sum(2), torch.ones(STEPS, 1, 4, 4), atol=2e-3, rtol=0)
    assert tr.meta["options"]["concepts"] == CONCEPTS


@pytest.mark.parametrize("arch", ["sd3", "sd35"])
def test_concept_heatmaps_at_image_resolution_sum_to_one(arch):
    _, _, _, tr = traced(arch)
    raw = {c: tr.heatmap(c, maps="concepts", normalize=False) for c in CONCEPTS}
    assert all(h.shape == (64, 64) for h in raw.values())
    torch.testing.assert_close(sum(raw.values()), torch.ones(64, 64), atol=2e-3, rtol=0)
    zebra = tr.heatmap("Zebra", maps="concepts")  # absent from the prompt; names ignore case
    assert zebra.min() == 0 and zebra.max() == 1
    per_step = tr.heatmap("circle", maps="concepts", per_step=True, layers="block.1", steps=-1)
    assert per_step.shape == (1, 64, 64)
    layer = tr.concepts.layers[1]
    torch.testing.assert_close(tr.concepts.get(layer, token="square"),
                               tr.concepts[layer][:, :, 1].float())


def test_the_stream_is_carried_through_unrecorded_blocks():
    """Maps kept at one block and step only: the concept stream still went through every block
    before it (the same maps as when every block is kept; sdlens's per-step maps: the paper's
    SD3 maps average the vectors over the recorded steps)."""
    pipe, _, _, full = traced("sd3", method="sdlens")
    with sdlens.trace(pipe, concepts=CONCEPTS, layers="block.1", steps=[-1],
                      concept_method="sdlens") as tr:
        call(pipe)
    assert tr.concepts.layers == ["transformer_blocks.1.attn"] and tr.concepts.steps == [1]
    torch.testing.assert_close(tr.concepts["block.1"][0], full.concepts["block.1"][1])


@pytest.mark.parametrize("arch", ["sd3", "sd35"])
def test_concept_step_is_the_blocks_text_stream(arch):
    """With the prompt's own text stream as the 'concepts', the concept step is the block's text
    path: its next stream is the block's text output, its image output the block's image
    attention output (before to_out)."""
    pipe = pipe_of(arch)
    adapter = adapter_for(pipe)
    torch.manual_seed(0)
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    hs, ehs, temb = torch.randn(2, 16, dim), torch.randn(2, 7, dim), torch.randn(2, dim)
    for site, block in adapter.concept_blocks():
        seen = []
        handle = block.attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            text_out, _ = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb)
            step = adapter.concept_step(block, ehs[1:], (), dict(
                hidden_states=hs, encoder_hidden_states=ehs, temb=temb), slice(1, 2), True)
        handle.remove()
        torch.testing.assert_close(step.image, seen[0][1:], atol=1e-5, rtol=1e-5)
        assert step.concepts.shape == (1, 7, dim) and step.image.shape == (1, 16, dim)
        if block.context_pre_only:
            assert text_out is None and step.stream is None  # the last block: the stream ends
        else:
            torch.testing.assert_close(step.stream, text_out[1:], atol=1e-5, rtol=1e-5)


def test_concept_map_is_the_softmax_of_output_products():
    torch.manual_seed(0)
    image, concepts = torch.randn(2, 16, 8), torch.randn(2, 3, 8)
    m = concept_maps(image, concepts)
    want = torch.einsum("ncd,nqd->ncq", concepts, image).softmax(1)
    torch.testing.assert_close(m, want)
    assert m.shape == (2, 3, 16)


def test_image_to_text_maps():
    pipe, _, _, tr = traced("sd35")
    i2t, att = tr.image_to_text, tr.attention
    assert i2t.layers == att.layers and i2t.token_positions == att.token_positions
    m = i2t[i2t.layers[0]].float()  # (steps, batch, tokens, h, w): a part of each text row
    assert m.shape == (STEPS, 1, len(att.token_positions), 4, 4)
    assert (m.sum((-2, -1)) < 1).all() and (m > 0).all()
    assert tr.heatmap("red", maps="image_to_text").shape == (64, 64)
    # the maths: the image columns of the text queries' softmax over all keys, checked
    # against an explicit float64 softmax in tests/engine/test_kernel_maps.py


def test_save_load_round_trip_and_operations(tmp_path):
    _, _, _, tr = traced("sd3")
    back = sdlens.load(tr.save(tmp_path / "c.sdlens"))
    assert back.concepts.concepts == CONCEPTS and back.concepts.layers == tr.concepts.layers
    for c in CONCEPTS:
        torch.testing.assert_close(back.heatmap(c, maps="concepts"), tr.heatmap(c, maps="concepts"))
    torch.testing.assert_close(back.image_to_text[back.image_to_text.layers[0]],
                               tr.image_to_text[tr.image_to_text.layers[0]])
    late = slice_steps(tr, 1, 2)
    assert late.concepts.steps == [0]
    torch.testing.assert_close(late.concepts["block.0"], tr.concepts["block.0"][1:])
    assert select_batch(tr, 0).concepts.concepts == CONCEPTS


def test_files_without_concepts_load_and_say_so(tmp_path):
    pipe = pipe_of("sd3")
    plain = sdlens.generate(pipe, PROMPT, steps=1, output_type="latent")
    path = plain.save(tmp_path / "plain.sdlens")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        doc = json.loads(f.metadata()["sdlens"])
    assert "concepts" not in doc and "image_to_text" not in doc  # as files written before
    back = sdlens.load(path)
    assert back.concepts is None and back.image_to_text is None
    with pytest.raises(ValueError, match="concepts=") as e:
        back.heatmap("red", maps="concepts")
    assert "\n" not in str(e.value)


def test_generate_batch_and_no_t5():
    pipe = pipe_of("sd3", t5=False)
    _, plain, out, tr = traced("sd3", t5=False)
    assert torch.equal(plain, out) and tr.concepts.concepts == CONCEPTS
    both = sdlens.generate(pipe, [PROMPT, "a zebra"], seed=[0, 1], steps=STEPS,
                           output_type="latent", concepts=["zebra", "circle"])
    assert both.concepts[both.concepts.layers[0]].shape == (STEPS, 2, 2, 4, 4)
    one = select_batch(both, 1)
    torch.testing.assert_close(one.heatmap("zebra", maps="concepts"),
                               both.heatmap("zebra", maps="concepts", batch=1))


def test_errors_are_one_line():
    _, _, _, tr = traced("sd3")
    with pytest.raises(ValueError, match="concepts is empty") as e:
        sdlens.trace(pipe_of("sd3"), concepts=[])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'tiger'.*'circle', 'square'") as e:
        tr.heatmap("tiger", maps="concepts")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="maps must be one of"):
        tr.heatmap("red", maps="concept")
    for bad in (["circle", "Circle"], ["circle", ""], "circle square".split() + [3]):
        with pytest.raises(ValueError, match="concepts"):
            sdlens.trace(pipe_of("sd3"), concepts=bad)
    for arch in ("sd15", "pixart", "sana"):
        pipe = random_pipeline(arch, seed=0)
        with pytest.raises(TypeError, match="concept maps need a joint-attention") as e:
            sdlens.trace(pipe, concepts=["circle"])
        assert "\n" not in str(e.value)
        with pytest.raises(TypeError, match="image_to_text maps need joint attention"):
            sdlens.generate(pipe, PROMPT, steps=1, record=("latents", "image_to_text"))


@pytest.mark.parametrize("part", ["paper_concepts", "concept_step"])
def test_a_failing_concept_pass_never_fails_the_run(monkeypatch, part):
    from sdlens.engine.arch.mmdit import MMDiTAdapter

    pipe, plain, _, _ = traced("sd3")

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(MMDiTAdapter, part, broken)
    with pytest.warns(UserWarning, match="concepts transformer_blocks.0.attn") as record:
        with sdlens.trace(pipe, concepts=["circle"]) as tr:
            out = call(pipe)
    assert len([w for w in record if "sdlens" in str(w.message)]) == 1
    assert torch.equal(plain, out) and tr.attention.layers  # the rest is recorded
    assert tr.concepts.layers == [] and "boom" in tr.meta["skipped"][
        "concepts transformer_blocks.0.attn"]
