"""Compact storage of traces (sdlens.trace.compact): the map codec's error bounds, files written
before it (format version 1) loading, and the size estimate against real traces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sdlens
from sdlens.engine.options import RecordOptions, estimate_trace_bytes
from sdlens.testing import random_pipeline
from sdlens.trace import load
from sdlens.trace.compact import CompactMaps, store_maps

DATA = Path(__file__).parent / "data"


def _maps(*lead: int, hw: int = 37, tiny: bool = False) -> torch.Tensor:
    """Softmax rows laid out (..., T, HW) as the recorders hand them over (``tiny``: the text
    share of a joint-attention row, values around 1e-6)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, hw, generator=g).mul(3).softmax(-1)
    return x * 1e-5 if tiny else x


@pytest.mark.parametrize("bits,dtype", [(4, torch.uint4), (8, torch.uint8)])
@pytest.mark.parametrize("tiny", [False, True], ids=["probabilities", "tiny"])
def test_codec_error_is_bounded_by_each_maps_peak(bits, dtype, tiny):
    maps = _maps(2, 3, 5, tiny=tiny)  # (B, heads, T, HW), HW odd (a padded nibble)
    maps[0, 0, 0] = 0  # an all-zero map
    kept = store_maps(maps, dtype)
    assert isinstance(kept, CompactMaps) and kept.shape == maps.shape and kept.bits == bits
    assert kept.nbytes == 2 * 3 * 5 * ((37 * bits + 7) // 8 + 4)
    back = kept.decode()
    assert back.dtype == torch.float32 and back.shape == maps.shape
    peak = maps.amax(-1, keepdim=True)
    err = (back - maps).abs()
    assert bool((err <= peak / (2 * (2 ** bits - 1)) * (1 + 1e-5)).all())
    assert torch.allclose(back.amax(-1), maps.amax(-1), rtol=1e-6, atol=0)  # the peak is exact
    assert bool((back[0, 0, 0] == 0).all())
    assert err.max() > 0  # it is a lossy code (the bound above can fail)
    # (h, w) view and stacking over steps keep the codes
    steps = CompactMaps.stack([kept, kept]).spatial(37, 1)
    assert steps.shape == (2, 2, 3, 5, 37, 1) and torch.equal(steps.decode()[1, ..., 0], back)


def test_codec_float_dtypes_and_no_device_sync():
    maps = _maps(1, 4)
    assert store_maps(maps, torch.float16).dtype == torch.float16
    # meta tensors have no values: any .item() / .cpu() / value-dependent branch would raise
    on_meta = store_maps(torch.empty(2, 8, 4, 100, device="meta"), torch.uint4)
    assert on_meta.codes.device.type == "meta" and on_meta.codes.shape == (2, 8, 4, 50)
    assert on_meta.scales.shape == (2, 8, 4)


def _words(trace) -> list[str]:
    return [w for w in trace.prompts[0].split() if w.isalpha()]


@pytest.mark.parametrize("name", ["v1-sd15", "v1-flux"])
def test_files_of_format_version_1_load(tmp_path, name):
    """Files written by sdlens before compact storage (tests/trace/data, see its README):
    float16 maps, noise_text written apart, read as they were written."""
    old = load(DATA / f"{name}.sdlens")
    att = old.attention
    assert att.dtype == "float16" and att[att.layers[0]].dtype == torch.float16
    assert old.x0.dtype == torch.float32 and old.noise_text.shape == old.noise.shape
    for w in _words(old):
        assert old.heatmap(w).shape[-2:] == (old.meta["height"], old.meta["width"])
    if old.concepts is not None:
        c = old.concepts
        assert c[c.layers[0]].dtype == torch.float16
        assert old.heatmap("sky", maps="concepts").ndim == 2
        assert old.image_to_text is not None and old.image_to_text.dtype == "float16"
    # saved again, in today's format: the same values, held as they were
    again = load(old.save(tmp_path / "again.sdlens"))
    for layer in att.layers:
        assert torch.equal(again.attention[layer], att[layer])
    assert torch.equal(again.latents, old.latents) and torch.equal(again.noise, old.noise)
    assert torch.equal(again.noise_text, old.noise_text)
    assert torch.equal(again.x0, old.x0)


def test_new_files_carry_codes_and_read_back_the_same_maps(tmp_path):
    pipe = random_pipeline("flux")
    with sdlens.trace(pipe, concepts=["circle", "sky"],
                      record=("latents", "noise", "x0", "attention", "image_to_text")) as tr:
        pipe("a red circle", num_inference_steps=2, max_sequence_length=16,
             output_type="latent")
    t = tr.runs[-1]
    assert t.attention.dtype == "uint8" and t.meta["options"]["attention_dtype"] == "uint8"
    assert t.noise_text is t.noise  # no CFG: one tensor
    back = load(t.save(tmp_path / "t.sdlens"))
    for kind in ("attention", "concepts", "image_to_text"):
        a, b = getattr(t, kind), getattr(back, kind)
        if kind == "concepts":  # a softmax over the concepts: kept in float16
            assert b.dtype == "float16"
        else:
            assert b.dtype == "uint8" and isinstance(b.stored(b.layers[0]), CompactMaps)
        for layer in a.layers:
            assert a[layer].dtype == (torch.float16 if kind == "concepts" else torch.float32)
            assert torch.equal(b[layer], a[layer])
    assert torch.equal(back.noise_text, t.noise) and back.noise_text is back.noise
    assert torch.equal(back.x0, t.x0)
    assert sum(back.nbytes().values()) == sum(t.nbytes().values())
    assert _version(t.to_bytes()) == 2


def _version(data: bytes) -> int:
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    return int(json.loads(data[8:8 + n])["__metadata__"]["format_version"])


def test_a_trace_that_needs_no_codes_is_written_as_version_1():
    """float16 maps under CFG (noise_text its own tensor): what older sdlens reads."""
    pipe = random_pipeline("sd15")
    with sdlens.trace(pipe, attention_dtype=torch.float16) as tr:
        pipe("a red circle", num_inference_steps=2, guidance_scale=7.5, output_type="latent")
    assert _version(tr.runs[-1].to_bytes()) == 1


def test_compact_maps_against_float32_maps():
    """The same run recorded with float32 and with the default codes: every map within 1/30
    of its peak, the word heatmaps within 0.1 (they are min-max normalised: a map's flat
    random-weight maps magnify the codes' steps)."""
    pipe = random_pipeline("sd15")
    runs = {}
    for dtype in (torch.float32, torch.uint4):
        with sdlens.trace(pipe, attention_dtype=dtype) as tr:
            pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="latent")
        runs[dtype] = tr.runs[-1]
    ref, got = runs[torch.float32], runs[torch.uint4]
    for layer in ref.attention.layers:
        r, g = ref.attention[layer], got.attention[layer]
        peak = r.amax(dim=(-2, -1), keepdim=True)
        assert bool(((g - r).abs() <= peak / 30 * (1 + 1e-5)).all())
    for w in ("red", "circle"):
        assert (got.heatmap(w) - ref.heatmap(w)).abs().max() < 0.1
    assert torch.equal(got.x0, ref.x0)


@pytest.mark.parametrize("arch", ["sd15", "flux", "sd3"])
@pytest.mark.parametrize("dtype", [torch.uint4, torch.float16])
def test_estimate_within_ten_percent_of_the_real_trace(arch, dtype):
    pipe = random_pipeline(arch)
    for height in (192, 256):  # big enough that the file header (~9 KB) is a small part
        with sdlens.trace(pipe, attention_dtype=dtype) as tr:
            pipe("a red circle and a blue square", num_inference_steps=2, height=height,
                 width=height, output_type="latent")
        t = tr.runs[-1]
        held, saved = sum(t.nbytes().values()), len(t.to_bytes())
        est = t.meta["estimated_bytes"]
        assert abs(sum(est.values()) / held - 1) < 0.10, (height, est, t.nbytes())
        assert abs(sum(est.values()) / saved - 1) < 0.10, (height, est, saved)
        called = estimate_trace_bytes(
            pipe, num_inference_steps=2, latent_hw=t.latents.shape[-2:], do_cfg=t.do_cfg,
            n_tokens=len(t.attention.token_positions), options=RecordOptions(attention_dtype=dtype))
        assert called == est
        assert called.storage["attention"].startswith(str(dtype).replace("torch.", ""))
        assert sum(called.values()) == sum(t.nbytes().values()) - t.nbytes()["other"]


def test_the_default_flux_dev_trace_fits_200_mb():
    """A default Flux.1-dev trace (1024 px, 28 steps, all 57 blocks, 32 text tokens kept), from
    the full-size transformer's config on the meta device."""
    import diffusers

    pipe = random_pipeline("flux")
    cfg = pipe.transformer.config
    with torch.device("meta"):
        full = diffusers.FluxTransformer2DModel(
            guidance_embeds=True, in_channels=cfg.in_channels,
            joint_attention_dim=cfg.joint_attention_dim,
            pooled_projection_dim=cfg.pooled_projection_dim)
    pipe.register_modules(transformer=full)
    vsf = int(pipe.vae_scale_factor)
    kw = dict(num_inference_steps=28, do_cfg=False, latent_hw=(1024 // vsf, 1024 // vsf),
              n_tokens=32)
    est = estimate_trace_bytes(pipe, **kw)
    assert sum(est.values()) <= 200e6, est
    # "auto": 8-bit codes would not fit, so 4-bit; the estimate says so
    assert est.attention_dtype == torch.uint4 and "auto" in est.storage["attention"]
    small = estimate_trace_bytes(pipe, **{**kw, "latent_hw": (64, 64)})
    assert small.attention_dtype == torch.uint8 and sum(small.values()) <= 200e6
    assert "noise_text is noise" in est.storage["noise"]
    fp16 = estimate_trace_bytes(pipe, options=RecordOptions(attention_dtype=torch.float16), **kw)
    assert fp16["attention"] == 57 * 28 * 32 * 64 * 64 * 2  # 2 bytes a value
    assert est["attention"] == 57 * 28 * 32 * (64 * 64 // 2 + 4)


def test_trace_operations_keep_the_codes():
    from sdlens.trace import select_batch, slice_steps

    pipe = random_pipeline("sd15")
    with sdlens.trace(pipe) as tr:
        pipe(["a red circle", "a blue square on the beach"], num_inference_steps=3,
             output_type="latent")
    t = tr.runs[-1]
    one, late = select_batch(t, 1), slice_steps(t, 1, 3)
    for layer in t.attention.layers:
        assert isinstance(one.attention.stored(layer), CompactMaps)
        assert torch.equal(one.attention[layer], t.attention[layer][:, 1:2])
        assert isinstance(late.attention.stored(layer), CompactMaps)
        assert torch.equal(late.attention[layer], t.attention[layer][1:3])
    assert one.attention.dtype == late.attention.dtype == "uint8"  # "auto": a small trace
    assert one.nbytes()["attention"] * 2 == t.nbytes()["attention"]
