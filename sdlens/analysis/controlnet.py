"""Where a ControlNet's condition acts: its residuals' size per block and step.

A ControlNet adds one residual to each skip connection of the UNet's down path and one to its mid
block, already multiplied by ``controlnet_conditioning_scale``. Traced with ``record`` including
``"controlnet"`` (``sdlens.trace(pipe, record=(*RECORDABLE, "controlnet"))``), a trace holds the
RMS of every residual per step, batch item (the conditional rows under guidance) and net:

>>> res = controlnet_residuals(trace)
>>> res.rms.shape            # (steps, batch, nets, blocks)
>>> res.blocks               # ['down.0', ..., 'down.11', 'mid']
>>> res.by_block()           # (blocks,) mean over steps, batch items and nets
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

TENSOR = "controlnet/residual_rms"


@dataclass
class ControlResiduals:
    """``rms`` (steps, batch, nets, blocks) float32 (NaN where a net was not called);
    ``blocks``: the residuals' names (``"down.i"`` in the UNet's skip order, then ``"mid"``);
    ``scale``: the run's ``controlnet_conditioning_scale``."""

    rms: torch.Tensor
    blocks: list[str]
    scale: Any

    def by_block(self) -> torch.Tensor:
        """(blocks,) the mean RMS of each residual over steps, batch items and nets."""
        return self.rms.nanmean(dim=(0, 1, 2))

    def by_step(self) -> torch.Tensor:
        """(steps,) the mean RMS over batch items, nets and blocks."""
        return self.rms.nanmean(dim=(1, 2, 3))


def controlnet_residuals(trace: Any) -> ControlResiduals:
    """The ControlNet residuals' RMS of a trace (see the module docstring); ValueError if the
    trace did not record them."""
    extra = trace.fields()["extra_tensors"]
    rms = extra.get(TENSOR)
    if rms is None:
        raise ValueError("this trace holds no ControlNet residuals: trace a ControlNet pipeline "
                         "with record=(..., 'controlnet') (e.g. sdlens.engine.options.KINDS)")
    rms = rms() if callable(rms) else rms
    n = rms.shape[-1]
    blocks = [f"down.{i}" for i in range(n - 1)] + ["mid"]
    return ControlResiduals(rms.float(), blocks,
                            (trace.meta.get("controlnet") or {}).get("conditioning_scale"))
