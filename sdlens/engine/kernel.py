"""Attention read where the kernel is called.

Every attention processor of current diffusers ends in one kernel call with q / k / v exactly
as the model uses them (after the q / k norms, the rotary embedding, the concatenation of
streams, with the mask): ``F.scaled_dot_product_attention`` in the older processors
(``AttnProcessor2_0``, ``JointAttnProcessor2_0``), ``dispatch_attention_fn`` in the transformer
processors, whose default ("native") backend calls ``torch.nn.functional.scaled_dot_product_attention``
with the heads moved to dim 1. sdlens reads maps there, so a backbone adapter describes how the
kernel's sequence splits into segments (:class:`~sdlens.engine.arch.base.KernelLayout`) instead
of re-implementing projections, rotary embeddings and masks.

**How the call is seen.** While sdlens traces or steers a pipeline, ``torch.nn.functional.
scaled_dot_product_attention`` is a thin wrapper (:func:`installed`, reference-counted, restored
in ``finally``). It is a pass-through unless the *current thread* is inside a site's processor
call that asked to see its kernel (:func:`tapping`, entered by the site wrapper); then the
call's q / k / v / mask go to the site's readers, and editors may add to its output. Why this and
not the alternatives (measured / read on diffusers 0.42, torch 2.13):

* a ``TorchFunctionMode`` around the processor sees the same calls but intercepts every torch
  op inside it: 71 ops for one ``JointAttnProcessor2_0`` call, about +280 us per site call on
  the CPU (+17 % on the shipped MMDiT's whole run); the attribute wrapper costs one Python call
  per kernel call;
* diffusers' backend registry (``_AttentionBackendRegistry``) is private, and the processors
  that call SDPA directly never pass through it; its native backend reaches SDPA by attribute,
  so the one wrapper serves both routes.

A non-native dispatch backend (flash-attn, sage, xformers: GPU libraries) makes no SDPA call:
the site's maps are then skipped with one warning naming that, and the run goes on.

**The normaliser.** Joint attention's text maps are the text columns of a softmax over *all*
keys, so each query row needs its log-sum-exp (lse). The fused SDPA ops compute it anyway:
:func:`attention` asks ``torch._fused_sdp_choice`` which op SDPA would run and, where that op
returns the lse (the CPU flash op; CUDA flash, memory-efficient and cuDNN), calls that op itself
and returns ``(output, lse)``. The first call of each signature (device, dtypes, shapes, mask,
causal, scale) is checked against SDPA itself: the outputs must be bit-identical (and the lse
right on a few rows), or that signature takes the exact route from then on: SDPA for the output
and the lse from the kernel's q / k in chunks (the cost the fused route avoids). Masks are
converted as SDPA converts them (a bool mask becomes 0 / -inf).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

#: the original kernel, captured once (``F.scaled_dot_product_attention`` is swapped while traced)
SDPA: Callable = F.scaled_dot_product_attention

_local = threading.local()  # .taps: the sites' kernel taps active in this thread, innermost last
_lock = threading.RLock()
_users = 0


class KernelCall(NamedTuple):
    """One attention-kernel call as the processor made it (SDPA layout).

    query (B, heads, Lq, d), key / value (B, heads, Lk, d) (grouped-query keys repeated to the
    query heads); mask: what the kernel got (None, bool or additive, broadcastable to
    (B, heads, Lq, Lk)); scale: the softmax scale used; lse: (B, heads, Lq) float32, each query
    row's log-sum-exp over all its keys (None where nobody asked for it); index: the call's
    number within its site call (0, 1, ...: an IP-Adapter processor calls the kernel once for
    the text and once per image prompt)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    is_causal: bool
    lse: torch.Tensor | None
    index: int


class Tap:
    """What one site call does with its kernel calls: ``wants_lse(query, key, index)`` says
    whether the lse is needed, ``on_kernel(call, out) -> out`` reads it (and may edit the
    output)."""

    def __init__(self, on_kernel: Callable[[KernelCall, torch.Tensor], torch.Tensor],
                 wants_lse: Callable[[torch.Tensor, torch.Tensor, int], bool]):
        self.on_kernel, self.wants_lse = on_kernel, wants_lse
        self.calls = 0


# ====================================================================== the wrapper
def _bind(args: tuple, kwargs: dict) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _sdpa(*args, **kwargs):
    taps = getattr(_local, "taps", None)
    if not taps:
        return SDPA(*args, **kwargs)
    tap = taps[-1]
    _local.taps = []  # nothing inside the kernel is a site's kernel call
    try:
        return _tapped(tap, args, kwargs)
    finally:
        _local.taps = taps


def _tapped(tap: Tap, args: tuple, kwargs: dict):
    b = _bind(args, kwargs)
    q, k, v = b["query"], b["key"], b["value"]
    odd = (float(b.get("dropout_p") or 0.0) != 0.0 or q.requires_grad or k.requires_grad
           or getattr(q, "is_nested", False) or q.ndim != 4 or k.ndim != 4)
    if odd:  # training-time or exotic calls: untouched, unread
        return SDPA(*args, **kwargs)
    index = tap.calls
    tap.calls += 1
    mask, causal = b.get("attn_mask"), bool(b.get("is_causal") or False)
    scale = b.get("scale")
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if b.get("enable_gqa") and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k_read, v_read = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    else:
        k_read, v_read = k, v
    lse = None
    if tap.wants_lse(q, k_read, index):
        out, lse = attention(args, kwargs)
    else:
        out = SDPA(*args, **kwargs)
    return tap.on_kernel(KernelCall(q, k_read, v_read, mask, scale, causal, lse, index), out)


@contextlib.contextmanager
def installed():
    """``torch.nn.functional.scaled_dot_product_attention`` is sdlens's pass-through wrapper
    inside the block (reference-counted: nested and concurrent users share one install)."""
    global _users
    with _lock:
        if _users == 0:
            F.scaled_dot_product_attention = _sdpa
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                F.scaled_dot_product_attention = SDPA


@contextlib.contextmanager
def tapping(tap: Tap):
    """Inside the block, this thread's kernel calls go to ``tap`` (the innermost tap wins; a
    site wrapped twice, e.g. steering inside a trace, combines its wrappers' readers into one
    tap)."""
    taps = getattr(_local, "taps", None)
    if taps is None:
        taps = _local.taps = []
    taps.append(tap)
    try:
        yield tap
    finally:
        taps.pop()


def active_tap() -> Tap | None:
    """The tap of the site call this thread is in (None outside one)."""
    taps = getattr(_local, "taps", None)
    return taps[-1] if taps else None


# ====================================================================== output + lse
_checked: dict[tuple, bool] = {}  # signature -> the fused route is bit-identical to SDPA


def _signature(q, k, v, mask, causal, scale) -> tuple:
    m = None if mask is None else (tuple(mask.shape), mask.dtype, tuple(mask.stride()))
    return (q.device.type, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape),
            tuple(q.stride()), tuple(k.stride()), m, causal, scale is None)


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """A bool mask as SDPA converts it (True: attend -> 0, False -> -inf)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, float("-inf"))


def _fused(q, k, v, mask, causal, scale):
    """(output, lse (B, heads, Lq) float32) from the op SDPA would pick, or None."""
    choice = int(torch._fused_sdp_choice(q, k, v, attn_mask=mask, dropout_p=0.0,
                                         is_causal=causal, scale=scale))
    dev = q.device.type
    if dev == "cpu" and choice == 1:  # SDPBackend.FLASH_ATTENTION
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale)
        return out, lse
    if dev == "cuda" and choice == 1 and mask is None:
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    if dev == "cuda" and choice == 2:  # memory-efficient
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, _additive(mask, q.dtype), True, 0.0, causal, scale=scale)
        return res[0], res[1][..., : q.shape[2]]
    if dev == "cuda" and choice == 3:  # cuDNN
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, _additive(mask, q.dtype), True, 0.0, causal, False, scale=scale)
        return res[0], res[1].reshape(q.shape[:3])
    return None


def attention(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.scaled_dot_product_attention(*args, **kwargs)`` and each query row's lse over its
    keys, (B, heads, Lq) float32; the output is bit-identical to SDPA's (see the module doc)."""
    b = _bind(args, kwargs)
    q, k, v = b["query"], b["key"], b["value"]
    mask, causal, scale = b.get("attn_mask"), bool(b.get("is_causal") or False), b.get("scale")
    gqa = bool(b.get("enable_gqa") or False) and k.shape[1] != q.shape[1]
    sig = _signature(q, k, v, mask, causal, scale)
    trusted = _checked.get(sig)
    if trusted is not False and not gqa:
        try:
            got = _fused(q, k, v, mask, causal, scale)
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            got = None
        if got is not None and trusted is None:
            ref = SDPA(*args, **kwargs)
            rows = min(4, q.shape[2])
            want = logsumexp_rows(q[:, :, :rows], _repeat(k, q), mask, causal, scale, start=0)
            ok = torch.equal(got[0], ref) and torch.allclose(
                got[1][:, :, :rows].float(), want, atol=1e-3, rtol=1e-3)
            with _lock:
                _checked[sig] = bool(ok)
            if not ok:
                got = None
                trusted = False
        if got is not None:
            return got[0], got[1].float()
    out = SDPA(*args, **kwargs)
    return out, logsumexp_rows(q, _repeat(k, q), mask, causal, scale, start=0)


def _repeat(k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return k if k.shape[1] == q.shape[1] else k.repeat_interleave(q.shape[1] // k.shape[1], 1)


def masked_scores(scores: torch.Tensor, mask: torch.Tensor | None, rows: slice, cols: slice,
                  batch: slice = slice(None)) -> torch.Tensor:
    """``scores`` (n, heads, |rows|, |cols|) float32 plus the kernel mask's part for those
    query ``rows`` / key ``cols`` / ``batch`` rows (bool masks as -inf where False)."""
    if mask is None:
        return scores
    m = mask
    while m.ndim < 4:
        m = m.unsqueeze(0)
    m = m[batch] if m.shape[0] != 1 else m
    m = m[:, :, rows] if m.shape[2] != 1 else m
    m = m[..., cols] if m.shape[3] != 1 else m
    if m.dtype == torch.bool:
        return scores.masked_fill(~m, float("-inf"))
    return scores + m.float()


def logsumexp_rows(q: torch.Tensor, k: torch.Tensor, mask, causal: bool, scale, start: int = 0,
                   chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """The exact route: (B, heads, Lq) float32 lse of ``q``'s rows (query rows ``start`` ..
    of the kernel call) over all keys, in chunks of queries (the (Lq x Lk) scores are never
    held at once)."""
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    n, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    step = max(1, min(lq, chunk_bytes // max(1, 4 * n * h * lk)))
    kf = k.float().transpose(-1, -2)
    out = []
    for i in range(0, lq, step):
        s = torch.matmul(q[:, :, i: i + step].float(), kf) * scale
        s = masked_scores(s, mask, slice(start + i, start + i + s.shape[2]), slice(None))
        if causal:
            r = torch.arange(start + i, start + i + s.shape[2], device=s.device)[:, None]
            s = s.masked_fill(torch.arange(lk, device=s.device)[None, :] > r, float("-inf"))
        out.append(s.logsumexp(-1))
    return torch.cat(out, -1)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, mask=None, scale=None,
                       dtype=torch.float64) -> torch.Tensor:
    """(B, heads, Lq, Lk) softmax of one kernel call, written out in ``dtype`` (float64 for
    tests: the reference every recorded map is checked against)."""
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if mask is not None:
        m = mask
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(dtype)
    return s.softmax(-1)

