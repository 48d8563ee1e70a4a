"""Word heatmaps on synthetic traces whose attention is known (tests/fakes.py), and on real traces."""

from __future__ import annotations

from importlib import import_module

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fakes import LAYERS, fake_trace
hm = import_module("sdlens.analysis.heatmaps")
from sdlens.analysis.tokens import find_word
from sdlens.trace import AttentionMaps, replace

L16 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
L8 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def tr():
    return fake_trace()  # circle words commit at step 4


# --------------------------------------------------------------------------- where words attend
@pytest.mark.parametrize("word,region,other", [("red", "circle-region", "square-region"),
                                               ("circle", "circle-region", "square-region"),
                                               ("blue", "square-region", "circle-region"),
                                               ("square", "square-region", "circle-region")])
def test_object_words_cover_their_object(tr, word, region, other):
    h = tr.heatmap(word, steps=slice(4, None))
    assert h.shape == (64, 64) and h.dtype == torch.float32
    assert hm.iou(h, tr.masks[region]) > 0.85
    assert hm.iou(h, tr.masks[other]) < 0.05
    # the peak lies inside the object
    y, x = np.unravel_index(int(h.argmax()), h.shape)
    assert tr.masks[region][y, x]
    # the finest layers alone are sharper still
    assert hm.iou(tr.heatmap(word, steps=slice(4, None), layers=16), tr.masks[region]) > 0.9


def test_before_commitment_the_circle_words_attend_elsewhere(tr):
    early = tr.heatmap("circle", steps=[0, 1, 2, 3])
    assert hm.iou(early, tr.masks["wrong-circle"]) > 0.8
    assert hm.iou(early, tr.masks["circle-region"]) < 0.05
    # all steps: both disks show, so the IoU with the final disk drops
    assert hm.iou(tr.heatmap("circle"), tr.masks["circle-region"]) < 0.7


def test_normalisation_and_shapes(tr):
    h = tr.heatmap("square")
    assert float(h.min()) == 0.0 and float(h.max()) == pytest.approx(1.0)
    ps = tr.heatmap("square", per_step=True)
    assert ps.shape == (10, 64, 64)
    assert torch.allclose(ps.amax(dim=(1, 2)), torch.ones(10))
    assert torch.allclose(ps.amin(dim=(1, 2)), torch.zeros(10))
    assert tr.heatmap("square", size=32).shape == (32, 32)
    assert tr.heatmap("square", size=(48, 32)).shape == (48, 32)
    raw = tr.heatmap("square", normalize=False)
    assert 0 <= float(raw.min()) and float(raw.max()) <= 1  # attention probabilities


def test_unnormalised_map_at_native_resolution_is_the_recorded_map(tr):
    """One 16x16 layer, one step, output at 16x16: pooling must give back the recorded map."""
    pos = find_word(tr, "circle").positions
    assert pos == (3,)
    h = tr.heatmap("circle", layers=L16, steps=[7], size=16, normalize=False)
    rec = tr.attention[L16][7, 0, 3].float()
    assert torch.allclose(h, rec, atol=1e-6)


def test_pooling_is_equal_weight_mean_of_bilinear_upsampled_layers(tr):
    pos = 6  # 'blue'
    ref = []
    for name in LAYERS:
        m = tr.attention[name][:, 0, pos].float().mean(0)
        ref.append(F.interpolate(m[None, None], size=(64, 64), mode="bilinear",
                                 align_corners=False)[0, 0])
    ref = torch.stack(ref).mean(0)
    got = tr.heatmap("blue", normalize=False)
    assert torch.allclose(got, ref, atol=1e-6)


def test_subword_tokens_are_merged_by_their_mean():
    t = fake_trace("a dreambeach circle", word_regions={"dream": "circle", "beach": "square",
                                                        "circle": "circle"})
    w = find_word(t, "dreambeach")
    assert w.tokens == ("dream", "beach</w>") and w.positions == (2, 3)
    merged = t.heatmap("dreambeach", layers=L16, size=16, normalize=False)
    a = t.attention[L16][:, 0, 2].float().mean(0)
    b = t.attention[L16][:, 0, 3].float().mean(0)
    assert torch.allclose(merged, (a + b) / 2, atol=1e-6)
    # so the merged map covers both objects
    h = t.heatmap("dreambeach", steps=slice(4, None))
    assert h[t.masks["circle-region"]].mean() > 0.5 and h[t.masks["square-region"]].mean() > 0.5
    # case-insensitive, and the query may be split the way the user wrote it
    assert torch.equal(t.heatmap("DreamBeach"), t.heatmap("dreambeach"))


def test_phrase_query_merges_consecutive_words(tr):
    pair = tr.heatmap("red circle", layers=L16, size=16, normalize=False)
    red = tr.heatmap("red", layers=L16, size=16, normalize=False)
    circle = tr.heatmap("circle", layers=L16, size=16, normalize=False)
    assert torch.allclose(pair, (red + circle) / 2, atol=1e-6)


def test_occurrence_picks_the_repeated_word():
    # 'red' at position 2 draws the circle, 'red' at position 6 the square
    t = fake_trace("a red circle and a red square",
                   word_regions={2: "circle", 3: "circle", 6: "square", 7: "square"})
    first = t.heatmap("red", steps=slice(4, None))
    second = t.heatmap("red", occurrence=1, steps=slice(4, None))
    assert hm.iou(first, t.masks["circle-region"]) > 0.85
    assert hm.iou(second, t.masks["square-region"]) > 0.85
    assert torch.equal(t.heatmap("red", occurrence=-1, steps=slice(4, None)), second)
    with pytest.raises(ValueError, match="occurs 2 time"):
        t.heatmap("red", occurrence=2)


def test_unknown_word_lists_the_words(tr):
    with pytest.raises(ValueError) as e:
        tr.heatmap("dog")
    msg = str(e.value)
    assert "'dog'" in msg and "'circle'" in msg and "'square'" in msg


def test_truncated_word_says_it_was_cut(tr):
    tr2 = replace(fake_trace(), truncated_words=[["zebra"]])
    with pytest.raises(ValueError, match="75-token"):
        tr2.heatmap("zebra")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(pooling="max"), ValueError, "pooling must be one of"),
    (dict(steps=10), ValueError, "out of range"),
    (dict(steps="all"), TypeError, "steps must be"),
    (dict(heads=0), ValueError, "heads averaged"),
    (dict(batch=3), ValueError, "out of range"),
    (dict(batch=1.0), TypeError, "batch must be an int"),
    (dict(layers="nonexistent"), ValueError, "unknown attention layer 'nonexistent'"),
    (dict(size=0), ValueError, "size must be"),
])
def test_bad_arguments(tr, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tr.heatmap("circle", **kwargs)


def test_word_must_be_a_string(tr):
    with pytest.raises(TypeError, match="token_heatmap"):
        tr.heatmap(3)


def test_unrecorded_step_is_an_error():
    t = fake_trace()
    m = t.attention  # pretend every 2nd step was recorded
    t = replace(t, attention=AttentionMaps({l: m[l][::2] for l in m.layers}, m.resolutions,
                                           [0, 2, 4, 6, 8], m.token_positions))
    assert t.heatmap("circle", per_step=True).shape == (5, 64, 64)
    with pytest.raises(ValueError, match="recorded steps: \\[0, 2, 4, 6, 8\\]"):
        t.heatmap("circle", steps=3)


def test_token_heatmap_and_word_heatmaps(tr):
    assert torch.equal(hm.token_heatmap(tr, 3), tr.heatmap("circle"))
    maps = hm.word_heatmaps(tr)
    assert list(maps) == ["a", "red", "circle", "and", "blue", "square"]
    assert torch.equal(maps["blue"], tr.heatmap("blue"))


# --------------------------------------------------------------------------- DAAM pooling
def test_daam_pooling_weighs_layers_by_head_count_sdlens_does_not():
    """Layer L16 (1 head) puts 'circle' on the circle, layer L8 (8 heads) on the square.
    sdlens pooling weighs the two layers equally; DAAM sums heads, so the square wins 8:1."""
    t = fake_trace(layers={L16: (16, 16), L8: (8, 8)}, heads={L16: 1, L8: 8},
                   layer_regions={L8: {"circle": "square"}}, commit_step=0)
    ours = t.heatmap("circle")
    daam = t.heatmap("circle", pooling="daam")
    circle, square = t.masks["circle-region"], t.masks["square-region"]
    background = ~(circle | square)
    # ours: both objects lit, far above the background (the 8x8 layer's square is blurrier, so
    # the circle of the 16x16 layer comes out somewhat brighter)
    assert float(ours[circle].mean()) > 0.7 and float(ours[square].mean()) > 0.4
    assert float(ours[background].mean()) < 0.1
    assert float(ours[circle].mean()) > float(ours[square].mean())
    # DAAM: the order flips, the square dominates
    assert hm.iou(daam, square) > 0.8
    assert float(daam[circle].mean()) < 0.3 * float(daam[square].mean())
    assert float(daam.min()) >= 0 and float(daam.max()) == pytest.approx(1.0)


def test_daam_pooling_is_daams_own_aggregation():
    """DAAM 0.2.0's compute_global_heat_map, written out as it does it: no middle block; per
    (layer, head) the maps summed over steps, bicubic to the latent grid, clamped at 0; the mean
    over all (layer, head) maps; a word's tokens averaged. normalize=False at the latent size
    gives exactly that (benchmarks/bench_daam.py checks it against DAAM itself)."""
    n_heads = {name: i + 1 for i, name in enumerate(LAYERS)}  # 1..5 heads: layers weigh unequally
    t = fake_trace(heads=n_heads, commit_step=3)
    pos = find_word(t, "circle").positions
    grid = tuple(t.latents.shape[-2:])

    def daam(names):
        merged = []
        for name in names:
            m = t.attention[name][:, 0].float().sum(0)  # (heads, tokens, h, w): summed over steps
            for head in m:
                merged.append(F.interpolate(head[:, None], size=grid, mode="bicubic")
                              .clamp_(min=0)[:, 0])
        return torch.stack(merged).mean(0)[list(pos)].mean(0)

    no_mid = [n for n in LAYERS if not n.startswith("mid_block")]
    ours = t.heatmap("circle", pooling="daam", size=grid, normalize=False)
    assert torch.allclose(ours, daam(no_mid), atol=1e-6)
    assert not torch.allclose(ours, daam(list(LAYERS)), atol=1e-3)  # the mid block is left out
    # chosen layers are taken as given, the middle block too
    assert torch.allclose(t.heatmap("circle", pooling="daam", size=grid, normalize=False,
                                    layers=list(LAYERS)), daam(list(LAYERS)), atol=1e-6)


def test_daam_and_sdlens_agree_when_layers_weigh_the_same(tr):
    a = tr.heatmap("square", pooling="daam").flatten().double()
    b = tr.heatmap("square").flatten().double()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert corr > 0.95
    # but they are not identical: bicubic vs bilinear, latent grid first
    assert float((a - b).abs().max()) > 1e-3
    assert hm.iou(tr.heatmap("square", pooling="daam", steps=slice(4, None)),
                  tr.masks["square"]) > 0.85


def test_heads_selection():
    t = fake_trace(layers={L16: (16, 16)}, heads={L16: 4},
                   head_maps={L16: {"circle": [1]}}, commit_step=0)
    # head 1 sees the circle, the others attend uniformly
    h1 = t.heatmap("circle", heads=1)
    assert hm.iou(h1, t.masks["circle-region"]) > 0.9
    with pytest.warns(RuntimeWarning, match="constant"):
        h0 = t.heatmap("circle", heads=[0, 2])
    assert float(h0.abs().max()) == 0.0
    assert t.heatmap("circle").shape == (64, 64)
    with pytest.raises(ValueError, match="out of range"):
        t.heatmap("circle", heads=4)


# --------------------------------------------------------------------------- IoU, commitment
def test_iou_protocol():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    heat = mask.astype(float) * 5 + 1  # normalises to exactly the mask
    assert hm.iou(heat, mask) == 1.0
    assert hm.iou(np.zeros((8, 8)), np.zeros((8, 8), bool)) == 1.0
    half = np.zeros((8, 8))
    half[2:6, 2:4] = 1
    assert hm.iou(half, mask) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        hm.iou(np.zeros((4, 4)), mask)
    with pytest.raises(ValueError, match="threshold"):
        hm.iou(heat, mask, threshold=2)


def test_commitment_finds_the_step_the_word_settles(tr):
    c = hm.commitment(tr, "circle")
    assert c.step == 4
    assert c.correlation[-1] == pytest.approx(1.0)
    assert (c.correlation[:4] < 0.5).all() and (c.correlation[4:] > 0.999).all()
    assert hm.commitment(tr, "square").step == 0
    both = hm.commitments(tr)
    assert [x.word for x in both] == ["a", "red", "circle", "and", "blue", "square"]
    assert {x.word: x.step for x in both}["red"] == 4
    with pytest.raises(ValueError, match="threshold"):
        hm.commitment(tr, "circle", threshold=3)


# --------------------------------------------------------------------------- real traces
@pytest.fixture(scope="module")
def real():
    from sdlens.engine.session import generate
    from sdlens.testing import random_pipeline

    pipe = random_pipeline("sd15")
    return pipe, generate(pipe, "a red circle and a dreambeach", seed=0, steps=4,
                          guidance_scale=5.0)


def test_real_trace_heatmaps(real, tmp_path):
    pipe, t = real
    n_rec = len(t.attention.steps)
    h = t.heatmap("circle")
    H, W = t.meta["height"], t.meta["width"]
    assert h.shape == (H, W) and float(h.min()) == 0 and float(h.max()) == pytest.approx(1)
    assert t.heatmap("circle", per_step=True).shape == (n_rec, H, W)
    assert t.heatmap("circle", pooling="daam").shape == (H, W)
    assert t.heatmap("circle", layers="up").shape == (H, W)
    w = find_word(t, "dreambeach")
    assert [tok for tok in w.tokens] == ["dream", "beach</w>"]
    # saved and loaded, the maps are the same
    from sdlens.trace import load

    path = t.save(tmp_path / "t.sdlens")
    t2 = load(path)
    assert torch.allclose(t2.heatmap("dreambeach"), t.heatmap("dreambeach"))
    # normalize=False: mean attention probabilities, which cannot exceed 1
    raw = t.heatmap("circle", normalize=False)
    assert 0 <= float(raw.min()) and float(raw.max()) <= 1
