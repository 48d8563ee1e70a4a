"""Scalar measures of one traced run, for tables over many runs (``Grid.table()``).

* :func:`map_concentration`: a word's attention map as a distribution over the latent grid — its
  mass inside the top ``top`` fraction of pixels (``top=0.1``: a uniform map gives 0.1, a map on
  one pixel 1.0) and its entropy divided by ``log(pixels)`` (1: uniform, 0: one pixel).
* :func:`x0_settle_step`: the first step from which the predicted clean latent x0 changes by less
  than ``threshold`` (relative, L2) from one step to the next, at every later step.
* :func:`image_distance`: the RMS difference of two images in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sdlens.analysis.heatmaps import word_heatmap
from sdlens.analysis.tokens import word_texts

TOP = 0.1               # the top-k% region: the 10% of pixels where the map is highest
SETTLE_THRESHOLD = 0.05  # x0 has settled once each later step moves it by < 5% (relative L2)


def map_concentration(heatmap: Any, top: float = TOP) -> tuple[float, float]:
    """(mass in the top ``top`` fraction of pixels, normalised entropy) of a non-negative
    ``(H, W)`` map taken as a distribution. A map without mass gives (nan, nan)."""
    if not 0 < top <= 1:
        raise ValueError(f"top must be in (0, 1], got {top}")
    p = torch.as_tensor(heatmap, dtype=torch.float64).clamp(min=0).reshape(-1)
    total = float(p.sum())
    if not total > 0 or p.numel() < 2:
        return math.nan, math.nan
    p = p / total
    k = max(1, int(round(top * p.numel())))
    mass = float(torch.topk(p, k).values.sum())
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum()) / math.log(p.numel())
    return mass, entropy


def word_measures(trace: Any, top: float = TOP) -> dict[str, float]:
    """``{"mass@10%:<word>": ..., "entropy:<word>": ...}`` for every word of the prompt, from its
    map pooled over the recorded steps and layers (:func:`word_heatmap`, unnormalised) on the
    latent grid. Empty where the trace has no attention maps."""
    if getattr(trace, "attention", None) is None:
        return {}
    latents = trace.latents
    size = tuple(latents.shape[-2:]) if latents is not None else None
    out = {}
    label = f"mass@{top * 100:g}%"
    for word in word_texts(trace):
        m = word_heatmap(trace, word, size=size, normalize=False)
        mass, entropy = map_concentration(m, top)
        out[f"{label}:{word}"] = mass
        out[f"entropy:{word}"] = entropy
    return out


def x0_settle_step(trace: Any, threshold: float = SETTLE_THRESHOLD) -> float:
    """The first step ``t`` such that ``||x0_s - x0_{s-1}|| / ||x0_s|| < threshold`` for every
    step ``s >= t`` (``t >= 1``), as a step index of the trace; nan where x0 was not recorded at
    every step or never settles."""
    x0 = trace.x0  # (steps, batch, C, h, w)
    if x0 is None or x0.shape[0] < 2:
        return math.nan
    x = x0[:, 0].double().reshape(x0.shape[0], -1)
    change = (x[1:] - x[:-1]).norm(dim=1) / x[1:].norm(dim=1).clamp(min=1e-12)  # step s = 1..
    above = torch.nonzero(change >= threshold).reshape(-1)
    if len(above) == 0:
        return 1.0
    last = int(above[-1]) + 1  # the last step that still moved x0 by >= threshold
    return float(last + 1) if last + 1 < x0.shape[0] else math.nan


def image_distance(a: Any, b: Any) -> float:
    """RMS of the difference of two float images in [0, 1] (``(H, W, 3)``); nan on a shape
    mismatch."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.nan
    return float(np.sqrt(np.mean((a - b) ** 2)))
