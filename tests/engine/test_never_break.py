"""sdlens is never the reason a generation fails: an attention call it does not understand is
skipped with one warning, the run finishes and the trace says what was skipped."""

from __future__ import annotations

import warnings

import numpy as np
import torch

import sdlens
from pipelines import assert_restored, cached_pipe, call_pipe, pipe_state


class GatedContextProcessor:
    """A processor with a signature sdlens does not know (``gate=``) that projects the text to
    another width before the module's ``to_k`` / ``to_v`` (which it replaced to take that
    width), and computes its attention by hand (no kernel call): sdlens cannot see it."""

    def __init__(self, attn, width: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(attn.to_k.in_features, width, generator=g) * 0.1
        self.to_k = torch.randn(attn.to_q.out_features, width, generator=g) * 0.1
        self.to_v = torch.randn(attn.to_q.out_features, width, generator=g) * 0.1
        self.attn = attn
        self.saved = (attn.to_k, attn.to_v)
        attn.to_k = torch.nn.Linear(width, attn.to_q.out_features, bias=False)
        attn.to_v = torch.nn.Linear(width, attn.to_q.out_features, bias=False)
        with torch.no_grad():
            attn.to_k.weight.copy_(self.to_k)
            attn.to_v.weight.copy_(self.to_v)

    def restore(self):
        self.attn.to_k, self.attn.to_v = self.saved

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 gate: float = 1.0, **kwargs):
        ctx = encoder_hidden_states @ self.proj
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        # attention written out by hand: no kernel call, no get_attention_scores: sdlens cannot
        # see it and must skip the site
        probs = (torch.bmm(q, k.transpose(-1, -2)) * attn.scale).softmax(-1)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out * gate)) / attn.rescale_output_factor


def test_unknown_processor_warns_once_and_the_generation_finishes():
    pipe = cached_pipe("sd15")
    procs = dict(pipe.unet.attn_processors)
    odd = next(k for k in procs if k.endswith("attn2.processor"))
    custom = dict(procs)
    gated = GatedContextProcessor(pipe.unet.get_submodule(odd[: -len(".processor")]), 12, 0)
    custom[odd] = gated
    pipe.unet.set_attn_processor(dict(custom))
    try:
        plain = call_pipe(pipe, num_inference_steps=2)
        state = pipe_state(pipe)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with sdlens.trace(pipe) as tr:
                traced = call_pipe(pipe, num_inference_steps=2)
        assert_restored(pipe, state)
    finally:
        pipe.unet.set_attn_processor(dict(procs))
        gated.restore()
    ours = [w for w in caught if "sdlens: cannot record" in str(w.message)]
    layer = odd[: -len(".processor")]
    assert len(ours) == 1 and layer in str(ours[0].message)
    np.testing.assert_array_equal(plain, traced)
    t = tr.runs[-1]
    assert list(t.meta["skipped"]) == [layer]
    assert layer not in t.attention.layers
    assert len(t.attention.layers) == sum(k.endswith("attn2.processor") for k in procs) - 1


def test_unexpected_encoder_hidden_states_type_is_skipped():
    """A UNet wrapper that hands the sites a dict instead of a tensor (the processor knows it)."""
    pipe = cached_pipe("sd15")
    procs = dict(pipe.unet.attn_processors)

    class DictAware:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            if isinstance(encoder_hidden_states, dict):
                encoder_hidden_states = encoder_hidden_states["text"]
            return self.inner(attn, hidden_states, encoder_hidden_states, **kwargs)

    def as_dict(module, args, kwargs):
        kwargs["encoder_hidden_states"] = {"text": kwargs["encoder_hidden_states"]}
        return args, kwargs

    blocks = [m for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    pipe.unet.set_attn_processor({k: DictAware(p) if k.endswith("attn2.processor") else p
                                  for k, p in procs.items()})
    handles = [b.register_forward_pre_hook(as_dict, with_kwargs=True) for b in blocks]
    try:
        plain = call_pipe(pipe, num_inference_steps=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with sdlens.trace(pipe) as tr:
                traced = call_pipe(pipe, num_inference_steps=2)
    finally:
        for h in handles:
            h.remove()
        pipe.unet.set_attn_processor(dict(procs))
    np.testing.assert_array_equal(plain, traced)
    assert sum("sdlens: cannot record" in str(w.message) for w in caught) == 1
    t = tr.runs[-1]
    assert len(t.meta["skipped"]) == len(blocks) and "dict" in next(iter(t.meta["skipped"].values()))
    assert t.attention is None or not t.attention.layers
    assert t.latents.shape[0] == len(t.timesteps) + 1  # everything else recorded


def test_a_batch_layout_sdlens_does_not_know_stops_recording_not_the_run():
    """A callback that calls the UNet on one row (the pipeline runs guidance on two): sdlens
    stops recording that call with one warning; the pipeline's output is untouched."""
    pipe = cached_pipe("sd15")
    width = pipe.unet.config.cross_attention_dim

    def probe(p, i, t, kw):
        with torch.no_grad():
            p.unet(kw["latents"], t, encoder_hidden_states=torch.zeros(1, 77, width))
        return {}

    plain = call_pipe(pipe, num_inference_steps=2, callback_on_step_end=probe)
    state = pipe_state(pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sdlens.trace(pipe) as tr:
            traced = call_pipe(pipe, num_inference_steps=2, callback_on_step_end=probe)
            call_pipe(pipe, num_inference_steps=2)  # the next call is recorded again
    assert_restored(pipe, state)
    np.testing.assert_array_equal(plain, traced)
    assert sum("stopped recording" in str(w.message) for w in caught) == 1
    assert len(tr.runs) == 1 and tr.runs[0].latents is not None
