"""Attention sites, and the one installer for every hook sdlens puts on a live pipeline.

Recording and editing are one mechanism (as baukit's ``TraceDict`` with retain / edit):

* A *site* is an attention layer of the backbone where image tokens meet text tokens (which
  layers: the backbone adapter's ``sites()``, :mod:`sdlens.engine.arch`). :class:`SiteProcessor`
  wraps the processor installed there. The wrapped processor computes the layer's output exactly
  as before (SDPA, dispatch backends, LoRA, IP-Adapter processors ... keep working).
* sdlens reads attention **where the processor calls the attention kernel**
  (:mod:`sdlens.engine.kernel`): q / k / v and the mask exactly as the model uses them, after its
  norms, rotary embeddings and stream concatenation. The backbone adapter only says how the
  kernel's sequence splits into segments (:meth:`~sdlens.engine.arch.base.BackboneAdapter.
  kernel_layout`: text, image, image prompts, ...). *Readers* (:class:`MapRecorder`: text->image
  and image->text maps) see each kernel call and change nothing; *editors* (:class:`Reweight`:
  prompt-to-prompt's equalizer, ablation) add to its output. A weight of exactly 1 adds an exact
  zero.
* :class:`Hooks` installs processor wrappers on chosen sites, forward hooks and forward
  pre-hooks on modules, context managers (the kernel wrapper) and any other undo step, and
  restores everything on exit, in reverse order, also on exceptions and KeyboardInterrupt.

Nothing here synchronises the device (no ``.cpu()`` / ``.item()``).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sdlens.analysis.tokens import MAX_POSITIONS
from sdlens.engine import kernel
from sdlens.engine.arch import adapter_for
from sdlens.engine.arch.base import (BackboneAdapter, KernelLayout, attention_processors,
                                     cross_layout, set_attention_processors)
from sdlens.engine.text import call_defaults, word_positions
from sdlens.trace.compact import CompactMaps, store_maps
from sdlens.trace.steps import step_window


# ====================================================================== the site wrapper
class SiteCall(NamedTuple):
    """The arguments of one processor call, as ``Attention.forward`` passes them."""

    hidden_states: torch.Tensor  # (B, HW, C) or (B, C, h, w)
    # (B, K, D) text tokens (None for self-attention and single-stream blocks); with an
    # IP-Adapter loaded the pair (text, [image-prompt embeddings per adapter])
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


class Reader(Protocol):
    """Sees a site's kernel calls; changes nothing."""

    def wants(self, layer: str, call: SiteCall) -> bool: ...

    def needs_lse(self, layout: KernelLayout) -> bool: ...

    def read(self, layer: str, call: SiteCall, k: kernel.KernelCall,
             layout: KernelLayout) -> None: ...

    def done(self, layer: str, call: SiteCall, seen: int) -> None: ...


class Editor(Protocol):
    """Adds to a site's kernel outputs."""

    def wants(self, layer: str, call: SiteCall) -> bool: ...

    def needs_lse(self, layout: KernelLayout) -> bool: ...

    def edit(self, layer: str, call: SiteCall, k: kernel.KernelCall, layout: KernelLayout,
             out: torch.Tensor) -> torch.Tensor: ...


class KernelSeam:
    """What the site wrappers of one installation share: the backbone adapter that lays out a
    kernel call (None: plain cross-attention, e.g. a processor tested alone) and the keyword
    arguments of the denoiser call in progress, its positional ones under their index (a forward
    pre-hook keeps them: a single-stream block's text length is read there)."""

    def __init__(self, adapter: BackboneAdapter | None = None):
        self.adapter = adapter
        self.denoiser_kwargs: dict = {}
        self._hooked = False

    def install(self, hooks: "Hooks") -> None:
        """The kernel wrapper for the length of ``hooks``, and the pre-hook on each of the
        adapter's denoisers (once, however many models' sites share this seam)."""
        hooks.enter(kernel.installed())
        if self.adapter is not None and not self._hooked:
            self._hooked = True
            hooks.undo(lambda: setattr(self, "_hooked", False))
            for model in self.adapter.denoisers():
                hooks.forward_pre_hook(model, self._before, with_kwargs=True)

    def _before(self, module, args, kwargs):
        # positional arguments under their index (Z-Image's pipeline passes its latents and
        # captions positionally)
        self.denoiser_kwargs = {**dict(enumerate(args)), **kwargs} if args else kwargs
        return None

    def layout(self, layer: str, attn, call: SiteCall, index: int, q_len: int,
               k_len: int) -> KernelLayout | None:
        if self.adapter is None:
            return cross_layout(q_len, k_len) if index == 0 else None
        return self.adapter.kernel_layout(layer, attn, call, index, q_len, k_len,
                                          self.denoiser_kwargs)


class _SiteTap:
    """One site call's kernel tap: the readers and editors of every wrapper around it."""

    def __init__(self, seam: KernelSeam, layer: str, attn, call: SiteCall):
        self.seam, self.layer, self.attn, self.call = seam, layer, attn, call
        self.readers: list = []
        self.editors: list = []
        self.layouts: dict[int, KernelLayout | None] = {}
        self.tap = kernel.Tap(self.on_kernel, self.wants_lse)

    def _layout(self, index: int, q_len: int, k_len: int) -> KernelLayout | None:
        if index not in self.layouts:
            self.layouts[index] = self.seam.layout(self.layer, self.attn, self.call, index,
                                                   q_len, k_len)
        return self.layouts[index]

    def wants_lse(self, q: torch.Tensor, k: torch.Tensor, index: int) -> bool:
        layout = self._layout(index, q.shape[2], k.shape[2])
        return layout is not None and any(
            x.needs_lse(layout) for x in self.readers + self.editors)

    def classic(self, scores: list) -> None:
        """Readers get the ``get_attention_scores`` calls of a processor that made no kernel
        call, as one kernel call (the slices joined, heads unfolded)."""
        heads = int(getattr(self.attn, "heads", 1))
        query = torch.cat([q for q, _, _ in scores])
        key = torch.cat([k for _, k, _ in scores])
        if query.shape[0] % heads or key.shape[0] != query.shape[0]:
            return
        unfold = lambda t: t.reshape(t.shape[0] // heads, heads, *t.shape[1:])  # noqa: E731
        masks = [m for _, _, m in scores]
        mask = None if masks[0] is None else unfold(torch.cat(masks))
        k = kernel.KernelCall(unfold(query), unfold(key), None, mask, float(self.attn.scale),
                              False, None, 0)
        self.tap.calls += 1
        layout = self._layout(0, k.query.shape[2], k.key.shape[2])
        if layout is not None and set(layout.keys) == {"text"}:
            for reader in self.readers:
                reader.read(self.layer, self.call, k, layout)

    def on_kernel(self, k: kernel.KernelCall, out: torch.Tensor) -> torch.Tensor:
        layout = self._layout(k.index, k.query.shape[2], k.key.shape[2])
        if layout is None:
            return out
        for reader in self.readers:
            reader.read(self.layer, self.call, k, layout)
        for editor in self.editors:
            out = editor.edit(self.layer, self.call, k, layout, out)
        return out


@contextlib.contextmanager
def _classic_scores(attn):
    """Processors that compute attention themselves (``AttnProcessor``, attention slicing's
    ``SlicedAttnProcessor``) call ``attn.get_attention_scores(query, key, mask)`` (heads folded
    into the batch, sliced or not) instead of a kernel: their (query, key, mask) are collected
    here, for readers only (no values: editors need an SDPA processor)."""
    orig = getattr(attn, "get_attention_scores", None)
    seen: list = []
    if orig is None or "get_attention_scores" in vars(attn):
        yield seen
        return

    def get_attention_scores(query, key, attention_mask=None):
        seen.append((query, key, attention_mask))
        return orig(query, key, attention_mask)

    attn.get_attention_scores = get_attention_scores
    try:
        yield seen
    finally:
        del attn.get_attention_scores


class SiteProcessor:
    """Wraps the processor of one attention site; its ``readers`` see, and its ``editors`` edit,
    the kernel calls the unchanged inner processor makes (see the module docstring).

    Args:
        inner: the processor that was installed (it computes the output).
        layer: the site's module path.
        readers: :class:`Reader` s (e.g. :class:`MapRecorder`).
        editors: :class:`Editor` s (e.g. :class:`Reweight`), applied in order.
        seam: the :class:`KernelSeam` (the adapter's layout); None: plain cross-attention.
    """

    def __init__(self, inner, layer: str, readers: Sequence[Reader] = (),
                 editors: Sequence[Editor] = (), seam: KernelSeam | None = None):
        self.inner = inner
        self.layer = layer
        self.readers = tuple(readers)
        self.editors = tuple(editors)
        self.seam = seam if seam is not None else KernelSeam(None)
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
        return (f"SiteProcessor({self.inner!r}, layer={self.layer!r}, readers={self.readers!r}, "
                f"editors={self.editors!r})")

    def __call__(self, attn, hidden_states, *args, **kwargs):
        inner_kwargs = kwargs if self._inner_params is None else \
            {k: v for k, v in kwargs.items() if k in self._inner_params}
        if not self.readers and not self.editors:
            return self.inner(attn, hidden_states, *args, **inner_kwargs)
        call = SiteCall.parse(hidden_states, args, kwargs)
        readers = [r for r in self.readers if r.wants(self.layer, call)]
        editors = [e for e in self.editors if e.wants(self.layer, call)]
        if not readers and not editors:
            return self.inner(attn, hidden_states, *args, **inner_kwargs)
        outer = kernel.active_tap()
        site = getattr(outer, "site", None)
        if site is not None and site.attn is attn and site.layer == self.layer:
            # wrapped twice (steering inside a trace): one tap; this wrapper's editors act first
            site.readers += readers
            site.editors[:0] = editors
            out = self.inner(attn, hidden_states, *args, **inner_kwargs)
            for reader in readers:
                reader.done(self.layer, call, site.tap.calls)
            return out
        site = _SiteTap(self.seam, self.layer, attn, call)
        site.readers, site.editors = list(readers), list(editors)
        site.tap.site = site
        with kernel.tapping(site.tap), _classic_scores(attn) as scores:
            out = self.inner(attn, hidden_states, *args, **inner_kwargs)
        if site.tap.calls == 0 and scores:
            site.classic(scores)
        for reader in site.readers:
            reader.done(self.layer, call, site.tap.calls)
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
    ...     hooks.wrap_sites(adapter.denoiser, adapter.sites(), readers=[recorder],
    ...                      seam=KernelSeam(adapter))
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

    def enter(self, cm):
        """Enter the context manager ``cm`` now and exit it on exit; returns its value."""
        return self._undo.enter_context(cm)

    def wrap_sites(self, model, layers: Sequence[str], readers: Sequence[Reader] = (),
                   editors: Sequence[Editor] = (), seam: KernelSeam | None = None
                   ) -> dict[str, SiteProcessor]:
        """Wrap the processors of ``layers`` (module paths in ``model``) in
        :class:`SiteProcessor` s; returns ``{layer: wrapper}``. ``seam``: the adapter's layout,
        installed here (the kernel wrapper and its denoiser pre-hook). On exit the saved
        processor objects are put back."""
        saved = attention_processors(model)
        keys = {f"{layer}.processor": layer for layer in layers}
        missing = [layer for key, layer in keys.items() if key not in saved]
        if missing:
            raise ValueError(f"{type(model).__name__} has no attention processor at {missing}")
        seam = seam if seam is not None else KernelSeam(None)
        seam.install(self)
        wrapped = {k: SiteProcessor(p, keys[k], readers, editors, seam) if k in keys else p
                   for k, p in saved.items()}
        # registered first: a failure half-way through setting the processors is undone too
        self.undo(lambda: set_attention_processors(model, saved))
        set_attention_processors(model, wrapped)
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


# ====================================================================== reading maps
class MapSink(Protocol):
    """Where recorded maps go (the session's collectors): one protocol for every kind of map
    ("attention": text->image, "image_to_text", "concepts")."""

    def request(self, kind: str, layer: str):
        """None (do not record this call) or (rows: slice, tokens: int | Sequence[int] | None
        (the first n text positions, or these positions), keep_heads: bool, dtype)."""

    def put(self, kind: str, layer: str, maps: torch.Tensor,
            image_tokens: tuple[int, ...] = (), grids: tuple = ()) -> None:
        """maps: (B, T, HW) or (B, heads, T, HW) on the device; the last ``sum(image_tokens)``
        of the T tokens are image-prompt tokens (``image_tokens``: how many per IP-Adapter).
        ``"reference_maps"``: T runs over the reference images' patches, ``grids`` (rows,
        columns) each, one reference after the other."""

    def skip(self, kind: str, layer: str, what: str) -> None:
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


def kept_positions(tokens, n_text: int, device) -> torch.Tensor:
    """The text positions a request keeps (``tokens`` as in :func:`reduce_maps`), within the
    kernel's ``n_text`` text keys, as an index tensor."""
    if tokens is None:
        return torch.arange(n_text, device=device)
    if isinstance(tokens, int):
        return torch.arange(min(tokens, n_text), device=device)
    index = torch.as_tensor(list(tokens), dtype=torch.long, device=device)
    return index[index < n_text]


def _mask_part(mask, rows: slice, q_span: slice, k_span: slice, k_index: torch.Tensor | None):
    """The kernel mask's block for batch ``rows``, query rows ``q_span`` and key columns
    ``k_span`` (then ``k_index`` of those), as (n | 1, heads | 1, q | 1, k | 1); None: none."""
    if mask is None:
        return None
    m = mask
    while m.ndim < 4:
        m = m.unsqueeze(0)
    m = m[rows] if m.shape[0] != 1 else m
    m = m[:, :, q_span] if m.shape[2] != 1 else m
    if m.shape[3] != 1:
        m = m[..., k_span]
        if k_index is not None:
            m = m.index_select(3, k_index)
    return m


def _add_mask(scores: torch.Tensor, m) -> torch.Tensor:
    if m is None:
        return scores
    if m.dtype == torch.bool:
        return scores.masked_fill(~m, float("-inf"))
    return scores + m.float()


def segment_probabilities(k: kernel.KernelCall, rows: slice, q_span: slice, k_span: slice,
                          k_index: torch.Tensor | None = None, normalise_over_all: bool = True,
                          ) -> torch.Tensor:
    """(n, heads, |keys|, |queries|) float32: the probabilities of the kernel call's query rows
    ``q_span`` on its keys ``k_span`` (``k_index`` of them, where given), batch ``rows``, laid
    out keys first (the recorded maps' layout). ``normalise_over_all``: the softmax over *all*
    the call's keys (from ``k.lse``: the text columns of joint attention); else over ``k_span``
    alone (cross-attention, an IP-Adapter's own softmax)."""
    q = k.query[rows][:, :, q_span].float() * k.scale
    keys = k.key[rows][:, :, k_span]
    if k_index is not None:
        keys = keys.index_select(2, k_index)
    scores = torch.matmul(keys.float(), q.transpose(-1, -2))  # (n, heads, K, Q)
    m = _mask_part(k.mask, rows, q_span, k_span, k_index)
    if m is not None:
        scores = _add_mask(scores, m.transpose(-1, -2))
    if normalise_over_all:
        lse = k.lse[rows][:, :, q_span] if k.lse is not None else None
        if lse is None:
            raise RuntimeError("the kernel's log-sum-exp is missing")
        return (scores - lse[:, :, None, :]).exp()
    if k_index is not None:
        raise ValueError("a softmax over a subset of keys needs all of them")
    return scores.softmax(dim=-2)


#: reference maps keep at most this many reference patches per side (sum-pooled beyond)
REFERENCE_GRID = 32


def reference_probabilities(k: kernel.KernelCall, rows: slice, q_span: slice, k_span: slice,
                            grid: tuple[int, int], max_side: int | None = None
                            ) -> tuple[torch.Tensor, tuple[int, int]]:
    """A reference image's part of the image queries' softmax (over *all* the call's keys,
    from the kernel's lse: not renormalised over the reference), heads averaged, one head at a
    time: ``(n, R, Q)`` float32 with R the reference's patches, row-major on ``grid``, each
    ``f x f`` block summed into one (``f = ceil(max(grid) / max_side)``, ``max_side`` by default
    :data:`REFERENCE_GRID`; the grid's edge padded
    with zeros: a patch's mass is kept), and the grid that gives."""
    heads = k.query.shape[1]
    acc = None
    for h in range(heads):  # one (n, K, Q) score matrix at a time
        m = k.mask
        if m is not None and m.ndim == 4 and m.shape[1] == heads:
            m = m[:, h: h + 1]
        one = k._replace(query=k.query[:, h: h + 1], key=k.key[:, h: h + 1], mask=m,
                         lse=k.lse[:, h: h + 1] if k.lse is not None else None)
        p = segment_probabilities(one, rows, q_span, k_span, None, True)[:, 0]
        acc = p if acc is None else acc + p
    probs = acc / heads  # (n, K, Q)
    r, c = grid
    max_side = max_side or REFERENCE_GRID
    f = -(-max(r, c) // max_side)
    if f <= 1:
        return probs, (r, c)
    n, _, q = probs.shape
    rr, cc = -(-r // f), -(-c // f)
    x = probs.transpose(1, 2).reshape(n, q, r, c)
    x = F.pad(x, (0, cc * f - c, 0, rr * f - r)).reshape(n, q, rr, f, cc, f).sum((3, 5))
    return x.reshape(n, q, rr * cc).transpose(1, 2), (rr, cc)


class MapRecorder:
    """Reader: the maps of a site's kernel calls, for the batch rows ``sink`` asks for, reduced
    on the device (kept token positions, heads averaged unless asked for) and handed to ``sink``
    as device tensors.

    * ``"attention"`` (text->image): the image queries' probabilities on the text keys. Where
      the kernel's keys are all text (cross-attention) this is their softmax; where there are
      other keys (joint attention over [image; text], reference images ...) it is the text
      columns of the softmax over all keys, ``exp(q . k_text * scale + mask - lse)`` with the
      kernel's own lse: a pixel's row sums to its *text share*. Only the kept text positions'
      columns are computed (cost: image tokens x kept tokens). An IP-Adapter's image-prompt
      tokens follow the text (their own softmax per kernel call, as its processor runs them).
    * ``"image_to_text"``: the kept text tokens' queries' probabilities on the image keys (the
      image columns of their softmax over all keys): a token's map sums to its *image share*.
    """

    def __init__(self, sink: MapSink, kinds: Sequence[str] = ("attention",)):
        self.sink = sink
        self.kinds = tuple(kinds)
        self._pending: dict[str, dict] = {}  # layer -> this site call's requests and parts

    def wants(self, layer: str, call: SiteCall) -> bool:
        requests = {kind: r for kind in self.kinds
                    if (r := self.sink.request(kind, layer)) is not None}
        if not requests:
            self._pending.pop(layer, None)
            return False
        self._pending[layer] = {"requests": requests, "text": None, "image_prompts": [],
                                "image_to_text": None, "reference_maps": None, "error": None}
        return True

    def needs_lse(self, layout: KernelLayout) -> bool:
        return set(layout.keys) != {"text"} and "text" in layout.keys

    def read(self, layer: str, call: SiteCall, k: kernel.KernelCall, layout: KernelLayout) -> None:
        state = self._pending.get(layer)
        if state is None or state["error"] is not None:
            return
        try:  # sdlens is never the reason a generation fails
            self._read(state, k, layout)
        except Exception as e:  # noqa: BLE001 - a layout sdlens does not understand
            state["error"] = f"{type(e).__name__}: {e}"

    @torch.no_grad()
    def _read(self, state: dict, k: kernel.KernelCall, layout: KernelLayout) -> None:
        requests = state["requests"]
        text, image_q = layout.keys.get("text"), layout.queries.get("image")
        att = requests.get("attention")
        if att is not None and image_q is not None:
            rows, tokens = att[0], att[1]
            if text is not None:
                only_text = set(layout.keys) == {"text"}
                if only_text:  # cross-attention: the softmax over the text, then kept positions
                    probs = segment_probabilities(k, rows, image_q, text, None, False)
                    index = kept_positions(tokens, probs.shape[2], probs.device)
                    state["text"] = probs.index_select(2, index)
                else:
                    index = kept_positions(tokens, text.stop - text.start, k.query.device)
                    state["text"] = segment_probabilities(k, rows, image_q, text, index, True)
            prompts = [n for n in layout.keys if n.startswith("image prompt ")]
            for name in prompts:
                probs = segment_probabilities(k, rows, image_q, layout.keys[name], None,
                                              len(layout.keys) > 1)
                state["image_prompts"].append((int(name.rsplit(" ", 1)[1]), probs))
        itt = requests.get("image_to_text")
        if itt is not None and text is not None and "text" in layout.queries \
                and "image" in layout.keys:
            state["image_to_text"] = self._image_to_text(k, layout, itt[0], itt[1])
        ref = requests.get("reference_maps")
        if ref is not None and image_q is not None and layout.grids:
            parts = [(reference_probabilities(k, ref[0], image_q, span, layout.grids[name]))
                     for name, span in layout.keys.items()
                     if name.startswith("reference ") and name in layout.grids]
            state["reference_maps"] = parts or None

    @staticmethod
    def _image_to_text(k: kernel.KernelCall, layout: KernelLayout, rows: slice, tokens
                       ) -> torch.Tensor:
        """(n, heads, T, HW): the kept text queries' probabilities on the image keys (the image
        columns of their softmax over all keys)."""
        t_span, i_span = layout.queries["text"], layout.keys["image"]
        index = kept_positions(tokens, t_span.stop - t_span.start, k.query.device)
        q = k.query[rows][:, :, t_span].index_select(2, index).float() * k.scale
        scores = torch.matmul(q, k.key[rows][:, :, i_span].float().transpose(-1, -2))
        m = _mask_part(k.mask, rows, t_span, i_span, None)
        if m is not None:
            scores = _add_mask(scores, m if m.shape[2] == 1 else m.index_select(2, index))
        lse = k.lse[rows][:, :, t_span].index_select(2, index)
        return (scores - lse[..., None]).exp()

    def done(self, layer: str, call: SiteCall, seen: int) -> None:
        state = self._pending.pop(layer, None)
        if state is None:
            return
        for kind, (rows, tokens, keep_heads, dtype) in state["requests"].items():
            if state["error"] is not None:
                self.sink.skip(kind, layer, state["error"])
            elif seen == 0:
                self.sink.skip(kind, layer, "its processor made no attention-kernel call sdlens "
                                            "can see (a dispatch backend other than torch's "
                                            "SDPA, or a processor that computes attention "
                                            "itself)")
            elif kind == "attention":
                self._put_attention(layer, call, state, keep_heads, dtype)
            elif kind == "reference_maps":
                parts = state[kind]
                if parts is None:
                    self.sink.skip(kind, layer, "no reference images in its attention kernel call")
                else:  # the references' (pooled) patches one after the other: (B, R, HW)
                    maps = torch.cat([p for p, _ in parts], dim=1).to(dtype).contiguous()
                    self.sink.put(kind, layer, maps, grids=tuple(g for _, g in parts))
            elif state[kind] is None:
                self.sink.skip(kind, layer, "no text queries in its attention kernel call")
            else:
                self.sink.put(kind, layer, reduce_maps(state[kind], None, keep_heads, dtype))

    def _put_attention(self, layer: str, call: SiteCall, state: dict, keep_heads: bool,
                       dtype) -> None:
        probs = state["text"]
        if probs is None:
            ehs = call.encoder_hidden_states
            what = "" if ehs is None or torch.is_tensor(ehs) or isinstance(ehs, tuple) else \
                f" (its encoder_hidden_states are a {type(ehs).__name__})"
            return self.sink.skip("attention", layer, "its attention-kernel calls have no image "
                                                      f"queries on text keys sdlens can name{what}")
        counts: tuple[int, ...] = ()
        if state["image_prompts"]:  # IP-Adapter: the image-prompt tokens follow the text
            adapters = max(i for i, _ in state["image_prompts"]) + 1
            counts = tuple(sum(p.shape[2] for i, p in state["image_prompts"] if i == a)
                           for a in range(adapters))
            probs = torch.cat([probs] + [p for _, p in state["image_prompts"]], dim=2)
        probs = reduce_maps(probs, None, keep_heads, dtype)  # (B, [heads,] T, HW)
        self.sink.put("attention", layer, probs, image_tokens=counts)


# ====================================================================== editor: reweight
class Reweight:
    """Editor: scale chosen text tokens' attention (prompt-to-prompt's equalizer), at the kernel.

    With the image queries' probabilities ``P`` on the text keys, the values ``V`` and per-token
    factors ``w``, the equalizer's attention output is ``(P * w) V`` and

        (P * w) V = P V + ((w - 1) * P) V

    so the editor adds ``((w - 1) * P) V`` over the reweighted positions to the kernel's output
    rows of the image queries (the processor's output projection and everything after it then
    act on it as on the rest). On cross-attention ``P`` is the softmax over the text; on joint
    attention (SD3 / SD3.5, Flux.1 double- and single-stream blocks) it is the text columns of the
    one softmax over all keys (image, text, ...: from the kernel's lse, so the image keys'
    columns and the text queries' rows are untouched). The probabilities are **not
    renormalised** (as in prompt-to-prompt): a weight of 2 doubles the token's share of every
    pixel's attention. A weight of exactly 1 adds an exact zero: the output is bit-identical to
    the unsteered one. Only the conditional (text) half of a classifier-free-guidance batch is
    reweighted (the half :attr:`cfg_halves` names "text"); the unconditional half (the negative
    prompt, whose token positions are other words) and true CFG's negative call
    (``cfg_calls``) are not. An IP-Adapter's image-prompt
    calls are not reweighted.

    Args:
        factors: (items, positions) float32, the multiplier of every text position per batch
            item (1 where not reweighted).
        positions: the token positions to correct (those named by the user, whatever their
            weight: a weight of 1 runs the same code and adds zeros).
        steps: ``(start, end)`` from :func:`sdlens.trace.steps.step_window`; None: every step. A
            step is one backbone call (one ``scheduler.step``), as on a Trace's step axis, counted
            by :meth:`count_step` (a forward pre-hook on the backbone).
        pipe: the pipeline (for the number of steps, with fractional ranges).
    """

    def __init__(self, factors: torch.Tensor, positions: Sequence[int], steps=None, pipe=None):
        self.factors = factors.float()
        self.positions = sorted(set(int(p) for p in positions))
        self.steps = steps
        self.pipe = pipe
        self.step = -1
        self.total = None
        self.calls = 0  # kernel calls that applied a correction (for tests / sanity)
        # guidance run as separate backbone calls per step (Flux's true CFG: ("text", "uncond")),
        # set by reweighting(); the half of the current call (None: the halves share a batch)
        self.cfg_calls: tuple[str, ...] | None = None
        self.half: str | None = None
        # the halves of a guided batch, in batch order (the adapter's ``cfg_halves``: diffusers'
        # cat([uncond, text]); Z-Image's prompts first), set by reweighting()
        self.cfg_halves: tuple[str, str] = ("uncond", "text")
        self._backbone_calls = 0
        self._factor_cache: dict = {}

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

    def wants(self, layer: str, call: SiteCall) -> bool:
        return bool(self.positions) and self.half != "uncond" and self.active()

    def needs_lse(self, layout: KernelLayout) -> bool:
        return "text" in layout.keys and set(layout.keys) != {"text"}

    def _rows(self, batch: int) -> slice:
        n = self.factors.shape[0]
        if batch == 2 * n:  # the text half
            i = self.cfg_halves.index("text")
            return slice(i * n, (i + 1) * n)
        if batch == n:
            return slice(0, n)
        raise RuntimeError(f"reweighting was set up for {n} batch items but the backbone saw a "
                           f"batch of {batch} (neither {n} nor 2 x {n} under classifier-free "
                           "guidance)")

    @torch.no_grad()
    def edit(self, layer: str, call: SiteCall, k: kernel.KernelCall, layout: KernelLayout,
             out: torch.Tensor) -> torch.Tensor:
        text, image = layout.keys.get("text"), layout.queries.get("image")
        if text is None or image is None or k.value is None:
            return out
        rows = self._rows(k.query.shape[0])
        n_text = text.stop - text.start
        pos = torch.tensor([p for p in self.positions if p < n_text], dtype=torch.long,
                           device=k.query.device)
        if not len(pos):
            return out
        only_text = set(layout.keys) == {"text"}
        if only_text:  # the softmax over the text (cheap: all text keys), then its columns
            probs = segment_probabilities(k, rows, image, text, None, False).index_select(2, pos)
        else:
            probs = segment_probabilities(k, rows, image, text, pos, True)  # (n, h, P, HW)
        f = self.factors.to(probs.device)[:, pos] - 1.0  # (n, P)
        weighted = probs * f[:, None, :, None]
        value = k.value[rows][:, :, text].index_select(2, pos).float()  # (n, h, P, d)
        delta = torch.matmul(weighted.transpose(-1, -2), value)  # (n, h, HW, d)
        full = torch.zeros_like(out)
        full[rows, :, image] = delta.to(out.dtype)
        self.calls += 1
        return out + full

    def describe(self, weights: Mapping[Any, float]) -> dict:
        """What was steered, for ``trace.meta["reweight"]``."""
        return {"weights": {str(k): float(v) for k, v in weights.items()},
                "steps": list(self.steps) if self.steps else None,
                "positions": self.positions, "renormalised": False}


def reweight_factors(pipe, prompts: Sequence[str], weights: Mapping[Any, float],
                     params: dict | None = None) -> tuple[torch.Tensor, list[int]]:
    """(items, 77) factors for ``{word: weight}`` in each prompt of ``pipe``'s call, and the
    positions named; ``params``: the call's arguments, where they place the words (the edit
    pipelines' reference images come before the prompt on the text axis)."""
    if not weights:
        raise ValueError("reweight needs at least one {word: weight}")
    named: list[tuple[int, int, float]] = []  # (item, position, weight)
    for i, prompt in enumerate(prompts):
        for word, w in weights.items():
            w = float(w)
            if not np.isfinite(w):
                raise ValueError(f"the weight of {word!r} is not finite: {w}")
            named += [(i, p, w) for p in word_positions(pipe, prompt, word, params)]
    # T5 / Gemma texts (PixArt, Sana) run past CLIP's 77 positions
    factors = torch.ones(len(prompts), max([MAX_POSITIONS] + [p + 1 for _, p, _ in named]))
    for i, p, w in named:
        factors[i, p] = w
    return factors, sorted({p for _, p, _ in named})


@contextlib.contextmanager
def reweighting(pipe, prompt: str | Sequence[str], weights: Mapping[Any, float], steps=None,
                num_images_per_prompt: int = 1, params: dict | None = None
                ) -> Iterator[Reweight]:
    """Install the equalizer (:class:`Reweight`, at each site's attention kernel) on every
    attention site of ``pipe`` (of every denoiser: Wan 2.2's two experts) for the pipeline calls
    in the ``with`` block (restored on exit, also on errors). Yields the editor.

    Args:
        prompt: the prompt(s) of the call (to find the words' token positions).
        weights: ``{word: weight}``; a word may be several consecutive words ("red circle") or an
            int token position. Every occurrence of the word is reweighted.
        steps: ``(start, end)`` denoising step indices (end exclusive, None for the end; the
            step axis of a Trace: one backbone call each) or fractions of the run as floats
            (``(0.0, 0.5)``: the first half); None: every step.
        params: the pipeline call's arguments (its defaults fill the rest), where the backbone
            runs guidance as separate calls per step (Flux's and Qwen-Image's true CFG:
            ``true_cfg_scale``, ``negative_prompt``; Wan's ``guidance_scale``): then the
            negative call is not reweighted and a step is that many calls.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    adapter = adapter_for(pipe)
    if adapter.attention_kind not in ("cross", "joint"):
        raise TypeError(f"token reweighting works on cross- and joint-attention backbones; "
                        f"{type(pipe).__name__}'s {adapter.attention_kind} attention is not "
                        "supported yet")
    factors, positions = reweight_factors(pipe, prompts, weights, params)
    editor = Reweight(factors, positions, step_window(steps), pipe=pipe)
    # the call's own arguments over its defaults (Wan guides by default: two calls per step)
    editor.cfg_calls = adapter.cfg_calls({**call_defaults(pipe), **(params or {})})
    editor.cfg_halves = tuple(adapter.cfg_halves)

    def count_step(module, args, kwargs):
        if not adapter.auxiliary_call(args, kwargs):  # SD3.5's skip-layer call is no step
            editor.count_step(module, args, kwargs)

    with Hooks() as hooks:
        seam = KernelSeam(adapter)
        # every expert that predicts a step (Wan 2.2's two: each step is one expert's call(s))
        for model in adapter.denoisers():
            hooks.wrap_sites(model, adapter.sites(), editors=[editor], seam=seam)
            hooks.forward_pre_hook(model, count_step, with_kwargs=True)
        yield editor
