"""What sdlens records beside joint attention's text maps (SD3 / SD3.5, Flux.1, Flux.1 Kontext,
Chroma, Flux.2, Qwen-Image, Z-Image; any backbone adapter that provides the concept pass,
:mod:`sdlens.engine.arch.base`): concept maps and image->text maps.

**Concept maps** follow ConceptAttention (Helbling, Meral, Hoover, Yeh, Chau: "ConceptAttention:
Diffusion Transformers Learn Highly Interpretable Features", ICML 2025; its code:
github.com/helblazer811/ConceptAttention). Concepts are chosen at trace time
(``sdlens.trace(pipe, concepts=["circle", "square", "background"])``) and need not be words of the
prompt. Two methods (``concept_method=``, :class:`~sdlens.engine.options.RecordOptions`):

**"conceptattention" (the default): the paper's code's choices**, family by family; with default
arguments ``trace.heatmap("circle", maps="concepts")`` is the paper's pipeline's heatmap
(``tests/engine/test_concept_paper.py`` ports its computation and checks r >= 0.99).

* Flux.1 (its ``concept_attention/flux/``; :class:`~sdlens.engine.arch.flux.FluxAdapter`'s
  ``paper_*`` methods):

  1. a concept is T5's encoding of the concept alone, its **first token** (``utils.py``,
     ``embed_concepts``: ``t5(concept)[0, 0]``), entering through ``context_embedder``;
  2. the concept stream is modulated with **time + guidance + the pooled-text embedding of a
     zero vector** (``embed_concepts`` returns ``zeros_like`` of the CLIP vector as the
     concepts' ``y``; ``flux/dit.py``: ``concept_vec = time_in + guidance_in + vector_in(y)``),
     not with the prompt's pooled vector;
  3. the concepts pass the **double-stream blocks only** (``flux/dit.py``: the loop over
     ``double_blocks``; the single-stream blocks never see them), attending to [concepts;
     image] (``flux/dit_block.py``), RoPE ids zeros (as the text's);
  4. the map at a block and step: ``softmax_c(o_c . o_x)``, ``o_x`` the image tokens' output of
     the block's own [text; image] attention, both before the output projections;
  5. the heatmap averages the per-step softmax maps over **every recorded step** and the
     **last four double-stream blocks** (``flux/pipeline.py``: ``layer_indices =
     range(15, 19)``, ``timesteps = range(num_inference_steps)``): blocks 15-18 of Flux.1's 19;
     a transformer with fewer (the shrunk test beds) uses its last four, all of them when it
     has four or fewer (:attr:`~sdlens.trace.maps.ConceptMaps.default_layers`). The maps of
     every double-stream block are recorded; ``layers=`` chooses others.

* SD3 / SD3.5 (its ``concept_attention/sd3/``; :class:`~sdlens.engine.arch.mmdit.MMDiTAdapter`):

  1. **all concepts as one prompt** (``pipeline.py``, ``encode_concepts``: ``" ".join(concepts)``
     through CLIP-L, CLIP-G and T5), its **first C + 1 positions** kept: the CLIP start token
     and one token per concept (a concept of several CLIP tokens shifts the rest, as there);
  2. the start token goes through the stream and is **dropped before the softmax**
     (``concept_attention_pipeline.py``, ``_compute_heatmaps``: ``concept_vectors[:, :, 1:]``);
  3. the concept stream is modulated with the block's own ``temb`` (the prompt's pooled vector:
     ``dit_block.py`` passes ``temb`` to ``norm1_context`` for the concepts too);
  4. the image vectors come from a **separate attention of the image over [image; concepts]**
     (``dit_block.py`` calls the block's attention a second time with the concepts in place of
     the prompt), not from the block's own image output;
  5. the vectors are **averaged over the recorded steps before** the dot product, the concept
     vectors **L2-normalised** (``_compute_heatmaps``), softmax over concepts, mean over **all
     blocks**. sdlens stores, at each recorded step, the map of the vectors averaged over the
     recorded steps so far, so the **last recorded step's map is the paper's**; the default
     heatmap reads that step (:attr:`~sdlens.trace.maps.ConceptMaps.default_steps` ``"last"``;
     ``steps=`` / ``per_step=True`` read the running averages);
  6. batch: the paper's code reads **row 0 of the transformer's batch**, which is the image at its
     default (a turbo model, no CFG) and the *unconditional* row under CFG. sdlens computes every
     batch item's maps from its conditional (text) rows; without CFG and with one image the two
     are the same.

* The families ConceptAttention's code has no path for (Flux.1 Kontext, Chroma, Flux.2,
  Qwen-Image, Z-Image): **sdlens's transfer of its Flux recipe**, not code of the paper (each
  adapter's module docstring says what it becomes there):

  1. a concept is one vector of its own encoding as a prompt: T5's first token where the
     encoder is T5 (Kontext, Chroma: as Flux.1); with a chat-templated causal LM (Flux.2's
     Mistral-3 / Qwen3, Qwen-Image's Qwen2.5-VL, Z-Image's Qwen3), whose position 0 is the
     template's, the same for every concept, the concept's **first piece** (T5's position 0 is
     the concept's first piece: :func:`concept_pieces`; the adapter's ``paper_first_piece``);
  2. the modulation: time + guidance + a zero pooled vector where there is a pooled vector
     (Kontext, as Flux.1); Chroma (its approximator reads only the timestep, a guidance fixed at
     0 and the modulation's index), Flux.2 (time + guidance), Qwen-Image and Z-Image (the
     timestep) have no pooled text, so the paper's recipe is their own text modulation;
  3. the double-stream blocks only (Qwen-Image: every block is one; Z-Image has none, so its
     main single-stream layers, where image and text meet), the concepts attending to [image;
     concepts] (the image stream with any reference image's patches, as the text's; the maps
     over the generated image's), every concept at the first text position's rotary embedding;
  4. the map as Flux.1's, per step, the heatmap averaging every step and the **last four**
     of those blocks.

**"sdlens"** (the variant sdlens had first; kept as a named option): the same core
(``softmax_c(o_c . o_x)``), with these choices instead:

1. **Encoding.** Each concept is encoded as its own short prompt by the pipeline's own text
   encoders (SD3: CLIP-L, CLIP-G and T5, at the call's ``max_sequence_length``; Flux.1, Chroma:
   T5; Flux.2, Qwen-Image, Z-Image: the chat-templated LM, as the pipeline encodes a prompt) and
   pooled into one vector: the mean over its tokens (its words' token positions, from the one
   Word model, start / end tokens and padding left out), as a word's heatmap is pooled.
2. **The concept stream** is modulated with the prompt's own conditioning (the block's ``temb``)
   and carried through **every** block (Flux: the single-stream blocks too, through their
   shared path, Flux.2's fused one; Z-Image: its main layers:
   :meth:`~sdlens.engine.arch.base.BackboneAdapter.concept_step`). Its queries attend
   to the image keys and the concept keys, never the prompt's; nothing attends to them.
3. **The map** at a recorded site and step: ``o_x`` the image tokens' output of the block's own
   attention (over [image; prompt]), ``o_c`` the concepts', per step; the heatmap pools every
   recorded block and step.

Which is closer to the ground truth on the shipped SD3 model "shapes-mmdit" is measured by
``python -m sdlens.models.shapes.card --concept-methods`` (``weights_mmdit/concept_methods.json``,
reported in its card).

Both: at a recorded site, with ``o_x`` (n, HW, inner) and ``o_c`` (n, C, inner) before the
output projections (both are mixtures of the same value vectors): ``softmax_c(o_c . o_x)`` ->
each patch's distribution over the concepts, (C, h, w) per batch item; the maps of all recorded
sites and steps are ``trace.concepts`` (:class:`~sdlens.trace.maps.ConceptMaps`, ``(steps,
batch, concepts, h, w)``, with the method and its default layers / steps), pooled by
``trace.heatmap("circle", maps="concepts")`` as word heatmaps are.

Everything is computed beside the blocks, from their forward pre-hooks' arguments, under
``torch.no_grad``, on the text (conditional) rows of the batch: the image is bit-for-bit the
untraced one. Cost per recorded step: the concepts' projections and attention at every block
(C queries), and one extra image attention at each recorded site; the paper's SD3 recipe also
keeps a float32 running sum of both vectors per recorded site on the device.

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
        raise TypeError(f"concept maps need a joint-attention backbone with a concept pass (SD3 / "
                        f"SD3.5, Flux.1, Flux.1 Kontext, Chroma, Flux.2, Qwen-Image, Z-Image); "
                        f"{name}'s {adapter.attention_kind}-attention backbone has none")
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


def concept_pieces(adapter: BackboneAdapter, concept: str, params: dict,
                   length: int) -> list[int]:
    """The positions of ``concept``'s own pieces on the text axis when it is encoded as a prompt
    (:meth:`BackboneAdapter.concept_text`, ``length`` positions): its words' token positions
    from the Word model (the adapter's ``text_parts`` where the family has segments, else the
    tokenizer's cut of its ``encoded_prompt``), start / end tokens, templates and padding left
    out. ValueError when it has none."""
    parts = adapter.text_parts(params)
    view = tokenize_segments(concept, parts) if parts is not None else tokenize(
        adapter.encoded_prompt(concept, params), adapter.pipe, limit=adapter.text_length(params))
    positions = sorted({p for w in view.words for p in w.positions if p < length})
    if not positions:
        raise ValueError(f"the concept {concept!r} has no tokens")
    return positions


def concept_vectors(adapter: BackboneAdapter, concepts: Sequence[str], params: dict,
                    first: bool = False) -> torch.Tensor:
    """(C, D): each concept encoded as its own prompt (:meth:`BackboneAdapter.concept_text`),
    pooled by the mean over its pieces (:func:`concept_pieces`: the Word model's, every
    encoder's), or, ``first``, its first piece's vector (``paper_first_piece``)."""
    text = adapter.concept_text(list(concepts), params)  # (C, L, D)
    out = []
    for i, concept in enumerate(concepts):
        pieces = concept_pieces(adapter, concept, params, text.shape[1])
        out.append(text[i, pieces[:1] if first else pieces].float().mean(0))
    return torch.stack(out)


class ConceptPass:
    """The concept stream of one pipeline call, run beside the denoiser's blocks (forward
    pre-hooks), its maps handed to ``sink`` (see the module docstring); ``method``:
    ``"conceptattention"`` or ``"sdlens"``."""

    def __init__(self, adapter: BackboneAdapter, concepts: Sequence[str], sink: MapSink,
                 params: dict, method: str = "conceptattention"):
        self.adapter, self.concepts, self.sink, self.params = adapter, list(concepts), sink, params
        self.paper = method == "conceptattention"
        self.method = method
        self.blocks = (adapter.paper_concept_blocks() if self.paper
                       else adapter.concept_blocks()) or []
        self.vectors: torch.Tensor | None = None  # (C', D), encoded by install()
        self.lead = 0  # leading stream tokens left out of the softmax (SD3's start token)
        self.stream: torch.Tensor | None = None
        self.call_kwargs: dict = {}  # the denoiser call's arguments (Flux's pooled vector, ...)
        self.temb: torch.Tensor | None = None  # the concepts' conditioning, this call
        self.sums: dict[str, list] = {}  # SD3, the paper's way: per site [sum o_x, sum o_c, n]
        self.failed = False

    def install(self, hooks: Hooks) -> None:
        """Encode the concepts (now, before the pipeline call: the text encoders are not run
        inside the denoiser's forward, where model offloading would move the denoiser away) and
        hook the blocks."""
        describe = getattr(self.sink, "describe", None)
        if describe is not None:
            paper = self.paper
            describe("concepts", sites=[site for site, _ in self.blocks], method=self.method,
                     default_layers=self.adapter.paper_default_layers() if paper else None,
                     default_steps="last" if paper and self.adapter.paper_time_mean else None)
        try:
            with torch.no_grad():
                if self.paper and not self.adapter.paper_first_piece:
                    self.vectors, self.lead = self.adapter.paper_concepts(self.concepts,
                                                                          self.params)
                else:
                    self.vectors = concept_vectors(self.adapter, self.concepts, self.params,
                                                   first=self.paper)
        except Exception as e:  # noqa: BLE001 - sdlens is never the reason a run fails
            return self._fail(e)
        hooks.forward_pre_hook(self.adapter.denoiser, self._before_call, with_kwargs=True)
        for i, (site, block) in enumerate(self.blocks):
            hooks.forward_pre_hook(block, functools.partial(self._before_block, i, site),
                                   with_kwargs=True)

    def _before_call(self, module, args, kwargs):
        # positional arguments under their index (Z-Image's pipeline passes its latents so)
        self.call_kwargs = {**dict(enumerate(args)), **kwargs} if args else kwargs
        return None

    def _fail(self, e: Exception) -> None:
        self.failed, self.stream = True, None
        blocks = self.blocks or self.adapter.concept_blocks() or []
        for site, _ in blocks:
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
            self.temb = None
            temb = kwargs["temb"] if "temb" in kwargs else (args[2] if len(args) > 2 else None)
            if self.paper and torch.is_tensor(temb):  # (Flux.2's blocks get no "temb")
                self.temb = self.adapter.paper_concept_temb(temb[rows], self.call_kwargs, rows)
        if self.stream is None:
            return
        request = self.sink.request("concepts", site)
        step = self.adapter.concept_step(block, self.stream, args, kwargs, rows,
                                         request is not None, method=self.method,
                                         concept_temb=self.temb, call_kwargs=self.call_kwargs)
        if request is not None:
            image, concepts = step.image, step.concepts
            if self.paper and self.adapter.paper_time_mean:  # the mean over the steps so far
                acc = self.sums.get(site)
                if acc is None:
                    acc = self.sums[site] = [image.float(), concepts.float(), 1]
                else:
                    acc[0], acc[1], acc[2] = acc[0] + image.float(), acc[1] + concepts.float(), \
                        acc[2] + 1
                image, concepts = acc[0] / acc[2], acc[1] / acc[2]
            concepts = concepts[:, self.lead:]
            if self.paper and self.adapter.paper_normalise:
                concepts = concepts.float()
                concepts = concepts / (concepts.norm(dim=-1, keepdim=True) + 1e-8)
            self.sink.put("concepts", site, store_maps(concept_maps(image, concepts), request[3]))
        self.stream = step.stream
