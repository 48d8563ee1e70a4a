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

**Image->text maps** (``record=(..., "image_to_text")``) are read at the attention kernel with the
text->image maps (:class:`~sdlens.engine.sites.MapRecorder`): each text token's attention to the
image patches, its query's softmax over all the kernel's keys, the image columns, so a token's
map sums to its *image share*. ``trace.image_to_text``: (steps, batch, tokens, h, w), tokens as
``trace.attention``'s.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from sdlens.analysis.tokens import tokenize, tokenize_segments
from sdlens.engine.arch import BackboneAdapter
from sdlens.engine.sites import Hooks, MapSink
from sdlens.trace.compact import store_maps


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

    def __init__(self, adapter: BackboneAdapter, concepts: Sequence[str], sink: MapSink,
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
            self.sink.skip("concepts", site, f"concept pass: {type(e).__name__}: {e}")

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
            n = rows.stop - rows.start  # the rows of the batch items (the text half under CFG)
            self.stream = self.adapter.concept_stream(
                self.vectors[None].expand(n, -1, -1).to(self.adapter.denoiser.device))
        if self.stream is None:
            return
        request = self.sink.request("concepts", site)
        step = self.adapter.concept_step(block, self.stream, args, kwargs, rows,
                                         request is not None)
        if request is not None:
            self.sink.put("concepts", site,
                          store_maps(concept_maps(step.image, step.concepts), request[3]))
        self.stream = step.stream
