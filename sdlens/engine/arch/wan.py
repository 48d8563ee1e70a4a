"""Wan 2.1 / 2.2 video diffusion (``WanTransformer3DModel``: WanPipeline, WanImageToVideoPipeline).

**Sites.** A stack of ``blocks``, each with a self-attention ``attn1`` over the video's patches and
a cross-attention ``attn2`` from the patches to the text (UMT5); the sites are the ``attn2``
modules, ``blocks.N.attn2``, aliased ``"block.N"`` (also ``"N"``), group ``"blocks"``.

**Video tokens.** The latents are (B, C, F, h, w) (F latent frames: the VAE compresses time 4x,
``(num_frames - 1) / 4 + 1``, and space 8x); ``patch_embedding`` cuts them into (1, 2, 2)
patches and flattens them frame-major, row-major (``flatten(2)`` of (B, D, F, h/2, w/2)), so a
site's map is (F, h/2, w/2): :meth:`WanAdapter.latent_size` reads (F, h, w) off the transformer's
input and :meth:`WanAdapter.resolutions` gives every site that grid over the patch size. A
trace's latents / velocity / x0 are then (steps(+1), batch, C, F, h, w) and its maps (steps',
batch, tokens, F, h/2, w/2); ``meta["latent_frames"]``, ``meta["num_frames"]`` and
``meta["vae_scale_factor_temporal"]`` say how latent frames map to video frames.

**The kernel.** ``WanAttnProcessor`` calls ``dispatch_attention_fn`` with q / k / v laid out
(B, L, heads, d); the native backend permutes them to (B, heads, L, d) and calls torch's SDPA,
where :mod:`sdlens.engine.kernel` sees it. Text call: image queries, text keys (all 512 of
them: the pipeline zeroes the embeddings past the prompt's end and passes no mask, so padding
keys are attended to and are part of the softmax; the maps keep the prompt's positions).
Image-to-video (Wan 2.1 I2V: ``attn2.add_k_proj``): the processor first attends from the same
queries to the image-context keys (the first ``L - 512`` positions of ``encoder_hidden_states``:
a CLIP image's hidden states) in a kernel call of its own, then to the text; its output is the
sum. That first call is a segment of its own, ``"image prompt 0"`` (its own softmax, as an
IP-Adapter's), whose tokens follow the text's in the maps (``<image prompt 0:k>``).

**Guidance.** The pipelines run classifier-free guidance as two transformer calls per step, the
prompt's (``"cond"``) then the negative prompt's (``"uncond"``), when ``guidance_scale > 1``
(:meth:`WanAdapter.cfg_calls`); maps come from the prompt's call.

**Wan 2.2** (``boundary_ratio`` set, ``transformer_2`` given): ``transformer`` (the high-noise
expert) predicts the steps whose timestep is >= ``boundary_ratio * num_train_timesteps``,
``transformer_2`` (low noise) the rest, with ``guidance_scale_2``. Both are denoisers
(:meth:`WanAdapter.denoisers`): the session hooks both and records them under one trace (their
sites have the same names); ``meta["denoiser_steps"]`` says which expert predicted each step and
``meta["switch_step"]`` the first step of ``transformer_2``.

The schedule: UniPC / Euler on flow sigmas (``flow_prediction`` is the velocity), the table's
flow row.
"""

from __future__ import annotations


import torch

from sdlens.engine.arch.base import BackboneAdapter, BlockNaming, cross_layout

# diffusers hardcodes the text encoder's context length in WanAttnProcessor (I2V's split)
WAN_TEXT_CONTEXT = 512


class WanAdapter(BackboneAdapter):
    """A Wan 2.1 / 2.2 pipeline (``pipe.transformer`` and / or ``pipe.transformer_2`` a
    ``WanTransformer3DModel``)."""

    pipelines = ("WanPipeline", "WanImageToVideoPipeline")
    families = ("wan",)
    naming = BlockNaming("attn2", blocks="blocks")  # blocks.N.attn2 <-> "block.N"
    max_text_tokens = WAN_TEXT_CONTEXT
    sample_arg = "hidden_states"
    video = True
    # maps at every 5th step unless asked otherwise: a default Wan 2.1 1.3B trace (480 x 832,
    # 81 frames, 50 steps, CFG, a 20-token prompt; "auto" storage: 4-bit codes, as the latents
    # alone pass 200 MB) is then ~2.2 GB instead of ~2.6 GB, its maps ~98 MB instead of ~490 MB
    # (tests/engine/test_wan.py checks both)
    default_map_steps = slice(None, None, 5)

    def __init__(self, pipe):
        super().__init__(pipe)
        self._sites = super().sites()
        if not self._sites:
            raise TypeError(f"sdlens cannot trace {type(pipe).__name__}: its transformer has no "
                            "cross-attention layers")

    @classmethod
    def handles(cls, pipe) -> bool:
        models = [getattr(pipe, n, None) for n in ("transformer", "transformer_2")]
        return (type(pipe).__name__ in cls.pipelines and any(m is not None for m in models)
                and all(type(m).__name__ == "WanTransformer3DModel" for m in models
                        if m is not None))

    # ---------------------------------------------------------------- the denoisers
    @property
    def denoiser(self) -> torch.nn.Module:
        """The first expert (Wan 2.1's one transformer; Wan 2.2's high-noise ``transformer``)."""
        return self.denoisers()[0]

    def denoisers(self) -> list[torch.nn.Module]:
        """``transformer`` then ``transformer_2`` (Wan 2.2's low-noise expert), those present."""
        return [m for m in (getattr(self.pipe, "transformer", None),
                            getattr(self.pipe, "transformer_2", None)) if m is not None]

    def denoiser_name(self, module: torch.nn.Module) -> str:
        return "transformer_2" if module is getattr(self.pipe, "transformer_2", None) \
            else "transformer"

    def family(self) -> str:
        return "wan"

    def _scale(self, kind: str, default: int) -> int:
        return int(getattr(self.pipe, f"vae_scale_factor_{kind}", default) or default)

    def default_latent_hw(self) -> tuple[int, int, int]:
        """(F, h, w) of the pipelines' defaults: 81 frames at 480 x 832."""
        t, s = self._scale("temporal", 4), self._scale("spatial", 8)
        return ((81 - 1) // t + 1, 480 // s, 832 // s)

    def latent_channels(self) -> int:
        return int(self.denoiser.config.out_channels)

    def latent_size(self, sample: torch.Tensor) -> tuple[int, ...]:
        """(F, h, w) of the transformer's input (B, C, F, h, w)."""
        return tuple(int(n) for n in sample.shape[-3:])

    def video_meta(self, latent_size: tuple[int, ...], params: dict) -> dict:
        t = self._scale("temporal", 4)
        return {"latent_frames": int(latent_size[0]), "vae_scale_factor_temporal": t,
                "num_frames": (int(latent_size[0]) - 1) * t + 1}

    # ---------------------------------------------------------------- guidance
    def cfg_calls(self, params: dict) -> tuple[str, ...] | None:
        """Two transformer calls per step, the prompt's then the negative one, when
        ``guidance_scale > 1`` (the pipelines' ``do_classifier_free_guidance``)."""
        gs = params.get("guidance_scale")
        return ("text", "uncond") if gs is not None and float(gs) > 1 else None

    def guidance_meta(self, params: dict) -> dict:
        boundary = getattr(getattr(self.pipe, "config", None), "boundary_ratio", None)
        if boundary is None:
            return {}
        gs2 = params.get("guidance_scale_2")
        gs2 = gs2 if gs2 is not None else params.get("guidance_scale")
        return {"boundary_ratio": float(boundary),
                "guidance_scale_2": float(gs2) if gs2 is not None else None}

    # ---------------------------------------------------------------- text
    def text_length(self, params: dict) -> int:
        return int(params.get("max_sequence_length") or WAN_TEXT_CONTEXT)

    def encoded_prompt(self, prompt: str, params: dict) -> str:
        """The pipelines' ``prompt_clean`` (ftfy where installed, HTML unescaping, whitespace)."""
        try:
            from diffusers.pipelines.wan.pipeline_wan import prompt_clean

            return prompt_clean(prompt)
        except Exception:  # noqa: BLE001 - a diffusers without it: what it does, roughly
            return " ".join(prompt.split())

    def activation_bytes(self, latent_hw: tuple[int, ...]) -> int:
        """30 tensors of the patches' width plus one self-attention score matrix."""
        t = self.denoiser
        itemsize = torch.finfo(t.dtype).bits // 8 if t.dtype.is_floating_point else 4
        tokens = 1
        for n, p in zip(latent_hw, t.config.patch_size):
            tokens *= n // p
        inner = t.config.num_attention_heads * t.config.attention_head_dim
        return (30 * tokens * inner + t.config.num_attention_heads * tokens ** 2) * itemsize

    # ---------------------------------------------------------------- sites
    def site_of(self, processor_key: str) -> str | None:
        return self.naming.site_of(processor_key)

    def sites(self) -> list[str]:
        return list(self._sites)

    def heads(self, site: str) -> int:
        return int(self.denoiser.get_submodule(site).heads)

    def resolutions(self, latent_hw: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """(F, h/2, w/2): the (1, 2, 2) patches of the latent grid (F, h, w)."""
        patch = tuple(int(p) for p in self.denoiser.config.patch_size)
        grid = tuple(n // p for n, p in zip(latent_hw, patch))
        return {s: grid for s in self._sites}

    def kernel_layout(self, site: str, attn, call, index: int, q_len: int, k_len: int,
                      denoiser_kwargs: dict):
        """Text-to-video: one kernel call, image queries on the text. Image-to-video
        (``attn.add_k_proj``): call 0 attends to the image context (``"image prompt 0"``), call
        1 to the text."""
        if getattr(attn, "add_k_proj", None) is None:
            return cross_layout(q_len, k_len) if index == 0 else None
        if index == 0:
            return cross_layout(q_len, k_len, "image prompt 0")
        return cross_layout(q_len, k_len) if index == 1 else None
