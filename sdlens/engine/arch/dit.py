"""Cross-attention diffusion transformers: PixArt-α / PixArt-Σ and Sana.

Both denoisers are a stack of ``transformer_blocks``, each with a self-attention ``attn1`` over
the image tokens and a cross-attention ``attn2`` from the image tokens to the text tokens (T5 for
PixArt, Gemma-2 for Sana; 300 positions by default). The sites are the ``attn2`` modules,
``transformer_blocks.N.attn2``, aliased ``"block.N"`` (also ``"N"``); the group ``"blocks"``
names them all.

Image tokens: the latents (B, C, h, w) are cut into ``patch_size`` x ``patch_size`` patches,
row-major (``PatchEmbed``), so every site's map is (h / p, w / p) (PixArt-Σ: p = 2; Sana: p = 1).

Text mask: the pipelines pass ``encoder_attention_mask`` (1 for the prompt's tokens, 0 for
padding); the transformer turns it into an additive bias (B, 1, K) that ``attn2`` receives as
``attention_mask``, so padding positions get no attention. The recorder applies the same mask
(:func:`sdlens.engine.sites.attention_probabilities`).

Guidance: ``cat([uncond, text])`` as in the SD pipelines (the masks likewise). PixArt is trained
with learned sigmas: its transformer returns 2 x C channels and the pipeline keeps the first C
(the noise) for the guidance and the scheduler; :meth:`DiTAdapter.denoiser_output` does the same.

Sana's pipeline prepends its "complex human instruction" to every prompt by default, then keeps
the first token and the last ``max_sequence_length - 1`` of the padded sequence;
:meth:`SanaAdapter.text_tokens` rebuilds that layout so the Trace's tokens line up with the text
axis.
"""

from __future__ import annotations

import torch

from sdlens.engine.arch.base import BackboneAdapter, BlockNaming



class DiTAdapter(BackboneAdapter):
    """A cross-attention DiT (``pipe.transformer``); subclasses name the transformer class."""

    transformer_class: str = ""
    naming = BlockNaming("attn2")
    max_text_tokens = 300
    sample_arg = "hidden_states"
    self_attention_quadratic: int = 1  # softmax self-attention (0: linear attention)

    def __init__(self, pipe):
        super().__init__(pipe)
        self._sites = super().sites()
        if not self._sites:
            raise TypeError(f"sdlens cannot trace {type(pipe).__name__}: its transformer has no "
                            "cross-attention layers")

    @classmethod
    def handles(cls, pipe) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return (transformer is not None and type(transformer).__name__ == cls.transformer_class
                and type(pipe).__name__ in cls.pipelines)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def family(self) -> str:
        return self.families[0]

    @property
    def _patch(self) -> int:
        return int(self.pipe.transformer.config.patch_size)

    def default_latent_hw(self) -> tuple[int, int]:
        size = self.pipe.transformer.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def latent_channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels)

    def denoiser_output(self, output) -> torch.Tensor | None:
        """The prediction the pipeline guides and steps with: the first C channels when the
        transformer also predicts the variance (``out_channels == 2 * in_channels``)."""
        out = super().denoiser_output(output)
        if out is None:
            return None
        c = self.latent_channels()
        cfg = self.pipe.transformer.config
        return out[:, :c] if (cfg.out_channels or c) // 2 == c else out

    def text_length(self, params: dict) -> int:
        """The text axis: ``max_sequence_length`` of the call (300 by default)."""
        return int(params.get("max_sequence_length") or self.max_text_tokens)

    def encoded_prompt(self, prompt: str, params: dict) -> str:
        """The pipeline's own text preprocessing (lower-cased and stripped; or its caption
        cleaning with ``clean_caption=True``)."""
        clean = bool(params.get("clean_caption"))
        try:
            return self.pipe._text_preprocessing([prompt], clean_caption=clean)[0]
        except Exception:  # noqa: BLE001 - a pipeline without it: what PixArt / Sana do
            return prompt.lower().strip()

    def activation_bytes(self, latent_hw: tuple[int, int]) -> int:
        """30 tensors of the image tokens' width (attention, MLP 4x, modulation, residuals) plus
        one self-attention score matrix (heads x tokens^2; Sana's linear attention has none)."""
        t = self.pipe.transformer
        itemsize = torch.finfo(t.dtype).bits // 8 if t.dtype.is_floating_point else 4
        h, w = latent_hw
        tokens = (h // self._patch) * (w // self._patch)
        inner = t.config.num_attention_heads * t.config.attention_head_dim
        quadratic = self.self_attention_quadratic * t.config.num_attention_heads * tokens ** 2
        return (30 * tokens * inner + quadratic) * itemsize

    def site_of(self, processor_key: str) -> str | None:
        return self.naming.site_of(processor_key)

    def sites(self) -> list[str]:
        return list(self._sites)

    def resolutions(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        h, w = latent_hw
        p = self._patch
        return {s: (h // p, w // p) for s in self._sites}


class PixArtAdapter(DiTAdapter):
    """PixArt-α / PixArt-Σ (``PixArtTransformer2DModel``, T5 text, learned sigmas)."""

    pipelines = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    families = ("pixart",)
    transformer_class = "PixArtTransformer2DModel"

    def text_length(self, params: dict) -> int:
        # PixArt-α's pipeline encodes 120 tokens by default, PixArt-Σ's 300
        default = 120 if type(self.pipe).__name__ == "PixArtAlphaPipeline" else 300
        return int(params.get("max_sequence_length") or default)


class SanaAdapter(DiTAdapter):
    """Sana (``SanaTransformer2DModel``, Gemma-2 text, linear self-attention)."""

    pipelines = ("SanaPipeline",)
    families = ("sana",)
    transformer_class = "SanaTransformer2DModel"
    self_attention_quadratic = 0

    def text_tokens(self, prompt: str, params: dict) -> list[int] | None:
        """The token ids at the text axis's positions when the call adds the complex human
        instruction (the pipeline's default): first token + the last ``max_sequence_length - 1``
        of ``instruction + prompt`` padded to ``len(instruction) + max_sequence_length - 2``,
        padding dropped; None without an instruction (the prompt's own tokens). ``prompt`` is
        the encoded prompt. The kept tail of the instruction is text the model saw: its pieces
        are words of the Trace too."""
        chi = params.get("complex_human_instruction")
        tok = getattr(self.pipe, "tokenizer", None)
        if not chi or tok is None:
            return None
        n = self.text_length(params)
        text = "\n".join(chi)
        total = len(tok.encode(text)) + n - 2
        # the pipeline pads on the right: padding is whatever lies past the encoded ids
        ids = list(tok(text + prompt, max_length=total, truncation=True,
                       add_special_tokens=True).input_ids)
        keep = [0] + list(range(total - (n - 1), total))
        return [int(ids[i]) for i in keep if i < len(ids)]
