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

**Concept maps** (``concepts=[...]``, :mod:`sdlens.engine.joint`) through
:meth:`sdlens.engine.arch.flux.FluxAdapter.concept_step`: the double-stream blocks' text path
(``norm1_context`` modulated by the shared ``temb_mod_txt``, ``add_q_proj`` / ``add_k_proj`` /
``add_v_proj``, ``norm_added_q`` / ``norm_added_k``, ``to_add_out``, ``ff_context``) and the
single-stream blocks' fused one (``to_qkv_mlp_proj``: q, k, v and the MLP's input in one
projection; ``to_out`` over [attention; MLP]; the shared ``temb_mod``); the text length of a
single-stream block's joined sequence is the transformer call's. The concepts attend to the
whole image stream (references too, as the text does); the maps are over the generated image's
patches. Every concept gets the first text position's rotary embedding (``txt_ids`` [0, 0, 0,
0]; the prompt's tokens are at ``l = 0, 1, ...``).

ConceptAttention's code has no Flux.2 path: the default (``"conceptattention"``) is **sdlens's
transfer of its Flux recipe**, not code of the paper: the double-stream blocks only, the last
four by default, every step, the concepts modulated as the paper modulates them, with time +
guidance and no pooled text, which in Flux.2 *is* the text stream's own modulation (Flux.2 has
no pooled-text vector: :meth:`Flux2Adapter.paper_concept_temb`); a concept is one vector of its
own encoding, the **first of its own pieces** (``paper_first_piece``): the paper
keeps T5's position 0, which is the concept's first piece (T5 puts nothing before it, and as an
encoder it reads the whole concept there); Flux.2's encoders are chat-templated causal LMs,
whose position 0 is the template's first token, the same vector for every concept.
The ``"sdlens"`` variant: every block, double- then single-stream, each concept the mean over
its pieces (:func:`sdlens.engine.joint.concept_pieces`).
"""

from __future__ import annotations

import torch

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

    def template_prefix(self) -> int | None:
        """Positions before the encoder's segment: the template's tokens before the prompt,
        less the special tokens the tokenizer puts before a bare prompt (a BOS: sdlens cuts the
        prompt alone, so that BOS sits on the template's last position, no word, and the
        prompt's pieces on their own positions). The same for every prompt. None where it cannot
        be told: no tokenizer (a pipeline called with ``prompt_embeds`` only), or one without a
        chat template it can apply (the words are then not known)."""
        if self._prefix is None:
            tok, mark = self.tokenizer(), "\u2603"
            if tok is None:
                return None
            try:
                text = self.templated(mark)
                before = len(tok(text[: text.index(mark)], add_special_tokens=False).input_ids)
                bare = list(tok("cat").input_ids)
                plain = list(tok("cat", add_special_tokens=False).input_ids)
            except Exception:  # noqa: BLE001 - no usable template: the words are not known
                return None
            lead = next((k for k in range(len(bare)) if bare[k: k + len(plain)] == plain), 0)
            self._prefix = max(0, before - lead)
        return self._prefix

    def text_prompts(self, prompts: list, params: dict) -> list:
        return list(prompts)

    def text_parts(self, params: dict) -> list[tuple[str, object, int]]:
        """The template's tokens before the prompt (no words), then the encoder's segment: the
        prompt's own pieces, then (as its padding) the template's end and the padding. A
        ``max_sequence_length`` shorter than the template's opening leaves the prompt no
        position (the pipeline cuts all of it); without a template prefix (see
        :meth:`template_prefix`) the whole text axis is one segment without tokens."""
        n, pre = self.text_length(params), self.template_prefix()
        if pre is None:
            return [(self.encoder_name(), None, n)]
        pre = min(pre, n)
        return [("template", None, pre), (self.encoder_name(), self.tokenizer(), n - pre)]

    def text_encoders(self, params: dict) -> list[TextEncoder]:
        pre, encoder = self.template_prefix(), getattr(self.pipe, "text_encoder", None)
        if encoder is None or pre is None:
            return []
        n = self.text_length(params)
        pre = min(pre, n)
        return [TextEncoder("text_encoder", self.tokenizer(), encoder, pre, n - pre)]

    # ---------------------------------------------------------------- concept pass
    def concept_text(self, concepts: list[str], params: dict) -> torch.Tensor:
        """The pipeline's ``prompt_embeds`` of the concepts as prompts (its chat template, its
        stacked hidden-state layers): (C, max_sequence_length, 3 x hidden)."""
        layers = params.get("text_encoder_out_layers")
        return self.pipe.encode_prompt(
            prompt=list(concepts),
            device=getattr(self.pipe, "_execution_device", self.denoiser.device),
            max_sequence_length=self.text_length(params),
            **({"text_encoder_out_layers": tuple(layers)} if layers is not None else {}))[0]

    paper_first_piece = True  # the paper's "first T5 token", transferred (module docstring)

    def paper_concept_temb(self, temb: torch.Tensor, call_kwargs: dict,
                           rows: slice) -> torch.Tensor | None:
        """None: the text stream's own modulation (time + guidance; Flux.2 has no pooled text
        to replace by a zero vector)."""
        return None

    def _concept_norm(self, block, double: bool, part: str, x: torch.Tensor, kwargs: dict,
                      args: tuple, rows: slice, concept_temb: torch.Tensor | None = None
                      ) -> tuple:
        """Flux.2's blocks share their modulation: a double-stream block gets
        ``temb_mod_img`` / ``temb_mod_txt`` (n, 6 dim: shift, scale, gate for attention, then
        for the MLP), a single-stream block ``temb_mod`` (n, 3 dim), applied after a plain
        LayerNorm."""
        if not double:
            shift, scale, gate = self._split(kwargs["temb_mod"][rows], 1)
            return (1 + scale) * block.norm(x) + shift, gate
        mod = kwargs["temb_mod_img" if part == "image" else "temb_mod_txt"][rows]
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self._split(mod, 2)
        norm = block.norm1 if part == "image" else block.norm1_context
        return (1 + scale) * norm(x) + shift, gate, shift_mlp, scale_mlp, gate_mlp

    @staticmethod
    def _split(mod: torch.Tensor, sets: int) -> tuple[torch.Tensor, ...]:
        """(n, 3 sets dim) -> 3 sets tensors (n, 1, dim), as ``Flux2Modulation.split``."""
        return (mod if mod.ndim == 3 else mod[:, None]).chunk(3 * sets, dim=-1)
