"""Forward hooks on the UNet: the batch layout before each call, the predicted noise after it.

Under classifier-free guidance SD pipelines call the UNet on ``cat([uncond, cond])`` and split the
output with ``chunk(2)``; without guidance (``guidance_scale <= 1``, LCM/turbo) the UNet sees only
the conditional batch. The recorder decides which case it is from the UNet's batch size compared
with the number of latents (batch items), never by assumption. Inpainting UNets take 9 input
channels (latents, mask, masked-image latents); SDXL passes ``added_cond_kwargs``: neither matters
here, the hooks only read the sample's shape and the output.
"""

from __future__ import annotations

import re
from typing import Callable

import torch


class UNetHooks:
    """Installs ``register_forward_pre_hook`` / ``register_forward_hook`` on ``unet``.

    Args:
        unet: the pipeline's ``UNet2DConditionModel``.
        before: called with the UNet's input sample (B_unet, C_in, h, w) before each forward.
        after: called with the UNet's output (B_unet, C_out, h, w) after each forward.
    """

    def __init__(self, unet: torch.nn.Module, before: Callable[[torch.Tensor], None],
                 after: Callable[[torch.Tensor], None]):
        self.unet = unet
        self._before, self._after = before, after
        self.handles = []
        try:
            self.handles.append(unet.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(unet.register_forward_hook(self._post, with_kwargs=True))
        except Exception:
            self.remove()
            raise

    def _pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if torch.is_tensor(sample):
            self._before(sample)
        return None

    def _post(self, module, args, kwargs, output):
        if isinstance(output, (tuple, list)):
            out = output[0]
        else:
            out = getattr(output, "sample", output)
        if torch.is_tensor(out):
            self._after(out)
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
             "StableDiffusionInpaintPipeline", "StableDiffusionXLPipeline",
             "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")

# ====================================================================== pipeline checks
def check_pipeline(pipe) -> list[str]:
    """The pipeline's ``attn2`` layer names; TypeError / NotImplementedError if untraceable."""
    cls = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    if unet is None:
        kind = "transformer-based (e.g. SD3, Flux, PixArt)" if getattr(pipe, "transformer", None) \
            is not None else "UNet-less"
        raise NotImplementedError(
            f"sdlens cannot trace {cls}: it is a {kind} pipeline without a `unet`; supported: "
            f"{', '.join(SUPPORTED)} (and SD 2.x v-prediction models)")
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise TypeError(f"sdlens cannot trace {cls}: its unet ({type(unet).__name__}) has no "
                        f"attention processors; supported: {', '.join(SUPPORTED)}")
    layers = [k[: -len(".processor")] for k in unet.attn_processors if k.endswith(".attn2.processor")]
    if not layers:
        raise TypeError(f"sdlens cannot trace {cls}: its UNet has no cross-attention (attn2) "
                        f"layers; supported: text-conditioned UNets in {', '.join(SUPPORTED)}")
    if getattr(pipe, "scheduler", None) is None or not hasattr(pipe.scheduler, "step"):
        raise TypeError(f"sdlens cannot trace {cls}: it has no scheduler with a step() method")
    if getattr(pipe, "tokenizer", None) is None and getattr(pipe, "tokenizer_2", None) is None:
        raise TypeError(f"sdlens cannot trace {cls}: it has no tokenizer")
    return sorted(layers, key=layer_sort_key)


def layer_level(layer: str, n_down: int) -> int:
    """Downsampling level of a layer: down_blocks.i -> i, mid -> n_down-1, up_blocks.i -> n_down-1-i."""
    parts = layer.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return n_down - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return n_down - 1
    raise ValueError(f"cannot tell the resolution of layer {layer!r}")


def level_shape(h: int, w: int, level: int) -> tuple[int, int]:
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w



# ====================================================================== names and aliases
PARTS = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}
_PART_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def layer_alias(layer: str) -> str:
    """Short alias of a module path: ``down_blocks.1.attentions.0.transformer_blocks.0.attn2``
    -> ``"down.1.0"``; a transformer block other than 0 is appended (``"down.2.1.3"``)."""
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$", layer)
    if m:
        part = "down" if m.group(1) == "down_blocks" else "up"
        alias = f"{part}.{m.group(2)}.{m.group(3)}"
        return alias if m.group(4) == "0" else f"{alias}.{m.group(4)}"
    m = re.match(r"^mid_block\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$", layer)
    if m:
        alias = "mid" if m.group(1) == "0" else f"mid.{m.group(1)}"
        return alias if m.group(2) == "0" else f"mid.{m.group(1)}.{m.group(2)}"
    return layer


def alias_prefix(name: str) -> str | None:
    """``"down.1.0.2"`` -> ``"down_blocks.1.attentions.0.transformer_blocks.2"``; None if not an alias."""
    parts = name.split(".")
    if parts[0] not in PARTS or not all(p.isdigit() for p in parts[1:]):
        return None
    if parts[0] == "mid":
        # mid[.attention[.transformer_block]]
        out = "mid_block"
        rest = parts[1:]
        if len(rest) > 2:
            return None
        if rest:
            out += f".attentions.{rest[0]}"
        if len(rest) > 1:
            out += f".transformer_blocks.{rest[1]}"
        return out
    rest = parts[1:]
    if len(rest) > 3:
        return None
    out = PARTS[parts[0]]
    if rest:
        out += f".{rest[0]}"
    if len(rest) > 1:
        out += f".attentions.{rest[1]}"
    if len(rest) > 2:
        out += f".transformer_blocks.{rest[2]}"
    return out


def layer_sort_key(layer: str) -> tuple:
    """UNet order: down blocks, mid, up blocks; numerically within each."""
    head = layer.split(".", 1)[0]
    nums = tuple(int(x) for x in re.findall(r"\d+", layer))
    return (_PART_ORDER.get(head, 3), nums, layer)


