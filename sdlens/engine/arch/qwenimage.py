"""Qwen-Image (``QwenImageTransformer2DModel``: QwenImagePipeline, QwenImageImg2ImgPipeline,
QwenImageInpaintPipeline) and Qwen-Image-Edit (QwenImageEditPipeline, QwenImageEditPlusPipeline:
:class:`QwenImageEditAdapter`, whose reference images are kernel segments of their own).

**Sites.** Every block ``transformer_blocks.N.attn`` (aliases ``"block.N"``, group
``"blocks"``; 60 in the real model) is a double-stream joint attention:
``QwenDoubleStreamAttnProcessor2_0`` concatenates ``[text; image]`` queries, keys and values
(each stream's own projections, RMS norms and complex rotary embedding applied before the
concatenation) and calls the attention kernel once. The recorded map of a site is each image
token's row of that softmax over ``[text; image]`` keys, its text columns, read at the kernel
call (:class:`sdlens.engine.sites.MapRecorder`): a pixel's row sums to its text share. Where the
prompts of a batch differ in length the pipeline zero-pads the shorter ones and passes
``encoder_hidden_states_mask``; the kernel then gets a bool mask, and the masked positions get
probability 0 (the mask is the kernel's own). Maps are at the latents' resolution / 2 (the
2x2 packing).

**Text.** The pipeline formats each prompt with its chat template (a system prompt, then
``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``), runs Qwen2.5-VL and drops
the first ``prompt_template_encode_start_idx`` (34) hidden states: the text axis is the
prompt's tokens, then the template's 5 closing tokens. The words are the prompt's own tokens,
as the tokenizer cuts them inside the template (:meth:`QwenImageAdapter.text_tokens`); the
template's closing tokens are not words, and by default their columns are left out of the maps
as padding is. The axis is at most ``max_sequence_length`` (512) long.

**Latents.** Packed as Flux.1's, (B, h/2 * w/2, 4 C), 2x2 patches; the trace's latents, noise
and x0 are unpacked to (B, C, h, w) (C = 16). (h, w) is read from the transformer's
``img_shapes`` argument (``[(frames, h/2, w/2)]`` per batch item).

**Guidance.** True CFG (``true_cfg_scale > 1``, 4 by default, with a negative prompt or
negative embeddings): two transformer calls per step, the prompt's then the negative prompt's
(:meth:`QwenImageAdapter.cfg_calls`). The pipeline guides with
``comb = neg + true_cfg_scale * (pos - neg)`` and then rescales each packed token's vector of
``comb`` (its 4 C channels) to the norm of ``pos``'s: ``trace.noise`` is that rescaled
prediction (the one the scheduler steps with), ``trace.noise_text`` / ``noise_uncond`` the two
calls', ``trace.guidance_scale`` is ``true_cfg_scale``. Maps are recorded from the prompt's
call. Without a negative prompt there is one call per step and no guidance
(``trace.guidance_scale`` is nan). sdlens' own ``guidance_scale`` (``sdlens.generate``, a
sweep's guidance axis, Studio) sets ``true_cfg_scale`` (:attr:`QwenImageAdapter.cfg_arg`); the
guided prediction is rescaled (not linear in the scale), so a sweep runs one call per value.
The schedule is the table's flow row (x0 = x_t - sigma v).

**Concept maps** (``concepts=[...]``, :mod:`sdlens.engine.joint`;
:meth:`QwenImageAdapter.concept_step`).
The concepts enter as the text does (``txt_norm``, ``txt_in``) and take each block's text path:
``txt_norm1`` modulated by ``txt_mod`` of the block's ``temb`` (the timestep's embedding: Qwen-
Image has no pooled text), ``add_q_proj`` / ``add_k_proj`` / ``add_v_proj``, ``norm_added_q`` /
``norm_added_k``, attention over the image keys and their own (nothing attends to them), then
``to_add_out``, the gate, ``txt_norm2`` / ``txt_mlp``. Every concept gets the first text
position's rotary frequencies (the prompt's tokens have consecutive ones after the image's). The
map's image factor is the image patches' own attention output over [text; image] (with the
pipeline's text mask), before ``to_out``.

ConceptAttention's code has no Qwen-Image path: the default (``"conceptattention"``) is
**sdlens's transfer of its Flux recipe**, not code of the paper: every block is double-stream,
the heatmap pools the last four by default, every step; the concepts are modulated with the
timestep's conditioning and no pooled text, which is the block's own text modulation (there is
no pooled vector to replace by zeros); a concept is its own encoding's **first piece** (the
paper keeps T5's position 0, the concept's first piece; Qwen2.5-VL is a causal LM, so a
concept's first piece is where its own text starts, as T5's position 0 is: the pipeline drops
the chat template's opening tokens, so that is its position 0 here too, and it sees the
template before it). The ``"sdlens"`` variant: the same blocks, each concept the mean over its
pieces. Qwen-Image-Edit-2511's ``zero_cond_t`` modulation is the block's: the concepts take the
text's (the step's timestep), the image stream's patches their own ``modulate_index`` half (the
references' at t = 0).
"""

from __future__ import annotations

import torch

import torch.nn.functional as F

from sdlens.engine.arch.base import (BackboneAdapter, BlockNaming, ConceptStep, KernelLayout,
                                     TextEncoder, joint_activation_bytes, joint_layout,
                                     reference_layout)
from sdlens.engine.arch.flux import FluxAdapter


class QwenImageAdapter(BackboneAdapter):
    """A Qwen-Image pipeline (``pipe.transformer`` a ``QwenImageTransformer2DModel``)."""

    pipelines = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
    families = ("qwen-image",)
    naming = BlockNaming("attn")
    max_text_tokens = 512  # the pipelines' default max_sequence_length
    sample_arg = "hidden_states"
    attention_kind = "joint"
    joint_order = ("text", "image")  # cat([txt_query, img_query])
    cfg_by_default = False  # without a negative prompt: one call per step
    cfg_arg = "true_cfg_scale"  # guidance_scale is a guidance-distilled checkpoint's input
    cfg_needs_negative = True

    def __init__(self, pipe):
        super().__init__(pipe)
        self._sites = super().sites()
        if not self._sites:
            raise TypeError(f"sdlens cannot trace {type(pipe).__name__}: its transformer has no "
                            "attention blocks")

    @classmethod
    def handles(cls, pipe) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return (type(transformer).__name__ == "QwenImageTransformer2DModel"
                and type(pipe).__name__ in cls.pipelines)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def family(self) -> str:
        return self.families[0]

    def default_latent_hw(self) -> tuple[int, int]:
        size = int(getattr(self.pipe, "default_sample_size", 128))
        return (size, size)

    def latent_channels(self) -> int:
        """Channels of the unpacked latents (the packed ones hold 2x2 patches: 4x as many)."""
        return int(self.pipe.transformer.config.in_channels) // 4

    # ---------------------------------------------------------------- packed latents
    @staticmethod
    def _latent_hw(img_shapes, n_tokens: int) -> tuple[int, int]:
        """Unpacked latent (h, w) from ``img_shapes`` (per batch item ``[(frames, h/2, w/2)]``);
        a square where it cannot be read."""
        try:
            _, h2, w2 = (int(v) for v in img_shapes[0][0])
            if h2 * w2 == n_tokens:
                return (2 * h2, 2 * w2)
        except (TypeError, ValueError, IndexError):
            pass
        side = int(round(n_tokens ** 0.5))
        return (2 * side, 2 * side)

    def denoiser_input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The latents the transformer is given, unpacked: (B, C, h, w)."""
        packed = args[0] if args else kwargs.get(self.sample_arg)
        if not torch.is_tensor(packed) or packed.ndim != 3:
            return None
        return self.spatial(packed, self._latent_hw(kwargs.get("img_shapes"),
                                                    int(packed.shape[1])))

    def spatial(self, t: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Packed (B, h/2 * w/2, 4 C) -> (B, C, h, w): Flux.1's packing (the pipelines'
        ``_unpack_latents`` without the frame axis)."""
        return FluxAdapter.spatial(self, t, latent_hw)

    # ---------------------------------------------------------------- guidance
    def cfg_calls(self, params: dict) -> tuple[str, ...] | None:
        """True CFG (``true_cfg_scale > 1`` with a negative prompt or negative embeddings, as
        the pipelines decide): the prompt's call, then the negative one, each step."""
        has_negative = params.get("negative_prompt") is not None \
            or params.get("negative_prompt_embeds") is not None
        true_cfg = params.get("true_cfg_scale")
        if true_cfg is not None and float(true_cfg) > 1 and has_negative:
            return ("text", "uncond")
        return None

    def cfg_scale(self, params: dict) -> float | None:
        """``true_cfg_scale`` under true CFG; None without guidance (``guidance_scale`` is only
        read by guidance-distilled checkpoints)."""
        return float(params["true_cfg_scale"]) if self.cfg_calls(params) else None

    def guidance_meta(self, params: dict) -> dict:
        true_cfg = params.get("true_cfg_scale")
        return {"true_cfg_scale": float(true_cfg) if true_cfg is not None else None,
                "guidance_embeds": bool(self.pipe.transformer.config.get("guidance_embeds")),
                "cfg_rule": "Qwen-Image guides with a negative prompt and true_cfg_scale above 1"}

    # ---------------------------------------------------------------- text
    def text_length(self, params: dict) -> int:
        return int(params.get("max_sequence_length") or self.max_text_tokens)

    def text_tokens(self, prompt: str, params: dict) -> list[int] | None:
        """The prompt's token ids as the pipeline tokenizes it inside its chat template: the
        templated text's ids past ``prompt_template_encode_start_idx``, without the template's
        closing tokens, at most ``max_sequence_length``. None where the pipeline has no template
        or tokenizer."""
        tok = getattr(self.pipe, "tokenizer", None)
        template = getattr(self.pipe, "prompt_template_encode", None)
        start = getattr(self.pipe, "prompt_template_encode_start_idx", None)
        if tok is None or not isinstance(template, str) or start is None:
            return None
        ids = list(tok(template.format(prompt)).input_ids)
        closing = len(tok(template.format("")).input_ids) - int(start)  # <|im_end|> ... \n
        body = ids[int(start): len(ids) - max(closing, 0)]
        return [int(i) for i in body[: self.text_length(params)]]

    def activation_bytes(self, latent_hw: tuple[int, int]) -> int:
        h, w = latent_hw
        tokens = (h // 2) * (w // 2) + self.max_text_tokens
        return joint_activation_bytes(self.pipe.transformer, tokens)

    # ---------------------------------------------------------------- sites
    def kernel_layout(self, site: str, attn, call, index: int, q_len: int, k_len: int,
                      denoiser_kwargs: dict) -> KernelLayout | None:
        """``[text; image]``: the text as long as the site call's ``encoder_hidden_states``,
        the image the rest (one kernel call per site call)."""
        if index != 0:
            return None
        n_text = self.kernel_text_length(call, denoiser_kwargs)
        if n_text is None or n_text >= q_len:
            return None
        return joint_layout(self.joint_order, {"text": n_text, "image": q_len - n_text},
                            q_len, k_len)

    def site_of(self, processor_key: str) -> str | None:
        return self.naming.site_of(processor_key)

    def sites(self) -> list[str]:
        return list(self._sites)

    def resolutions(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        hw = (latent_hw[0] // 2, latent_hw[1] // 2)
        return {s: hw for s in self._sites}

    # ---------------------------------------------------------------- concept pass
    def concept_blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """Every block (all are double-stream)."""
        blocks = self.pipe.transformer.transformer_blocks
        return [(f"transformer_blocks.{i}.attn", b) for i, b in enumerate(blocks)]

    def paper_default_layers(self) -> list[str]:
        """The last four blocks (sdlens's transfer of ConceptAttention's Flux default)."""
        n = len(self.pipe.transformer.transformer_blocks)
        return [f"transformer_blocks.{i}.attn" for i in range(max(0, n - 4), n)]

    def concept_text(self, concepts: list[str], params: dict) -> torch.Tensor:
        """The pipeline's ``prompt_embeds`` of the concepts as prompts (the template's opening
        dropped; zero-padded to the longest): (C, L, 3584)."""
        return self.pipe.encode_prompt(
            prompt=list(concepts),
            device=getattr(self.pipe, "_execution_device", self.denoiser.device),
            max_sequence_length=self.text_length(params))[0]

    def _concept_noise(self, call_kwargs: dict | None, n_image: int) -> int:
        """The generated image's patches among the image stream's ``n_image`` (all of them
        here; the edit pipelines append their references' patches)."""
        return n_image

    def concept_stream(self, vectors: torch.Tensor) -> torch.Tensor:
        tr = self.pipe.transformer
        return tr.txt_in(tr.txt_norm(vectors.to(tr.txt_in.weight.dtype)))

    paper_first_piece = True  # the paper's "first T5 token", transferred (module docstring)

    def concept_step(self, block, stream: torch.Tensor, args: tuple, kwargs: dict, rows: slice,
                     outputs: bool, method: str = "sdlens",
                     concept_temb: torch.Tensor | None = None,
                     call_kwargs: dict | None = None) -> ConceptStep:
        """One block of the concept pass (module docstring: "Concept maps")."""
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        hs, ehs = kwargs["hidden_states"][rows], kwargs["encoder_hidden_states"][rows]
        temb, rope = kwargs["temb"], kwargs.get("image_rotary_emb")
        index = None
        if getattr(block, "zero_cond_t", False):
            # Qwen-Image-Edit-2511: temb is (2n, dim), the step's rows then t = 0's; the text
            # stream takes the first half, each image-stream token the half its
            # modulate_index names (0: the noise, 1: the references, at t = 0)
            temb, temb_ref = temb.chunk(2, dim=0)
            temb_ref, index = temb_ref[rows], kwargs["modulate_index"][rows]
        temb = temb[rows]
        mask = kwargs.get("encoder_hidden_states_mask")
        attn = block.attn
        d = attn.inner_dim // attn.heads

        def modulated(norm, x, mod, ref=None):
            """The block's modulation: norm(x) (1 + scale) + shift, and the gate; with ``ref``
            (zero_cond_t), the tokens whose modulate_index is 1 take ``ref``'s."""
            shift, scale, gate = (m[:, None] for m in mod.chunk(3, dim=-1))
            if ref is not None:
                noise = index[..., None] == 0
                shift, scale, gate = (torch.where(noise, a, b[:, None]) for a, b in
                                      zip((shift, scale, gate), ref.chunk(3, dim=-1)))
            return norm(x) * (1 + scale) + shift, gate

        def qkv(x, added: bool, freqs, queries: bool = True):
            """(q or None, k, v), each (n, heads, L, d), as the processor computes them."""
            pre = "add_{}_proj" if added else "to_{}"
            q, k, v = (getattr(attn, pre.format(n))(x).unflatten(-1, (-1, d))
                       if n != "q" or queries else None for n in "qkv")
            norm_q, norm_k = ((attn.norm_added_q, attn.norm_added_k) if added
                              else (attn.norm_q, attn.norm_k))
            q = norm_q(q) if queries and norm_q is not None else q
            k = norm_k(k) if norm_k is not None else k
            if freqs is not None:
                q = apply_rotary_emb_qwen(q, freqs, use_real=False) if queries else None
                k = apply_rotary_emb_qwen(k, freqs, use_real=False)
            return tuple(x.transpose(1, 2) if x is not None else None for x in (q, k, v))

        img_freqs, txt_freqs = rope if rope is not None else (None, None)
        first = txt_freqs[:1].expand(stream.shape[1], -1) if txt_freqs is not None else None
        txt_mod1, txt_mod2 = block.txt_mod(temb if concept_temb is None
                                           else concept_temb).chunk(2, dim=-1)
        norm_c, gate_c = modulated(block.txt_norm1, stream, txt_mod1)
        q_c, k_c, v_c = qkv(norm_c, True, first)
        img_mod1 = block.img_mod(temb).chunk(2, dim=-1)[0]
        ref_mod1 = block.img_mod(temb_ref).chunk(2, dim=-1)[0] if index is not None else None
        q, k, v = qkv(modulated(block.img_norm1, hs, img_mod1, ref_mod1)[0], False, img_freqs,
                      queries=outputs)
        # the concepts attend to the image and to each other; nothing attends to them
        out_c = F.scaled_dot_product_attention(q_c, torch.cat([k, k_c], 2), torch.cat([v, v_c], 2))
        out_c = out_c.transpose(1, 2).flatten(2)  # (n, C, inner)
        image = None
        if outputs:  # the image patches' own attention output over [text; image], as the block
            own_mod1 = block.txt_mod(temb).chunk(2, dim=-1)[0]
            _, k_t, v_t = qkv(modulated(block.txt_norm1, ehs, own_mod1)[0], True, txt_freqs,
                              queries=False)
            joint_mask = None
            if mask is not None:  # the processor's: [text mask; image all kept]
                m = mask[rows]
                joint_mask = torch.cat([m, torch.ones(m.shape[0], hs.shape[1], dtype=torch.bool,
                                                      device=m.device)], 1)[:, None, None, :]
            image = F.scaled_dot_product_attention(q, torch.cat([k_t, k], 2),
                                                   torch.cat([v_t, v], 2), attn_mask=joint_mask)
            image = image.transpose(1, 2).flatten(2)  # (n, HW, inner)
            image = image[:, : self._concept_noise(call_kwargs, image.shape[1])]
        nxt = None
        if block is not self.pipe.transformer.transformer_blocks[-1]:  # the text's update
            c = stream + gate_c * attn.to_add_out(out_c)
            ff_in, gate2 = modulated(block.txt_norm2, c, txt_mod2)
            nxt = c + gate2 * block.txt_mlp(ff_in)
            if nxt.dtype == torch.float16:
                nxt = nxt.clip(-65504, 65504)  # as the blocks clip their fp16 outputs
        return ConceptStep(nxt, image, out_c if outputs else None)

    # ================================================================ asked from outside the engine
    def text_encoders(self, params: dict) -> list:
        """Qwen2.5-VL (``text_encoder``), the whole text axis."""
        return self._text_encoder("tokenizer", "text_encoder", 0, self.text_length(params))


# EditPlus's label of image i (1-based) before the prompt (a local of its _get_qwen_prompt_embeds)
_PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
_REFERENCE_PATCHES = 64 * 64  # a reference as the edit pipelines VAE-encode it: ~1 MP, 2x2 packed


class QwenImageEditAdapter(QwenImageAdapter):
    """A Qwen-Image-Edit pipeline (``QwenImageEditPipeline``; ``QwenImageEditPlusPipeline``,
    several reference images) on ``QwenImageTransformer2DModel``: Qwen-Image with the reference
    images' packed latents appended to the image stream and shown to Qwen2.5-VL in the prompt.

    **Sites, kernel.** The transformer's ``hidden_states`` are ``[noise; reference 0; ...]``
    packed patches; ``img_shapes`` (per batch item ``[(1, h/2, w/2), (1, rh_0/2, rw_0/2), ...]``)
    gives each part's grid, and the pipeline keeps the first ``noise`` rows of the prediction. So
    every site's kernel sequence is ``[text, image, reference 0, ...]``
    (:func:`sdlens.engine.arch.base.reference_layout`, the grids from ``img_shapes``): the maps
    are the image queries' text columns of the softmax over all of it, reference maps
    (``record=(..., "reference_maps")``, ``trace.heatmap("image 1")``) its reference columns.
    The trace's latents / noise / x0 are the noise part, unpacked as Qwen-Image's.

    **Text.** The pipelines drop the template's first 64 tokens (its system prompt and
    ``<|im_start|>user\\n``); what is left is, in order: the reference images as Qwen2.5-VL
    sees them (Edit: ``<|vision_start|>``, the image's ``<|image_pad|>`` tokens, one per 28 x 28
    px of the image resized to ~1 MP -- a list of images, one per prompt, is shown as given --
    then ``<|vision_end|>``; EditPlus: ``Picture i: <|vision_start|> ... <|vision_end|>`` per
    image, each resized to ~384² px), the prompt's pieces, the template's 5 closing tokens. The text axis is two segments (``text_parts``): ``"vision"``
    (the images' tokens and labels: no words, not recorded; its length computed from the
    images' sizes by the pipeline's own processor) and ``"qwen2.5-vl"`` (the prompt's pieces,
    cut alone: a special token before them splits the text; then the closing tokens, that
    segment's padding). The pipelines do not truncate the prompt; its segment is given
    ``tokenizer_max_length`` (1024) positions. Guidance as Qwen-Image's (true CFG, two calls;
    the negative prompt's text has the same vision tokens).
    """

    pipelines = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    families = ("qwen-image-edit",)
    max_text_tokens = 1024  # the pipelines' tokenizer_max_length (the prompt's segment)

    def __init__(self, pipe):
        super().__init__(pipe)
        self._noise: int | None = None  # noise tokens of the denoiser call in progress
        self._vision: dict = {}  # image sizes -> tokens of the "vision" segment

    def plus(self) -> bool:
        return type(self.pipe).__name__ == "QwenImageEditPlusPipeline"

    # ---------------------------------------------------------------- packed latents
    @staticmethod
    def _image_parts(img_shapes) -> tuple[list[int], list[tuple[int, int]]] | None:
        """Token counts and (rows, columns) of the noise and each reference, from ``img_shapes``
        (the first batch item's ``[(frames, rows, columns), ...]``); None where unreadable."""
        try:
            shapes = [tuple(int(v) for v in s) for s in img_shapes[0]]
            counts = [f * h * w for f, h, w in shapes]
        except (TypeError, ValueError, IndexError):
            return None
        return (counts, [(h, w) for _, h, w in shapes]) if counts else None

    def denoiser_input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The noise part of the transformer's input, unpacked: (B, C, h, w)."""
        packed = args[0] if args else kwargs.get(self.sample_arg)
        parts = self._image_parts(kwargs.get("img_shapes"))
        self._noise = None
        if not torch.is_tensor(packed) or packed.ndim != 3 or parts is None \
                or sum(parts[0]) != packed.shape[1]:
            return None
        self._noise = parts[0][0]
        rows, cols = parts[1][0]
        return self.spatial(packed[:, : self._noise], (2 * rows, 2 * cols))

    def denoiser_output(self, output) -> torch.Tensor | None:
        """The noise part of the prediction (the pipeline keeps ``[:, :noise]``)."""
        out = self.output_tensor(output)
        return out[:, : self._noise] if torch.is_tensor(out) and self._noise is not None else None

    def activation_bytes(self, latent_hw: tuple[int, int]) -> int:
        """One ~1 MP reference (64 x 64 patches) and its ~1225 vision tokens assumed."""
        h, w = latent_hw
        tokens = (h // 2) * (w // 2) + _REFERENCE_PATCHES + 1227 + self.max_text_tokens
        return joint_activation_bytes(self.pipe.transformer, tokens)

    # ---------------------------------------------------------------- text
    def _shown_images(self, params: dict) -> list | None:
        """The call's reference images as the pipeline shows them to Qwen2.5-VL (PIL images: the
        pipelines read their ``.size``): EditPlus resizes each to ~384² px; Edit resizes one image
        to ~1 MP and keeps a list of one image per prompt as given (the first here; None when the
        list's images differ in size: vision tokens of another length per prompt). None where it
        cannot be told."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
            CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE, calculate_dimensions)

        image = params.get("image")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        sizes = [getattr(im, "size", None) for im in images]
        if not images or not all(isinstance(s, tuple) and len(s) == 2 and min(s) > 0
                                 for s in sizes):
            return None
        resize = self.pipe.image_processor.resize
        if self.plus():
            dims = [calculate_dimensions(CONDITION_IMAGE_SIZE, w / h) for w, h in sizes]
            return [resize(im, dh, dw) for im, (dw, dh, *_) in zip(images, dims)]
        if isinstance(image, (list, tuple)):  # the pipeline's resize passes a list through
            return images[:1] if len(set(sizes)) == 1 else None
        w, h = sizes[0]
        dw, dh, *_ = calculate_dimensions(VAE_IMAGE_SIZE, w / h)
        return [resize(image, dh, dw)]

    def _vision_length(self, params: dict) -> int | None:
        """Tokens of the text axis before the prompt's (the ``"vision"`` segment), for the
        call's ``image``; None where it cannot be told. The images as shown
        (:meth:`_shown_images`) and the templated text up to the prompt (EditPlus: with its
        ``"Picture i: "`` labels) go through the pipeline's processor (which expands each
        ``<|image_pad|>`` to the image's tokens)."""
        image = params.get("image")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        sizes = tuple(getattr(im, "size", None) for im in images)
        key = (self.plus(), sizes)
        if key not in self._vision:
            pipe = self.pipe
            template = getattr(pipe, "prompt_template_encode", None)
            start = getattr(pipe, "prompt_template_encode_start_idx", None)
            shown = self._shown_images(params)
            if shown is None or getattr(pipe, "processor", None) is None \
                    or not isinstance(template, str) or "{}" not in template or start is None:
                return None
            prefix = template[: template.index("{}")]
            if self.plus():
                prefix += "".join(_PICTURE.format(i + 1) for i in range(len(shown)))
            try:
                ids = pipe.processor(text=[prefix], images=shown).input_ids[0]
            except Exception:  # noqa: BLE001 - what the pipeline cannot take either
                return None
            self._vision[key] = len(ids) - int(start)
        return self._vision[key]

    def _concept_noise(self, call_kwargs: dict | None, n_image: int) -> int:
        """The noise part of the image stream (``img_shapes``' first grid): the concepts attend
        to the references' patches too, as the prompt does, and map the generated image only."""
        parts = self._image_parts((call_kwargs or {}).get("img_shapes"))
        if parts is None or sum(parts[0]) != n_image:
            raise ValueError("the image stream's parts cannot be read from img_shapes")
        return parts[0][0]

    def concept_text(self, concepts: list[str], params: dict) -> torch.Tensor:
        """The pipeline's ``prompt_embeds`` of each concept as the prompt, beside the call's
        reference images as the pipeline shows them (so a concept's pieces sit where the
        prompt's do: after the ``"vision"`` segment), one concept at a time (the processor takes
        one set of images per text); zero-padded to the longest: (C, L, 3584)."""
        shown = self._shown_images(params)
        if shown is None:
            raise ValueError("the reference images of this call cannot be read (PIL images "
                             "expected), so the concepts cannot be encoded beside them")
        device = getattr(self.pipe, "_execution_device", self.denoiser.device)
        embeds = [self.pipe.encode_prompt(prompt=[c], image=shown if self.plus() else shown[0],
                                          device=device,
                                          max_sequence_length=self.max_text_tokens)[0][0]
                  for c in concepts]
        length = max(e.shape[0] for e in embeds)
        return torch.stack([F.pad(e, (0, 0, 0, length - e.shape[0])) for e in embeds])

    def text_length(self, params: dict) -> int:
        return (self._vision_length(params) or 0) + self.max_text_tokens

    def text_tokens(self, prompt: str, params: dict) -> None:
        return None  # laid out by text_parts

    def text_parts(self, params: dict) -> list[tuple[str, object, int]]:
        """The images' tokens (no words), then the prompt's pieces; with images sdlens cannot
        read, the prompt's segment gets no tokenizer (its words unknown, not misplaced)."""
        vision = self._vision_length(params)
        tok = getattr(self.pipe, "tokenizer", None) if vision is not None else None
        return [("vision", None, vision or 0), ("qwen2.5-vl", tok, self.max_text_tokens)]

    def text_encoders(self, params: dict) -> list[TextEncoder]:
        """Qwen2.5-VL (``text_encoder``): the prompt's segment of the text axis."""
        vision = self._vision_length(params)
        if vision is None:
            return []
        return self._text_encoder("tokenizer", "text_encoder", vision, self.max_text_tokens)

    def encoder_ids(self, enc, prompt: str, params: dict) -> None:
        return None  # the processor's ids (the images' vision tokens inside): not Qwen-Image's

    # ---------------------------------------------------------------- sites
    def kernel_layout(self, site: str, attn, call, index: int, q_len: int, k_len: int,
                      denoiser_kwargs: dict) -> KernelLayout | None:
        """``[text, image, reference 0, ...]``: the text as long as the site call's
        ``encoder_hidden_states``, the image parts from ``img_shapes``."""
        if index != 0:
            return None
        n_text = self.kernel_text_length(call, denoiser_kwargs)
        parts = self._image_parts(denoiser_kwargs.get("img_shapes"))
        if n_text is None or parts is None:
            return None
        counts, grids = parts
        return reference_layout(("text", "image"), {"text": n_text, "image": counts[0]},
                                counts[1:], q_len, k_len, grids[1:])
