"""The .sdlens file format: round trip, lazy loading, clear errors for bad files."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest
import torch

import diffusers
from sdlens.engine.session import generate
from sdlens.trace import FORMAT_VERSION, load
from pipelines import cached_pipe


def test_save_load_round_trip(tmp_path):
    pipe = cached_pipe("sd15")
    tr = generate(pipe, ["a red circle", "a blue square"], seed=1, steps=3, negative_prompt="ugly")
    path = tr.save(tmp_path / "run.sdlens")
    assert path.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    t0 = time.perf_counter()
    back = load(path)
    assert time.perf_counter() - t0 < 1.0
    assert back._cache == {}  # lazy: nothing read yet
    assert back.pipeline is None
    for name in ("latents", "noise", "noise_text", "noise_uncond", "x0", "timesteps"):
        assert torch.equal(getattr(back, name), getattr(tr, name)), name
    assert back.sigmas is None and tr.sigmas is None
    assert back.prompts == tr.prompts and back.negative_prompts == tr.negative_prompts
    assert back.tokens == tr.tokens and back.token_ids == tr.token_ids
    assert back.truncated_words == tr.truncated_words
    assert back.meta == json.loads(json.dumps(tr.meta))
    assert back.meta["seeds"] == [1] and back.meta["diffusers_version"] == diffusers.__version__
    assert back.guidance_scale == tr.guidance_scale and back.do_cfg == tr.do_cfg
    assert back.attention.layers == tr.attention.layers
    assert back.attention.steps == tr.attention.steps
    assert back.attention.token_positions == tr.attention.token_positions
    for layer in tr.attention.layers:
        assert back.attention.resolution(layer) == tr.attention.resolution(layer)
        assert torch.equal(back.attention[layer], tr.attention[layer])
    assert len(back.images) == 2
    for a, b in zip(back.images, tr.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # saving a loaded trace again (onto itself) works
    back.save(path)
    again = load(path)
    assert torch.equal(again.latents, tr.latents)
    # tensors other modules add (e.g. sdlens.experiments.refiner's 'parts/...') survive a round trip
    from sdlens.trace import replace

    extra = replace(tr, extra_tensors={"parts/x": torch.arange(3.0)})
    extra.save(tmp_path / "extra.sdlens")
    assert torch.equal(load(tmp_path / "extra.sdlens")._tensor("parts/x"), torch.arange(3.0))


def test_load_errors(tmp_path):
    from safetensors.torch import save_file

    pipe = cached_pipe("sd15")
    tr = generate(pipe, "a red circle", seed=0, steps=2)
    path = tr.save(tmp_path / "ok.sdlens")
    data = path.read_bytes()
    cut = tmp_path / "cut.sdlens"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated|too short"):
        load(cut)
    # a newer format version
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["format_version"] = str(FORMAT_VERSION + 1)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    newer = tmp_path / "newer.sdlens"
    newer.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ValueError, match="newer sdlens.*upgrade"):
        load(newer)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="not an sdlens trace"):
        load(other)
    junk = tmp_path / "junk.sdlens"
    junk.write_bytes(b"PK\x03\x04 this is a zip file or anything else" * 10)
    with pytest.raises(ValueError, match="not an sdlens trace"):
        load(junk)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.sdlens")
