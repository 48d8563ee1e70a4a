"""One adapter per backbone family (see :mod:`sdlens.engine.arch.base` for what one provides).

>>> adapter = adapter_for(pipe)          # TypeError for pipelines sdlens cannot trace
>>> adapter.sites()                      # the cross-attention sites, in the denoiser's order
>>> naming_for(trace.meta["family"])     # a saved trace's site naming, no pipeline needed
"""

from __future__ import annotations

from sdlens.engine.arch.base import BackboneAdapter, SiteNaming
from sdlens.engine.arch.dit import PixArtAdapter, SanaAdapter
from sdlens.engine.arch.flux import ChromaAdapter, FluxAdapter, FluxKontextAdapter
from sdlens.engine.arch.flux2 import Flux2Adapter
from sdlens.engine.arch.mmdit import MMDiTAdapter
from sdlens.engine.arch.qwenimage import QwenImageAdapter, QwenImageEditAdapter
from sdlens.engine.arch.unet import UNetAdapter
from sdlens.engine.arch.wan import WanAdapter
from sdlens.engine.arch.zimage import ZImageAdapter

ADAPTERS: tuple[type[BackboneAdapter], ...] = (UNetAdapter, MMDiTAdapter, PixArtAdapter, SanaAdapter,
                                               FluxAdapter, ChromaAdapter, FluxKontextAdapter,
                                               Flux2Adapter, QwenImageAdapter,
                                               QwenImageEditAdapter, ZImageAdapter, WanAdapter)
SUPPORTED_PIPELINES = tuple(p for a in ADAPTERS for p in a.pipelines)


def adapter_for(pipe) -> BackboneAdapter:
    """The adapter of ``pipe``'s backbone family; TypeError naming the supported pipelines if
    sdlens cannot trace it."""
    for cls in ADAPTERS:
        if cls.handles(pipe):
            return cls(pipe)
    transformer = getattr(pipe, "transformer", None)
    # e.g. Flux.2, Qwen-Image, HiDream, Z-Image; or a supported transformer in another pipeline
    # (Flux Kontext / Fill / Control lay their tokens out otherwise)
    kind = f"sdlens does not support this pipeline or its transformer " \
        f"({type(transformer).__name__})" if transformer is not None \
        else "it is a pipeline without a `unet` or `transformer`"
    raise TypeError(f"sdlens cannot trace {type(pipe).__name__}: {kind}; supported: "
                    f"{', '.join(SUPPORTED_PIPELINES)}")


def naming_for(family: str | None) -> SiteNaming:
    """The site naming of a model family (``trace.meta["family"]``); None (traces that did not
    record one) is a UNet family. ValueError for unknown families."""
    if family is None:
        return UNetAdapter.naming
    for cls in ADAPTERS:
        if family in cls.families:
            return cls.naming
    known = [f for cls in ADAPTERS for f in cls.families]
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(known)}")
