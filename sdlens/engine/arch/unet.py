"""The UNet family: SD 1.x / 2.x / SDXL (txt2img, img2img, inpaint) and the shipped "shapes" model.

Sites are the ``attn2`` modules of the UNet's transformer blocks (``attn1`` is self-attention),
named by module path, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2``; aliases
are ``"down.1.0"`` (its transformer block 0), ``"down.1.0.2"`` (block 2), ``"mid"``, ``"up.1"``.
A site in ``down_blocks.i`` sees the latents downsampled i times, ``up_blocks.i`` mirrors it, the
mid block sits at the lowest resolution.

Under classifier-free guidance SD pipelines call the UNet on ``cat([uncond, text])`` and split the
output with ``chunk(2)``; without guidance (``guidance_scale <= 1``, LCM/turbo) the UNet sees only
the conditional batch (the engine tells the two apart from the UNet's batch size). Inpainting
UNets take 9 input channels (latents, mask, masked-image latents); SDXL passes
``added_cond_kwargs``; ControlNet pipelines call their ControlNet first and pass its residuals to
the UNet (``down_block_additional_residuals``); an IP-Adapter makes the sites' text a pair (text,
image-prompt embeddings): none of this matters here, the hooks only read the sample's shape and the
output.
"""

from __future__ import annotations

import re

import torch

from sdlens.engine.arch.base import BackboneAdapter, SiteNaming


class UNetNaming(SiteNaming):
    """Aliases, groups (``"down"``, ``"mid"``, ``"up"``) and order of UNet sites."""

    groups = ("down", "mid", "up")
    PARTS = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}
    _ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def alias(self, site: str) -> str:
        """``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` -> ``"down.1.0"``; a
        transformer block other than 0 is appended (``"down.2.1.3"``)."""
        m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$",
                     site)
        if m:
            part = "down" if m.group(1) == "down_blocks" else "up"
            alias = f"{part}.{m.group(2)}.{m.group(3)}"
            return alias if m.group(4) == "0" else f"{alias}.{m.group(4)}"
        m = re.match(r"^mid_block\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$", site)
        if m:
            alias = "mid" if m.group(1) == "0" else f"mid.{m.group(1)}"
            return alias if m.group(2) == "0" else f"mid.{m.group(1)}.{m.group(2)}"
        return site

    def expand(self, name: str) -> str | None:
        """``"down.1.0.2"`` -> ``"down_blocks.1.attentions.0.transformer_blocks.2"``, ``"mid"``
        -> ``"mid_block"``; None if ``name`` is not an alias."""
        parts = name.split(".")
        if parts[0] not in self.PARTS or not all(p.isdigit() for p in parts[1:]):
            return None
        rest = parts[1:]
        if parts[0] == "mid":  # mid[.attention[.transformer_block]]
            if len(rest) > 2:
                return None
            out = "mid_block"
            if rest:
                out += f".attentions.{rest[0]}"
            if len(rest) > 1:
                out += f".transformer_blocks.{rest[1]}"
            return out
        if len(rest) > 3:  # down|up[.block[.attention[.transformer_block]]]
            return None
        out = self.PARTS[parts[0]]
        if rest:
            out += f".{rest[0]}"
        if len(rest) > 1:
            out += f".attentions.{rest[1]}"
        if len(rest) > 2:
            out += f".transformer_blocks.{rest[2]}"
        return out

    def sort_key(self, site: str) -> tuple:
        """UNet order: down blocks, mid, up blocks; numerically within each."""
        head = site.split(".", 1)[0]
        nums = tuple(int(x) for x in re.findall(r"\d+", site))
        return (self._ORDER.get(head, 3), nums, site)


class UNetAdapter(BackboneAdapter):
    """A pipeline whose denoiser is a ``UNet2DConditionModel`` (``pipe.unet``)."""

    pipelines = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                 "StableDiffusionInpaintPipeline", "StableDiffusionXLPipeline",
                 "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                 "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
                 "StableDiffusionControlNetInpaintPipeline", "StableDiffusionXLControlNetPipeline",
                 "StableDiffusionXLControlNetImg2ImgPipeline",
                 "StableDiffusionXLControlNetInpaintPipeline")
    # "sd": what traces of UNet pipelines that sdlens could not classify recorded
    families = ("shapes", "sd1", "sd2", "sdxl", "sdxl-refiner", "sd")
    naming = UNetNaming()

    def __init__(self, pipe):
        super().__init__(pipe)
        unet = pipe.unet
        cls = type(pipe).__name__
        if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
            raise TypeError(f"sdlens cannot trace {cls}: its unet ({type(unet).__name__}) has no "
                            f"attention processors; supported: {', '.join(self.pipelines)}")
        self._sites = super().sites()
        if not self._sites:
            raise TypeError(f"sdlens cannot trace {cls}: its UNet has no cross-attention "
                            f"layers; supported: text-conditioned UNets in "
                            f"{', '.join(self.pipelines)}")

    @classmethod
    def handles(cls, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def family(self) -> str:
        """"sdxl" / "sdxl-refiner" (text-time embeddings, with / without the first text
        encoder), "shapes" (the shipped model's 64-wide text, 16x16 latents), "sd2", "sd1"."""
        cfg = self.pipe.unet.config
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            return "sdxl" if getattr(self.pipe, "text_encoder", None) is not None else "sdxl-refiner"
        cross = cfg.cross_attention_dim
        if cross == 64 and cfg.sample_size == 16:
            return "shapes"
        # SD 2.x's OpenCLIP text encoder uses gelu, SD 1.x's CLIP ViT-L quick_gelu (true of shrunk
        # random-weight copies too, whose widths differ from the real 1024 / 768)
        act = getattr(getattr(self.pipe, "text_encoder", None), "config", None)
        if cross == 1024 or getattr(act, "hidden_act", None) == "gelu":
            return "sd2"
        return "sd1"

    def default_latent_hw(self) -> tuple[int, int]:
        size = self.pipe.unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def latent_channels(self) -> int:
        return int(self.pipe.unet.config.out_channels)


    def activation_bytes(self, latent_hw: tuple[int, int]) -> int:
        """40 tensors of the top-resolution feature map (``block_out_channels[0]`` x h x w:
        resnet and transformer intermediates, GEGLU's 8x-wide projection, skip connections), plus
        one self-attention score matrix at the top resolution (heads x (hw)^2; SDPA often avoids
        it, the estimate does not count on that)."""
        unet = self.pipe.unet
        h, w = latent_hw
        itemsize = torch.finfo(unet.dtype).bits // 8 if unet.dtype.is_floating_point else 4
        c0 = unet.config.block_out_channels[0]
        heads = unet.config.num_attention_heads or unet.config.attention_head_dim
        heads = heads[0] if isinstance(heads, (list, tuple)) else heads
        return 40 * c0 * h * w * itemsize + int(heads) * (h * w) ** 2 * itemsize

    def site_of(self, processor_key: str) -> str | None:
        return processor_key[: -len(".processor")] if processor_key.endswith(".attn2.processor") \
            else None

    def sites(self) -> list[str]:
        return list(self._sites)

    def resolutions(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        n_down = len(self.pipe.unet.down_blocks)
        return {s: _downsampled(latent_hw, _level(s, n_down)) for s in self._sites}

    # ================================================================ asked from outside the engine
    def embeds_guidance(self) -> bool:
        """An LCM UNet (``time_cond_proj_dim``) embeds the guidance value."""
        return getattr(self.pipe.unet.config, "time_cond_proj_dim", None) is not None


def _level(site: str, n_down: int) -> int:
    """Times a site's input was downsampled: down_blocks.i -> i, mid -> n_down - 1,
    up_blocks.i -> n_down - 1 - i."""
    parts = site.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return n_down - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return n_down - 1
    raise ValueError(f"cannot tell the resolution of layer {site!r}")


def _downsampled(hw: tuple[int, int], level: int) -> tuple[int, int]:
    h, w = hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w
