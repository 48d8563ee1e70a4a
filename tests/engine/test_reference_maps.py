"""Reference maps of the editing models (``record=(..., "reference_maps")``): each output
patch's attention on each reference image's patches, read at the kernel (Flux.1 Kontext, Flux.2
with ``image=[...]``). Checked against an explicit float64 softmax from the q / k the kernel saw
(an independent ``TorchFunctionMode`` spy), on a constructed near-diagonal case, pooled, saved
and loaded, and as ``trace.heatmap("image 1")``. Random-weight beds, CPU fp32, 2 steps."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import sdlens
import sdlens.engine.sites as sites
from sdlens.engine.arch import adapter_for
from sdlens.testing import call_kwargs_2026, random_pipeline, reference_image
from test_kernel_maps import KernelSpy, explicit

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = 512
RECORD = ("latents", "attention", "reference_maps")
# case -> (arch, call keywords, output patches, reference patches (rows, columns) each)
CASES = {
    "flux-kontext": ("flux-kontext", lambda: dict(image=reference_image(64), max_area=32 * 32),
                     4, [(4, 4)]),
    "flux2": ("flux2", lambda: dict(image=[reference_image(64), reference_image(96, seed=1)]),
              4, [(4, 4), (6, 6)]),  # Flux.2 takes references of >= 64 px
}


@functools.lru_cache(maxsize=None)
def pipe_of(arch: str):
    return random_pipeline(arch, seed=0)


@functools.lru_cache(maxsize=None)
def traced(case: str):
    arch, kw, _, _ = CASES[case]
    pipe = pipe_of(arch)
    plain = pipe(**call_kwargs_2026(arch, **kw())).images
    adapter = adapter_for(pipe)
    spy = KernelSpy(adapter.denoiser, adapter.sites())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="sdlens")
            with spy, sdlens.trace(pipe, record=RECORD, attention_dtype=torch.float32) as tr:
                out = pipe(**call_kwargs_2026(arch, **kw())).images
    finally:
        spy.remove()
    assert torch.equal(plain, out), "tracing changed the image"
    return tr.runs[-1], spy


@pytest.mark.parametrize("case", list(CASES))
def test_reference_maps_equal_the_explicit_softmax(case):
    """Each output patch's probabilities on each reference's patches: its softmax over *all* the
    kernel's keys restricted to the reference's columns (not renormalised), heads averaged;
    ``at`` renormalises over the reference, ``lands`` reads a reference patch's column."""
    tr, spy = traced(case)
    _, _, n_out, grids = CASES[case]
    refs = tr.reference_maps
    assert refs.grids == grids and refs.layers == tr.attention.layers
    n = 0
    for layer in refs.layers:
        for i, step in enumerate(refs.steps):
            q, k, mask, scale = spy.calls[(step, layer)][0]
            p = explicit(q, k, mask, scale).mean(1)  # (B, L, L), heads averaged
            img = slice(TEXT, TEXT + n_out)
            start = TEXT + n_out
            for r, (rows, cols) in enumerate(grids):
                span = slice(start, start + rows * cols)
                want = p[:, img, span]  # (B, Q, R)
                got = refs.reference(layer, r)[i].double()  # (B, rows, cols, h, w)
                got = got.flatten(1, 2).flatten(-2).transpose(1, 2)
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
                w = 2  # the output's 2x2 patches
                at = refs.at(1, 0, layers=layer, index=r, step=step)
                torch.testing.assert_close(at.double().flatten(),
                                           want[0, w] / want[0, w].sum(), atol=1e-5, rtol=0)
                lands = refs.lands(rows - 1, 0, layers=layer, index=r, step=step)
                torch.testing.assert_close(lands.double().flatten(),
                                           want[0, :, (rows - 1) * cols], atol=1e-6, rtol=0)
                start += rows * cols
            n += 1
    assert n == len(refs.layers) * tr.num_steps


def test_image_heatmap_is_the_reference_share():
    tr, _ = traced("flux2")
    refs = tr.reference_maps
    for i in (0, 1):
        share = refs.share(index=i)  # (h, w): summed over the reference's patches
        hm = tr.heatmap(f"image {i + 1}", normalize=False, size=2)
        torch.testing.assert_close(hm, share, rtol=1e-5, atol=1e-7)
        assert tr.heatmap(f"image {i + 1}").shape == (32, 32)
    with pytest.raises(ValueError) as e:
        tr.heatmap("image 3")
    assert "\n" not in str(e.value) and "image 2" in str(e.value)
    assert tr.heatmap("cat").shape == (32, 32)  # words still words


def test_save_load_round_trip(tmp_path):
    tr, _ = traced("flux-kontext")
    back = sdlens.load(tr.save(tmp_path / "kontext.sdlens"))
    refs, loaded = tr.reference_maps, back.reference_maps
    assert loaded.grids == refs.grids and loaded.layers == refs.layers
    for layer in refs.layers:
        assert torch.equal(loaded[layer], refs[layer])
    torch.testing.assert_close(back.heatmap("image 1"), tr.heatmap("image 1"))


def test_large_references_are_sum_pooled(monkeypatch):
    """A reference wider than REFERENCE_GRID patches a side is sum-pooled: each cell the sum of
    an f x f block of the full-resolution probabilities (here 4x4 patches -> 2x2)."""
    tr, _ = traced("flux-kontext")
    monkeypatch.setattr(sites, "REFERENCE_GRID", 2)
    pipe = pipe_of("flux-kontext")
    kw = CASES["flux-kontext"][1]
    with sdlens.trace(pipe, record=RECORD, attention_dtype=torch.float32) as small:
        pipe(**call_kwargs_2026("flux-kontext", **kw()))
    pooled = small.runs[-1].reference_maps
    assert pooled.grids == [(2, 2)]
    for layer in pooled.layers:
        full = tr.reference_maps.reference(layer)  # (S, B, 4, 4, h, w)
        want = full.unflatten(2, (2, 2)).unflatten(4, (2, 2)).sum((3, 5))
        torch.testing.assert_close(pooled.reference(layer), want, atol=1e-6, rtol=0)


def test_no_reference_image_no_reference_maps():
    pipe = pipe_of("flux2")
    with pytest.warns(UserWarning, match="no reference images"):
        with sdlens.trace(pipe, record=RECORD) as tr:
            pipe(**call_kwargs_2026("flux2"))
    tr = tr.runs[-1]
    assert tr.reference_maps is None and tr.attention.layers
    with pytest.raises(ValueError, match="reference_maps"):
        tr.heatmap("image 1", maps="reference_maps")


def test_own_latent_as_reference_is_near_diagonal():
    """Constructed case: Kontext given its own starting latent as the reference (``image`` a
    latent tensor, ``latents`` the same tensor packed), so at step 0 every reference patch's
    hidden state equals the output patch's at the same (row, column) (the same embedder and
    modulation; only the first rotary coordinate differs: 1 vs 0). In the first double-stream
    block the keys are made the queries (``to_k`` := ``to_q``, ``norm_k`` := ``norm_q``, its
    scale x4 to sharpen the softmax): a patch's own vector then has the largest score. Each
    output patch's distribution over the reference peaks at its own position."""
    pipe = random_pipeline("flux-kontext", seed=0)
    attn = pipe.transformer.transformer_blocks[0].attn
    with torch.no_grad():
        attn.to_k.weight.copy_(attn.to_q.weight)
        attn.to_k.bias.copy_(attn.to_q.bias)
        attn.norm_q.weight.mul_(4.0)
        attn.norm_k.weight.copy_(attn.norm_q.weight)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))  # 64 px: 4x4
    kw = call_kwargs_2026("flux-kontext", steps=1, size=64, image=x,
                          latents=pipe._pack_latents(x, 1, 16, 8, 8))
    with sdlens.trace(pipe, record=RECORD, layers="double.0") as tr:
        pipe(**kw)
    refs = tr.runs[-1].reference_maps
    assert refs.grids == [(4, 4)]
    diag = torch.stack([refs.at(y, x_, step=0)[y, x_] for y in range(4) for x_ in range(4)])
    peaks = [int(refs.at(y, x_, step=0).argmax()) for y in range(4) for x_ in range(4)]
    assert peaks == list(range(16))  # every patch peaks at its own position
    assert diag.mean() > 0.9, diag
    # and the reverse: a reference point lands on the same output patch
    assert all(int(refs.lands(y, x_, step=0).argmax()) == 4 * y + x_
               for y in range(4) for x_ in range(4))


def test_slicing_a_trace_slices_its_reference_maps():
    from sdlens.trace.ops import select_batch, slice_steps

    tr, _ = traced("flux-kontext")
    refs = tr.reference_maps
    layer = refs.layers[-1]
    late = slice_steps(tr, 1, 2).reference_maps
    assert late.steps == [0] and torch.equal(late[layer], refs[layer][1:2])
    one = select_batch(tr, [0]).reference_maps
    assert one.grids == refs.grids and torch.equal(one[layer], refs[layer][:, [0]])


def test_size_estimate_counts_reference_maps():
    """One reference of the output's size assumed, pooled to <= 32 patches a side, fp16: at
    1024 px (64 x 64 patches) 8 MiB per site and step."""
    from sdlens.engine.options import RecordOptions, estimate_trace_bytes

    pipe = pipe_of("flux-kontext")
    opts = RecordOptions(record=RECORD, layers="single.1")
    est = estimate_trace_bytes(pipe, steps=3, latent_hw=(128, 128), options=opts)
    assert est["reference_maps"] == 3 * 64 * 64 * 32 * 32 * 2 == 3 * 8 * 2 ** 20
    small = estimate_trace_bytes(pipe, steps=2, latent_hw=(8, 8), options=opts)  # 4x4 patches
    assert small["reference_maps"] == 2 * 16 * 16 * 2
