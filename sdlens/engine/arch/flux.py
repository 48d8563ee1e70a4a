"""The Flux.1 family (``FluxTransformer2DModel``: FluxPipeline, FluxImg2ImgPipeline,
FluxInpaintPipeline; Flux.1-dev and -schnell), and beside it the families that share its blocks:
Chroma (:class:`ChromaAdapter`) and Flux.1 Kontext (:class:`FluxKontextAdapter`, whose reference
image is a kernel segment of its own, ``"reference 0"``). Flux.2 is :mod:`sdlens.engine.arch.flux2`.

**Sites.** Flux has two kinds of blocks, and image tokens attend to text tokens in both:

* the double-stream blocks ``transformer_blocks.N.attn`` (aliases ``"double.N"``, group
  ``"double"``): joint attention as SD3's, but with the text tokens FIRST. ``FluxAttnProcessor``
  concatenates ``[text; image]`` queries, keys and values (text keys from ``add_k_proj`` /
  ``norm_added_k``), then rotates queries and keys with the RoPE of the whole sequence
  (``image_rotary_emb``, text positions first);
* the single-stream blocks ``single_transformer_blocks.N.attn`` (aliases ``"single.N"``, group
  ``"single"``): one attention over the concatenated ``[text; image]`` hidden states, with the
  same ``to_q`` / ``to_k`` for both parts; the processor receives no ``encoder_hidden_states``, so
  the text length (T5's sequence, ``max_sequence_length``) is the one the double-stream blocks of
  the same transformer call saw.

``"blocks"`` names every site (double then single); the naming's order is the transformer's
(double 0..18, then single 0..37). The recorded map of a site is each image token's row of the
full softmax over ``[text; image]`` keys, its text columns (computed from the RoPE-rotated q / k,
as the processor does, read at its kernel call: :class:`sdlens.engine.sites.MapRecorder`).
Maps are at the latents' resolution / 2 (the 2x2 packing).

**Text.** Only T5's sequence is attended to (CLIP-L gives the pooled vector): the text axis is one
segment, ``("t5", tokenizer_2, max_sequence_length)`` (512 by default); padding positions are left
out of the maps by default as for SD3. T5 reads ``prompt_2`` where the call gives one, so the
trace's tokens and words are then ``prompt_2``'s (``trace.prompts`` stays ``prompt``).

**Latents.** The pipelines hold the latents packed: (B, h/2 * w/2, 4 C), 2x2 patches. The
transformer's input, output, the scheduler's tensors and the callback's latents are unpacked
to (B, C, h, w) (:meth:`FluxAdapter.spatial`, the inverse of the pipeline's ``_pack_latents``),
so a Flux trace's latents / noise / x0 are laid out as SD's. (h, w) comes from the transformer's
``img_ids`` (row and column of each packed token).

**Guidance.** Flux.1-dev is guidance-distilled: the guidance value (``guidance_scale``, 3.5 by
default) is an input of the transformer, called once per step; there is no unconditional pass,
so ``trace.noise_uncond`` is None and ``trace.guidance_scale`` is that value
(``meta["distilled_guidance"]`` too; None for a transformer without ``guidance_embeds``, as
schnell, which ignores it). With ``true_cfg_scale > 1`` and a negative prompt the pipeline
calls the transformer twice per step, the prompt first, then the negative prompt
(:meth:`FluxAdapter.cfg_calls`), and guides with ``neg + true_cfg_scale * (pos - neg)``: then
``trace.noise_uncond`` is the negative call's prediction, ``trace.noise_text`` the prompt's,
``trace.do_cfg`` is True and ``trace.guidance_scale`` is ``true_cfg_scale`` (the scale of that
combination; ``meta["true_cfg_scale"]`` always holds it). Maps are recorded from the prompt's
call. The schedule is the table's flow row (x0 = x_t - sigma v).

**Concept maps** (``concepts=[...]``, :mod:`sdlens.engine.joint`, whose docstring lists both
methods' choices; the seam in :mod:`sdlens.engine.arch.base`). The default,
``concept_method="conceptattention"``, is ConceptAttention's Flux code (Helbling et al., ICML
2025; github.com/helblazer811/ConceptAttention): each concept T5's first token of its own
encoding (:meth:`FluxAdapter.paper_concepts`), modulated with time + guidance + a zero pooled
vector (:meth:`FluxAdapter.paper_concept_temb`), through the double-stream blocks only, the
heatmap pooling the last four (:meth:`FluxAdapter.paper_default_layers`). The ``"sdlens"``
variant encodes the concepts as prompts by T5 (``pipe.encode_prompt``'s ``prompt_embeds``),
pools them over their pieces, modulates them with the block's ``temb`` and carries them through
every block, double-stream then single-stream (:meth:`FluxAdapter.concept_step`):

* a double-stream block: the text stream's path, ``norm1_context`` (AdaLN with the block's
  ``temb``), ``add_q_proj`` / ``add_k_proj`` / ``add_v_proj``, ``norm_added_q`` /
  ``norm_added_k``, attention over the image keys and the concepts' own, then ``to_add_out``,
  the gates, ``norm2_context`` / ``ff_context``;
* a single-stream block: the block's one shared path (its ``norm``, ``to_q`` / ``to_k`` /
  ``to_v``, ``norm_q`` / ``norm_k``), attention over the image part of the joined sequence and
  the concepts, then the parallel MLP (``proj_mlp``) beside it and ``proj_out``, gated. The
  image tokens' attention output (the map's other factor) is the image rows of the joined
  sequence's attention (before ``proj_out``).

Queries and keys are rotated as the processor rotates them: the image part with its rows of
``image_rotary_emb``. The concepts have no position of their own in ``txt_ids``; they get the
first text position's rotary embedding. The Flux pipelines' ``txt_ids`` are zeros, so every text
token's rotation, and the concepts', is the identity: concepts are placed exactly as the
prompt's text tokens are.

The same :meth:`FluxAdapter.concept_step` serves the families built on these blocks, each
supplying its modulation (:meth:`FluxAdapter._concept_norm`): Chroma (the approximator's
vectors, and its float text mask on the image's own attention), Flux.1 Kontext (the reference's
patches in the image stream: the concepts attend to them as the text does, the maps are over the
generated image's patches, :meth:`FluxAdapter._concept_noise`) and Flux.2
(:mod:`sdlens.engine.arch.flux2`: shared modulation, fused single-stream projections). A
single-stream block given the joined [text; image] sequence (Chroma's, Flux.2's) is split at
the transformer call's text length.

**Image->text maps** (``record`` with ``"image_to_text"``) are the text queries' image columns of
the same RoPE-rotated softmax (the single-stream blocks' text rows of the joined sequence), and
**token reweighting** (:class:`sdlens.engine.sites.Reweight`, at the kernel) scales the image queries'
RoPE-rotated probabilities on the chosen text columns, in both block kinds (the single-stream
blocks: the image rows of the attention output before ``proj_out``); true CFG's negative call is
not reweighted.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from sdlens.engine.arch.base import (BackboneAdapter, ConceptStep, SiteNaming, TextEncoder,
                                     joint_activation_bytes, reference_layout)

_DOUBLE, _SINGLE = "transformer_blocks", "single_transformer_blocks"


class FluxNaming(SiteNaming):
    """``transformer_blocks.N.attn`` <-> ``"double.N"``, ``single_transformer_blocks.N.attn`` <->
    ``"single.N"``; groups ``"double"`` and ``"single"``; ``"blocks"``: all of them."""

    groups = ("double", "single")
    site = re.compile(rf"^({_DOUBLE}|{_SINGLE})\.(\d+)\.attn$")
    _alias = re.compile(r"^(double|single)(?:\.(\d+))?$")
    _prefix = {"double": _DOUBLE, "single": _SINGLE}

    def alias(self, site: str) -> str:
        m = self.site.match(site)
        if not m:
            return site
        return f"{'double' if m.group(1) == _DOUBLE else 'single'}.{m.group(2)}"

    def expand(self, name: str) -> str | tuple[str, ...] | None:
        if name == "blocks":
            return (_DOUBLE, _SINGLE)
        m = self._alias.match(name)
        if not m:
            return None
        prefix = self._prefix[m.group(1)]
        return prefix if m.group(2) is None else f"{prefix}.{int(m.group(2))}"

    def sort_key(self, site: str) -> tuple:
        m = self.site.match(site)
        return ((0 if m.group(1) == _DOUBLE else 1), int(m.group(2)), site) if m \
            else (2, 1 << 30, site)

    def site_of(self, processor_key: str) -> str | None:
        site = processor_key[: -len(".processor")] if processor_key.endswith(".processor") else ""
        return site if self.site.match(site) else None


class FluxAdapter(BackboneAdapter):
    """A Flux.1 pipeline (``pipe.transformer`` a ``FluxTransformer2DModel``)."""

    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    families = ("flux",)
    naming = FluxNaming()
    max_text_tokens = 512  # T5 at the pipelines' default max_sequence_length
    sample_arg = "hidden_states"
    attention_kind = "joint"
    joint_order = ("text", "image")  # FluxAttnProcessor: cat([text, image]), RoPE over both
    cfg_by_default = False  # a default call is one transformer call per step

    def __init__(self, pipe):
        super().__init__(pipe)
        self._sites = super().sites()
        self._ids_hw: tuple | None = None  # (img_ids, (h, w)): read once per pipeline call
        if not self._sites:
            raise TypeError(f"sdlens cannot trace {type(pipe).__name__}: its transformer has no "
                            "attention blocks")

    @classmethod
    def handles(cls, pipe) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return (type(transformer).__name__ == "FluxTransformer2DModel"
                and type(pipe).__name__ in cls.pipelines)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def family(self) -> str:
        return "flux"

    def default_latent_hw(self) -> tuple[int, int]:
        size = int(getattr(self.pipe, "default_sample_size", 128))
        return (size, size)

    def latent_channels(self) -> int:
        """Channels of the unpacked latents (the packed ones hold 2x2 patches: 4x as many)."""
        return int(self.pipe.transformer.config.in_channels) // 4

    # ---------------------------------------------------------------- packed latents
    def _latent_hw(self, img_ids, n_tokens: int) -> tuple[int, int]:
        """Unpacked latent (h, w) from ``img_ids`` (N, 3): [0, row, column] of each packed token
        (Flux.2's (N, 4): [t, row, column, 0])
        (read once per ids tensor: the pipeline passes the same one at every step)."""
        if self._ids_hw is not None and self._ids_hw[0] is img_ids:
            return self._ids_hw[1]
        hw = None
        if torch.is_tensor(img_ids) and img_ids.shape[-1] >= 3:  # Flux.2: [t, row, column, l]
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            rows, cols = (int(v) + 1 for v in ids[:, 1:3].amax(0).tolist())
            hw = (2 * rows, 2 * cols) if rows * cols == n_tokens else None
        if hw is None:  # no ids sdlens can read: a square
            side = int(round(n_tokens ** 0.5))
            hw = (2 * side, 2 * side)
        self._ids_hw = (img_ids, hw)
        return hw

    def denoiser_input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The latents the transformer is given, unpacked: (B, C, h, w)."""
        packed = args[0] if args else kwargs.get(self.sample_arg)
        if not torch.is_tensor(packed) or packed.ndim != 3:
            return None
        hw = self._latent_hw(kwargs.get("img_ids"), int(packed.shape[1]))
        return self.spatial(packed, hw)

    def spatial(self, t: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Packed (B, h/2 * w/2, 4 C) -> (B, C, h, w), as the pipeline's ``_unpack_latents``;
        anything else unchanged."""
        h, w = latent_hw
        if not torch.is_tensor(t) or t.ndim != 3 or t.shape[1] * 4 != h * w or t.shape[2] % 4:
            return t
        b, _, c4 = t.shape
        t = t.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return t.reshape(b, c4 // 4, h, w)

    # ---------------------------------------------------------------- guidance
    def cfg_calls(self, params: dict) -> tuple[str, ...] | None:
        """True CFG (``true_cfg_scale > 1`` with a negative prompt or negative embeddings, as
        the pipelines decide): the prompt's call, then the negative one, each step."""
        has_negative = params.get("negative_prompt") is not None or (
            params.get("negative_prompt_embeds") is not None
            and params.get("negative_pooled_prompt_embeds") is not None)
        true_cfg = params.get("true_cfg_scale")
        if true_cfg is not None and float(true_cfg) > 1 and has_negative:
            return ("text", "uncond")
        return None

    def cfg_scale(self, params: dict) -> float | None:
        """``true_cfg_scale`` under true CFG, else the distilled guidance value."""
        if self.cfg_calls(params):
            return float(params["true_cfg_scale"])
        return super().cfg_scale(params)

    def guidance_meta(self, params: dict) -> dict:
        gs = params.get("guidance_scale")
        embeds = self.distilled_guidance()
        true_cfg = params.get("true_cfg_scale")
        return {"distilled_guidance": float(gs) if embeds and gs is not None else None,
                "true_cfg_scale": float(true_cfg) if true_cfg is not None else None}

    # ---------------------------------------------------------------- text
    def text_length(self, params: dict) -> int:
        return int(params.get("max_sequence_length") or self.max_text_tokens)

    def text_prompts(self, prompts: list, params: dict) -> list:
        """T5 reads ``prompt_2`` where given (the pipelines: ``prompt_2 or prompt``); CLIP's
        pooled vector reads ``prompt``."""
        second = params.get("prompt_2")
        if second is None:
            return list(prompts)
        second = [second] * len(prompts) if isinstance(second, str) else list(second)
        if len(second) != len(prompts):
            return list(prompts)
        return [(t or q) if q is not None else None for q, t in zip(prompts, second)]

    def text_parts(self, params: dict) -> list[tuple[str, object, int]]:
        """One segment: T5's ``max_sequence_length`` positions (CLIP's output is pooled)."""
        return [("t5", getattr(self.pipe, "tokenizer_2", None), self.text_length(params))]

    def activation_bytes(self, latent_hw: tuple[int, int]) -> int:
        h, w = latent_hw
        tokens = (h // 2) * (w // 2) + self.max_text_tokens
        return joint_activation_bytes(self.pipe.transformer, tokens)

    # ---------------------------------------------------------------- sites
    def kernel_text_length(self, call, denoiser_kwargs: dict) -> int | None:
        """The double-stream blocks get the text apart (``encoder_hidden_states``); a
        single-stream block's kernel sequence is the joined [text; image], whose text is the
        transformer call's ``encoder_hidden_states``."""
        n = super().kernel_text_length(call, denoiser_kwargs)
        if n is None:
            ehs = denoiser_kwargs.get("encoder_hidden_states")
            n = int(ehs.shape[1]) if torch.is_tensor(ehs) and ehs.ndim == 3 else None
        return n

    def site_of(self, processor_key: str) -> str | None:
        return self.naming.site_of(processor_key)

    def sites(self) -> list[str]:
        return list(self._sites)

    def resolutions(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        hw = (latent_hw[0] // 2, latent_hw[1] // 2)
        return {s: hw for s in self._sites}

    # ---------------------------------------------------------------- concept pass
    def concept_blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """The double-stream blocks, then the single-stream blocks (the transformer's order)."""
        tr = self.pipe.transformer
        return [(f"{_DOUBLE}.{i}.attn", b) for i, b in enumerate(tr.transformer_blocks)] + \
            [(f"{_SINGLE}.{i}.attn", b) for i, b in enumerate(tr.single_transformer_blocks)]

    def concept_text(self, concepts: list[str], params: dict) -> torch.Tensor:
        """T5's ``prompt_embeds`` of the concepts as prompts: (C, max_sequence_length, 4096)."""
        return self.pipe.encode_prompt(
            prompt=list(concepts), prompt_2=None,
            device=getattr(self.pipe, "_execution_device", self.denoiser.device),
            max_sequence_length=self.text_length(params))[0]

    def concept_stream(self, vectors: torch.Tensor) -> torch.Tensor:
        embedder = self.pipe.transformer.context_embedder
        return embedder(vectors.to(embedder.weight.dtype))

    def paper_concepts(self, concepts: list[str], params: dict) -> tuple[torch.Tensor, int]:
        """ConceptAttention's Flux ``embed_concepts``: each concept encoded by T5 as its own
        prompt, its FIRST token kept: (C, 4096)."""
        return self.concept_text(list(concepts), params)[:, 0], 0

    def paper_concept_blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """The double-stream blocks only (ConceptAttention's ``ModifiedFluxDiT``: the concepts
        stop before the single-stream blocks)."""
        tr = self.pipe.transformer
        return [(f"{_DOUBLE}.{i}.attn", b) for i, b in enumerate(tr.transformer_blocks)]

    def paper_default_layers(self) -> list[str]:
        """The last four double-stream blocks: 15-18 of Flux.1's 19, ConceptAttention's Flux
        pipeline's default ``layer_indices``; a transformer with fewer: all of them."""
        n = len(self.pipe.transformer.transformer_blocks)
        return [f"{_DOUBLE}.{i}.attn" for i in range(max(0, n - 4), n)]

    def paper_concept_temb(self, temb: torch.Tensor, call_kwargs: dict,
                           rows: slice) -> torch.Tensor | None:
        """time + guidance + the pooled-text embedding of a ZERO vector (ConceptAttention's
        ``embed_concepts`` returns ``zeros_like`` of the CLIP vector as the concepts' ``y``): the
        block's ``temb`` with its pooled-text term swapped (``time_text_embed`` sums the three
        terms)."""
        pooled = call_kwargs.get("pooled_projections")
        embed = getattr(getattr(self.pipe.transformer, "time_text_embed", None), "text_embedder",
                        None)
        if not torch.is_tensor(pooled) or embed is None:
            raise ValueError("no pooled_projections to swap for the concepts' zero vector")
        pooled = pooled[rows].to(temb.dtype)
        return temb - embed(pooled) + embed(torch.zeros_like(pooled))

    def concept_step(self, block, stream: torch.Tensor, args: tuple, kwargs: dict, rows: slice,
                     outputs: bool, method: str = "sdlens",
                     concept_temb: torch.Tensor | None = None,
                     call_kwargs: dict | None = None) -> ConceptStep:
        """One block of the concept pass (module docstring: "Concept maps"), for Flux.1's
        blocks and those built as theirs (Chroma's, Flux.2's: :meth:`_concept_norm` is where they
        differ). The concepts get the rotary embedding of the first text position (ids zeros, as
        ConceptAttention's concept ids: the Flux.1 pipelines' ``txt_ids`` are zeros, so that is
        every text token's rotation, the identity); they are modulated with ``concept_temb``
        where given (ConceptAttention: :meth:`paper_concept_temb`), else as the block's text.
        They attend to every image-stream token (the generated image's patches and any
        reference image's, as the prompt's text does) and to each other; the map's image
        factor is the generated image's patches' own attention output."""
        from diffusers.models.embeddings import apply_rotary_emb

        def arg(name: str, i: int):
            return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)

        hs, ehs, rope = (arg("hidden_states", 0), arg("encoder_hidden_states", 1),
                         arg("image_rotary_emb", 3))
        rope = tuple(rope) if isinstance(rope, (tuple, list)) and len(rope) == 2 else None
        hs = hs[rows]
        if ehs is None:  # a joined [text; image] (Chroma's and Flux.2's single-stream blocks)
            t = self._call_text_length(call_kwargs)
            ehs, hs = hs[:, :t], hs[:, t:]
        else:
            ehs = ehs[rows]
        t = int(ehs.shape[1])
        noise = self._concept_noise(call_kwargs, int(hs.shape[1]))
        attn = block.attn
        double = hasattr(block, "norm1_context")
        parallel = hasattr(attn, "to_qkv_mlp_proj")  # Flux.2's single-stream blocks

        def heads(x: torch.Tensor) -> torch.Tensor:  # (n, L, inner) -> (n, heads, L, d)
            return x.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)

        def qkv(x: torch.Tensor, added: bool, rope_rows: slice, queries: bool = True):
            """(q or None, k, v, the parallel MLP's input or None), q / k / v (n, heads, L, d),
            as the processor computes them."""
            mlp = None
            if parallel:  # one projection: q, k, v and the MLP's input
                proj = attn.to_qkv_mlp_proj(x)
                q, k, v = proj[..., : 3 * attn.inner_dim].chunk(3, dim=-1)
                mlp = proj[..., 3 * attn.inner_dim:]
            elif getattr(attn, "fused_projections", False):  # after fuse_qkv_projections()
                q, k, v = (attn.to_added_qkv if added else attn.to_qkv)(x).chunk(3, dim=-1)
            else:
                pre = "add_{}_proj" if added else "to_{}"
                q, k, v = (getattr(attn, pre.format(n))(x) if n != "q" or queries else None
                           for n in "qkv")
            q = (attn.norm_added_q if added else attn.norm_q)(heads(q)) if queries else None
            k, v = (attn.norm_added_k if added else attn.norm_k)(heads(k)), heads(v)
            if rope is not None:
                cos, sin = rope[0][rope_rows], rope[1][rope_rows]
                if cos.shape[0] != x.shape[1]:  # the concepts: the first text position's
                    cos, sin = cos.expand(x.shape[1], -1), sin.expand(x.shape[1], -1)
                q = apply_rotary_emb(q, (cos, sin), sequence_dim=2) if queries else None
                k = apply_rotary_emb(k, (cos, sin), sequence_dim=2)
            return q, k, v, mlp

        text_rows, first = slice(0, t), slice(0, 1)
        image_rows = slice(t, t + int(hs.shape[1]))
        # a single-stream block's norm and projections are per token: its joined sequence's
        # image and text rows are computed apart (the text's only for the image's own output)
        norm_c, *mods_c = self._concept_norm(block, double, "concept", stream, kwargs, args, rows,
                                             concept_temb)
        q_c, k_c, v_c, mlp_c = qkv(norm_c, double, first)
        norm_x = self._concept_norm(block, double, "image", hs, kwargs, args, rows)[0]
        q, k, v, _ = qkv(norm_x, False, image_rows, queries=outputs)
        # the concepts attend to the image stream and to each other; nothing attends to them
        out_c = F.scaled_dot_product_attention(q_c, torch.cat([k, k_c], 2), torch.cat([v, v_c], 2))
        out_c = out_c.transpose(1, 2).flatten(2)  # (n, C, inner)
        image = None
        if outputs:  # the image patches' own attention output (over [text; image], as the block)
            norm_t = self._concept_norm(block, double, "text", ehs, kwargs, args, rows)[0]
            _, k_t, v_t, _ = qkv(norm_t, double, text_rows, queries=False)
            image = F.scaled_dot_product_attention(
                q[:, :, :noise], torch.cat([k_t, k], 2), torch.cat([v_t, v], 2),
                attn_mask=self._concept_image_mask(kwargs, rows, t, noise))
            image = image.transpose(1, 2).flatten(2)  # (n, HW, inner)
        if double:  # the text stream's update (FluxTransformerBlock's; Chroma's, Flux.2's alike)
            gate, shift_mlp, scale_mlp, gate_mlp = mods_c
            c = stream + gate * attn.to_add_out(out_c)
            ff_in = block.norm2_context(c) * (1 + scale_mlp) + shift_mlp
            nxt = c + gate_mlp * block.ff_context(ff_in)
        elif block is self.pipe.transformer.single_transformer_blocks[-1]:
            nxt = None  # the last block: nothing reads the stream after it
        elif parallel:  # Flux.2: the fused MLP beside attention, one fused output projection
            nxt = stream + mods_c[0] * attn.to_out(torch.cat([out_c, attn.mlp_act_fn(mlp_c)], 2))
        else:  # FluxSingleTransformerBlock: the parallel MLP beside attention, one proj_out
            mlp = block.act_mlp(block.proj_mlp(norm_c))
            nxt = stream + mods_c[0] * block.proj_out(torch.cat([out_c, mlp], 2))
        if nxt is not None and nxt.dtype == torch.float16:
            nxt = nxt.clip(-65504, 65504)  # as the blocks clip their fp16 outputs
        return ConceptStep(nxt, image, out_c if outputs else None)

    def _concept_norm(self, block, double: bool, part: str, x: torch.Tensor, kwargs: dict,
                      args: tuple, rows: slice, concept_temb: torch.Tensor | None = None
                      ) -> tuple:
        """``x`` (n, L, dim) normalised and modulated as ``block`` does its ``part`` ("image",
        "text" or "concept": the text stream's modulation, or ``concept_temb``'s), with the
        gates and MLP modulation of that stream, each broadcastable to (n, L, dim): a double-
        stream block ``(x, gate, shift_mlp, scale_mlp, gate_mlp)``, a single-stream block ``(x,
        gate)``. Flux.1: AdaLN from the block's ``temb`` (n, dim)."""
        temb = (kwargs["temb"] if "temb" in kwargs else args[2])[rows]
        if part == "concept" and concept_temb is not None:
            temb = concept_temb
        if not double:
            normed, gate = block.norm(x, emb=temb)
            return normed, gate.unsqueeze(1)
        normed, gate, shift, scale, gate_mlp = (block.norm1 if part == "image"
                                                else block.norm1_context)(x, emb=temb)
        return normed, gate.unsqueeze(1), shift[:, None], scale[:, None], gate_mlp.unsqueeze(1)

    def _call_text_length(self, call_kwargs: dict | None) -> int:
        """The text tokens of the denoiser call (its ``encoder_hidden_states``' length), for a
        block given the joined [text; image] sequence."""
        ehs = (call_kwargs or {}).get("encoder_hidden_states")
        if not torch.is_tensor(ehs) or ehs.ndim != 3:
            raise ValueError("the denoiser call's encoder_hidden_states are not known")
        return int(ehs.shape[1])

    def _concept_noise(self, call_kwargs: dict | None, n_image: int) -> int:
        """The generated image's patches among the ``n_image`` image-stream tokens (the first
        ones): all of them (Flux.1 Kontext and Flux.2: the reference images' follow them)."""
        return n_image

    def _concept_image_mask(self, kwargs: dict, rows: slice, t: int, noise: int):
        """The mask the block's attention adds for the image patches' queries over [text;
        image] keys (Chroma's); None (Flux.1, Flux.2: no mask)."""
        return None

    # ================================================================ asked from outside the engine
    def embeds_guidance(self) -> bool:
        return self.distilled_guidance()

    def distilled_guidance(self) -> bool:
        """Flux.1-dev (``guidance_embeds``): the guidance value is an input of the transformer;
        schnell has none."""
        return bool(self.pipe.transformer.config.get("guidance_embeds"))

    def text_encoders(self, params: dict) -> list[TextEncoder]:
        """T5 (``text_encoder_2``), the whole text axis; CLIP only gives the pooled vector."""
        return self._text_encoder("tokenizer_2", "text_encoder_2", 0, self.text_length(params))


class ChromaAdapter(FluxAdapter):
    """A Chroma pipeline (``ChromaPipeline`` / ``ChromaImg2ImgPipeline`` / ``ChromaInpaintPipeline``:
    ``ChromaTransformer2DModel``), Flux.1's blocks and sites without CLIP or a guidance input.

    * **Text**: T5 only (``tokenizer`` / ``text_encoder``), ``max_sequence_length`` (512)
      positions. The pipeline masks the text: the transformer's ``attention_mask`` keeps the
      prompt's tokens, ``</s>`` and one ``<pad>``, and reaches the kernel as a *float* 0 / 1
      ``(B, 1, L, L)`` tensor that SDPA adds to the scores (kept pairs +1, the rest +0: padding
      is down-weighted by e^-1, not excluded). The recorder adds that same float mask
      (:func:`sdlens.engine.sites.segment_probabilities`), so a map is the kernel's softmax;
      padding positions are left out of the words / recorded positions as for Flux.1.
    * **Guidance**: true CFG with two transformer calls per step when ``guidance_scale > 1``
      (the default, 3.0), the prompt's call first, then the negative prompt's (``""`` by
      default): ``neg + guidance_scale * (pos - neg)``. ``trace.guidance_scale`` is that scale;
      with ``guidance_scale <= 1`` one call, no guidance.
    * **Concept maps** as Flux.1's (:meth:`FluxAdapter.concept_step`), the modulation read
      from the approximator's vectors the blocks are given (:meth:`_concept_norm`); the image
      patches' own attention output adds the blocks' float mask. The paper's way is sdlens's
      transfer of ConceptAttention's Flux recipe (its code has no Chroma path): each concept
      T5's first token, double-stream blocks only, the last four by default; its "zero pooled
      vector" is no change here (:meth:`paper_concept_temb`: Chroma's modulation has no
      pooled-text input), so the concepts are modulated as the block's text.
    """

    pipelines = ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline")
    families = ("chroma",)
    cfg_by_default = True

    @classmethod
    def handles(cls, pipe) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return (type(transformer).__name__ == "ChromaTransformer2DModel"
                and type(pipe).__name__ in cls.pipelines)

    def family(self) -> str:
        return "chroma"

    def cfg_calls(self, params: dict) -> tuple[str, ...] | None:
        """Two calls per step, the prompt's then the negative's, when ``guidance_scale > 1``."""
        gs = params.get("guidance_scale")
        return ("text", "uncond") if gs is not None and float(gs) > 1 else None

    def cfg_scale(self, params: dict) -> float | None:
        return BackboneAdapter.cfg_scale(self, params)

    def guidance_meta(self, params: dict) -> dict:
        return {}

    def embeds_guidance(self) -> bool:
        return False

    def distilled_guidance(self) -> bool:
        return False

    def text_prompts(self, prompts: list, params: dict) -> list:
        return list(prompts)

    def text_parts(self, params: dict) -> list[tuple[str, object, int]]:
        return [("t5", getattr(self.pipe, "tokenizer", None), self.text_length(params))]

    def text_encoders(self, params: dict) -> list[TextEncoder]:
        return self._text_encoder("tokenizer", "text_encoder", 0, self.text_length(params))

    # ---------------------------------------------------------------- concept pass
    def concept_text(self, concepts: list[str], params: dict) -> torch.Tensor:
        """T5's ``prompt_embeds`` of the concepts as prompts: (C, max_sequence_length, 4096)."""
        return self.pipe.encode_prompt(
            prompt=list(concepts), device=getattr(self.pipe, "_execution_device",
                                                  self.denoiser.device),
            do_classifier_free_guidance=False, max_sequence_length=self.text_length(params))[0]

    def paper_concept_temb(self, temb: torch.Tensor, call_kwargs: dict,
                           rows: slice) -> torch.Tensor | None:
        """None: the block's own text-stream modulation. ConceptAttention's Flux code modulates
        the concepts with time + guidance + the pooled-text embedding of a zero vector; Chroma's
        modulation has no text input to zero (its approximator reads the timestep, a guidance
        fixed at 0 and each modulation's index), so that recipe is its own modulation."""
        return None

    def _concept_norm(self, block, double: bool, part: str, x: torch.Tensor, kwargs: dict,
                      args: tuple, rows: slice, concept_temb: torch.Tensor | None = None
                      ) -> tuple:
        """Chroma's blocks get their modulation vectors from the approximator: a double-stream
        block's ``temb`` (n, 12, dim), the image's six then the text's, a single-stream
        block's (n, 3, dim)."""
        temb = kwargs["temb"][rows]
        if not double:
            normed, gate = block.norm(x, emb=temb)
            return normed, gate.unsqueeze(1)
        norm, emb = (block.norm1, temb[:, :6]) if part == "image" else (block.norm1_context,
                                                                         temb[:, 6:])
        normed, gate, shift, scale, gate_mlp = norm(x, emb=emb)
        return normed, gate.unsqueeze(1), shift[:, None], scale[:, None], gate_mlp.unsqueeze(1)

    def _concept_image_mask(self, kwargs: dict, rows: slice, t: int, noise: int):
        """The blocks' float mask (the pipeline's 0 / 1 over [text; image], as pairs ``m_i *
        m_j`` added to the scores): the image patches' rows of it."""
        mask = kwargs.get("attention_mask")
        if mask is None:
            return None
        m = mask[rows]
        return m[:, None, t:t + noise, None] * m[:, None, None, :]


class FluxKontextAdapter(FluxAdapter):
    """A Flux.1 Kontext pipeline (``FluxKontextPipeline`` on ``FluxTransformer2DModel``): Flux.1
    with the reference image's packed latent patches appended to the image stream.

    The transformer's ``hidden_states`` are ``[noise; reference]`` patches and ``img_ids`` tells
    them apart by their first coordinate (0: the image being generated, 1: the reference,
    whose own rows / columns give its (h, w)); the pipeline keeps the first ``noise`` rows of the
    prediction. So the kernel sequence at every site is ``[text, image, reference 0]``
    (:func:`sdlens.engine.arch.base.reference_layout`): the maps are the image queries' text
    columns of the softmax over all of it; the denoiser's input / output as the trace records
    them are the noise part only. Text, guidance (distilled; true CFG with a negative prompt) and
    sites as Flux.1's. Concept maps as Flux.1's, both methods (the paper's way exactly as
    ConceptAttention's Flux code, which has no Kontext path but whose recipe reads the same
    inputs): the concepts attend to the whole image stream, the reference's patches too, as the
    prompt's text does; the maps are over the generated image's patches
    (:meth:`_concept_noise`)."""

    pipelines = ("FluxKontextPipeline",)
    families = ("flux-kontext",)

    def __init__(self, pipe):
        super().__init__(pipe)
        self._parts: tuple | None = None  # (img_ids, [noise, reference, ...] token counts)
        self._noise: int | None = None  # the noise tokens of the denoiser call in progress
        self._grids: list | None = None  # (rows, columns) of each part of ``_parts``

    def family(self) -> str:
        return "flux-kontext"

    def _image_parts(self, img_ids) -> list[int] | None:
        """Token counts of the noise and each reference, from ``img_ids`` ((N, 3) or (B, N, 3);
        Flux.2's (B, N, 4)): first coordinate 0 for the noise, then one value per reference
        (Kontext 1; Flux.2 10, 20, ...), in sequence order."""
        if self._parts is not None and self._parts[0] is img_ids:
            return self._parts[1]
        parts, grids = None, None
        if torch.is_tensor(img_ids) and img_ids.shape[-1] >= 3:
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            _, counts = torch.unique_consecutive(ids[:, 0], return_counts=True)
            parts = [int(c) for c in counts.tolist()] if float(ids[0, 0]) == 0 else None
            if parts:  # each part's (rows, columns) from its row / column ids
                grids = [tuple(int(v) + 1 for v in (g[:, 1:3].amax(0) - g[:, 1:3].amin(0)))
                         for g in ids.split(parts)]
        self._parts = (img_ids, parts)
        self._grids = grids
        return parts

    def denoiser_input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The noise part of the transformer's input, unpacked: (B, C, h, w)."""
        packed = args[0] if args else kwargs.get(self.sample_arg)
        ids = kwargs.get("img_ids")
        parts = self._image_parts(ids)
        if not torch.is_tensor(packed) or packed.ndim != 3 or not parts:
            return None
        noise = parts[0]
        flat = ids[0] if ids.ndim == 3 else ids
        self._noise = noise
        packed = packed[:, :noise]
        return self.spatial(packed, self._latent_hw(flat[:noise], noise))

    def denoiser_output(self, output) -> torch.Tensor | None:
        """The noise part of the prediction (the pipeline keeps ``[:, :noise]``)."""
        out = self.output_tensor(output)
        noise = self._noise
        return out[:, :noise] if torch.is_tensor(out) and noise is not None else out

    def kernel_layout(self, site: str, attn, call, index: int, q_len: int, k_len: int,
                      denoiser_kwargs: dict):
        n_text = self.kernel_text_length(call, denoiser_kwargs)
        parts = self._image_parts(denoiser_kwargs.get("img_ids"))
        if n_text is None or not parts:
            return None
        return reference_layout(("text", "image"), {"text": n_text, "image": parts[0]},
                                parts[1:], q_len, k_len,
                                self._grids[1:] if self._grids else None)

    def _concept_noise(self, call_kwargs: dict | None, n_image: int) -> int:
        """The noise part of the image stream (``img_ids``' first coordinate 0)."""
        parts = self._image_parts((call_kwargs or {}).get("img_ids"))
        return int(parts[0]) if parts else n_image
