"""Every recorded map equals an explicit float64 softmax over the keys the attention kernel saw.

The q / k / mask are captured here independently of sdlens: a ``TorchFunctionMode`` (not the
attribute wrapper sdlens installs) sees every kernel call (torch's SDPA, or the fused op sdlens
calls for its log-sum-exp), and forward pre-hooks on the sites and the denoiser tell which site
and step it belongs to. The test knows each family's sequence layout itself (SD3: [image; text];
Flux: [text; image], single-stream blocks joined; cross-attention: text keys only), so it checks
the adapters' layouts as well as the recorder's maths. Traced images equal untraced ones.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

import sdlens
from sdlens.engine.arch import adapter_for
from sdlens.testing import ip_adapter_state_dict, random_pipeline

PROMPT = "a red circle and a blue square"
KERNELS = {torch.nn.functional.scaled_dot_product_attention,
           torch.ops.aten._scaled_dot_product_flash_attention_for_cpu}


class KernelSpy(TorchFunctionMode):
    """q / k / mask / scale of every attention-kernel call, keyed by (step, site), in order."""

    def __init__(self, denoiser, sites):
        super().__init__()
        self.calls: dict[tuple[int, str], list] = {}
        self.step, self.site, self.handles = -1, None, []
        self.last = None
        self.handles.append(denoiser.register_forward_pre_hook(self._step))
        for name in sites:
            module = denoiser.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: self._enter(name)))
            self.handles.append(module.register_forward_hook(
                lambda m, a, o: setattr(self, "site", None)))

    def _enter(self, name):
        self.site, self.last = name, None

    def _step(self, module, args):
        self.step += 1

    def remove(self):
        for h in self.handles:
            h.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in KERNELS and self.site is not None:
            named = dict(zip(("query", "key", "value", "dropout_p" if func is not
                              torch.nn.functional.scaled_dot_product_attention else "attn_mask"),
                             args), **kwargs)
            q, k = named["query"], named["key"]
            key = (q.data_ptr(), k.data_ptr(), tuple(q.shape))
            if key != self.last:  # sdlens's one-time check calls SDPA on the same q / k again
                mask = named.get("attn_mask")
                self.calls.setdefault((self.step, self.site), []).append(
                    (q.detach().clone(), k.detach().clone(),
                     None if mask is None else mask.detach().clone(), kwargs.get("scale")))
            self.last = key
        return func(*args, **kwargs)


def explicit(q, k, mask, scale):
    """(B, heads, Lq, Lk) float64 softmax over all keys."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    s = q.double() @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return s.softmax(-1)


def traced_with_spy(pipe, steps=2, record=("latents", "noise", "x0", "attention"), **kw):
    if getattr(pipe, "unet", None) is not None:  # one denoiser call per step (PNDM has more)
        from diffusers import EulerDiscreteScheduler

        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    call = dict(prompt=PROMPT, num_inference_steps=steps, output_type="latent", **kw)
    plain = pipe(generator=torch.Generator().manual_seed(0), **call).images
    adapter = adapter_for(pipe)
    spy = KernelSpy(adapter.denoiser, adapter.sites())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="sdlens")  # nothing skipped
            with spy, sdlens.trace(pipe, keep_padding=False, attention_dtype=torch.float32,
                                   record=record) as tr:
                out = pipe(generator=torch.Generator().manual_seed(0), **call).images
    finally:
        spy.remove()
    assert torch.equal(plain, out), "tracing changed the image"
    return tr.runs[-1], spy, adapter


def text_rows(tr, batch_rows):
    """The denoiser batch's rows of the text (conditional) half."""
    return slice(batch_rows - tr.latents.shape[1], batch_rows) if tr.do_cfg else slice(0, batch_rows)


def check(tr, spy, layout, kind="attention", atol=1e-6):
    """Every site and recorded step of ``tr``'s ``kind`` maps against the explicit softmax;
    ``layout(site, q, k) -> (image rows, text cols)`` in the kernel's sequence."""
    maps = tr.attention if kind == "attention" else tr.image_to_text
    assert maps is not None and maps.layers
    n = 0
    for layer in maps.layers:
        got = maps[layer].double()  # (steps, batch, tokens, h, w)
        for i, step in enumerate(maps.steps):
            q, k, mask, scale = spy.calls[(step, layer)][0]
            img, txt = layout(layer, q, k)
            p = explicit(q, k, mask, scale)[text_rows(tr, q.shape[0])]
            kept = [pos for pos in maps.token_positions]
            if kind == "attention":
                want = p[:, :, img][..., txt][..., kept].mean(1).transpose(-1, -2)  # (B, T, HW)
            else:
                want = p[:, :, txt][..., img][:, :, kept].mean(1)  # (B, T, HW)
            torch.testing.assert_close(got[i].flatten(-2), want, atol=atol, rtol=0)
            n += 1
    return n


def cross(layer, q, k):
    return slice(0, q.shape[2]), slice(0, k.shape[2])


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "pixart", "sana"])
def test_cross_attention_maps_equal_the_explicit_softmax(arch):
    pipe = random_pipeline(arch, seed=0)
    kw = {}
    if arch in ("pixart", "sana"):
        kw = dict(use_resolution_binning=False, clean_caption=False, height=32 if arch == "sana"
                  else None, width=32 if arch == "sana" else None)
        kw = {k: v for k, v in kw.items() if v is not None}
    tr, spy, _ = traced_with_spy(pipe, **kw)
    assert check(tr, spy, cross) == len(tr.attention.layers) * tr.num_steps


@pytest.mark.parametrize("arch", ["sd3", "sd35"])
def test_sd3_joint_maps_equal_the_explicit_softmax(arch):
    pipe = random_pipeline(arch, seed=0)
    tr, spy, _ = traced_with_spy(pipe, record=("latents", "attention", "image_to_text"))

    def layout(layer, q, k):  # [image; text]
        n_text = k.shape[2] - 16  # 4x4 patches at the test bed's size
        return slice(0, 16), slice(16, 16 + n_text)

    assert check(tr, spy, layout) == len(tr.attention.layers) * tr.num_steps
    check(tr, spy, layout, kind="image_to_text")


def test_flux_double_and_single_stream_maps_equal_the_explicit_softmax():
    pipe = random_pipeline("flux", seed=0)
    tr, spy, _ = traced_with_spy(pipe, max_sequence_length=32,
                                 record=("latents", "attention", "image_to_text"))

    def layout(layer, q, k):  # [text; image], the same in both block kinds
        return slice(32, k.shape[2]), slice(0, 32)

    layers = tr.attention.layers
    assert any(l.startswith("single_") for l in layers) and any(l.startswith("transformer_") for l in layers)
    assert check(tr, spy, layout) == len(layers) * tr.num_steps
    check(tr, spy, layout, kind="image_to_text")


def test_flux_true_cfg_maps_come_from_the_prompts_call():
    pipe = random_pipeline("flux", seed=0)
    tr, spy, _ = traced_with_spy(pipe, max_sequence_length=32, true_cfg_scale=2.0,
                                 negative_prompt="a green triangle")
    # two denoiser calls per step: the spy counts calls, the maps are the first (prompt) call's
    step_of = {s: 2 * s for s in tr.attention.steps}
    layer = tr.attention.layers[-1]
    q, k, mask, scale = spy.calls[(step_of[tr.attention.steps[0]], layer)][0]
    p = explicit(q, k, mask, scale)[:, :, 32:, :32]
    want = p[..., tr.attention.token_positions].mean(1).transpose(-1, -2)
    torch.testing.assert_close(tr.attention[layer][0].double().flatten(-2), want, atol=1e-6, rtol=0)


def test_ip_adapter_maps_equal_each_kernel_calls_softmax():
    pipe = random_pipeline("sd15", seed=0)
    pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet, "plain", image_embed_dim=8)])
    embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(1))]
    tr, spy, _ = traced_with_spy(pipe, ip_adapter_image_embeds=embeds)
    n_text = len(tr.attention.token_positions) - 4
    for layer in tr.attention.layers:
        for i, step in enumerate(tr.attention.steps):
            (q, k, m, s), (qi, ki, mi, si) = spy.calls[(step, layer)][:2]
            rows = text_rows(tr, q.shape[0])
            text = explicit(q, k, m, s)[rows][..., :n_text].mean(1)
            image = explicit(qi, ki, mi, si)[rows].mean(1)  # the image prompt's own softmax
            want = torch.cat([text, image], -1).transpose(-1, -2)
            got = tr.attention[layer][i].double().flatten(-2)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_controlnet_and_concepts_leave_the_maps_exact():
    from sdlens.testing import controlnet_for
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    base = random_pipeline("sd15", seed=0)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet_for(base))
    tr, spy, _ = traced_with_spy(pipe, image=Image.new("RGB", (64, 64), (200, 30, 30)))
    assert check(tr, spy, cross) == len(tr.attention.layers) * tr.num_steps
    sd3 = random_pipeline("sd3", seed=0)
    call = dict(prompt=PROMPT, num_inference_steps=2, output_type="latent")
    plain = sd3(generator=torch.Generator().manual_seed(0), **call).images
    with sdlens.trace(sd3, concepts=["circle", "square"], attention_dtype=torch.float32) as tr3:
        out = sd3(generator=torch.Generator().manual_seed(0), **call).images
    assert torch.equal(plain, out) and tr3.concepts is not None


def test_the_fused_route_is_bit_identical_and_its_lse_exact():
    from sdlens.engine import kernel

    g = torch.Generator().manual_seed(0)
    for shape_q, shape_k, mask in [((2, 4, 300, 32), (2, 4, 300, 32), None),
                                   ((2, 4, 64, 16), (2, 4, 77, 16), None),
                                   ((2, 4, 64, 16), (2, 4, 77, 16), torch.rand(2, 1, 1, 77, generator=g) > 0.3),
                                   ((1, 2, 40, 8), (1, 2, 40, 8), torch.randn(1, 1, 40, 40, generator=g))]:
        q, k, v = (torch.randn(s, generator=g) for s in (shape_q, shape_k, shape_k))
        if mask is not None and mask.dtype == torch.bool:
            mask[..., 0] = True
        out, lse = kernel.attention((q, k, v), {"attn_mask": mask})
        ref = kernel.SDPA(q, k, v, attn_mask=mask)
        assert torch.equal(out, ref)
        s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
        torch.testing.assert_close(lse.double(), s.logsumexp(-1), atol=1e-5, rtol=0)
        # the exact route gives the same lse
        torch.testing.assert_close(kernel.logsumexp_rows(q, k, mask, False, None, chunk_bytes=4096),
                                   lse, atol=1e-5, rtol=0)
