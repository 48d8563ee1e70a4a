"""The MMDiT family: Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``; txt2img, img2img, inpaint).

Sites are the joint-attention modules of the transformer blocks, ``transformer_blocks.N.attn``
(aliases ``"block.N"`` and ``"N"``; the group ``"blocks"`` is all of them). Joint attention is one
softmax over the keys of [image tokens; text tokens] (``JointAttnProcessor2_0`` concatenates image
first, then text: :attr:`MMDiTAdapter.joint_order`); the recorded map of a site is each image
patch's attention to each text token, a part of a row whose rest goes to the image keys
(:class:`sdlens.engine.sites.MapRecorder`, at the kernel call). SD3.5's dual-attention blocks
(``dual_attention_layers``) have a second, image-only attention ``attn2``: no text there, not a
site. A site's map is at the latents' resolution divided by the patch size (2).

The text sequence is CLIP-L and CLIP-G's 77 positions (their hidden states joined channel-wise),
then T5's ``max_sequence_length`` (256 by default; zeros when ``text_encoder_3`` is None):
:meth:`MMDiTAdapter.text_parts`. Classifier-free guidance is diffusers' ``cat([uncond, text])``;
the transformer takes the latents as ``hidden_states=`` and returns ``.sample``. SD3.5's
skip-layer guidance calls the transformer a second time per step on the text half with
``skip_layers=``: an auxiliary call (:meth:`MMDiTAdapter.auxiliary_call`), not recorded.

The concept pass (concept maps, :mod:`sdlens.engine.joint`, whose docstring lists both methods'
choices; the seam in :mod:`sdlens.engine.arch.base`): every ``JointTransformerBlock`` in order.
The default, ``concept_method="conceptattention"`` (ConceptAttention's SD3 code), encodes all
concepts as one prompt (:meth:`MMDiTAdapter.paper_concepts`) and takes the image vectors from the
image's attention over [image; concepts]; the ``"sdlens"`` variant encodes each concept
with ``pipe.encode_prompt`` (CLIP-L, CLIP-G and T5, as a prompt is). Both enter through
``context_embedder``, and at each block take the text stream's path: ``norm1_context`` (AdaLN
with the block's ``temb``), ``add_q_proj`` / ``add_k_proj`` / ``add_v_proj`` and the added q/k
norms, attention over the image keys and their own keys, then ``to_add_out``, the gates, and
``norm2_context`` / ``ff_context``. The last block (``context_pre_only``) has no text output
path: the stream ends there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdlens.engine.arch.base import (BackboneAdapter, BlockNaming, ConceptStep, TextEncoder,
                                     joint_activation_bytes)



class MMDiTAdapter(BackboneAdapter):
    """A pipeline whose denoiser is an ``SD3Transformer2DModel`` (``pipe.transformer``)."""

    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                 "StableDiffusion3InpaintPipeline")
    families = ("sd3", "sd35")
    naming = BlockNaming("attn")
    max_text_tokens = 77 + 256  # CLIP + T5 at the pipelines' default max_sequence_length
    sample_arg = "hidden_states"
    attention_kind = "joint"
    joint_order = ("image", "text")  # JointAttnProcessor2_0: cat([image, text]) keys
    clip_positions = 77

    def __init__(self, pipe):
        super().__init__(pipe)
        cls = type(pipe).__name__
        self._sites = super().sites()
        if not self._sites:
            raise TypeError(f"sdlens cannot trace {cls}: its transformer has no joint-attention "
                            f"blocks; supported: {', '.join(self.pipelines)}")

    @classmethod
    def handles(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "SD3Transformer2DModel"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def family(self) -> str:
        """"sd35" (dual-attention blocks or q/k norms, as SD3.5 medium / large), else "sd3"."""
        cfg = self.pipe.transformer.config
        return "sd35" if (cfg.get("dual_attention_layers") or cfg.get("qk_norm")) else "sd3"

    def default_latent_hw(self) -> tuple[int, int]:
        size = self.pipe.transformer.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def latent_channels(self) -> int:
        return int(self.pipe.transformer.config.out_channels)

    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.patch_size)

    def auxiliary_call(self, args: tuple, kwargs: dict) -> bool:
        """Skip-layer guidance's extra call (``skip_layers=``): not a step's prediction."""
        return kwargs.get("skip_layers") is not None

    def text_parts(self, params: dict) -> list[tuple[str, object, int]]:
        """The text sequence's segments in order: ``(encoder, tokenizer or None, length)``; T5
        has no tokens when ``text_encoder_3`` is None (its positions are zeros)."""
        n_t5 = params.get("max_sequence_length")
        n_t5 = 256 if n_t5 is None else int(n_t5)  # 0 is a length: no T5 segment at all
        t5 = self.pipe.tokenizer_3 if getattr(self.pipe, "text_encoder_3", None) is not None \
            else None
        return [("clip", self.pipe.tokenizer, self.clip_positions), ("t5", t5, n_t5)]

    def activation_bytes(self, latent_hw: tuple[int, int]) -> int:
        h, w = latent_hw
        p = self.patch_size()
        tokens = (h // p) * (w // p) + self.max_text_tokens
        return joint_activation_bytes(self.pipe.transformer, tokens)

    def site_of(self, processor_key: str) -> str | None:
        return self.naming.site_of(processor_key)

    def sites(self) -> list[str]:
        return list(self._sites)

    def resolutions(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        p = self.patch_size()
        hw = (latent_hw[0] // p, latent_hw[1] // p)
        return {s: hw for s in self._sites}

    # ---------------------------------------------------------------- concept pass
    def concept_blocks(self) -> list[tuple[str, torch.nn.Module]]:
        blocks = self.pipe.transformer.transformer_blocks
        return [(f"transformer_blocks.{i}.attn", b) for i, b in enumerate(blocks)]

    def concept_text(self, concepts: list[str], params: dict) -> torch.Tensor:
        """``prompt_embeds`` of the concepts as prompts: (C, 77 + max_sequence_length, 4096)."""
        embeds = self.pipe.encode_prompt(
            prompt=list(concepts), prompt_2=None, prompt_3=None,
            device=getattr(self.pipe, "_execution_device", self.denoiser.device),
            do_classifier_free_guidance=False, clip_skip=params.get("clip_skip"),
            max_sequence_length=int(params.get("max_sequence_length") or 256))[0]
        return embeds

    def concept_stream(self, vectors: torch.Tensor) -> torch.Tensor:
        embedder = self.pipe.transformer.context_embedder
        return embedder(vectors.to(embedder.weight.dtype))

    paper_time_mean = True  # concept_attention_pipeline.py: vectors averaged over time first
    paper_normalise = True  # concept_attention_pipeline.py: concept vectors L2-normalised

    def paper_concepts(self, concepts: list[str], params: dict) -> tuple[torch.Tensor, int]:
        """ConceptAttention's SD3 ``encode_concepts``: the concepts joined by spaces into one
        prompt, encoded as a prompt is (CLIP-L, CLIP-G, T5 at 256), its first ``C + 1`` positions
        kept: (C + 1, 4096), the CLIP start token first (``lead`` 1). A concept of several CLIP
        tokens shifts the ones after it, as in the paper's code."""
        embeds = self.pipe.encode_prompt(
            prompt=" ".join(concepts), prompt_2=None, prompt_3=None,
            device=getattr(self.pipe, "_execution_device", self.denoiser.device),
            do_classifier_free_guidance=False, max_sequence_length=256)[0]
        return embeds[0, : len(concepts) + 1], 1

    def concept_step(self, block, stream: torch.Tensor, args: tuple, kwargs: dict, rows: slice,
                     outputs: bool, method: str = "sdlens",
                     concept_temb: torch.Tensor | None = None,
                     call_kwargs: dict | None = None) -> ConceptStep:
        """One block of the concept pass. ``method="conceptattention"``: the image vectors are
        the image queries' attention over [image; concepts] (ConceptAttention's SD3 block runs
        the block's attention a second time with the concepts in place of the prompt), not the
        block's own image output (over [image; prompt])."""
        def arg(name: str, i: int):
            return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)

        attn = block.attn
        temb = arg("temb", 2)[rows]
        norm_hs = block.norm1(arg("hidden_states", 0)[rows], emb=temb)[0]

        def heads(t: torch.Tensor) -> torch.Tensor:  # (n, L, inner) -> (n, heads, L, d)
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        def normed(norm, t: torch.Tensor) -> torch.Tensor:
            return t if norm is None else norm(t)

        def text_side(x: torch.Tensor):  # the text stream's norm, then its projections
            if block.context_pre_only:
                normed_x, mods = block.norm1_context(x, temb), None
            else:
                normed_x, *mods = block.norm1_context(x, emb=temb)
            return (normed(attn.norm_added_q, heads(attn.add_q_proj(normed_x))),
                    normed(attn.norm_added_k, heads(attn.add_k_proj(normed_x))),
                    heads(attn.add_v_proj(normed_x)), mods)

        key = normed(attn.norm_k, heads(attn.to_k(norm_hs)))
        value = heads(attn.to_v(norm_hs))
        q_c, k_c, v_c, mods = text_side(stream)
        # the concepts attend to the image and to each other; nothing attends to them
        out_c = F.scaled_dot_product_attention(q_c, torch.cat([key, k_c], 2),
                                               torch.cat([value, v_c], 2))
        out_c = out_c.transpose(1, 2).flatten(2)  # (n, C, inner)
        image = None
        if outputs:  # the image tokens' attention output over [image; prompt] (the block's own)
            # or, the paper's way, over [image; concepts]
            if method == "conceptattention":
                k_t, v_t = k_c, v_c
            else:
                _, k_t, v_t, _ = text_side(arg("encoder_hidden_states", 1)[rows])
            q = normed(attn.norm_q, heads(attn.to_q(norm_hs)))
            image = F.scaled_dot_product_attention(q, torch.cat([key, k_t], 2),
                                                   torch.cat([value, v_t], 2))
            image = image.transpose(1, 2).flatten(2)  # (n, HW, inner)
        nxt = None
        if mods is not None:  # JointTransformerBlock's text-stream update
            gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
            c = stream + gate_msa.unsqueeze(1) * attn.to_add_out(out_c)
            ff_in = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            nxt = c + gate_mlp.unsqueeze(1) * block.ff_context(ff_in)
        return ConceptStep(nxt, image, out_c if outputs else None)

    # ================================================================ asked from outside the engine
    def text_encoders(self, params: dict) -> list[TextEncoder]:
        """CLIP-L and CLIP-G on the first 77 positions (joined channel-wise), T5 on the
        ``max_sequence_length`` after them (none when ``text_encoder_3`` is None):
        :meth:`text_parts`' segments, encoder by encoder."""
        (_, _, n_clip), (_, _, n_t5) = self.text_parts(params)
        return (self._text_encoder("tokenizer", "text_encoder", 0, n_clip)
                + self._text_encoder("tokenizer_2", "text_encoder_2", 0, n_clip)
                + self._text_encoder("tokenizer_3", "text_encoder_3", n_clip, n_t5))
