"""Pipelines without a tokenizer or text encoder, called with prompt embeddings: traced
faithfully, the maps kept per token position, words unknown (or given with ``tokens=``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdlens
from sdlens.analysis.tokens import token_view
from sdlens.testing import random_pipeline
from pipelines import PROMPT, assert_restored, pipe_state


def embeddings_pipe(arch):
    """(a tokenizer-less copy of ``arch``'s random pipeline, the call's embedding kwargs)."""
    full = random_pipeline(arch, seed=0)
    with torch.no_grad():
        if arch == "sdxl":
            pe, ne, pp, npp = full.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=True, negative_prompt="")
            kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
                      negative_pooled_prompt_embeds=npp)
        else:
            pe, ne = full.encode_prompt(PROMPT, "cpu", 1, True, "")
            kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne)
    comps = dict(full.components, tokenizer=None, text_encoder=None)
    if arch == "sdxl":
        comps.update(tokenizer_2=None, text_encoder_2=None)
    pipe = type(full)(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw


def run(pipe, **kw):
    return pipe(num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_prompt_embeds_without_tokenizer_traced(arch):
    pipe, kw = embeddings_pipe(arch)
    plain = run(pipe, **kw)
    state = pipe_state(pipe)
    with sdlens.trace(pipe) as tr:
        traced = run(pipe, **kw)
    assert_restored(pipe, state)
    np.testing.assert_array_equal(plain, traced)
    t = tr.runs[-1]
    assert t.meta["words_unknown"] is True and t.tokens == [[]]
    assert t.attention.token_positions == list(range(kw["prompt_embeds"].shape[1]))  # all 77
    layer = t.attention.layers[0]
    assert t.attention.get(layer, token=3, batch=0).ndim == 3
    with pytest.raises(ValueError, match="words are unknown"):
        t.heatmap("red")
    view = token_view(t)
    assert [r.position for r in view.rows] == list(range(77))
    assert "words unknown" in str(view)


def test_tokens_given_by_the_user():
    pipe, kw = embeddings_pipe("sd15")
    toks = ["<|startoftext|>", "a", "red", "circle", "<|endoftext|>"]
    t = sdlens.generate(pipe, None, seed=0, steps=2, tokens=toks, output_type="np", **kw)
    assert "words_unknown" not in t.meta
    assert t.attention.token_positions == list(range(5))
    assert t.heatmap("red circle").ndim == 2
    with pytest.raises(ValueError, match="positions"):
        sdlens.generate(pipe, None, seed=0, steps=2, tokens=["a"] * 78, output_type="np", **kw)


def test_views_show_positions_when_words_are_unknown(tmp_path):
    from sdlens.views.report import build_report
    from sdlens.views.widgets.frames import TraceFrames, word_chips

    pipe, kw = embeddings_pipe("sd15")
    t = sdlens.generate(pipe, None, seed=0, steps=2, output_type="np", **kw)
    chips = word_chips(t)
    assert [c.key for c in chips] == [f"#{p}" for p in range(1, 13)]
    heat = TraceFrames(t).heat(0, "all", chips[:2])
    assert list(heat) == ["#1", "#2"] and len(heat["#1"]["steps"]) == len(t.attention.steps)
    from sdlens.views.widgets.trace_viewer import describe_trace

    assert "words unknown" in describe_trace(t)
    html = build_report(t)
    assert "Words unknown" in html
