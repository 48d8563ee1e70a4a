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

**Guidance.** CFG (``guidance_scale > 0``, 5 by default) is one batched call per step, the
prompts first, then the negative prompts (``cfg_halves = ("text", "uncond")``). The pipeline
combines ``pos + guidance_scale * (pos - neg)`` and then negates the result (the model
predicts ``-v``): the trace's ``noise_text`` / ``noise_uncond`` are the two halves negated, so
``trace.noise = noise_text + guidance_scale * (noise_text - noise_uncond)`` (without
``cfg_normalization``, which rescales it) and x0 = x_t - sigma * noise (the table's flow row).
``trace.guidance_scale`` is ``guidance_scale`` as given. A call whose ``cfg_truncation`` drops
the guidance for later steps changes the denoiser's batch mid-run: sdlens then stops recording
that call (one warning), and the generation is not affected.
"""

from __future__ import annotations


import torch

from sdlens.engine.arch.base import (BackboneAdapter, BlockNaming, KernelLayout,
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
        return joint_activation_bytes(self.pipe.transformer, tokens)

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

    # ================================================================ asked from outside the engine
    def text_encoders(self, params: dict) -> list:
        """Qwen3 (``text_encoder``), the whole text axis."""
        return self._text_encoder("tokenizer", "text_encoder", 0, self.text_length(params))
