"""Z-Image (``ZImageTransformer2DModel``: ZImagePipeline).

**Sites.** The main layers ``layers.N.attention`` (aliases ``"layer.N"``, group ``"layers"``; 30
in the real model) are single-stream: ``ZSingleStreamAttnProcessor`` attends over one sequence
per batch row, ``[image; caption]`` (the transformer's ``_build_unified_sequence``, basic
mode), and calls the attention kernel once. The image part is the image's patches (2x2), padded
to a multiple of 32 with the learned ``x_pad_token``; the caption part is the caption's tokens,
padded to a multiple of 32 with the learned ``cap_pad_token``; rows of a batch whose sequences
differ in length are zero-padded to the longest and the kernel gets a bool mask. The refiners
(``noise_refiner``: the image alone; ``context_refiner``: the caption alone) see no text->image
attention and are not sites. The recorded map of a site is each image patch's row of the
softmax over the whole sequence, its prompt-token columns (the padding patches' rows are not
recorded; every key the kernel saw is in the normaliser, padding included, as the model
attends to it). Maps are at the latents' resolution / 2.

**Text.** The pipeline formats the prompt with Qwen3's chat template
(``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``), keeps the valid tokens'
``hidden_states[-2]`` (at most ``max_sequence_length``, 512, with the template) and passes them
as a list. The template's opening tokens are a segment of their own (``"template"``) in the
kernel's layout; the text axis starts at the prompt's first token (:meth:`ZImageAdapter.text_tokens`:
the prompt's tokens as the tokenizer cuts them inside the template). The template's closing
tokens and the caption padding follow the prompt on that axis: they are not words and, by
default, are left out of the maps as padding is.

**Latents.** Unpacked, (B, 16, h, w), as the pipeline holds them; the transformer gets a list of
(16, 1, h, w) and returns one, which is stacked here.

**Guidance.** CFG (``guidance_scale > 0``, 5 by default; 0 turns it off, 1 does not) is one
batched call per step, the
prompts first, then the negative prompts (``cfg_halves = ("text", "uncond")``). The pipeline
combines ``pos + guidance_scale * (pos - neg)`` and then negates the result (the model
predicts ``-v``): the trace's ``noise_text`` / ``noise_uncond`` are the two halves negated, so
``trace.noise = noise_text + guidance_scale * (noise_text - noise_uncond)`` (without
``cfg_normalization``, which rescales it) and x0 = x_t - sigma * noise (the table's flow row).
``trace.guidance_scale`` is ``guidance_scale`` as given. A call whose ``cfg_truncation`` drops
the guidance for later steps changes the denoiser's batch mid-run: sdlens then stops recording
that call (one warning), and the generation is not affected.

**Concept maps** (``concepts=[...]``, :mod:`sdlens.engine.joint`;
:meth:`ZImageAdapter.concept_step`),
beside the main layers, from their forward pre-hooks' arguments, under ``torch.no_grad``: the
image is unchanged (``tests/engine/test_concepts_2026.py`` checks it). A concept is encoded as
the caption is (Qwen3 in the chat template, ``hidden_states[-2]``, the template's opening left
out so position ``p`` is the concept's ``p``-th piece) and enters as the caption does:
``cap_embedder``, then the caption-only ``context_refiner`` layers, in which each concept is the
one token of its own caption (it attends to itself only). In each main layer it takes the
layer's one shared path as a caption token does: ``attention_norm1`` scaled by the layer's
modulation (the timestep's only: Z-Image has no pooled text), ``to_q`` / ``to_k`` / ``to_v``,
``norm_q`` / ``norm_k``, the first caption position's rotary frequencies; it attends to the
image part of the sequence (the patches and the image padding, as the caption does) and to the
concepts (nothing attends to them); then ``to_out``, ``attention_norm2``, the tanh gate and the
gated ``feed_forward``. The map's image factor is the image patches' own attention output over
the whole sequence (with the batch's mask), before ``to_out``.

ConceptAttention's code has no Z-Image path and Z-Image has no double-stream blocks: the
default (``"conceptattention"``) is **sdlens's transfer of its Flux recipe**, not code of the
paper: every main layer (the only layers where image and text meet), the heatmap pooling the
last four by default, every step, each concept its own encoding's **first piece** (the paper
keeps T5's position 0, the concept's first piece; Qwen3 is a causal LM in a chat template), the
layers' own modulation (no pooled text to replace by zeros). ``"sdlens"``: the same layers, each
concept the mean over its pieces. Omni mode (``siglip_feats``, per-token modulation) is not
handled: the pass is skipped with one warning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdlens.engine.arch.base import (BackboneAdapter, BlockNaming, ConceptStep, KernelLayout,
                                     joint_activation_bytes)

_LAYERS = "layers"
_MULTIPLE = 32  # the transformer pads the image and the caption to multiples of this


def _padded(n: int) -> int:
    return n + (-n) % _MULTIPLE


class ZImageAdapter(BackboneAdapter):
    """A Z-Image pipeline (``pipe.transformer`` a ``ZImageTransformer2DModel``)."""

    pipelines = ("ZImagePipeline",)
    families = ("z-image",)
    naming = BlockNaming("attention", blocks=_LAYERS, alias="layer", group="layers")
    max_text_tokens = 512  # the pipeline's default max_sequence_length (template included)
    cfg_halves = ("text", "uncond")  # cat([prompt_embeds, negative_prompt_embeds])
    attention_kind = "joint"
    joint_order = ("image", "text")

    def cfg_weight(self, scale: float) -> float | None:
        """The pipeline guides above 0 with ``pos + scale (pos - neg)``: ``u + (1 + scale)
        (c - u)``."""
        return 1.0 + float(scale) if float(scale) > 0 else None

    def guidance_meta(self, params: dict) -> dict:
        return {"cfg_rule": "Z-Image guides above 0"}  # how the views explain "guidance off"

    def __init__(self, pipe):
        super().__init__(pipe)
        self._sites = super().sites()
        self._template: tuple[int, int] | None = None  # (opening, closing) template tokens
        if not self._sites:
            raise TypeError(f"sdlens cannot trace {type(pipe).__name__}: its transformer has no "
                            "attention layers")

    @classmethod
    def handles(cls, pipe) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return (type(transformer).__name__ == "ZImageTransformer2DModel"
                and type(pipe).__name__ in cls.pipelines)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def family(self) -> str:
        return self.families[0]

    def default_latent_hw(self) -> tuple[int, int]:
        size = 1024 // int(getattr(self.pipe, "vae_scale_factor", 8))  # the pipeline's default
        return (size, size)

    def latent_channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels)

    @property
    def _patch(self) -> int:
        sizes = self.pipe.transformer.config.get("all_patch_size") or (2,)
        return int(sizes[0])

    # ---------------------------------------------------------------- the denoiser's lists
    def denoiser_input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The latents the transformer is given, a list of (C, 1, h, w), stacked: (B, C, h, w)."""
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, (list, tuple)) or not x or not all(
                torch.is_tensor(t) and t.ndim == 4 and t.shape[1] == 1 for t in x):
            return None
        return torch.stack([t[:, 0] for t in x])

    def output_tensor(self, output) -> torch.Tensor | None:
        """The transformer's list of (C, 1, h, w) predictions, stacked and negated as the
        pipeline does (it steps with ``-output``): (B, C, h, w) float32."""
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", None)
        if not isinstance(out, (list, tuple)) or not out or not all(
                torch.is_tensor(t) and t.ndim == 4 for t in out):
            return None
        return -torch.stack([t.float() for t in out]).squeeze(2)

    def with_output_tensor(self, output, tensor: torch.Tensor):
        """``output`` with its list replaced by ``tensor`` (B, C, h, w), undoing
        :meth:`output_tensor`'s negation and stacking."""
        items = [(-t).unsqueeze(1) for t in tensor.unbind(0)]
        if isinstance(output, tuple):
            return (items, *output[1:])
        output.sample = items
        return output

    # ---------------------------------------------------------------- text
    def text_length(self, params: dict) -> int:
        return int(params.get("max_sequence_length") or self.max_text_tokens)

    def _templated(self, prompt: str) -> list[int]:
        tok = self.pipe.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=True)
        return list(tok(text).input_ids)

    def template_tokens(self) -> tuple[int, int] | None:
        """(opening, closing): how many tokens the chat template puts before and after a
        prompt; None where the pipeline's tokenizer has no chat template."""
        if self._template is None:
            try:
                a, b = self._templated("a"), self._templated("")
            except Exception:  # noqa: BLE001 - no template: the words are not known
                return None
            opening = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
            self._template = (opening, len(b) - opening)
        return self._template

    def text_tokens(self, prompt: str, params: dict) -> list[int] | None:
        """The prompt's token ids as the tokenizer cuts them inside the chat template (what the
        pipeline encodes, truncated at ``max_sequence_length`` with the template), without the
        template's tokens."""
        template = self.template_tokens()
        if template is None:
            return None
        opening, closing = template
        ids = self._templated(prompt)
        end = min(len(ids) - closing, self.text_length(params))
        return [int(i) for i in ids[opening:end]]

    def activation_bytes(self, latent_hw: tuple[int, int]) -> int:
        h, w = latent_hw
        p = self._patch
        tokens = _padded((h // p) * (w // p)) + self.max_text_tokens
        cfg = self.pipe.transformer.config
        return joint_activation_bytes(self.pipe.transformer, tokens, int(cfg.n_heads),
                                      int(cfg.dim))

    # ---------------------------------------------------------------- sites
    def kernel_layout(self, site: str, attn, call, index: int, q_len: int, k_len: int,
                      denoiser_kwargs: dict) -> KernelLayout | None:
        """``[image; image padding; template; text ...]``: the image's patches from the
        denoiser call's latents (its first positional argument), padded to a multiple of 32;
        the chat template's opening tokens; the prompt's tokens and everything after them
        (the template's closing tokens, caption padding, batch padding: the request keeps
        the prompt's positions). None where it cannot be told."""
        x = denoiser_kwargs.get(0, denoiser_kwargs.get("x"))
        template = self.template_tokens()
        if index != 0 or template is None or not isinstance(x, (list, tuple)) or not x \
                or not torch.is_tensor(x[0]) or x[0].ndim != 4 or q_len != k_len:
            return None
        p = int(denoiser_kwargs.get("patch_size", self._patch))
        fp = int(denoiser_kwargs.get("f_patch_size", 1))
        _, f, h, w = x[0].shape
        n_image = (f // fp) * (h // p) * (w // p)
        start = _padded(n_image) + template[0]
        if start >= q_len:
            return None
        spans = {"image": slice(0, n_image), "image padding": slice(n_image, _padded(n_image)),
                 "template": slice(_padded(n_image), start), "text": slice(start, q_len)}
        return KernelLayout({"image": spans["image"], "text": spans["text"]}, spans)

    def site_of(self, processor_key: str) -> str | None:
        return self.naming.site_of(processor_key)

    def sites(self) -> list[str]:
        return list(self._sites)

    def resolutions(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        p = self._patch
        return {s: (latent_hw[0] // p, latent_hw[1] // p) for s in self._sites}

    # ---------------------------------------------------------------- concept pass
    def concept_blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """The main layers (the refiners see no text->image attention)."""
        return [(f"{_LAYERS}.{i}.attention", b) for i, b in
                enumerate(self.pipe.transformer.layers)]

    def paper_default_layers(self) -> list[str]:
        """The last four main layers (sdlens's transfer of ConceptAttention's Flux default)."""
        n = len(self.pipe.transformer.layers)
        return [f"{_LAYERS}.{i}.attention" for i in range(max(0, n - 4), n)]

    def concept_text(self, concepts: list[str], params: dict) -> torch.Tensor:
        """The pipeline's caption features of the concepts as prompts, the chat template's
        opening left out (position ``p``: the concept's ``p``-th piece, as the text axis of the
        words), zero-padded to the longest: (C, L, D)."""
        template = self.template_tokens()
        if template is None:
            raise ValueError("the tokenizer has no chat template: the concepts' pieces are unknown")
        embeds = self.pipe.encode_prompt(
            prompt=list(concepts), device=getattr(self.pipe, "_execution_device",
                                                  self.denoiser.device),
            do_classifier_free_guidance=False, max_sequence_length=self.text_length(params))[0]
        return torch.nn.utils.rnn.pad_sequence([e[template[0]:] for e in embeds],
                                               batch_first=True)

    paper_first_piece = True  # the paper's "first T5 token", transferred (module docstring)

    def concept_stream(self, vectors: torch.Tensor) -> torch.Tensor:
        """``cap_embedder``, then the ``context_refiner`` layers with each concept the one token
        of its own caption (its attention output is its own value)."""
        tr = self.pipe.transformer
        c = tr.cap_embedder(vectors.to(tr.cap_embedder[-1].weight.dtype))
        for layer in tr.context_refiner:
            attn = layer.attention
            c = c + layer.attention_norm2(attn.to_out[0](attn.to_v(layer.attention_norm1(c))))
            c = c + layer.ffn_norm2(layer.feed_forward(layer.ffn_norm1(c)))
        return c

    @staticmethod
    def _rotated(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """``ZSingleStreamAttnProcessor``'s rotation: x (n, L, heads, d), freqs (n, L, d / 2)
        complex."""
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(z * freqs.unsqueeze(2)).flatten(3).type_as(x)

    def concept_step(self, block, stream: torch.Tensor, args: tuple, kwargs: dict, rows: slice,
                     outputs: bool, method: str = "sdlens",
                     concept_temb: torch.Tensor | None = None,
                     call_kwargs: dict | None = None) -> ConceptStep:
        """One main layer of the concept pass (module docstring: "Concept maps")."""
        names = ("x", "attn_mask", "freqs_cis", "adaln_input", "noise_mask")
        arg = {n: kwargs[n] if n in kwargs else (args[i] if len(args) > i else None)
               for i, n in enumerate(names)}
        if arg["noise_mask"] is not None or arg["adaln_input"] is None:
            raise ValueError("Z-Image's omni mode (per-token modulation) is not handled")
        call_kwargs = call_kwargs or {}
        latents = call_kwargs.get(0, call_kwargs.get("x"))  # (the pipeline passes it first)
        if not isinstance(latents, (list, tuple)) or not torch.is_tensor(latents[0]):
            raise ValueError("the denoiser call's latents are not known")
        p = int(call_kwargs.get("patch_size", self._patch))
        fp = int(call_kwargs.get("f_patch_size", 1))
        _, f, h, w = latents[0].shape
        n_image = (f // fp) * (h // p) * (w // p)
        image_end = _padded(n_image)  # the caption starts after the image's padding
        x, freqs = arg["x"][rows], arg["freqs_cis"][rows]
        attn = block.attention
        mod = block.adaLN_modulation(arg["adaln_input"][rows]).unsqueeze(1)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=2)
        scale_msa, scale_mlp = 1 + scale_msa, 1 + scale_mlp
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()

        def qkv(t: torch.Tensor, f: torch.Tensor, queries: bool = True):
            """(q or None, k, v), each (n, heads, L, d), as the processor computes them."""
            t = block.attention_norm1(t) * scale_msa
            q, k, v = (getattr(attn, f"to_{n}")(t).unflatten(-1, (attn.heads, -1))
                       if n != "q" or queries else None for n in "qkv")
            q = attn.norm_q(q) if queries and attn.norm_q is not None else q
            k = attn.norm_k(k) if attn.norm_k is not None else k
            q = self._rotated(q, f) if queries else None
            return tuple(u.transpose(1, 2) if u is not None else None
                         for u in (q, self._rotated(k, f), v))

        first = freqs[:, image_end:image_end + 1].expand(-1, stream.shape[1], -1)
        q_c, k_c, v_c = qkv(stream, first)
        # the concepts attend to the image part (patches and padding) and to each other
        q, k, v = qkv(x if outputs else x[:, :image_end], freqs if outputs
                      else freqs[:, :image_end], queries=outputs)
        out_c = F.scaled_dot_product_attention(
            q_c, torch.cat([k[:, :, :image_end], k_c], 2), torch.cat([v[:, :, :image_end], v_c], 2))
        out_c = out_c.transpose(1, 2).flatten(2)  # (n, C, inner)
        image = None
        if outputs:  # the image patches' own attention output over the whole sequence
            mask = arg["attn_mask"]
            mask = mask[rows][:, None, None, :] if torch.is_tensor(mask) and mask.ndim == 2 \
                else mask
            image = F.scaled_dot_product_attention(q[:, :, :n_image], k, v, attn_mask=mask)
            image = image.transpose(1, 2).flatten(2)  # (n, HW, inner)
        nxt = None
        if block is not self.pipe.transformer.layers[-1]:  # the layer's update of a token
            c = stream + gate_msa * block.attention_norm2(attn.to_out[0](out_c))
            nxt = c + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(c) * scale_mlp))
        return ConceptStep(nxt, image, out_c if outputs else None)

    # ================================================================ asked from outside the engine
    def text_encoders(self, params: dict) -> list:
        """Qwen3 (``text_encoder``), the whole text axis."""
        return self._text_encoder("tokenizer", "text_encoder", 0, self.text_length(params))
