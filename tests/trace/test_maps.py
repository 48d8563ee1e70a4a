"""AttentionMaps: choosing layers and steps, and its API."""

from __future__ import annotations


import pytest
import torch

from sdlens.engine.session import trace
from pipelines import cached_pipe, call_pipe


def test_layer_and_step_selection():
    pipe = cached_pipe("sd15")
    with trace(pipe, layers="up", steps=slice(None, None, 2)) as tr:
        call_pipe(pipe, num_inference_steps=5)
    maps = tr.attention
    assert maps.layers and all(l.startswith("up_blocks.") for l in maps.layers)
    assert maps.steps == list(range(0, tr.num_steps, 2))
    assert maps[maps.layers[0]].shape[0] == len(maps.steps)
    with trace(pipe, layers=["down.1.0", 8], steps=[0, -1]) as tr2:
        call_pipe(pipe, num_inference_steps=5)
    m2 = tr2.attention
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2" in m2.layers
    assert all(max(m2.resolution(l)) == 8 or l.startswith("down_blocks.1.") for l in m2.layers)
    assert m2.steps == [0, tr2.num_steps - 1]
    with trace(pipe, record=("latents",)) as tr3:
        call_pipe(pipe)
    assert tr3.attention is None and tr3.noise is None and tr3.x0 is None
    assert tr3.latents is not None


def test_attention_maps_api():
    pipe = cached_pipe("sd15")
    with trace(pipe) as tr:
        call_pipe(pipe, num_inference_steps=3)
    maps = tr.attention
    assert maps.resolution("mid") == (1, 1)
    assert maps.resolution("down.0.0") == (8, 8)
    assert maps.alias("down_blocks.1.attentions.0.transformer_blocks.0.attn2") == "down.1.0"
    assert list(maps.select("down")) == [l for l in maps.layers if l.startswith("down_blocks")]
    assert set(maps.select(8)) == {l for l in maps.layers if maps.resolution(l) == (8, 8)}
    assert list(maps.select(None)) == maps.layers
    with pytest.raises(ValueError, match="available layers.*down.0.0"):
        maps.select("down.7.0")
    with pytest.raises(ValueError, match="available resolutions"):
        maps.select(13)
    with pytest.raises(IndexError, match="not recorded|out of range"):
        maps.get(maps.layers[0], step=99)
    with pytest.raises(ValueError, match="its words.*'circle'"):
        maps.token_index("triangle")
    circle = maps.get("up.3.0", step=-1, token="circle", batch=0)
    assert circle.shape == (8, 8)
    full = maps["up.3.0"]
    assert tr.tokens[0][3] == "circle</w>"
    torch.testing.assert_close(circle, full[-1, 0, 3].float())
    assert maps.token_index(0) == [0]
