"""What a backbone family provides to the engine: the seam between sdlens and a model architecture.

sdlens records at *sites*: the places where image tokens attend to text tokens (cross-attention
modules). A site is named by its module path inside the denoiser; the family's :class:`SiteNaming`
gives those paths short aliases, groups and an order (pure naming: saved traces use it without a
pipeline). A :class:`BackboneAdapter` wraps one live pipeline of its family and tells the engine
where the sites are, the resolution of each site's map, the text length, how classifier-free
guidance lays out the denoiser's batch, and how to hook the denoiser's forward.

A new family (SD3, Flux, PixArt, Sana: transformer denoisers) is one subclass of each, listed in
``sdlens.engine.arch.ADAPTERS``.

**The concept pass** (concept maps, ConceptAttention: :mod:`sdlens.engine.joint`) is generic
except for four methods a joint-attention family provides; the rest (encoding each concept as its
own prompt and pooling it over its tokens with the Word model, carrying the concept stream from
block to block, the maps, recording, errors) is :mod:`sdlens.engine.joint`'s:

* :meth:`BackboneAdapter.concept_blocks`: the blocks the concept tokens pass through, in forward
  order, each with the site its maps are named by (one of ``sites()``; SD3, Qwen-Image:
  ``transformer_blocks.N`` and its ``.attn``; Flux.1, Chroma, Kontext, Flux.2: its double-stream
  blocks, then its single-stream blocks; Z-Image: its main layers). None (the default) means no
  concept pass: ``concepts=`` raises TypeError;
* :meth:`BackboneAdapter.concept_text`: the concepts encoded as prompts, laid out as the
  denoiser's text input, position ``p`` of the text axis at ``[:, p]`` (the layout
  ``text_parts`` / ``text_length`` describe, where the Word model finds a concept's tokens:
  :func:`sdlens.engine.joint.concept_pieces`; SD3: ``pipe.encode_prompt`` -> ``(C, 77 + T5,
  4096)``; Flux: its T5 ``prompt_embeds``), and
  :meth:`BackboneAdapter.concept_stream`: the pooled vectors as the first block receives text
  (SD3 and Flux: ``transformer.context_embedder``; Qwen-Image: ``txt_norm``, ``txt_in``;
  Z-Image: ``cap_embedder`` and its caption refiners);
* :meth:`BackboneAdapter.concept_step`: one block of the concept pass, from the block's forward
  arguments (its forward pre-hook's ``args`` / ``kwargs``): the concept tokens go through the
  block's *text-stream* modulation / norms and projections (SD3: ``norm1_context``,
  ``add_q_proj`` / ``add_k_proj`` / ``add_v_proj``, ``norm_added_q`` / ``norm_added_k``; Flux's
  single-stream blocks: the block's one norm and ``to_q`` / ``to_k`` / ``to_v``, with the text
  tokens' rotary embedding; Flux.2's single-stream blocks: the fused ``to_qkv_mlp_proj`` and
  ``to_out``), attend to the image keys and the concept keys (never the prompt's
  text keys; nothing attends to them), and the block's text-stream output path (SD3:
  ``to_add_out``, gates, ``ff_context``; Flux's single-stream blocks: the block's parallel MLP
  and ``proj_out``) gives the stream entering the next block. It returns a
  :class:`ConceptStep`: that stream, and where asked the image tokens' and the concepts' attention
  outputs (before the output projections: both are mixtures of the same value vectors).

The paper's own choices (``concept_method="conceptattention"``, the default) are a family's
``paper_*`` methods and attributes: :meth:`BackboneAdapter.paper_concepts` (how its code encodes
the concepts), :meth:`BackboneAdapter.paper_concept_blocks`, :meth:`BackboneAdapter.paper_default_layers`,
:meth:`BackboneAdapter.paper_concept_temb`, ``paper_time_mean``, ``paper_normalise`` and
``paper_first_piece``.

Everything runs on copies beside the block, under ``torch.no_grad``: the image is unchanged.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch


class SiteNaming:
    """How a family names its sites, without a pipeline.

    Attributes:
        groups: names of the parts of the denoiser a selector may name (e.g. ``"down"``), in
            the denoiser's order; each is also an alias (``expand(group)`` is its path prefix).
    """

    groups: ClassVar[tuple[str, ...]] = ()

    def alias(self, site: str) -> str:
        """Short alias of a site's module path (the path itself where there is none)."""
        return site

    def expand(self, name: str) -> str | tuple[str, ...] | None:
        """The module-path prefix an alias (or group) stands for (or several: Flux's
        ``"blocks"``); None if ``name`` is not one."""
        return None

    def group(self, site: str) -> str | None:
        """The group (one of ``groups``) a site belongs to; None if none."""
        for g in self.groups:
            prefix = self.expand(g)
            prefixes = (prefix,) if isinstance(prefix, str) else (prefix or ())
            if any(site == p or site.startswith(p + ".") for p in prefixes):
                return g
        return None

    def sort_key(self, site: str) -> tuple:
        """Key that puts sites in the denoiser's order."""
        return (site,)


class BlockNaming(SiteNaming):
    """A transformer's sites ``<blocks>.N.<attention>`` <-> ``"<alias>.N"`` (or ``"N"``), in
    block order; the group ``group`` (all of them). ``attention``: the name of the site's
    attention module in a block, ``blocks`` the block list's name (``transformer_blocks``;
    Wan's ``blocks``, Z-Image's ``layers``), ``alias`` a block's short name (``"block"``;
    Z-Image: ``"layer"``), ``group`` the group's (``"blocks"``; Z-Image: ``"layers"``)."""

    groups = ("blocks",)

    def __init__(self, attention: str, blocks: str = "transformer_blocks", alias: str = "block",
                 group: str = "blocks"):
        self.site = re.compile(rf"^{re.escape(blocks)}\.(\d+)\.{re.escape(attention)}$")
        self.blocks, self.short, self.groups = blocks, alias, (group,)

    def alias(self, site: str) -> str:
        m = self.site.match(site)
        return f"{self.short}.{m.group(1)}" if m else site

    def expand(self, name: str) -> str | None:
        if name == self.groups[0]:
            return self.blocks
        m = re.match(rf"^(?:{re.escape(self.short)}\.)?(\d+)$", name)
        return f"{self.blocks}.{int(m.group(1))}" if m else None

    def sort_key(self, site: str) -> tuple:
        m = self.site.match(site)
        return (int(m.group(1)), site) if m else (1 << 30, site)

    def site_of(self, processor_key: str) -> str | None:
        """The site a key of ``denoiser.attn_processors`` belongs to; None for other attention."""
        site = processor_key[: -len(".processor")] if processor_key.endswith(".processor") else ""
        return site if self.site.match(site) else None


class ConceptStep(NamedTuple):
    """One block of the concept pass (:meth:`BackboneAdapter.concept_step`)."""

    stream: torch.Tensor | None  # (n, C, dim): the concepts entering the next block; None: last
    image: torch.Tensor | None  # (n, HW, inner): the image tokens' attention outputs, if asked
    concepts: torch.Tensor | None  # (n, C, inner): the concept tokens' attention outputs, if asked


class KernelLayout(NamedTuple):
    """How one attention-kernel call's sequences split into segments: ``{name: slice}`` of the
    query rows and of the key columns (SDPA's Lq and Lk axes). Names: ``"image"`` (the latent
    patches a map is drawn over: the image being generated), ``"text"`` (the text axis, position
    0 first), ``"image prompt i"`` (IP-Adapter ``i``'s tokens), ``"reference i"`` (an editing
    model's reference image ``i``, 0-based in the pipeline's order: its latent patches, row-major,
    beside the image's: Flux.1 Kontext, Flux.2, Qwen-Image-Edit; :func:`reference_layout`), and
    any other a family has. A segment absent from ``queries`` is not a query of this call
    (cross-attention: only the image queries). Users name reference ``i`` ``"image {i+1}"``
    (``trace.heatmap("image 1")``, as the pipelines' docs number their input images)."""

    queries: dict
    keys: dict
    grids: dict | None = None  # segment -> (rows, columns) of its patches (reference images)


def cross_layout(q_len: int, k_len: int, keys: str = "text") -> KernelLayout:
    """Cross-attention: image queries, keys all of one segment."""
    return KernelLayout({"image": slice(0, q_len)}, {keys: slice(0, k_len)})


def joint_layout(order: tuple[str, ...], lengths: dict, q_len: int, k_len: int
                 ) -> KernelLayout | None:
    """Joint attention: queries and keys are the same sequence of segments in ``order`` with
    these ``lengths``; None when they do not add up to the kernel's (a layout not understood)."""
    spans, at = {}, 0
    for name in order:
        n = int(lengths[name])
        spans[name] = slice(at, at + n)
        at += n
    if at != q_len or at != k_len:
        return None
    return KernelLayout(dict(spans), dict(spans))


def attention_processors(model: torch.nn.Module) -> dict:
    """``{"<module path>.processor": processor}`` of every attention module of ``model``:
    ``model.attn_processors`` where the model has diffusers' ``AttentionMixin``; else (Z-Image's
    transformer has none) read from the modules that have a ``processor`` and ``set_processor``."""
    if hasattr(model, "attn_processors"):
        return dict(model.attn_processors)
    return {f"{name}.processor": m.processor for name, m in model.named_modules()
            if hasattr(m, "set_processor") and getattr(m, "processor", None) is not None}


def set_attention_processors(model: torch.nn.Module, processors: dict) -> None:
    """Set the processors :func:`attention_processors` returned (a dict of the same keys)."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(dict(processors))  # it empties the dict it is given
        return
    for key, proc in processors.items():
        model.get_submodule(key[: -len(".processor")]).set_processor(proc)


REFERENCE = "reference {}"  # the segment name of reference image i (KernelLayout)


def reference_layout(order_before: tuple[str, ...], lengths: dict, references: list[int],
                     q_len: int, k_len: int, grids: list[tuple[int, int]] | None = None
                     ) -> KernelLayout | None:
    """Joint attention over ``order_before`` (e.g. ``("text", "image")``, lengths in
    ``lengths``) followed by the reference images' patches, ``references[i]`` of reference
    ``i`` (segments ``"reference i"``), row-major on a ``grids[i]`` = (rows, columns) grid;
    None when they do not add up to the kernel's.

    A family opts in to reference maps (``record=(..., "reference_maps")``) by laying its
    kernel calls out with this (the grids given): :class:`sdlens.engine.sites.MapRecorder`
    reads every ``"reference i"`` key segment with a grid."""
    names = tuple(REFERENCE.format(i) for i in range(len(references)))
    layout = joint_layout(order_before + names, {**lengths, **dict(zip(names, references))},
                          q_len, k_len)
    if layout is None or grids is None:
        return layout
    if len(grids) != len(references) or any(int(r) * int(c) != n
                                            for (r, c), n in zip(grids, references)):
        return layout._replace(grids=None)  # grids that do not fit: no reference maps
    return layout._replace(grids={n: (int(r), int(c)) for n, (r, c) in zip(names, grids)})


def innermost_processor(processor):
    """The processor under any wrappers that keep it as ``.inner`` (sdlens's site wrapper)."""
    while hasattr(processor, "inner") and hasattr(processor, "layer"):
        processor = processor.inner
    return processor


def image_prompt_calls(processor, call) -> list[int] | None:
    """For an IP-Adapter processor (``to_k_ip``, ``scale``): the adapter index of each of its
    kernel calls after the text's, in call order (an adapter at scale 0 is skipped by the
    processor; with ``ip_adapter_masks`` an adapter attends per reference image, one call each);
    None for another processor."""
    to_k_ip, scales = getattr(processor, "to_k_ip", None), getattr(processor, "scale", None)
    ehs = call.encoder_hidden_states
    if to_k_ip is None or scales is None or not isinstance(ehs, tuple) or len(ehs) != 2:
        return None
    images = list(ehs[1])
    masks = call.extra.get("ip_adapter_masks")
    masks = list(masks) if masks is not None else [None] * len(images)
    out = []
    for i, (emb, scale) in enumerate(zip(images, scales)):
        if (all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0):
            continue
        masked = i < len(masks) and masks[i] is not None
        out += [i] * (int(emb.shape[1]) if masked and emb.ndim == 4 else 1)
    return out


class BackboneAdapter(ABC):
    """One live pipeline of a backbone family, as the engine sees it.

    Construct it through :func:`sdlens.engine.arch.adapter_for`, which picks the family; the
    constructor raises TypeError when the pipeline's denoiser has no sites.

    Class attributes:
        pipelines: the diffusers pipeline classes of this family that sdlens traces.
        families: the model families (``trace.meta["family"]``) whose traces it names.
        naming: the family's :class:`SiteNaming`.
        max_text_tokens: text positions the denoiser attends to at most (CLIP: 77).
        cfg_halves: the halves of the denoiser batch under classifier-free guidance, in batch
            order (diffusers' SD pipelines: ``cat([uncond, text])``).
        attention_kind: what a site's attention is: ``"cross"`` (image queries, text keys) or
            ``"joint"`` (one softmax over image and text keys; the recorder keeps the text
            columns).
        joint_order: joint attention's order of the sequence (SD3: image then text; Flux: text
            then image, which matters where RoPE rotates by position).
        cfg_by_default: whether the pipeline's default call guides (size estimates).
        cfg_arg: the pipeline argument that holds the classifier-free guidance scale (what
            ``sdlens.generate(guidance_scale=)``, a sweep's guidance axis and Studio's CFG box
            set): ``guidance_scale`` in diffusers; Qwen-Image's ``true_cfg_scale``.
        cfg_needs_negative: whether the pipeline guides only when given a negative prompt
            (Qwen-Image's true CFG).
        video: whether the denoiser's latents have a frame axis (Wan: (B, C, F, h, w)).
    """

    pipelines: ClassVar[tuple[str, ...]] = ()
    families: ClassVar[tuple[str, ...]] = ()
    naming: ClassVar[SiteNaming] = SiteNaming()
    max_text_tokens: ClassVar[int] = 77
    cfg_halves: ClassVar[tuple[str, str]] = ("uncond", "text")
    # "cross": a site attends from image tokens to text tokens only (the UNet's sites);
    # "joint": one softmax over [image; text] keys (SD3's MMDiT), in ``joint_order``
    attention_kind: ClassVar[str] = "cross"
    joint_order: ClassVar[tuple[str, str]] = ("image", "text")
    cfg_by_default: ClassVar[bool] = True
    cfg_arg: ClassVar[str] = "guidance_scale"
    cfg_needs_negative: ClassVar[bool] = False
    # a video family: latents (B, C, F, h, w), maps (F, h, w) (:meth:`latent_size`)
    video: ClassVar[bool] = False
    # the steps with maps when RecordOptions.steps is None (None: every step)
    default_map_steps: ClassVar[object] = None

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    @abstractmethod
    def handles(cls, pipe) -> bool:
        """Whether ``pipe`` is of this family (by its components, not its class name)."""

    # ---------------------------------------------------------------- the denoiser
    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The module called once per denoising step (UNet or transformer)."""

    def denoisers(self) -> list[torch.nn.Module]:
        """Every module that predicts a step, in the pipeline's order (one, :attr:`denoiser`,
        except where a pipeline switches experts between steps: Wan 2.2's ``transformer`` /
        ``transformer_2``). The session hooks them all and records them under one trace; their
        sites must have the same names."""
        return [self.denoiser]

    def denoiser_name(self, module: torch.nn.Module) -> str:
        """The pipeline's component name of one of :meth:`denoisers` (``meta["denoiser_steps"]``)."""
        for name in ("unet", "transformer"):
            if getattr(self.pipe, name, None) is module:
                return name
        return type(module).__name__

    @abstractmethod
    def family(self) -> str:
        """The model family (one of ``families``), from the pipeline's components."""

    @abstractmethod
    def default_latent_hw(self) -> tuple[int, int]:
        """Latent (h, w) of the pipeline's default image size."""

    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the denoiser's prediction (and of the latents the scheduler steps)."""

    # the denoiser's forward, as the engine's forward (pre-)hooks see it
    sample_arg: ClassVar[str] = "sample"

    def denoiser_input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The latent input (B_denoiser, C_in, h, w) of one denoiser call, from the arguments a
        forward pre-hook receives; None if it is not a tensor."""
        sample = args[0] if args else kwargs.get(self.sample_arg)
        return sample if torch.is_tensor(sample) else None

    def denoiser_output(self, output) -> torch.Tensor | None:
        """The prediction (B_denoiser, C_out, h, w) of one denoiser call, from what its forward
        returned (a tuple or an output dataclass); None if it is not a tensor."""
        return self.output_tensor(output)

    def latent_size(self, sample: torch.Tensor) -> tuple[int, ...]:
        """The latent grid of one denoiser input (B, C, h, w): (h, w); a video family's (B, C,
        F, h, w): (F, h, w). What :meth:`resolutions` and :meth:`spatial` are given."""
        return (int(sample.shape[-2]), int(sample.shape[-1]))

    def video_meta(self, latent_size: tuple[int, ...], params: dict) -> dict:
        """``trace.meta`` entries of a video family (latent frames, the VAE's temporal
        compression, the video's frames); {} for images."""
        return {}

    def spatial(self, t: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """A latent-shaped tensor as the pipeline holds it (its latents, the denoiser's
        prediction, the scheduler's x0) laid out (B, C, h, w) at latent (h, w); Flux unpacks its
        2x2-packed sequence. Identity where the pipeline holds them so already."""
        return t

    def cfg_calls(self, params: dict) -> tuple[str, ...] | None:
        """Guidance run as separate denoiser calls per step, one per half, in call order (Flux's
        true CFG: ``("text", "uncond")``), for the call's arguments ``params``; None where the
        halves share one batch (``cfg_halves``) or there is no guidance."""
        return None

    def cfg_weight(self, scale: float) -> float | None:
        """The weight ``w`` of the pipeline's guided prediction ``u + w (c - u)`` at guidance
        scale ``scale`` (:attr:`cfg_arg`); None where the pipeline runs unguided at that scale.
        diffusers' rule: ``w = scale`` above 1, unguided at 1 and below."""
        return float(scale) if float(scale) > 1 else None

    def cfg_scale(self, params: dict) -> float | None:
        """The guidance scale of the call (``trace.guidance_scale``)."""
        gs = params.get("guidance_scale")
        return float(gs) if gs is not None else None

    def guidance_meta(self, params: dict) -> dict:
        """Guidance settings of the family for ``trace.meta`` (Flux: the distilled guidance
        value and ``true_cfg_scale``)."""
        return {}

    def auxiliary_call(self, args: tuple, kwargs: dict) -> bool:
        """Whether a denoiser call (its forward pre-hook's arguments) is an extra call that is
        not a step's prediction (SD3.5's skip-layer guidance); such calls are not recorded."""
        return False

    def text_parts(self, params: dict) -> list[tuple[str, object, int]] | None:
        """Several text encoders joined along the text sequence (SD3: CLIP then T5): their
        ``(encoder name, tokenizer or None, length)`` in sequence order, for the pipeline call's
        arguments ``params``; None for one text encoder (77 CLIP positions)."""
        return None

    @abstractmethod
    def activation_bytes(self, latent_hw: tuple[int, int]) -> int:
        """A rough upper estimate of the memory one row of the denoiser's batch needs at
        latent (h, w) during a forward (weights not counted)."""

    # ---------------------------------------------------------------- text
    def text_length(self, params: dict) -> int | None:
        """Text positions the pipeline encodes for a call with ``params`` (its arguments);
        None: the tokenizer's ``model_max_length`` (CLIP: 77)."""
        return None

    def text_prompts(self, prompts: list, params: dict) -> list:
        """Per prompt of the call (before ``num_images_per_prompt``): the text whose tokens
        the sites attend to, where the pipeline gives that encoder another prompt (Flux's T5
        reads ``prompt_2``); the prompts themselves by default."""
        return list(prompts)

    def encoded_prompt(self, prompt: str, params: dict) -> str:
        """The prompt as the pipeline hands it to its tokenizer (e.g. lower-cased)."""
        return prompt

    def text_tokens(self, prompt: str, params: dict) -> list[int] | None:
        """The token ids at the text axis's positions when the pipeline lays its text out other
        than as the tokenizer cuts ``encoded_prompt`` (e.g. a prepended instruction, partly
        kept); None where it does not."""
        return None

    # ---------------------------------------------------------------- sites
    @abstractmethod
    def site_of(self, processor_key: str) -> str | None:
        """The site a key of ``denoiser.attn_processors`` belongs to; None for other processors.
        (Installers wrap the processors that have a site and set them all back with
        ``denoiser.set_attn_processor``.)"""

    def sites(self) -> list[str]:
        """The denoiser's sites (module paths), in the naming's order."""
        keys = [self.site_of(k) for k in attention_processors(self.denoiser)]
        return sorted((s for s in keys if s is not None), key=self.naming.sort_key)

    @abstractmethod
    def resolutions(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """site -> (h, w) of its map when the latents are (h, w)."""

    def heads(self, site: str) -> int:
        """Attention heads of a site."""
        return int(self.denoiser.get_submodule(site).heads)

    # ---------------------------------------------------------------- the kernel's layout
    def kernel_text_length(self, call, denoiser_kwargs: dict) -> int | None:
        """Joint attention: the text tokens in a site call's kernel sequence (default: the
        site call's ``encoder_hidden_states``; a single-stream block reads it from the denoiser
        call, ``denoiser_kwargs``); None where it cannot be told."""
        ehs = call.encoder_hidden_states
        return int(ehs.shape[1]) if torch.is_tensor(ehs) and ehs.ndim == 3 else None

    def kernel_layout(self, site: str, attn, call, index: int, q_len: int, k_len: int,
                      denoiser_kwargs: dict) -> KernelLayout | None:
        """The segments of the ``index``-th kernel call of one call of ``site`` (``attn``: its
        attention module; ``call``: the processor's arguments, a ``SiteCall``; ``q_len`` /
        ``k_len``: the kernel's sequence lengths; ``denoiser_kwargs``: the keyword arguments of
        the denoiser call it is part of). None: a call sdlens does not understand (its maps are
        skipped with one warning).

        Cross-attention (the default): call 0 attends from the image to the text; an IP-Adapter
        processor's later calls attend to its image prompts (``"image prompt i"``). Joint
        attention: one sequence in ``joint_order``, the text's length from
        :meth:`kernel_text_length`, the image the rest."""
        if self.attention_kind == "joint":
            n_text = self.kernel_text_length(call, denoiser_kwargs)
            if n_text is None or n_text >= q_len:
                return None
            return joint_layout(self.joint_order, {"text": n_text, "image": q_len - n_text},
                                q_len, k_len)
        if index == 0:  # the text, as long as the call's text (else: keys sdlens cannot name)
            text = call.encoder_hidden_states
            text = text[0] if isinstance(text, tuple) and text else text
            if not torch.is_tensor(text) or text.ndim != 3 or int(text.shape[1]) != k_len:
                return None
            return cross_layout(q_len, k_len)
        plan = image_prompt_calls(innermost_processor(attn.processor), call)
        if plan is None or index - 1 >= len(plan):
            return None
        return cross_layout(q_len, k_len, f"image prompt {plan[index - 1]}")

    # ---------------------------------------------------------------- concept pass
    def concept_blocks(self) -> list[tuple[str, torch.nn.Module]] | None:
        """``(site, block)`` pairs the concept pass runs through, in forward order; None: the
        backbone has no concept pass (cross-attention backbones: the UNet, PixArt, Sana)."""
        return None

    def concept_text(self, concepts: list[str], params: dict) -> torch.Tensor:
        """(C, L, D): each concept encoded as its own prompt by the pipeline's text encoders as
        the pipeline encodes a prompt of a call with ``params`` (no guidance), laid out as the
        denoiser's text input (position ``p`` of the text axis at ``[:, p]``)."""
        raise NotImplementedError(f"{type(self).__name__} has no concept pass")

    def concept_stream(self, vectors: torch.Tensor) -> torch.Tensor:
        """(n, C, dim): pooled concept vectors (n, C, D) as the first block receives text."""
        raise NotImplementedError(f"{type(self).__name__} has no concept pass")

    def concept_step(self, block: torch.nn.Module, stream: torch.Tensor, args: tuple,
                     kwargs: dict, rows: slice, outputs: bool, method: str = "sdlens",
                     concept_temb: torch.Tensor | None = None,
                     call_kwargs: dict | None = None) -> ConceptStep:
        """One block of the concept pass on batch rows ``rows`` (``stream``: (n, C, dim), the
        rows' concept tokens entering ``block``; ``args`` / ``kwargs``: the block's forward
        arguments); ``outputs``: also return the attention outputs the maps are made of.
        ``method``: ``"sdlens"`` or ``"conceptattention"`` (the paper's code's choices, where
        they differ per family); ``concept_temb``: (n, dim), the conditioning the concept
        stream is modulated with, where it is not the block's own (:meth:`paper_concept_temb`);
        ``call_kwargs``: the denoiser call's arguments, keyword ones by name and positional ones
        by index (where a block's own arguments do not tell the text's length or the generated
        image's tokens: a single-stream block given the joined sequence, reference images'
        patches beside the image's, Z-Image's latents)."""
        raise NotImplementedError(f"{type(self).__name__} has no concept pass")

    # ConceptAttention's own choices (concept_method="conceptattention"), per family: how its code
    # encodes concepts, which blocks it runs them through, which it averages by default
    paper_time_mean = False  # vectors averaged over the recorded steps before the product (SD3)
    paper_normalise = False  # concept vectors L2-normalised before the product (SD3)
    # each concept its own encoding at its first piece (sdlens.engine.joint.concept_vectors), the
    # transfer of the paper's "first T5 token" to a chat-templated causal LM encoder (whose first
    # position is the template's, the same for every concept): Flux.2, Qwen-Image, Z-Image
    paper_first_piece = False

    def paper_concepts(self, concepts: list[str], params: dict) -> tuple[torch.Tensor, int]:
        """``(vectors (C', D), lead)``: the concepts encoded as ConceptAttention's code encodes
        them for this family; the first ``lead`` rows go through the stream but are left out of
        the softmax (SD3's start token)."""
        raise NotImplementedError(f"{type(self).__name__} has no ConceptAttention recipe")

    def paper_concept_blocks(self) -> list[tuple[str, torch.nn.Module]] | None:
        """The blocks ConceptAttention's code runs the concepts through (default: all of
        :meth:`concept_blocks`)."""
        return self.concept_blocks()

    def paper_default_layers(self) -> list[str] | None:
        """The sites ConceptAttention's pipeline averages by default (None: all)."""
        return None

    def paper_concept_temb(self, temb: torch.Tensor, call_kwargs: dict,
                           rows: slice) -> torch.Tensor | None:
        """(n, dim): the conditioning ConceptAttention modulates the concept stream with, from
        the block's ``temb`` rows and the denoiser call's keyword arguments; None: ``temb``."""
        return None

    # ---------------------------------------------------------------- guidance layout
    def cfg_rows(self, batch: int) -> dict[str, slice]:
        """Rows of each half (``cfg_halves``) in a denoiser batch of ``2 * batch`` rows."""
        return {half: slice(i * batch, (i + 1) * batch) for i, half in enumerate(self.cfg_halves)}

    def split_cfg(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """A denoiser batch (input or output) under classifier-free guidance, by half."""
        rows = self.cfg_rows(t.shape[0] // 2)
        return {half: t[r] for half, r in rows.items()}

    # ================================================================ asked from outside the engine
    # (sdlens.engine.batch, sdlens.experiments: what they used to read off the pipeline's
    # components themselves)
    def join_cfg(self, halves: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`split_cfg`: the halves (each (B, ...)) as one denoiser batch
        (2B, ...), in ``cfg_halves`` order."""
        return torch.cat([halves[half] for half in self.cfg_halves])

    def output_tensor(self, output) -> torch.Tensor | None:
        """Everything one denoiser call predicted (B_denoiser, C, ...), from what its forward
        returned (a tuple or an output dataclass): the tensor the pipeline's classifier-free
        guidance combines, every channel (PixArt guides its noise and variance channels
        together; :meth:`denoiser_output` keeps the noise); None if it is not a tensor."""
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        return out if torch.is_tensor(out) else None

    def with_output_tensor(self, output, tensor: torch.Tensor):
        """``output`` (what the denoiser's forward returned) with :meth:`output_tensor` replaced
        by ``tensor``, of the same kind: a new tuple / list, or the output dataclass updated."""
        if isinstance(output, tuple):
            return (tensor, *output[1:])
        if isinstance(output, list):
            return [tensor, *output[1:]]
        if torch.is_tensor(output):
            return tensor
        output.sample = tensor
        return output

    def embeds_guidance(self) -> bool:
        """Whether the guidance value is an input of the denoiser (LCM UNets' guidance
        embedding; a guidance-distilled transformer): then every value needs calls of its own
        (a batch cannot mix them)."""
        return False

    def distilled_guidance(self) -> bool:
        """Whether the call's ``guidance_scale`` is a guidance-distilled model's guidance value
        (Flux.1-dev) rather than a classifier-free guidance scale."""
        return False

    def text_encoders(self, params: dict) -> list["TextEncoder"]:
        """The pipeline's text encoders whose hidden states lie on the denoiser's text axis, for
        a call with ``params``, each with its tokenizer and its positions on that axis (an
        encoder that only gives a pooled vector, Flux's CLIP, is not one). By default the
        ``text_encoder`` / ``text_encoder_2`` the pipeline has, both at the axis's start (SDXL
        joins its two CLIPs channel-wise), ``text_length`` (or the tokenizer's
        ``model_max_length``) long."""
        out = []
        for suffix in ("", "_2"):
            out += self._text_encoder("tokenizer" + suffix, "text_encoder" + suffix, 0,
                                      self.text_length(params))
        return out

    def _text_encoder(self, tok_name: str, enc_name: str, start: int,
                      length: int | None) -> list["TextEncoder"]:
        """``[TextEncoder]`` for the pipeline's components of these names; [] where either is
        missing or None. ``length`` None: the tokenizer's ``model_max_length``."""
        tok, enc = getattr(self.pipe, tok_name, None), getattr(self.pipe, enc_name, None)
        if tok is None or enc is None:
            return []
        return [TextEncoder(enc_name, tok, enc, int(start),
                            int(tok.model_max_length if length is None else length))]

    def token_embeddings(self, encoder: torch.nn.Module) -> list[torch.nn.Module]:
        """The token-embedding modules of a text encoder (one of :meth:`text_encoders`): its
        input embeddings and every embedding of the same vocabulary (T5's encoder calls an
        ``embed_tokens`` of its own, a module apart from ``get_input_embeddings()`` in recent
        transformers). A hook on them sees every token the encoder embeds."""
        rows = encoder.get_input_embeddings().weight.shape[0]
        return [m for m in encoder.modules()
                if isinstance(m, torch.nn.Embedding) and m.weight.shape[0] == rows]


class TextEncoder(NamedTuple):
    """A text encoder of the pipeline (:meth:`BackboneAdapter.text_encoders`): its hidden states
    are positions ``start .. start + length`` of the denoiser's text axis."""

    name: str  # the pipeline's component, e.g. "text_encoder_2"
    tokenizer: object
    encoder: torch.nn.Module
    start: int
    length: int


def joint_activation_bytes(transformer, tokens: int, heads: int | None = None,
                           dim: int | None = None) -> int:
    """A joint-attention transformer's peak activations for one sample of ``tokens`` (patches +
    text tokens): 30 tensors of the sequence's width (norms, projections, the 4x MLP) and one
    attention score matrix (heads x tokens^2), at the transformer's dtype. ``heads`` / ``dim``
    (the width): from the config's ``num_attention_heads`` / ``attention_head_dim`` unless
    given (Z-Image names them ``n_heads`` / ``dim``)."""
    dtype = transformer.dtype
    itemsize = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    heads = int(heads if heads is not None else transformer.config.num_attention_heads)
    dim = int(dim if dim is not None else heads * int(transformer.config.attention_head_dim))
    return 30 * dim * tokens * itemsize + heads * tokens * tokens * itemsize
