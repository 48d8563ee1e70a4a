"""Steering processors: scale chosen tokens' cross-attention (prompt-to-prompt's equalizer).

:class:`ReweightProcessor` wraps the processor installed on a cross-attention site. The wrapped
processor computes the layer's output as before (SDPA, LoRA, whatever it is); the reweighting is
added as a correction. With attention probabilities ``P`` (rows sum to 1 over the text tokens),
values ``V`` and per-token factors ``w`` the equalizer's output is ``(P * w) V``, and

    (P * w) V = P V + ((w - 1) * P) V

so the processor adds ``to_out(((w - 1) * P) V)`` (the output projection without its bias,
divided by ``rescale_output_factor``) to the wrapped processor's output. ``P`` is recomputed from
the layer's own ``to_q`` / ``to_k`` (a softmax over ~77 keys: cheap); only the reweighted
positions' columns of ``P`` and rows of ``V`` enter the correction. The
probabilities are **not renormalised** (as in prompt-to-prompt): a weight of 2 doubles the token's
share of every pixel's attention and the rows then sum to more than 1. A weight of exactly 1
adds an exact zero: the output is bit-identical to the unsteered one.

Only the conditional (text) half of a classifier-free-guidance batch is reweighted; the
unconditional half (the negative prompt, whose token positions are different words) is not.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from einops import rearrange

from sdlens.engine.sites import attention_probabilities


class SteeringState:
    """Shared by the processors of one steered call: the factors, and the step counter.

    Args:
        factors: (items, 77) float32, the multiplier of every token position per batch item
            (1 where not reweighted).
        positions: the token positions to correct (those named by the user, whatever their
            weight: a weight of 1 runs the same code and adds zeros).
        steps: (start, end) step indices, end exclusive (None: to the end), or fractions of the
            run in [0, 1] when floats; None: every step. A step is one UNet call (one
            ``scheduler.step``), as on a Trace's step axis.
        pipe: the pipeline (for the number of steps, with fractional ranges).
    """

    def __init__(self, factors: torch.Tensor, positions: list[int], steps=None, pipe=None):
        self.factors = factors.float()
        self.positions = sorted(set(int(p) for p in positions))
        self.steps = steps
        self.pipe = pipe
        self.step = -1
        self.total = None
        self.calls = 0  # processor calls that applied a correction (for tests / sanity)

    # the UNet pre-hook: one UNet call per ``scheduler.step`` in SD pipelines, so the step index
    # counts UNet calls (the same step axis as a Trace's: ``trace.timesteps``)
    def pre_hook(self, module, args, kwargs):
        self.step += 1
        if self.total is None and self.pipe is not None:
            total = getattr(self.pipe, "_num_timesteps", None)
            if not isinstance(total, int) or total <= 0:
                ts = getattr(self.pipe.scheduler, "timesteps", None)
                total = len(ts) if ts is not None else None
            self.total = total
        return None

    def active(self) -> bool:
        if self.steps is None:
            return True
        start, end = self.steps
        if isinstance(start, float) or isinstance(end, float):
            if self.total is None:
                raise RuntimeError("fractional reweight steps need the number of steps (pass pipe=)")
            start = 0 if start is None else int(round(start * self.total))
            end = self.total if end is None else int(round(end * self.total))
        start = 0 if start is None else start
        return self.step >= start and (end is None or self.step < end)


def _signature(fn):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


class ReweightProcessor:
    """Wraps one cross-attention site's processor and applies the equalizer of ``state`` to its
    output."""

    def __init__(self, inner, layer: str, state: SteeringState):
        self.inner = inner
        self.layer = layer
        self.state = state
        sig = _signature(inner.__call__)
        self._inner_params = None
        if sig is not None and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            self._inner_params = set(sig.parameters)
        if sig is not None:
            # ``Attention.forward`` filters cross_attention_kwargs by the processor's signature:
            # show it the wrapped processor's, so the same kwargs reach it as without steering.
            def _call(*args, **kwargs):
                return ReweightProcessor.__call__(self, *args, **kwargs)

            _call.__signature__ = sig
            self.__dict__["__call__"] = _call

    def __repr__(self) -> str:
        return f"ReweightProcessor({self.inner!r}, layer={self.layer!r})"

    def __call__(self, attn, hidden_states, *args, **kwargs):
        ehs = kwargs.get("encoder_hidden_states", args[0] if len(args) > 0 else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        inner_kwargs = kwargs
        if self._inner_params is not None:
            inner_kwargs = {k: v for k, v in kwargs.items() if k in self._inner_params}
        out = self.inner(attn, hidden_states, *args, **inner_kwargs)
        if ehs is None or not torch.is_tensor(ehs) or not self.state.positions or not self.state.active():
            return out
        return out + self._correction(attn, hidden_states, ehs, mask, temb, out)

    def _rows(self, batch: int) -> slice:
        n = self.state.factors.shape[0]
        if batch == 2 * n:
            return slice(n, 2 * n)  # cat([uncond, text]): the text half
        if batch == n:
            return slice(0, n)
        raise RuntimeError(f"reweighting was set up for {n} batch items but the UNet saw a batch of "
                           f"{batch} (neither {n} nor 2 x {n} under classifier-free guidance)")

    def _correction(self, attn, hidden_states, ehs, mask, temb, out) -> torch.Tensor:
        st = self.state
        batch = hidden_states.shape[0]
        rows = self._rows(batch)
        probs, value = attention_probabilities(attn, hidden_states, ehs, mask, temb, rows=rows,
                                               with_values=True)  # (n, heads, HW, K), (n, heads, K, d)
        pos = torch.tensor(st.positions, device=probs.device)
        pos = pos[pos < probs.shape[-1]]
        f = (st.factors.to(probs.device)[:, pos] - 1.0)  # (n, P)
        weighted = probs[..., pos] * f[:, None, None, :]  # (n, heads, HW, P)
        delta = torch.matmul(weighted, value.float()[:, :, pos, :])  # (n, heads, HW, d)
        delta = rearrange(delta, "n heads l d -> n l (heads d)")
        proj = attn.to_out[0]
        if isinstance(proj, torch.nn.Linear) and type(proj) is torch.nn.Linear:
            delta = F.linear(delta.to(proj.weight.dtype), proj.weight)
        else:  # LoRA and other wrappers: linear, so f(x) - f(0) is the bias-free part
            d = delta.to(out.dtype)
            delta = proj(d) - proj(torch.zeros_like(d[:, :1]))
        if hidden_states.ndim == 4:
            delta = rearrange(delta, "n (h w) c -> n c h w", h=out.shape[2])
        delta = (delta / attn.rescale_output_factor).to(out.dtype)
        st.calls += 1
        full = torch.zeros_like(out)
        full[rows] = delta
        return full


def install(unet, state: SteeringState):
    """Wrap the processor of every cross-attention site of ``unet`` and add the step-counting
    pre-hook.
    Returns a function that restores the previous processors (call it in ``finally``)."""
    saved = dict(unet.attn_processors)
    steered = {k: (ReweightProcessor(p, k[: -len(".processor")], state) if ".attn2." in k else p)
               for k, p in saved.items()}
    if not any(isinstance(p, ReweightProcessor) for p in steered.values()):
        raise ValueError("the UNet has no cross-attention (attn2) layers to reweight")
    handle = None
    try:
        unet.set_attn_processor(dict(steered))
        handle = unet.register_forward_pre_hook(state.pre_hook, with_kwargs=True)
    except Exception:
        if handle is not None:
            handle.remove()
        unet.set_attn_processor(dict(saved))
        raise

    def restore():
        handle.remove()
        unet.set_attn_processor(dict(saved))

    return restore
