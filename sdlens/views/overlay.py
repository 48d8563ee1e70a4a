"""How a heatmap is laid over an image: the one rule every overlay follows.

The image goes under the heat **in grey** (its luminance only): hue then belongs to the heat
alone, so a red map on a red object reads as well as on a grey one (in colour, red heat on a red
object all but vanishes). The grey is CSS's ``grayscale(1)``: Rec. 709 weights on the sRGB
values, which is what the notebook panels (TraceViewer, Studio's viewer, ReferenceView) apply in
the browser under their heat frames, and what :func:`underlay` computes here for ``plot.*``, the
HTML report and the clip GIFs. ``grey=False`` (everywhere) keeps the image's colours.

>>> from sdlens.views.overlay import blend, compose
>>> blend(image, heat)                  # (H, W, 3) uint8: heat through jet at alpha 0.55
>>> compose(image, rgba, opacity=0.45)  # an RGBA heat layer as the browser panels draw it
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: The legend's / caption's words for the grey underlay.
GREY_NOTE = "image shown in grey under the heat"
#: Rec. 709 luma weights on sRGB values (CSS ``grayscale(1)``'s matrix).
LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)


def _rgb(image: Any) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim < 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (..., H, W, 3) RGB image, got shape {a.shape}")
    return a[..., :3]


def underlay(image: Any, grey: bool = True) -> np.ndarray:
    """(..., H, W, 3) uint8 RGB image(s) (or PIL) -> the copy drawn under a heatmap: its
    luminance in all three channels (``grey``), else the image unchanged."""
    rgb = _rgb(image)
    if not grey:
        return rgb
    y = rgb.astype(np.float32) @ LUMA
    return np.repeat(y.round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def compose(image: Any, layer: np.ndarray, opacity: float = 1.0, grey: bool = True) -> np.ndarray:
    """An RGBA heat ``layer`` (H, W, 4) uint8 over ``image`` (H, W, 3) uint8 at ``opacity``
    (source-over, as the browser stacks a heat frame at CSS opacity on the panel's image):
    (H, W, 3) uint8."""
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    base = underlay(image, grey).astype(np.float32)
    layer = np.asarray(layer)
    if layer.shape[:-1] != base.shape[:-1] or layer.shape[-1] != 4:
        raise ValueError(f"layer {layer.shape} must be RGBA of the image's size {base.shape[:2]}")
    a = layer[..., 3:].astype(np.float32) / 255 * opacity
    out = base * (1 - a) + layer[..., :3].astype(np.float32) * a
    return out.round().clip(0, 255).astype(np.uint8)


def blend(image: Any, heat: np.ndarray, alpha: float = 0.55, cmap: str = "jet",
          grey: bool = True) -> np.ndarray:
    """``heat`` (..., H, W) in [0, 1] through ``cmap`` at a flat ``alpha`` over ``image``
    (..., H, W, 3) uint8 (what ``imshow(heat, alpha=...)`` over ``imshow(underlay(image))``
    draws): (..., H, W, 3) uint8."""
    from matplotlib import colormaps

    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = colormaps[cmap](np.clip(np.nan_to_num(heat), 0, 1))[..., :3] * 255
    out = (1 - alpha) * underlay(image, grey).astype(np.float32) + alpha * colours
    return out.round().clip(0, 255).astype(np.uint8)


__all__ = ["GREY_NOTE", "LUMA", "underlay", "compose", "blend"]
