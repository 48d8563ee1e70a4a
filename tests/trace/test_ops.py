"""The one Trace constructor (``Trace.build``), the operations on traces (``sdlens.trace.ops``)
and a trace's bytes (``to_bytes`` / ``from_bytes``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fakes import fake_trace
from sdlens.trace import AttentionMaps, Trace, concat_steps, load, replace, select_batch, slice_steps


def _equal(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


FIELDS = ("timesteps", "sigmas", "latents", "noise_uncond", "noise_text", "noise", "x0")


def test_build_checks_shapes():
    tr = fake_trace(batch=2)
    f = tr.fields()
    assert torch.equal(Trace.build(**f).latents, tr.latents)
    bad = [
        (dict(latents=tr.latents[1:]), r"latents has shape \(10, 2, 4, 16, 16\), expected 5 "
                                       r"dimensions starting \(11, 2\)"),
        (dict(x0=tr.x0[:, :1]), "x0 has shape"),
        (dict(noise=tr.noise[0]), "noise has shape"),
        (dict(sigmas=torch.zeros(3)), "sigmas has shape"),
        (dict(prompts=["a"]), "negative_prompts has 2 entries, prompts 1"),
        (dict(latents=tr.latents.numpy()), "latents must be a tensor"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            Trace.build(**{**f, **change})
    m = tr.attention
    layer = m.layers[0]
    short = AttentionMaps({layer: m[layer][:, :, :3]}, m.resolutions, m.steps, m.token_positions)
    with pytest.raises(ValueError, match=r"attention\['down_blocks.0"):
        Trace.build(**{**f, "attention": short})
    late = AttentionMaps({layer: m[layer]}, m.resolutions, [s + 1 for s in m.steps],
                         m.token_positions)
    with pytest.raises(ValueError, match="attention steps"):
        Trace.build(**{**f, "attention": late})
    with pytest.raises(TypeError, match="unknown trace fields"):
        replace(tr, colour="red")


def test_replace_changes_only_what_it_is_told():
    tr = fake_trace()
    new = replace(tr, guidance_scale=3.0, noise_uncond=None)
    assert new.guidance_scale == 3.0 and new.noise_uncond is None and tr.noise_uncond is not None
    assert new.prompts == tr.prompts and new.meta == tr.meta and torch.equal(new.x0, tr.x0)
    assert new.attention.layers == tr.attention.layers


def test_select_batch_is_each_item_alone():
    prompts = ["a red circle", "a big red circle and a blue square"]
    two = fake_trace(batch=2)
    # make the items differ: item 1 gets the second prompt's (longer) tokens
    from fakes import tokenizer

    ids = [tokenizer()(p).input_ids for p in prompts]
    n = max(len(i) for i in ids) - 1
    m = two.attention
    maps = AttentionMaps({l: torch.cat([m[l]] * 2, dim=2)[:, :, :n] for l in m.layers},
                         m.resolutions, m.steps, range(n))
    two = replace(two, prompts=prompts, token_ids=ids,
                  tokens=[tokenizer().convert_ids_to_tokens(i) for i in ids], attention=maps)
    one = select_batch(two, 0)
    assert one.prompts == prompts[:1] and one.batch_size == 1
    assert one.attention.token_positions == list(range(len(ids[0])))  # its own tokens only
    for name in FIELDS[2:]:
        assert torch.equal(getattr(one, name), getattr(two, name)[:, :1]), name
    layer = m.layers[0]
    assert torch.equal(one.attention[layer], maps[layer][:, :1, :len(ids[0])])
    back = select_batch(two, [1, 0])
    assert back.prompts == prompts[::-1] and back.attention.token_positions == list(range(n))
    assert torch.equal(back.latents, two.latents[:, [1, 0]])
    with pytest.raises(IndexError, match="batch item 2 of a trace of 2"):
        select_batch(two, 2)


def test_slice_and_concat_steps_round_trip(tmp_path):
    tr = fake_trace(steps=10)
    head, tail = slice_steps(tr, 0, 4), slice_steps(tr, 4, 10)
    assert head.num_steps == 4 and tail.num_steps == 6 and tail.meta["step_offset"] == 4
    assert torch.equal(head.latents[-1], tail.latents[0]) and head.images == []
    assert tail.attention.steps == list(range(6)) and head.attention.steps == list(range(4))
    layer = tr.attention.layers[0]
    assert torch.equal(tail.attention[layer], tr.attention[layer][4:])
    whole = concat_steps(head, tail)
    assert whole.num_steps == 10 and len(whole.images) == 1
    for name in FIELDS:
        assert _equal(getattr(whole, name), getattr(tr, name)), name
    # the first trace's maps only (steps 0..3)
    assert whole.attention.steps == list(range(4))
    # slicing a loaded trace keeps its maps unread until used
    back = load(tr.save(tmp_path / "t.sdlens"))
    part = slice_steps(back, 0, 10)
    assert not torch.is_tensor(part.attention.source(layer))
    assert torch.equal(part.attention[layer], tr.attention[layer])
    nocfg = replace(tail, do_cfg=False)
    assert concat_steps(head, nocfg).noise_uncond is None
    with pytest.raises(ValueError, match="latent shapes differ"):
        concat_steps(head, replace(tail, latents=tail.latents[..., :8]))


def _parts(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (JSON) and tensor data."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8: 8 + n]), data[8 + n:]


def test_bytes_are_the_file(tmp_path):
    tr = fake_trace(batch=2)
    path = tr.save(tmp_path / "t.sdlens")
    data = tr.to_bytes()
    assert _parts(data) == _parts(path.read_bytes())  # safetensors orders its metadata at random
    back = Trace.from_bytes(data)
    for name in FIELDS:
        assert _equal(getattr(back, name), getattr(tr, name)), name
    assert back.meta == tr.meta and back.tokens == tr.tokens and back.pipeline is None
    assert [np.asarray(i).tolist() for i in back.images] == \
        [np.asarray(i).tolist() for i in tr.images]
    for layer in tr.attention.layers:
        assert torch.equal(back.attention[layer], tr.attention[layer])
    with pytest.raises(ValueError, match="not an sdlens trace"):
        Trace.from_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
