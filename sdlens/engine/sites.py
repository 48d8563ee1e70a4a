"""A recording processor for cross-attention sites that wraps the existing processor.

The wrapped processor computes the layer's output exactly as before (SDPA, attention slicing,
LoRA, IP-Adapter processors ... keep working, and the output is bit-identical). In addition the
recorder computes the attention probabilities itself, ``softmax(q k^T * attn.scale)`` from
``attn.to_q`` / ``attn.to_k`` (cross-attention has only ~77 keys: cheap), for the batch rows it is
asked for only, reduces them on the device (token positions kept, heads averaged) and hands the
device tensor to the recorder. The keys depend only on the text, so they are computed once per
call of the pipeline (again if the text embeddings change) and reused at every step. Nothing here
synchronises the device (no ``.cpu()``/``.item()``).
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch
from einops import rearrange


class AttentionSink(Protocol):
    def attention_request(self, layer: str):
        """None (do not record this call) or (rows: slice, n_tokens: int | None,
        keep_heads: bool, dtype)."""

    def put_attention(self, layer: str, probs: torch.Tensor, n_queries: int) -> None:
        """probs: (B, T, HW) or (B, heads, T, HW) on the device."""


def _normed_queries_input(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    """The image tokens as ``to_q`` sees them: spatial norm, (B, HW, C) layout, group norm."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        hidden_states = rearrange(hidden_states, "b c h w -> b (h w) c")
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


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

    query, key = heads(query), heads(key)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
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


def _signature_without_self(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


class RecordingProcessor:
    """Wraps the processor of one cross-attention site; records its attention probabilities.

    Args:
        inner: the processor that was installed (it computes the output, unchanged).
        layer: the site's module path (as the backbone adapter names it, :mod:`sdlens.engine.arch`).
        sink: the recorder (see :class:`AttentionSink`).
    """

    def __init__(self, inner, layer: str, sink: AttentionSink):
        self.inner = inner
        self.layer = layer
        self.sink = sink
        self._keys = None  # (ehs, its version, rows, keys (B, heads, K, d)): see _token_maps
        sig = _signature_without_self(inner.__call__)
        self._inner_params = None
        if sig is not None and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            self._inner_params = set(sig.parameters)
        # ``Attention.forward`` filters cross_attention_kwargs by ``inspect.signature(
        # processor.__call__)``; expose the inner processor's signature so exactly the same
        # kwargs reach it as without sdlens (an instance attribute wins attribute lookup, while
        # calling the object still uses the class's __call__).
        if sig is not None:
            def _call(*args, **kwargs):
                return RecordingProcessor.__call__(self, *args, **kwargs)
            _call.__signature__ = sig
            self.__dict__["__call__"] = _call

    def __repr__(self) -> str:
        return f"RecordingProcessor({self.inner!r}, layer={self.layer!r})"

    def __call__(self, attn, hidden_states, *args, **kwargs):
        request = self.sink.attention_request(self.layer)
        if request is not None:
            ehs = kwargs.get("encoder_hidden_states", args[0] if len(args) > 0 else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
            if ehs is not None and torch.is_tensor(ehs):
                self._record(attn, hidden_states, ehs, mask, temb, request)
        if self._inner_params is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self._inner_params}
        return self.inner(attn, hidden_states, *args, **kwargs)

    @torch.no_grad()
    def _record(self, attn, hidden_states, ehs, mask, temb, request) -> None:
        rows, n_tokens, keep_heads, dtype = request
        hs = hidden_states[rows]
        if mask is not None and mask.shape[0] == hidden_states.shape[0]:
            mask = mask[rows]
        if temb is not None and torch.is_tensor(temb) and temb.shape[0] == hidden_states.shape[0]:
            temb = temb[rows]
        if mask is None and getattr(attn, "norm_q", None) is None:
            probs = self._token_maps(attn, hs, ehs, rows, temb)  # (B, heads, K, HW)
        else:  # rare layouts: the reference computation, then (B, heads, K, HW)
            probs = attention_probabilities(attn, hs, ehs[rows], mask, temb).transpose(-1, -2)
        if n_tokens is not None:
            probs = probs[:, :, :n_tokens]
        if not keep_heads:
            probs = probs[:, 0] if probs.shape[1] == 1 else probs.mean(dim=1)  # (B, T, HW)
        probs = probs.to(dtype).contiguous()  # (B, [heads,] T, HW)
        self.sink.put_attention(self.layer, probs, probs.shape[-1])

    def _token_maps(self, attn, hs: torch.Tensor, ehs: torch.Tensor, rows: slice,
                    temb: torch.Tensor | None) -> torch.Tensor:
        """``attention_probabilities`` without a mask, laid out (B, heads, K, HW) (softmax over K).

        This runs at every layer and step, so it is lean: the keys (scaled, float32) depend only
        on the text, which a pipeline passes unchanged at every step, so they are computed once
        per ``ehs`` tensor (same object, same in-place version) and reused; the scores are made
        as ``k q^T`` directly in the recorded layout (no transpose copy).
        """
        cached = self._keys
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
            self._keys = (ehs, ehs._version, rows, key)
        hs = _normed_queries_input(attn, hs, temb)
        query = rearrange(attn.to_q(hs).float(), "n l (heads d) -> n heads d l", heads=attn.heads)
        return torch.matmul(key, query).softmax(dim=-2)
