"""What sdlens records beside joint attention's text maps (SD3 / SD3.5, Flux.1; any backbone
adapter that provides the concept pass, :mod:`sdlens.engine.arch.base`): concept maps and
image->text maps.

**Concept maps** follow ConceptAttention (Helbling, Meral, Hoover, Yeh, Chau: "ConceptAttention:
Diffusion Transformers Learn Highly Interpretable Features", ICML 2025). Concepts are chosen at
trace time (``sdlens.trace(pipe, concepts=["circle", "square", "background"])``) and need not be
words of the prompt. The method, as sdlens implements it:

1. **Encoding.** Each concept is encoded as its own short prompt by the pipeline's own text
   encoders, as the pipeline encodes a prompt (SD3: CLIP-L, CLIP-G and T5, at the call's
   ``max_sequence_length``; Flux: T5), and pooled into one vector: the mean over its tokens
   (its words' token positions, from the one Word model: CLIP tokens and T5 pieces alike, start
   / end tokens and padding left out), as a word's heatmap is pooled over its CLIP token(s) and
   T5 pieces.
   One token per concept keeps the softmax over concepts a choice between concepts, whatever
   their token counts.
2. **The concept stream.** The pooled vectors enter the first block as the prompt's text does
   (the denoiser's text embedding), and at every block go through the block's *text-stream*
   path (the adapter's :meth:`~sdlens.engine.arch.base.BackboneAdapter.concept_step`: the text
   stream's modulation and norms, its q/k/v projections and q/k norms). Their queries attend to
   the image keys and to the concept keys, never to the prompt's text keys; no image or text
   query attends to the concepts. The stream is **carried** from block to block (the block's
   text output path: output projection, gates, feed-forward), as ConceptAttention does, rather
   than re-injected at each block: a block's text projections were trained on text tokens that
   went through the blocks before it, so a concept re-injected at block 12 would be read with
   statistics it does not have; carried, it evolves beside the prompt's tokens. So the pass runs
   through every block at each recorded step, whichever sites' maps are kept.
3. **The map.** At a recorded site, with ``o_x`` the image tokens' attention outputs (n, HW,
   inner) and ``o_c`` the concepts' (n, C, inner), both before the output projections (both are
   mixtures of the same value vectors, so their dot product compares like with like):
   ``softmax_c(o_c . o_x)`` -> each patch's distribution over the concepts, (C, h, w) per
   batch item; the maps of all recorded sites and steps are ``trace.concepts``
   (:class:`~sdlens.trace.maps.ConceptMaps`, ``(steps, batch, concepts, h, w)``), pooled by
   ``trace.heatmap("circle", maps="concepts")`` as word heatmaps are.

Everything is computed beside the blocks, from their forward pre-hooks' arguments, under
``torch.no_grad``, on the text (conditional) rows of the batch: the image is bit-for-bit the
untraced one. Cost per recorded step: the concepts' projections and attention at every block
(C queries), and one extra image attention at each recorded site.

**Image->text maps** (``record=(..., "image_to_text")``): at each recorded site, each text
token's attention to the image patches: its query's softmax over the keys of [image; text], the
image columns, so a token's map sums to its *image share*. ``trace.image_to_text``: (steps,
batch, tokens, h, w), tokens as ``trace.attention``'s. Flux: from the RoPE-rotated q / k, in
the double- and single-stream blocks (:mod:`sdlens.engine.arch.flux`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from sdlens.analysis.tokens import tokenize, tokenize_segments
from sdlens.engine.arch import BackboneAdapter
from sdlens.engine.sites import (Hooks, SiteCall, joint_call_parts, joint_projections,
                                 reduce_maps)
from sdlens.trace.compact import dtype_name, host_maps, stack_maps, store_maps, stored_dtype
from sdlens.trace.maps import AttentionMaps, ConceptMaps


def check_joint_options(adapter: BackboneAdapter, options) -> None:
    """TypeError (one line) when ``options`` (a ``RecordOptions``) ask for concept maps or
    image->text maps on a backbone that has no concept pass / no joint attention."""
    name = type(adapter.pipe).__name__
    if options.concepts is not None and adapter.concept_blocks() is None:
        raise TypeError(f"concept maps need a joint-attention backbone (SD3 / SD3.5, Flux.1); "
                        f"{name}'s {adapter.attention_kind}-attention backbone has no concept pass")
    if "image_to_text" in options.record and adapter.attention_kind != "joint":
        raise TypeError(f"image_to_text maps need joint attention (SD3 / SD3.5, Flux.1), where "
                        f"the text tokens attend to the image; {name} has "
                        f"{adapter.attention_kind} attention")


# ====================================================================== collecting
class ExtraMaps:
    """Maps of one kind ("concepts", "image_to_text") recorded beside a run's attention maps, at
    the run's recorded steps and selected sites, on its text rows (``run``: the session's
    ``_Run``). A site that cannot be computed is left out (``meta["skipped"]["<kind> <site>"]``,
    one warning per call)."""

    def __init__(self, run, kind: str, concepts: Sequence[str] | None = None):
        self.run, self.kind = run, kind
        self.concepts = list(concepts) if concepts is not None else None
        self.chunks: dict[str, list[torch.Tensor]] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.steps: list[int] = []
        self.n_tokens: int | None = None
        self.dtype = stored_dtype(kind, run.opts.attention_dtype)  # how the maps are kept

    def rows(self) -> slice | None:
        """The batch rows to compute at this denoiser call; None: nothing recorded now."""
        run = self.run
        if run.aux or run.abandoned or not run.maps_now or run.half == "uncond":
            return None  # (Flux's true CFG: the maps come from the prompt's call)
        return run.rows

    def request(self, layer: str):
        """As ``attention_request``: (rows, tokens, keep_heads, dtype) or None."""
        rows = self.rows()
        if rows is None or layer not in self.run.selected or self.skipped(layer):
            return None
        run = self.run
        return rows, run.n_tokens, run.opts.heads, self.dtype

    def key(self, layer: str) -> str:
        return f"{self.kind} {layer}"

    def skipped(self, layer: str) -> bool:
        return self.key(layer) in self.run.skipped

    def skip(self, layer: str, what: str) -> None:
        self.run.skip(self.key(layer), what)

    def put(self, layer: str, maps: torch.Tensor) -> None:
        """maps: (n, [heads,] T, HW) on the device."""
        lh, lw = self.run.resolutions[layer]
        if maps.shape[-1] != lh * lw:
            return self.skip(layer, f"{maps.shape[-1]} positions, expected {lh}x{lw}")
        if self.n_tokens is None:
            self.n_tokens = int(maps.shape[-2])
        elif int(maps.shape[-2]) != self.n_tokens:
            return self.skip(layer, f"{maps.shape[-2]} tokens, other sites had {self.n_tokens}")
        self.pending[layer] = maps

    def end_step(self) -> None:
        """At a recorded step's ``scheduler.step``: the step's maps to the host."""
        run = self.run
        for layer in run.selected:
            t = self.pending.get(layer)
            if t is None and not self.skipped(layer):
                self.skip(layer, f"not computed at step {run.step}")
            if not self.skipped(layer):
                self.chunks.setdefault(layer, []).append(host_maps(t, run._host))
        self.steps.append(run.step)
        self.pending = {}

    def build(self) -> AttentionMaps | None:
        """The maps of the run (None: no step recorded): :class:`ConceptMaps` for concepts."""
        run = self.run
        if not self.steps:
            return None
        layers = {}
        for layer in run.selected:
            chunks = self.chunks.get(layer)
            if self.skipped(layer) or not chunks or len(chunks) != len(self.steps):
                continue
            layers[layer] = stack_maps(chunks, run.resolutions[layer], (), self.dtype)
        res = {l: run.resolutions[l] for l in layers}
        family = run.session.adapter.family()
        dtype = dtype_name(self.dtype)
        if self.concepts is not None:
            return ConceptMaps(layers, res, self.steps, self.concepts, family=family, dtype=dtype)
        positions = list(run.n_tokens) if isinstance(run.n_tokens, list) \
            else list(range(self.n_tokens or 0))
        return AttentionMaps(layers, res, self.steps, positions, run.opts.heads, family=family,
                             dtype=dtype)


# ====================================================================== image -> text
class ImageToTextRecorder:
    """Observer of a joint-attention site: each text token's attention to the image patches (the
    text queries' softmax over [image; text] keys, the image columns), reduced as the attention
    maps are and handed to ``sink`` (an :class:`ExtraMaps`).

    Flux (``text_first``): q / k RoPE-rotated with the processor's ``(cos, sin)`` (text rows
    first), and the single-stream blocks' joined [text; image] sequence split at the text length
    the double-stream calls of the same transformer call saw, as
    :class:`~sdlens.engine.sites.JointAttentionRecorder` does."""

    def __init__(self, sink: ExtraMaps, text_first: bool = False):
        self.sink, self.text_first = sink, text_first
        self.text_length: int | None = None  # T of the last call with encoder_hidden_states

    def observe(self, attn, layer: str, call: SiteCall) -> None:
        ehs = call.encoder_hidden_states
        if torch.is_tensor(ehs):
            self.text_length = int(ehs.shape[1])
        request = self.sink.request(layer)
        if request is None:
            return
        try:  # sdlens is never the reason a generation fails
            rows, n_tokens, keep_heads, dtype = request
            parts = joint_call_parts(call, rows, self.text_first, self.text_length)
            if parts is None:
                return self.sink.skip(layer, "no text tokens sdlens can find in its joint "
                                             "attention")
            hs, ehs, rope, single = parts
            probs = self.image_probabilities(attn, hs, ehs, rope=rope, text_first=self.text_first,
                                             single=single)
            self.sink.put(layer, reduce_maps(probs, n_tokens, keep_heads, dtype))
        except Exception as e:  # noqa: BLE001 - an unknown processor / layout
            self.sink.skip(layer, f"{type(e).__name__}: {e}")

    @staticmethod
    @torch.no_grad()
    def image_probabilities(attn, hs: torch.Tensor, ehs: torch.Tensor, rope=None,
                            text_first: bool = False, single: bool = False) -> torch.Tensor:
        """(B, heads, T, HW) float32: the text queries' probabilities on the image keys, softmax
        over all keys ([image; text]), from ``hs`` (B, HW, C) and ``ehs`` (B, T, C) as the
        processor receives them (``rope``, ``text_first``, ``single``: as
        :func:`~sdlens.engine.sites.joint_projections`)."""
        p = joint_projections(attn, hs, ehs, ("text_q", "text_k", "image_k"), rope=rope,
                              text_first=text_first, single=single)
        query = p["text_q"]
        query = query.float() * float(getattr(attn, "scale", query.shape[-1] ** -0.5))
        image = torch.matmul(query, p["image_k"].float().transpose(-1, -2))  # (B, heads, T, HW)
        text = torch.matmul(query, p["text_k"].float().transpose(-1, -2))  # (B, heads, T, T)
        lse = torch.logaddexp(image.logsumexp(-1), text.logsumexp(-1))  # (B, heads, T)
        return (image - lse[..., None]).exp()


# ====================================================================== concepts
def concept_maps(image: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """ConceptAttention's map: (n, C, HW) float32, each patch's softmax over the concepts of
    ``concepts`` (n, C, inner) . ``image`` (n, HW, inner) (attention outputs)."""
    scores = torch.matmul(concepts.float(), image.float().transpose(1, 2))  # (n, C, HW)
    return scores.softmax(dim=1)


def concept_vectors(adapter: BackboneAdapter, concepts: Sequence[str], params: dict
                    ) -> torch.Tensor:
    """(C, D): each concept encoded as its own prompt (:meth:`BackboneAdapter.concept_text`) and
    pooled by the mean over its words' token positions (the Word model's: every encoder's)."""
    text = adapter.concept_text(list(concepts), params)  # (C, L, D)
    parts = adapter.text_parts(params)
    out = []
    for i, concept in enumerate(concepts):
        view = tokenize_segments(concept, parts) if parts is not None else tokenize(
            adapter.encoded_prompt(concept, params), adapter.pipe,
            limit=adapter.text_length(params))
        positions = sorted({p for w in view.words for p in w.positions if p < text.shape[1]})
        if not positions:
            raise ValueError(f"the concept {concept!r} has no tokens")
        out.append(text[i, positions].float().mean(0))
    return torch.stack(out)


class ConceptPass:
    """The concept stream of one pipeline call, run beside the denoiser's blocks (forward
    pre-hooks), its maps handed to ``sink`` (see the module docstring)."""

    def __init__(self, adapter: BackboneAdapter, concepts: Sequence[str], sink: ExtraMaps,
                 params: dict):
        self.adapter, self.concepts, self.sink, self.params = adapter, list(concepts), sink, params
        self.blocks = adapter.concept_blocks() or []
        self.vectors: torch.Tensor | None = None  # (C, D), encoded by install()
        self.stream: torch.Tensor | None = None
        self.failed = False

    def install(self, hooks: Hooks) -> None:
        """Encode the concepts (now, before the pipeline call: the text encoders are not run
        inside the denoiser's forward, where model offloading would move the denoiser away) and
        hook the blocks."""
        try:
            with torch.no_grad():
                self.vectors = concept_vectors(self.adapter, self.concepts, self.params)
        except Exception as e:  # noqa: BLE001 - sdlens is never the reason a run fails
            return self._fail(e)
        for i, (site, block) in enumerate(self.blocks):
            hooks.forward_pre_hook(block, functools.partial(self._before_block, i, site),
                                   with_kwargs=True)

    def _fail(self, e: Exception) -> None:
        self.failed, self.stream = True, None
        for site, _ in self.blocks:
            self.sink.skip(site, f"concept pass: {type(e).__name__}: {e}")

    def _before_block(self, i: int, site: str, block, args, kwargs):
        if not self.failed:
            try:
                self._step(i, site, block, args, kwargs)
            except Exception as e:  # noqa: BLE001 - sdlens is never the reason a run fails
                self._fail(e)
        return None

    @torch.no_grad()
    def _step(self, i: int, site: str, block, args, kwargs) -> None:
        rows = self.sink.rows()
        if rows is None:
            self.stream = None
            return
        if i == 0:
            n = self.sink.run.batch  # the rows of the batch items (the text half under CFG)
            self.stream = self.adapter.concept_stream(
                self.vectors[None].expand(n, -1, -1).to(self.adapter.denoiser.device))
        if self.stream is None:
            return
        want = self.sink.request(site) is not None
        step = self.adapter.concept_step(block, self.stream, args, kwargs, rows, want)
        if want:
            self.sink.put(site, store_maps(concept_maps(step.image, step.concepts),
                                           self.sink.dtype))
        self.stream = step.stream
