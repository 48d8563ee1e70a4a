"""The Flux.2 family (``Flux2Transformer2DModel``): ``Flux2Pipeline`` (FLUX.2-dev, Mistral-3 text)
and ``Flux2KleinPipeline`` / ``Flux2KleinInpaintPipeline`` (FLUX.2-klein, Qwen3 text).

**Sites** as Flux.1's (:class:`sdlens.engine.arch.flux.FluxNaming`): the double-stream blocks
``transformer_blocks.N.attn`` (``"double.N"``) and the single-stream blocks
``single_transformer_blocks.N.attn`` (``"single.N"``), whose fused ``to_qkv_mlp_proj`` is no
concern at the kernel: every site's kernel sequence is ``[text, image, reference 0, ...]``
(the transformer joins text and image once before the single-stream blocks; the text length is
its call's ``encoder_hidden_states``).

**Latents.** The pipelines hold ``(B, (h/16)(w/16), 128)``: 32 channels x 2x2 patches, row-major
(``img_ids`` [t, row, column, 0]), normalised by the VAE's batch norm. The trace holds them
unpatchified, ``(B, 32, h/8, w/8)``, in that *normalised* space (the transformer's; a pure
permutation, so x0 = x_t - sigma v holds as the scheduler computes it); the VAE decodes
``x * sqrt(bn.var + eps) + bn.mean``. Klein's ``output_type="latent"`` returns them
de-normalised, Flux.2-dev's packed.

**Reference images** (``image=[...]``): their patches follow the noise's in the transformer's
input (``img_ids`` t = 10, 20, ...), each a segment ``"reference i"`` of the kernel sequence
(:func:`sdlens.engine.arch.base.reference_layout`); the trace's latents / prediction are the
noise part (the pipelines keep ``[:, :noise]``).

**Text.** The prompt goes through a chat template (dev: Mistral's ``[SYSTEM_PROMPT]`` with the
pipeline's ``system_message``, then ``[INST]{prompt}[/INST]``; klein: Qwen3's ``<|im_start|>user
\\n{prompt}<|im_end|>`` + the assistant's empty think block), padded to ``max_sequence_length``
(512); hidden states of several layers are stacked per token (dev 10 / 20 / 30, klein 9 / 18 /
27), so position ``p`` of the text axis is token ``p`` of the templated sequence. The template
is left out of the words: the text axis is two segments (``text_parts``), ``"template"``
(the tokens before the prompt: no words, its positions not recorded) and the encoder's
(``"mistral3"`` / ``"qwen3"``: the prompt's own pieces; what follows them, the template's
closing tokens and the padding, is that segment's padding: not recorded unless
``keep_padding=True``). Not traced as words: a prompt rewritten by the pipeline's caption
upsampling (``caption_upsample_temperature``).

**Guidance.** dev is guidance-distilled (``guidance_scale``, 4 by default, an input of the
transformer; one call per step; ``meta["distilled_guidance"]``). klein's step-distilled
checkpoints (``is_distilled``) take no guidance (one call, ``trace.guidance_scale`` NaN: "guidance
off"); the base checkpoints run true CFG when ``guidance_scale > 1``: two calls per step, the
prompt's, then ``""`` (or the negative prompt), ``neg + g (pos - neg)``.

No concept pass (Flux.2's blocks share their modulation across blocks; not written yet).
"""

from __future__ import annotations

from sdlens.engine.arch.base import BackboneAdapter, TextEncoder
from sdlens.engine.arch.flux import FluxKontextAdapter


class Flux2Adapter(FluxKontextAdapter):
    """A Flux.2 pipeline (``pipe.transformer`` a ``Flux2Transformer2DModel``); references laid
    out as Kontext's (noise first, then each reference, told apart by ``img_ids``' first
    coordinate)."""

    pipelines = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline")
    families = ("flux2", "flux2-klein")

    def __init__(self, pipe):
        super().__init__(pipe)
        self._prefix: int | None = None  # template tokens before the prompt

    @classmethod
    def handles(cls, pipe) -> bool:
        transformer = getattr(pipe, "transformer", None)
        return (type(transformer).__name__ == "Flux2Transformer2DModel"
                and type(pipe).__name__ in cls.pipelines)

    def klein(self) -> bool:
        return "Klein" in type(self.pipe).__name__

    def family(self) -> str:
        return "flux2-klein" if self.klein() else "flux2"

    # ---------------------------------------------------------------- guidance
    def _guided(self, params: dict) -> bool:
        """klein base: true CFG when ``guidance_scale > 1`` (the pipeline's rule)."""
        gs = params.get("guidance_scale")
        distilled = bool(getattr(self.pipe, "config", {}).get("is_distilled", False))
        return self.klein() and not distilled and gs is not None and float(gs) > 1

    def cfg_calls(self, params: dict) -> tuple[str, ...] | None:
        return ("text", "uncond") if self._guided(params) else None

    def cfg_scale(self, params: dict) -> float | None:
        if self.klein() and not self._guided(params):
            return None  # step-distilled klein (or guidance_scale <= 1): no guidance
        return BackboneAdapter.cfg_scale(self, params)

    def guidance_meta(self, params: dict) -> dict:
        gs = params.get("guidance_scale")
        if self.distilled_guidance() and gs is not None:
            return {"distilled_guidance": float(gs)}
        return {}

    def distilled_guidance(self) -> bool:
        """dev: the guidance value is an input of the transformer (``guidance_embeds``); klein's
        transformer has none (the pipeline passes ``guidance=None``)."""
        return not self.klein() and bool(self.pipe.transformer.config.get("guidance_embeds"))

    # ---------------------------------------------------------------- text
    def encoder_name(self) -> str:
        return "qwen3" if self.klein() else "mistral3"

    def templated(self, prompt: str) -> str:
        """The text the pipeline tokenizes for ``prompt`` (its chat template applied)."""
        tok = self.pipe.tokenizer
        if self.klein():
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        system = getattr(self.pipe, "system_message", None)
        messages = format_input(prompts=[prompt], **({"system_message": system} if system else {}))
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return text[0] if isinstance(text, list) else text  # a batch of one conversation

    def tokenizer(self):
        """The text tokenizer (FLUX.2-dev's pipeline holds a ``PixtralProcessor``: its
        ``.tokenizer``)."""
        tok = self.pipe.tokenizer
        return tok if hasattr(tok, "convert_ids_to_tokens") else getattr(tok, "tokenizer", tok)

    def template_prefix(self) -> int:
        """Positions before the encoder's segment: the template's tokens before the prompt,
        less the special tokens the tokenizer puts before a bare prompt (a BOS: sdlens cuts the
        prompt alone, so that BOS sits on the template's last position, no word, and the
        prompt's pieces on their own positions). The same for every prompt."""
        if self._prefix is None:
            tok, mark = self.tokenizer(), "\u2603"
            text = self.templated(mark)
            before = len(tok(text[: text.index(mark)], add_special_tokens=False).input_ids)
            bare = list(tok("cat").input_ids)
            plain = list(tok("cat", add_special_tokens=False).input_ids)
            lead = next((k for k in range(len(bare)) if bare[k: k + len(plain)] == plain), 0)
            self._prefix = max(0, before - lead)
        return self._prefix

    def text_prompts(self, prompts: list, params: dict) -> list:
        return list(prompts)

    def text_parts(self, params: dict) -> list[tuple[str, object, int]]:
        """The template's tokens before the prompt (no words), then the encoder's segment: the
        prompt's own pieces, then (as its padding) the template's end and the padding."""
        n, pre = self.text_length(params), self.template_prefix()
        return [("template", None, pre), (self.encoder_name(), self.tokenizer(), n - pre)]

    def text_encoders(self, params: dict) -> list[TextEncoder]:
        pre, encoder = self.template_prefix(), getattr(self.pipe, "text_encoder", None)
        if encoder is None:
            return []
        return [TextEncoder("text_encoder", self.tokenizer(), encoder, pre,
                            self.text_length(params) - pre)]
