"""Attention sites, and the one installer for every hook sdlens puts on a live pipeline.

Recording and editing are one mechanism (as baukit's ``TraceDict`` with retain / edit):

* A *site* is a cross-attention layer of the backbone (which layers: the backbone adapter's
  ``sites()``, :mod:`sdlens.engine.arch`).
  :class:`SiteProcessor` wraps the processor installed there. The wrapped processor computes the
  layer's output exactly as before (SDPA, attention slicing, LoRA, IP-Adapter processors ... keep
  working); around it the wrapper runs *observers* (``observe(attn, layer, call)``, before the
  inner processor; they change nothing: :class:`AttentionRecorder`) and *editors*
  (``edit(attn, layer, call, out) -> out``, after it: :class:`Reweight`).
* :class:`Hooks` installs processor wrappers on chosen sites, forward hooks and forward
  pre-hooks on modules (and any other undo step) and restores everything on exit, in reverse
  order, also on exceptions and KeyboardInterrupt.

Observers and editors recompute the attention probabilities themselves,
``softmax(q k^T * attn.scale)`` from ``attn.to_q`` / ``attn.to_k`` (cross-attention has only ~77
keys: cheap), for the batch rows they need only. Nothing here synchronises the device (no
``.cpu()`` / ``.item()``).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from sdlens.analysis.tokens import MAX_POSITIONS
from sdlens.engine.arch import adapter_for
from sdlens.engine.text import word_positions
from sdlens.trace.compact import CompactMaps, store_maps
from sdlens.trace.steps import step_window


# ====================================================================== attention maths
def _normed_queries_input(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    """The image tokens as ``to_q`` sees them: spatial norm, (B, HW, C) layout, group norm."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        hidden_states = rearrange(hidden_states, "b c h w -> b (h w) c")
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def _across_heads(norm, flat: torch.Tensor) -> bool:
    """Whether a q/k norm normalises over all heads at once (``qk_norm="rms_norm_across_heads"``:
    applied before the heads are split, as Sana's processor does)."""
    dim = getattr(norm, "dim", None)
    return dim is not None and tuple(dim) == (flat.shape[-1],)


def attention_probabilities(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                            attention_mask: torch.Tensor | None = None,
                            temb: torch.Tensor | None = None, rows: slice = slice(None),
                            with_values: bool = False):
    """Cross-attention probabilities of an ``Attention`` module, as ``AttnProcessor`` /
    ``AttnProcessor2_0`` compute them, in float32.

    Args:
        attn: diffusers ``Attention`` module (a cross-attention site).
        hidden_states: (B, HW, C) image tokens (or (B, C, h, w)).
        encoder_hidden_states: (B, K, D) text tokens.
        attention_mask: optional mask as passed to the processor (for all B rows).
        temb: time embedding (only for spatial-norm attention).
        rows: the batch rows to compute (e.g. the text half of a CFG batch); the norms run on
            all rows (they are per sample), the projections only on these.
        with_values: also return the values ``to_v(encoder_hidden_states)``.

    Returns:
        probs (n, heads, HW, K) float32, rows summing to 1 (n: the selected rows); with
        ``with_values`` the pair (probs, values (n, heads, K, head_dim)).
    """
    hidden_states = _normed_queries_input(attn, hidden_states, temb)
    batch = hidden_states.shape[0]
    hidden_states, encoder_hidden_states = hidden_states[rows], encoder_hidden_states[rows]
    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "n l (heads d) -> n heads l d", heads=attn.heads)

    if _across_heads(getattr(attn, "norm_q", None), query):  # Sana 1.5's qk_norm
        query, key = attn.norm_q(query), attn.norm_k(key)
    else:
        query, key = heads(query), heads(key)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
    query, key = (heads(query), heads(key)) if query.ndim == 3 else (query, key)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * float(attn.scale)
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
        mask = mask.view(batch, attn.heads, -1, mask.shape[-1])[rows]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = scores.softmax(dim=-1)
    if not with_values:
        return probs
    return probs, heads(attn.to_v(encoder_hidden_states))


# ====================================================================== the site wrapper
class SiteCall(NamedTuple):
    """The arguments of one processor call, as ``Attention.forward`` passes them."""

    hidden_states: torch.Tensor  # (B, HW, C) or (B, C, h, w)
    # (B, K, D) text tokens (None for self-attention); with an IP-Adapter loaded the pair
    # (text, [image-prompt embeddings per adapter: (B, [images,] tokens, D)])
    encoder_hidden_states: Any
    attention_mask: Any
    temb: Any
    extra: Mapping[str, Any] = {}  # the other keyword arguments (e.g. ``ip_adapter_masks``)

    @classmethod
    def parse(cls, hidden_states, args: tuple, kwargs: dict) -> "SiteCall":
        known = ("encoder_hidden_states", "attention_mask", "temb")
        return cls(hidden_states,
                   kwargs.get("encoder_hidden_states", args[0] if len(args) > 0 else None),
                   kwargs.get("attention_mask", args[1] if len(args) > 1 else None),
                   kwargs.get("temb", args[2] if len(args) > 2 else None),
                   {k: v for k, v in kwargs.items() if k not in known})

    def text_and_images(self) -> tuple[Any, list | None]:
        """``(text (B, K, D), image-prompt embeddings or None)``: the text tokens with or
        without an IP-Adapter's pair."""
        ehs = self.encoder_hidden_states
        if isinstance(ehs, tuple) and len(ehs) == 2 and torch.is_tensor(ehs[0]) \
                and isinstance(ehs[1], (list, tuple)) and all(torch.is_tensor(e) for e in ehs[1]):
            return ehs[0], list(ehs[1])
        return ehs, None


class Observer(Protocol):
    def observe(self, attn, layer: str, call: SiteCall) -> None: ...


class Editor(Protocol):
    def edit(self, attn, layer: str, call: SiteCall, out: torch.Tensor) -> torch.Tensor: ...


class SiteProcessor:
    """Wraps the processor of one attention site; runs ``observers`` before and ``editors``
    after the unchanged inner processor.

    Args:
        inner: the processor that was installed (it computes the output).
        layer: the site's module path.
        observers: objects with ``observe(attn, layer, call)``.
        editors: objects with ``edit(attn, layer, call, out) -> out``, applied in order.
    """

    def __init__(self, inner, layer: str, observers: Sequence[Observer] = (),
                 editors: Sequence[Editor] = ()):
        self.inner = inner
        self.layer = layer
        self.observers = tuple(observers)
        self.editors = tuple(editors)
        try:
            sig = inspect.signature(inner.__call__)
        except (TypeError, ValueError):
            sig = None
        self._inner_params = None
        if sig is not None and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            self._inner_params = set(sig.parameters)
        # ``Attention.forward`` filters cross_attention_kwargs by ``inspect.signature(
        # processor.__call__)``; expose the inner processor's signature so exactly the same
        # kwargs reach it as without sdlens (an instance attribute wins attribute lookup, while
        # calling the object still uses the class's __call__).
        if sig is not None:
            def _call(*args, **kwargs):
                return SiteProcessor.__call__(self, *args, **kwargs)
            _call.__signature__ = sig
            self.__dict__["__call__"] = _call

    def __repr__(self) -> str:
        return (f"SiteProcessor({self.inner!r}, layer={self.layer!r}, observers={self.observers!r}, "
                f"editors={self.editors!r})")

    def __call__(self, attn, hidden_states, *args, **kwargs):
        call = SiteCall.parse(hidden_states, args, kwargs)
        for observer in self.observers:
            observer.observe(attn, self.layer, call)
        if self._inner_params is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self._inner_params}
        out = self.inner(attn, hidden_states, *args, **kwargs)
        for editor in self.editors:
            out = editor.edit(attn, self.layer, call, out)
        return out


def innermost(processor):
    """The processor that computes a site's output, under any :class:`SiteProcessor` s
    (reweighting inside a trace wraps a site twice)."""
    while isinstance(processor, SiteProcessor):
        processor = processor.inner
    return processor


# ====================================================================== the installer
class Hooks:
    """Everything sdlens installs on a live pipeline, undone together on exit (reverse order;
    every undo step runs even if one fails).

    >>> with Hooks() as hooks:
    ...     hooks.wrap_sites(adapter.denoiser, adapter.sites(), observers=[recorder])
    ...     hooks.forward_pre_hook(adapter.denoiser, count_step, with_kwargs=True)
    ...     pipe(...)
    """

    def __init__(self):
        self._undo = contextlib.ExitStack()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def remove(self) -> None:
        """Undo everything installed so far."""
        self._undo.close()

    def undo(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on exit (for anything else installed, e.g. a ``scheduler.step`` wrapper)."""
        self._undo.callback(fn)

    def wrap_sites(self, model, layers: Sequence[str], observers: Sequence[Observer] = (),
                   editors: Sequence[Editor] = ()) -> dict[str, SiteProcessor]:
        """Wrap the processors of ``layers`` (module paths in ``model``) in
        :class:`SiteProcessor` s; returns ``{layer: wrapper}``. On exit the saved processor
        objects are put back."""
        saved = dict(model.attn_processors)
        keys = {f"{layer}.processor": layer for layer in layers}
        missing = [layer for key, layer in keys.items() if key not in saved]
        if missing:
            raise ValueError(f"{type(model).__name__} has no attention processor at {missing}")
        wrapped = {k: SiteProcessor(p, keys[k], observers, editors) if k in keys else p
                   for k, p in saved.items()}
        # registered first: a failure half-way through setting the processors is undone too;
        # set_attn_processor empties the dict it is given, so each call gets a copy
        self.undo(lambda: model.set_attn_processor(dict(saved)))
        model.set_attn_processor(dict(wrapped))
        return {layer: wrapped[k] for k, layer in keys.items()}

    def forward_hook(self, module: torch.nn.Module, fn: Callable, with_kwargs: bool = False):
        """``module.register_forward_hook(fn)``, removed on exit; returns the handle."""
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self.undo(handle.remove)
        return handle

    def forward_pre_hook(self, module: torch.nn.Module, fn: Callable, with_kwargs: bool = False):
        """``module.register_forward_pre_hook(fn)``, removed on exit; returns the handle."""
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        self.undo(handle.remove)
        return handle


# ====================================================================== observer: record
class AttentionSink(Protocol):
    def attention_request(self, layer: str):
        """None (do not record this call) or (rows: slice, tokens: int | Sequence[int] | None
        (the first n positions, or these positions), keep_heads: bool, dtype)."""

    def put_attention(self, layer: str, probs: torch.Tensor, n_queries: int,
                      image_tokens: tuple[int, ...] = ()) -> None:
        """probs: (B, T, HW) or (B, heads, T, HW) on the device; the last ``sum(image_tokens)``
        of the T tokens are image-prompt tokens (``image_tokens``: how many per IP-Adapter)."""

    def skip(self, layer: str, what: str) -> None:
        """This call of ``layer`` could not be recorded (``what``: why); the run goes on."""


def reduce_maps(probs: torch.Tensor, tokens, keep_heads: bool, dtype) -> torch.Tensor | CompactMaps:
    """The recorded form of (B, heads, K, HW) probabilities: the kept token positions
    (``tokens``: None all, an int the first n, a sequence of positions), heads averaged unless
    kept, stored in ``dtype`` (:func:`~sdlens.trace.compact.store_maps`: codes + scales for
    ``torch.uint4`` / ``torch.uint8``); (B, [heads,] T, HW), on the device."""
    if isinstance(tokens, int):
        probs = probs[:, :, :tokens]
    elif tokens is not None:
        index = torch.as_tensor(list(tokens), dtype=torch.long, device=probs.device)
        probs = probs.index_select(2, index[index < probs.shape[2]])
    if not keep_heads:
        probs = probs[:, 0] if probs.shape[1] == 1 else probs.mean(dim=1)  # (B, T, HW)
    return store_maps(probs, dtype)


class AttentionRecorder:
    """Observer: the attention probabilities of the batch rows ``sink`` asks for, reduced on the
    device (token positions kept, heads averaged unless asked for) and handed to ``sink`` as a
    device tensor. The keys depend only on the text, so they are computed once per call of the
    pipeline and site (again if the text embeddings change) and reused at every step."""

    def __init__(self, sink: AttentionSink):
        self.sink = sink
        self._keys: dict[str, tuple] = {}  # layer -> (ehs, its version, rows, keys (B, heads, K, d))

    def observe(self, attn, layer: str, call: SiteCall) -> None:
        request = self.sink.attention_request(layer)
        if request is None:
            return
        # sdlens is never the reason a generation fails: what it cannot read it skips
        text, _ = call.text_and_images()
        if not torch.is_tensor(text):
            self.sink.skip(layer, f"encoder_hidden_states of type {type(text).__name__} "
                                  "(expected a tensor, or an IP-Adapter's (text, images) pair)")
            return
        try:
            self.record(attn, layer, call, request)
        except Exception as e:  # noqa: BLE001 - an unknown processor / layout
            inner = innermost(attn.processor)
            self.sink.skip(layer, f"processor {type(inner).__name__}: {type(e).__name__}: {e}")

    @torch.no_grad()
    def record(self, attn, layer: str, call: SiteCall, request) -> None:
        rows, n_tokens, keep_heads, dtype = request
        hidden_states, _, mask, temb = call[:4]
        ehs, images = call.text_and_images()
        hs = hidden_states[rows]
        if mask is not None and mask.shape[0] == hidden_states.shape[0]:
            mask = mask[rows]
        if temb is not None and torch.is_tensor(temb) and temb.shape[0] == hidden_states.shape[0]:
            temb = temb[rows]
        if mask is None and getattr(attn, "norm_q", None) is None:
            probs = self._token_maps(attn, layer, hs, ehs, rows, temb)  # (B, heads, K, HW)
        else:  # rare layouts: the reference computation, then (B, heads, K, HW)
            probs = attention_probabilities(attn, hs, ehs[rows], mask, temb).transpose(-1, -2)
        counts: tuple[int, ...] = ()
        if images is not None:  # IP-Adapter: the image-prompt tokens follow the kept text tokens
            probs = reduce_maps(probs, n_tokens, True, probs.dtype)
            image_probs, counts = self._image_prompt_maps(attn, hs, images, rows, temb,
                                                          call.extra.get("ip_adapter_masks"))
            probs, n_tokens = torch.cat([probs, image_probs], dim=2), None
        probs = reduce_maps(probs, n_tokens, keep_heads, dtype)  # (B, [heads,] T, HW)
        self.sink.put_attention(layer, probs, probs.shape[-1], image_tokens=counts)

    @staticmethod
    def _image_prompt_maps(attn, hs: torch.Tensor, images: list, rows: slice,
                           temb: torch.Tensor | None, masks) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The image-prompt tokens' attention, as ``IPAdapterAttnProcessor2_0`` computes it:
        per IP-Adapter ``i`` a softmax over its own keys ``to_k_ip[i](images[i])`` (with
        ``ip_adapter_masks``, one softmax per reference image), scaled by 1/sqrt(head_dim) as
        its SDPA is. Returns ((B, heads, K_img, HW) float32, tokens per adapter)."""
        processor = innermost(attn.processor)
        to_k_ip = getattr(processor, "to_k_ip", None)
        if to_k_ip is None or len(to_k_ip) != len(images):
            raise TypeError(f"{type(processor).__name__} has no to_k_ip for {len(images)} "
                            "image prompt(s) (not an IP-Adapter processor sdlens knows)")
        if masks is not None and not isinstance(masks, (list, tuple)):
            masks = list(masks.unsqueeze(1))
        query = rearrange(attn.to_q(_normed_queries_input(attn, hs, temb)).float(),
                          "n l (heads d) -> n heads d l", heads=attn.heads)
        scale = query.shape[2] ** -0.5
        out, counts = [], []
        for i, (emb, proj) in enumerate(zip(images, to_k_ip)):
            emb = emb[rows]
            masked = masks is not None and masks[i] is not None
            groups = [emb[:, j] for j in range(emb.shape[1])] if masked and emb.ndim == 4 else [emb]
            n = 0
            for g in groups:
                key = proj(g).reshape(g.shape[0], -1, query.shape[1], query.shape[2])
                key = key.transpose(1, 2).float() * scale  # (B, heads, K_i, d)
                out.append(torch.matmul(key, query).softmax(dim=-2))
                n += key.shape[2]
            counts.append(n)
        return torch.cat(out, dim=2), tuple(counts)

    def _token_maps(self, attn, layer: str, hs: torch.Tensor, ehs: torch.Tensor, rows: slice,
                    temb: torch.Tensor | None) -> torch.Tensor:
        """``attention_probabilities`` without a mask, laid out (B, heads, K, HW) (softmax over K).

        This runs at every site and step, so it is lean: the keys (scaled, float32) depend only
        on the text, which a pipeline passes unchanged at every step, so they are computed once
        per ``ehs`` tensor (same object, same in-place version) and reused; the scores are made
        as ``k q^T`` directly in the recorded layout (no transpose copy).
        """
        cached = self._keys.get(layer)
        if cached is not None and cached[0] is ehs and cached[1] == ehs._version and cached[2] == rows:
            key = cached[3]
        else:
            e = ehs[rows]
            if attn.norm_cross:
                e = attn.norm_encoder_hidden_states(e)
            key = rearrange(attn.to_k(e), "n k (heads d) -> n heads k d", heads=attn.heads)
            if getattr(attn, "norm_k", None) is not None:
                key = attn.norm_k(key)
            key = key.float() * float(attn.scale)
            # holding ``ehs`` keeps its memory from being reused by another tensor
            self._keys[layer] = (ehs, ehs._version, rows, key)
        hs = _normed_queries_input(attn, hs, temb)
        query = rearrange(attn.to_q(hs).float(), "n l (heads d) -> n heads d l", heads=attn.heads)
        return torch.matmul(key, query).softmax(dim=-2)


class JointAttentionRecorder(AttentionRecorder):
    """Observer of a *joint*-attention site (SD3's MMDiT, ``JointAttnProcessor2_0``; Flux's
    ``FluxAttnProcessor``): the image tokens' attention to the text tokens, laid out and reduced
    as :class:`AttentionRecorder`'s.

    Joint attention is one softmax over the keys of [image tokens; text tokens] (heads, q/k
    norms: ``norm_q`` / ``norm_k`` on the image stream, ``norm_added_k`` on the text stream,
    ``add_k_proj`` for the text keys). The recorded map is the text columns of that softmax, so
    a pixel's row over the text tokens sums to its *text share* (the rest went to image keys):
    ``p(text j) = exp(s_j - logsumexp(all image and text scores))``. The image keys' part of the
    normaliser is computed in chunks of queries (the image-image scores are (HW x HW) per head).
    The text stream changes at every block and step, so nothing is cached.

    Flux (``text_first``): the sequence is [text; image] and the processor rotates queries and
    keys with the RoPE of the whole sequence (``image_rotary_emb``, passed positionally where
    other processors take ``temb``), so the text keys get its first T rows and the image its
    rest; the scores are those of the rotated q / k. Its single-stream blocks attend over the
    concatenated [text; image] hidden states (no ``encoder_hidden_states``; the same ``to_k`` /
    ``norm_k`` for both parts): T is the text length the last double-stream call saw (the same
    transformer call runs them first).
    """

    chunk_bytes = 256 << 20  # the image-image scores held at once

    def __init__(self, sink: AttentionSink, text_first: bool = False):
        super().__init__(sink)
        self.text_first = text_first
        self.text_length: int | None = None  # T of the last call with encoder_hidden_states

    def observe(self, attn, layer: str, call: SiteCall) -> None:
        ehs = call.encoder_hidden_states
        if torch.is_tensor(ehs):
            self.text_length = int(ehs.shape[1])
        request = self.sink.attention_request(layer)
        if request is None:
            return
        rows, n_tokens, keep_heads, dtype = request
        try:  # sdlens is never the reason a generation fails
            parts = joint_call_parts(call, rows, self.text_first, self.text_length)
            if parts is None:
                return self.sink.skip(layer, "no text tokens sdlens can find in its joint attention")
            hs, ehs, rope, single = parts
            probs = self.text_probabilities(attn, hs, ehs, rope, single=single)
            probs = reduce_maps(probs, n_tokens, keep_heads, dtype)
        except Exception as e:  # noqa: BLE001 - an unknown processor / layout
            return self.sink.skip(layer, f"{type(e).__name__}: {e}")
        self.sink.put_attention(layer, probs, probs.shape[-1])

    @torch.no_grad()
    def text_probabilities(self, attn, hs: torch.Tensor, ehs: torch.Tensor, rope=None,
                           single: bool = False) -> torch.Tensor:
        """(B, heads, T, HW) float32: image queries' probabilities on the text keys, softmax
        over all keys ([image; text]), from ``hs`` (B, HW, C) and ``ehs`` (B, T, C) as the
        processor receives them (``single``: both parts of one single-stream sequence, keyed by
        ``to_k``); ``rope``: the processor's ``(cos, sin)`` over the whole sequence, in
        ``joint_order``."""
        p = joint_projections(attn, hs, ehs, ("image_q", "image_k", "text_k"), rope=rope,
                              text_first=self.text_first, single=single)
        query, key, text_key = p["image_q"], p["image_k"], p["text_k"]
        scale = float(getattr(attn, "scale", query.shape[-1] ** -0.5))
        query = query.float() * scale  # (B, heads, HW, d)
        key, text_key = key.float(), text_key.float()
        text_scores = torch.matmul(text_key, query.transpose(-1, -2))  # (B, heads, T, HW)
        n, h, hw = query.shape[0], query.shape[1], query.shape[2]
        chunk = max(1, min(hw, self.chunk_bytes // max(1, 4 * n * h * key.shape[2])))
        image_lse = torch.cat([torch.matmul(query[:, :, i: i + chunk], key.transpose(-1, -2))
                               .logsumexp(dim=-1) for i in range(0, hw, chunk)], dim=-1)
        lse = torch.logaddexp(image_lse, text_scores.logsumexp(dim=-2))  # (B, heads, HW)
        return (text_scores - lse[:, :, None, :]).exp()


def joint_call_parts(call: SiteCall, rows, text_first: bool, text_length: int | None):
    """``(hs, ehs, rope, single)`` of a joint-attention call, the batch ``rows`` only: the image
    tokens (B, HW, C) and text tokens (B, T, C) as the processor receives them, its rotary
    ``(cos, sin)`` or None, and whether they came joined in one single-stream sequence ([text;
    image], Flux; split at ``text_length``, the T of the last call that had text apart). None
    when there are no text tokens to find."""
    ehs = call.encoder_hidden_states
    rope = call.extra.get("image_rotary_emb", call.temb)
    rope = tuple(rope) if isinstance(rope, (tuple, list)) and len(rope) == 2 else None
    hs = call.hidden_states[rows]
    if torch.is_tensor(ehs):
        return hs, ehs[rows], rope, False
    if ehs is None and text_first and text_length and hs.ndim == 3 and hs.shape[1] > text_length:
        return hs[:, text_length:], hs[:, :text_length], rope, True
    return None


def joint_projections(attn, hs: torch.Tensor, ehs: torch.Tensor, parts: Sequence[str],
                      rope=None, text_first: bool = False, single: bool = False
                      ) -> dict[str, torch.Tensor]:
    """Joint attention's projections as the processor computes them (SD3's
    ``JointAttnProcessor2_0``, Flux's ``FluxAttnProcessor``), each (B, heads, L, d): ``parts``
    from ``image_q``, ``image_k``, ``image_v`` (``to_q`` / ``to_k`` / ``to_v`` of ``hs`` (B, HW,
    C), q/k normed by ``norm_q`` / ``norm_k``) and ``text_q``, ``text_k``, ``text_v``
    (``add_*_proj`` of ``ehs`` (B, T, C) and ``norm_added_q`` / ``norm_added_k``; ``single``:
    the single-stream blocks' one ``to_*`` and ``norm_q`` / ``norm_k`` for both parts). Fused
    projections (``to_qkv`` / ``to_added_qkv``) are read as fused. ``rope``: the processor's
    ``(cos, sin)`` over the whole sequence in its order (``text_first``: [text; image], Flux),
    applied to q and k with diffusers' ``apply_rotary_emb``, as the processor applies it."""
    def heads(t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "n l (heads d) -> n heads l d", heads=attn.heads)

    fused = getattr(attn, "fused_projections", False)
    out = {}
    for part, x in (("image", hs), ("text", ehs)):
        names = [n for n in "qkv" if f"{part}_{n}" in parts]
        if not names:
            continue
        added = part == "text" and not single
        if fused:  # after fuse_qkv_projections(): one to_qkv (to_added_qkv for the text stream)
            proj = dict(zip("qkv", (attn.to_added_qkv if added else attn.to_qkv)(x)
                            .chunk(3, dim=-1)))
        else:
            proj = {n: getattr(attn, f"add_{n}_proj" if added else f"to_{n}")(x) for n in names}
        norms = {"q": getattr(attn, "norm_added_q" if added else "norm_q", None),
                 "k": getattr(attn, "norm_added_k" if added else "norm_k", None), "v": None}
        for n in names:
            t = heads(proj[n])
            if norms[n] is not None:
                t = norms[n](t)
            if rope is not None and n != "v":
                t = _rotate(t, rope, part, hs.shape[1], ehs.shape[1], text_first)
            out[f"{part}_{n}"] = t
    return out


def _rotate(t: torch.Tensor, rope, part: str, n_image: int, n_text: int,
            text_first: bool) -> torch.Tensor:
    """``t`` (B, heads, L, d), the ``part`` ("image" or "text") of joint attention's sequence,
    rotated with its rows of the processor's ``(cos, sin)`` (the whole sequence, text first
    where ``text_first``) by diffusers' ``apply_rotary_emb``."""
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rope
    first, second = (n_text, n_image) if text_first else (n_image, n_text)
    at_start = (part == "text") == text_first
    rows = slice(0, first) if at_start else slice(first, first + second)
    return apply_rotary_emb(t, (cos[rows], sin[rows]), sequence_dim=2)


def recorder_for(kind: str, sink: AttentionSink, order: tuple[str, str] = ("image", "text")
                 ) -> AttentionRecorder:
    """The attention observer for a backbone's ``attention_kind`` ("cross" or "joint") and, for
    joint attention, its ``joint_order``."""
    if kind == "joint":
        return JointAttentionRecorder(sink, text_first=order[0] == "text")
    return AttentionRecorder(sink)


# ====================================================================== editor: reweight
class Reweight:
    """Editor: scale chosen tokens' cross-attention (prompt-to-prompt's equalizer).

    With attention probabilities ``P`` (rows sum to 1 over the text tokens), values ``V`` and
    per-token factors ``w`` the equalizer's output is ``(P * w) V``, and

        (P * w) V = P V + ((w - 1) * P) V

    so the editor adds ``to_out(((w - 1) * P) V)`` (the output projection without its bias,
    divided by ``rescale_output_factor``) to the inner processor's output. Only the reweighted
    positions' columns of ``P`` and rows of ``V`` enter the correction. The probabilities are
    **not renormalised** (as in prompt-to-prompt): a weight of 2 doubles the token's share of
    every pixel's attention. A weight of exactly 1 adds an exact zero: the output is
    bit-identical to the unsteered one. Only the conditional (text) half of a
    classifier-free-guidance batch is reweighted; the unconditional half (the negative prompt,
    whose token positions are different words) is not.

    Args:
        factors: (items, 77) float32, the multiplier of every token position per batch item
            (1 where not reweighted).
        positions: the token positions to correct (those named by the user, whatever their
            weight: a weight of 1 runs the same code and adds zeros).
        steps: ``(start, end)`` from :func:`sdlens.trace.steps.step_window`; None: every step. A step is one
            backbone call (one ``scheduler.step``), as on a Trace's step axis, counted by
            :meth:`count_step` (a forward pre-hook on the backbone).
        pipe: the pipeline (for the number of steps, with fractional ranges).
    """

    def __init__(self, factors: torch.Tensor, positions: Sequence[int], steps=None, pipe=None):
        self.factors = factors.float()
        self.positions = sorted(set(int(p) for p in positions))
        self.steps = steps
        self.pipe = pipe
        self.step = -1
        self.total = None
        self.calls = 0  # site calls that applied a correction (for tests / sanity)
        # guidance run as separate backbone calls per step (Flux's true CFG: ("text", "uncond")),
        # set by reweighting(); the half of the current call (None: the halves share a batch)
        self.cfg_calls: tuple[str, ...] | None = None
        self.half: str | None = None
        self._backbone_calls = 0

    def count_step(self, module, args, kwargs):
        """Forward pre-hook on the backbone: one call per ``scheduler.step`` in SD pipelines
        (``len(cfg_calls)`` calls where guidance runs as separate calls)."""
        per_step = len(self.cfg_calls or ()) or 1
        i, self._backbone_calls = self._backbone_calls % per_step, self._backbone_calls + 1
        self.half = self.cfg_calls[i] if self.cfg_calls else None
        if i:
            return None  # the same step's next call
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

    def edit(self, attn, layer: str, call: SiteCall, out: torch.Tensor) -> torch.Tensor:
        ehs, _ = call.text_and_images()  # with an IP-Adapter: its text part (same equalizer)
        if ehs is None or not torch.is_tensor(ehs) or not self.positions or not self.active() \
                or self.half == "uncond":
            return out
        return out + self._correction(attn, call._replace(encoder_hidden_states=ehs), out)

    def _rows(self, batch: int) -> slice:
        n = self.factors.shape[0]
        if batch == 2 * n:
            return slice(n, 2 * n)  # cat([uncond, text]): the text half
        if batch == n:
            return slice(0, n)
        raise RuntimeError(f"reweighting was set up for {n} batch items but the backbone saw a "
                           f"batch of {batch} (neither {n} nor 2 x {n} under classifier-free "
                           "guidance)")

    def _correction(self, attn, call: SiteCall, out: torch.Tensor) -> torch.Tensor:
        hidden_states = call.hidden_states
        rows = self._rows(hidden_states.shape[0])
        probs, value = attention_probabilities(
            attn, hidden_states, call.encoder_hidden_states, call.attention_mask, call.temb,
            rows=rows, with_values=True)  # (n, heads, HW, K), (n, heads, K, d)
        delta = self._delta(attn, probs, value, out)
        if hidden_states.ndim == 4:
            delta = rearrange(delta, "n (h w) c -> n c h w", h=out.shape[2])
        delta = (delta / attn.rescale_output_factor).to(out.dtype)
        self.calls += 1
        full = torch.zeros_like(out)
        full[rows] = delta
        return full

    def _mixed(self, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``((w - 1) * P) V`` over the reweighted positions: probs (n, heads, HW, K), value
        (n, heads, K, d) -> (n, HW, inner), float32."""
        pos = torch.tensor(self.positions, device=probs.device)
        pos = pos[pos < probs.shape[-1]]
        f = (self.factors.to(probs.device)[:, pos] - 1.0)  # (n, P)
        weighted = probs[..., pos] * f[:, None, None, :]  # (n, heads, HW, P)
        delta = torch.matmul(weighted, value.float()[:, :, pos, :])  # (n, heads, HW, d)
        return rearrange(delta, "n heads l d -> n l (heads d)")

    def _delta(self, attn, probs: torch.Tensor, value: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        """``to_out[0]`` without its bias of ``((w - 1) * P) V`` over the reweighted positions:
        probs (n, heads, HW, K), value (n, heads, K, d) -> (n, HW, C)."""
        delta = self._mixed(probs, value)
        proj = attn.to_out[0]
        if isinstance(proj, torch.nn.Linear) and type(proj) is torch.nn.Linear:
            return F.linear(delta.to(proj.weight.dtype), proj.weight)
        # LoRA and other wrappers: linear, so f(x) - f(0) is the bias-free part
        d = delta.to(out.dtype)
        return proj(d) - proj(torch.zeros_like(d[:, :1]))

    def describe(self, weights: Mapping[Any, float]) -> dict:
        """What was steered, for ``trace.meta["reweight"]``."""
        return {"weights": {str(k): float(v) for k, v in weights.items()},
                "steps": list(self.steps) if self.steps else None,
                "positions": self.positions, "renormalised": False}


class JointReweight(Reweight):
    """Editor: :class:`Reweight` on a joint-attention site (SD3's MMDiT, ``JointAttnProcessor2_0``;
    Flux's ``FluxAttnProcessor``).

    The image queries' probabilities ``P`` on the chosen text tokens (the text columns of joint
    attention's one softmax over [image; text] keys,
    :meth:`JointAttentionRecorder.text_probabilities`) are multiplied by the weights, and, as for
    the UNet's cross-attention, not renormalised: the image stream's output gets
    ``to_out(((w - 1) * P) V_text)`` (``V_text``: ``add_v_proj`` of the text tokens; the output
    projection without its bias). The image keys' columns, the text stream's output and the
    unconditional half are untouched; a weight of exactly 1 adds an exact zero.

    Flux (``text_first``): ``P`` from the RoPE-rotated q / k, as recorded. Its single-stream
    blocks return the attention output of the joined [text; image] sequence before the block's
    ``proj_out`` (which also reads the parallel MLP): the image rows get ``((w - 1) * P) V_text``
    itself (``V_text``: ``to_v`` of the text part), the text rows nothing; T is the text length
    the double-stream calls of the same transformer call saw. True CFG's negative call
    (``cfg_calls``) is not reweighted.
    """

    def __init__(self, *args, text_first: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_first = text_first
        self.text_length: int | None = None  # T of the last call with encoder_hidden_states
        self._joint = JointAttentionRecorder(sink=None, text_first=text_first)

    def edit(self, attn, layer: str, call: SiteCall, out):
        ehs, hs = call.encoder_hidden_states, call.hidden_states
        if torch.is_tensor(ehs):
            self.text_length = int(ehs.shape[1])
        if not self.positions or not self.active() or self.half == "uncond":
            return out
        rope = call.extra.get("image_rotary_emb", call.temb)
        rope = tuple(rope) if isinstance(rope, (tuple, list)) and len(rope) == 2 else None
        if torch.is_tensor(ehs):
            image = out[0] if isinstance(out, tuple) else out  # (image, text) outputs
            image = image + self._joint_correction(attn, hs, ehs, image, rope)
            return (image,) + tuple(out[1:]) if isinstance(out, tuple) else image
        t = self.text_length
        if ehs is None and self.text_first and t and torch.is_tensor(out) and out.ndim == 3 \
                and hs.ndim == 3 and hs.shape[1] == out.shape[1] > t:  # single-stream
            image = out[:, t:] + self._joint_correction(attn, hs[:, t:], hs[:, :t], out[:, t:],
                                                        rope, single=True)
            return torch.cat([out[:, :t], image], 1)
        return out

    @torch.no_grad()
    def _joint_correction(self, attn, hs: torch.Tensor, ehs: torch.Tensor, out: torch.Tensor,
                          rope=None, single: bool = False) -> torch.Tensor:
        rows = self._rows(hs.shape[0])
        hs, ehs = hs[rows], ehs[rows]
        probs = self._joint.text_probabilities(attn, hs, ehs, rope, single=single)  # (n,h,T,HW)
        value = joint_projections(attn, hs, ehs, ("text_v",), single=single)["text_v"]
        if single:  # before proj_out: the mixed values themselves
            delta = self._mixed(probs.transpose(-1, -2), value)
        else:
            delta = self._delta(attn, probs.transpose(-1, -2), value, out)
        self.calls += 1
        full = torch.zeros_like(out)
        full[rows] = delta.to(out.dtype)
        return full


def reweight_factors(pipe, prompts: Sequence[str], weights: Mapping[Any, float]
                     ) -> tuple[torch.Tensor, list[int]]:
    """(items, 77) factors for ``{word: weight}`` in each prompt of ``pipe``'s call, and the
    positions named."""
    if not weights:
        raise ValueError("reweight needs at least one {word: weight}")
    named: list[tuple[int, int, float]] = []  # (item, position, weight)
    for i, prompt in enumerate(prompts):
        for word, w in weights.items():
            w = float(w)
            if not np.isfinite(w):
                raise ValueError(f"the weight of {word!r} is not finite: {w}")
            named += [(i, p, w) for p in word_positions(pipe, prompt, word)]
    # T5 / Gemma texts (PixArt, Sana) run past CLIP's 77 positions
    factors = torch.ones(len(prompts), max([MAX_POSITIONS] + [p + 1 for _, p, _ in named]))
    for i, p, w in named:
        factors[i, p] = w
    return factors, sorted({p for _, p, _ in named})


@contextlib.contextmanager
def reweighting(pipe, prompt: str | Sequence[str], weights: Mapping[Any, float], steps=None,
                num_images_per_prompt: int = 1, params: dict | None = None
                ) -> Iterator[Reweight]:
    """Install the equalizer on every attention site of ``pipe`` (cross-attention:
    :class:`Reweight`; joint attention: :class:`JointReweight`) for the pipeline calls in the
    ``with`` block (restored on exit, also on errors). Yields the editor.

    Args:
        prompt: the prompt(s) of the call (to find the words' token positions).
        weights: ``{word: weight}``; a word may be several consecutive words ("red circle") or an
            int token position. Every occurrence of the word is reweighted.
        steps: ``(start, end)`` denoising step indices (end exclusive, None for the end; the
            step axis of a Trace: one backbone call each) or fractions of the run as floats
            (``(0.0, 0.5)``: the first half); None: every step.
        params: the pipeline call's arguments, where the backbone runs guidance as separate
            calls per step (Flux's true CFG: ``true_cfg_scale``, ``negative_prompt``): then the
            negative call is not reweighted and a step is that many calls.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    adapter = adapter_for(pipe)
    editors = {"cross": Reweight, "joint": JointReweight}
    if adapter.attention_kind not in editors:
        raise TypeError(f"token reweighting works on cross- and joint-attention backbones; "
                        f"{type(pipe).__name__}'s {adapter.attention_kind} attention is not "
                        "supported yet")
    factors, positions = reweight_factors(pipe, prompts, weights)
    extra = {"text_first": adapter.joint_order[0] == "text"} \
        if adapter.attention_kind == "joint" else {}
    editor = editors[adapter.attention_kind](factors, positions, step_window(steps), pipe=pipe,
                                             **extra)
    editor.cfg_calls = adapter.cfg_calls(params or {})

    def count_step(module, args, kwargs):
        if not adapter.auxiliary_call(args, kwargs):  # SD3.5's skip-layer call is no step
            editor.count_step(module, args, kwargs)

    with Hooks() as hooks:
        hooks.wrap_sites(adapter.denoiser, adapter.sites(), editors=[editor])
        hooks.forward_pre_hook(adapter.denoiser, count_step, with_kwargs=True)
        yield editor
