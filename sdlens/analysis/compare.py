"""Compare two runs step by step: where do two seeds, two CFG scales or two prompts part ways?

``compare(trace_a, trace_b)`` returns a :class:`Comparison` holding, per step:

* ``latent_rms`` ``(steps + 1,)``: RMS of ``x_t(a) - x_t(b)`` (x_T ... x_0);
* ``x0_rms`` ``(steps,)`` and ``x0_relative`` (the RMS divided by the mean RMS of the two x0s);
* ``word_change`` ``{word: (recorded steps,)}``: for each word in both prompts, the mean absolute
  difference of its two per-step heatmaps (each min-max normalised to [0, 1]; 0 = same map,
  1 = opposite), from :func:`sdlens.analysis.heatmaps.word_heatmap` with ``per_step=True``;
* ``parting_step``: the first step from which each run's x0 is closer to *its own* final x0
  than to the other run's final x0, and stays so until the end - from there on one can tell which
  picture each run becomes. None when the runs never part: a trace with itself, or two runs whose
  x0 distance stays within float noise (relative distance below ``NOISE``) at every step;
* ``differs``: the settings that differ (prompt, seed, guidance, scheduler, ...), ``{name: (a, b)}``.

Steps are numbered 1..N in text and plots, as diffusers' progress bar counts them; the arrays
are indexed from 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch

from sdlens.analysis.guidance import guidance_kind, guidance_text
from sdlens.analysis.heatmaps import word_heatmap
from sdlens.analysis.tokens import word_texts

#: Relative x0 distance below which two runs count as the same picture (float noise: the same
#: computation in another order, fp16 rounding).
NOISE = 1e-3


@dataclass
class Comparison:
    """Result of :func:`compare`; see the module docstring for each field."""

    label_a: str
    label_b: str
    steps: np.ndarray
    latent_rms: np.ndarray
    x0_rms: np.ndarray
    x0_relative: np.ndarray
    own_vs_cross: np.ndarray  # (steps, 2): d(x0_t, own final) - d(x0_t, other final), a and b
    parting_step: int | None
    word_change: dict[str, np.ndarray] = field(default_factory=dict)
    map_steps: list[int] = field(default_factory=list)
    differs: dict[str, tuple] = field(default_factory=dict)

    #: Draws a comparison: ``hook(comparison, **kwargs) -> Figure``. Analysis imports no views: the
    #: front door ``sdlens`` sets it to :func:`sdlens.views.plot.comparison`.
    plot_hook: ClassVar[Callable[..., Any] | None] = None

    @property
    def words(self) -> list[str]:
        return list(self.word_change)

    @property
    def within_noise(self) -> bool:
        """True when the x0 distance stays within float noise at every step."""
        return bool(len(self.x0_relative) == 0 or float(np.max(self.x0_relative)) < NOISE)

    def summary(self) -> str:
        diff = ", ".join(f"{k} {_show(a)} vs {_show(b)}" for k, (a, b) in self.differs.items())
        lines = [f"{self.label_a}  vs  {self.label_b}",
                 "differs in: " + (diff or "no recorded setting"),
                 f"final x0 RMS distance {self.x0_rms[-1]:.4g} (relative {self.x0_relative[-1]:.3g})"]
        if self.parting_step is not None:
            lines.append(f"parting step: {self.parting_step + 1} of {len(self.x0_rms)}")
        elif self.within_noise:
            lines.append(f"never parted: the x0 distance stays within noise (relative < {NOISE:g}) "
                         "at every step")
        else:
            lines.append("never parted: neither run's x0 settles closer to its own final x0")
        for w, c in self.word_change.items():
            lines.append(f"  {w!r}: map change first {c[0]:.3f}, last {c[-1]:.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def plot(self, **kwargs: Any):
        """The comparison's curves (a matplotlib Figure; keyword arguments go to the hook)."""
        return type(self).plot_hook(self, **kwargs)  # off the class: the plain function


def _rms(x: torch.Tensor) -> np.ndarray:
    return x.flatten(1).pow(2).mean(1).sqrt().numpy()


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def run_settings(trace: Any, batch: int = 0) -> dict[str, Any]:
    """The settings of image ``batch`` of a run, as recorded: prompt, negative prompt, seed,
    guidance ("off" when the run was unguided), steps, scheduler, size, model."""
    meta = getattr(trace, "meta", None) or {}
    seeds = meta.get("seeds") or []
    seed = seeds[batch] if isinstance(seeds, (list, tuple)) and len(seeds) > batch else meta.get("seed")
    prompts = getattr(trace, "prompts", None) or []
    negs = getattr(trace, "negative_prompts", None) or []
    gs = getattr(trace, "guidance_scale", None)
    kind = guidance_kind(trace)
    sched = meta.get("scheduler_class") or meta.get("scheduler")
    return {
        "prompt": prompts[batch] if batch < len(prompts) else None,
        "negative prompt": negs[batch] if batch < len(negs) else None,
        "seed": seed,
        # a CFG run's scale as a number (compared, shown by guidance_label); "off"; another
        # kind (Flux's distilled guidance, true CFG) as guidance_text names it
        "guidance": (float(gs) if kind == "cfg" and gs is not None
                     else "off" if kind == "off" else guidance_text(trace)),
        "steps": len(trace.timesteps),
        "scheduler": str(sched).replace("Scheduler", "") if sched else None,
        "size": (f"{meta['height']}x{meta['width']}" if meta.get("height") and meta.get("width")
                 else None),
        "model": meta.get("model_id") or None,
    }


def _label(trace: Any, batch: int) -> str:
    s = run_settings(trace, batch)
    g = s["guidance"]
    return (f"{s['prompt']!r} seed={s['seed']} " + (f"cfg={g:g}" if isinstance(g, float) else
                                                    guidance_text(trace))
            + (f" {s['scheduler']}" if s["scheduler"] else ""))


def _check_batch(trace: Any, batch: int, name: str) -> int:
    n = trace.latents.shape[1]
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not -n <= batch < n:
        raise ValueError(f"{name}={batch!r} is out of range: that trace holds {n} image(s)")
    return int(batch) % n


def compare(trace_a: Any, trace_b: Any, batch_a: int = 0, batch_b: int = 0,
            words: Iterable[str] | None = None, maps: bool = True, **heatmap_kwargs: Any
            ) -> Comparison:
    """Compare image ``batch_a`` of ``trace_a`` with image ``batch_b`` of ``trace_b``.

    Both runs must have the same number of steps and latent shape. ``words``: the words whose
    maps to compare (default: every non-punctuation word found in both prompts); ``maps=False``
    skips the maps. ``heatmap_kwargs`` (``layers``, ``pooling``, ``size``...) go to
    :func:`sdlens.analysis.heatmaps.word_heatmap`.
    """
    for name, t in (("trace_a", trace_a), ("trace_b", trace_b)):
        if getattr(t, "latents", None) is None:
            raise TypeError(f"{name} is not a Trace (no .latents): {type(t).__name__}")
    ba = _check_batch(trace_a, batch_a, "batch_a")
    bb = _check_batch(trace_b, batch_b, "batch_b")
    la, lb = trace_a.latents[:, ba].float(), trace_b.latents[:, bb].float()
    if la.shape != lb.shape:
        raise ValueError(f"the runs differ in shape: latents {tuple(la.shape)} vs {tuple(lb.shape)}"
                         " (steps + 1, C, h, w); compare runs with the same steps and size")
    latent_rms = _rms(la - lb)
    if trace_a.x0 is not None and trace_b.x0 is not None:
        xa, xb = trace_a.x0[:, ba].float(), trace_b.x0[:, bb].float()
    else:  # no x0 recorded: the latents after each step stand in
        xa, xb = la[1:], lb[1:]
    x0_rms = _rms(xa - xb)
    scale = 0.5 * (_rms(xa) + _rms(xb))
    x0_rel = np.where(scale > 0, x0_rms / np.maximum(scale, 1e-12), 0.0)
    fa, fb = xa[-1], xb[-1]
    own_a = _rms(xa - fa) - _rms(xa - fb)
    own_b = _rms(xb - fb) - _rms(xb - fa)
    own = np.stack([own_a, own_b], 1)
    parted = (own_a < 0) & (own_b < 0)
    parting = None
    if float(np.max(x0_rel)) >= NOISE:  # distances within float noise never part
        for i in range(len(parted)):
            if parted[i:].all():
                parting = i
                break

    change: dict[str, np.ndarray] = {}
    map_steps: list[int] = []
    have_maps = (getattr(trace_a, "attention", None) is not None
                 and getattr(trace_b, "attention", None) is not None)
    if maps and have_maps:
        if words is None:
            wb = set(word_texts(trace_b, bb))
            words = [w for w in word_texts(trace_a, ba) if w in wb]
        elif isinstance(words, str):
            words = [words]
        sa = [int(s) for s in trace_a.attention.steps]
        sb = [int(s) for s in trace_b.attention.steps]
        map_steps = [s for s in sa if s in sb]
        kw = dict(heatmap_kwargs)
        kw.pop("steps", None)
        for w in words:
            if not map_steps:
                break
            ma = word_heatmap(trace_a, w, batch=ba, per_step=True, steps=map_steps, **kw)
            mb = word_heatmap(trace_b, w, batch=bb, per_step=True, steps=map_steps, **kw)
            change[w] = (ma - mb).abs().flatten(1).mean(1).numpy()
    sa_, sb_ = run_settings(trace_a, ba), run_settings(trace_b, bb)
    differs = {k: (sa_[k], sb_[k]) for k in sa_ if sa_[k] != sb_[k]}
    return Comparison(_label(trace_a, ba), _label(trace_b, bb), np.arange(len(x0_rms)),
                      latent_rms, x0_rms, x0_rel, own, parting, change, map_steps, differs)
