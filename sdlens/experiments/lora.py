"""LoRA, traced and compared: what an adapter does to the image, per scale.

Tracing works unchanged on pipelines with diffusers' loaders applied (``pipe.load_lora_weights``,
``set_adapters``, ``fuse_lora``): sdlens' site processors wrap whatever processor is installed,
and the attention probabilities are computed through the layer's own ``to_q`` / ``to_k`` (peft's
LoRA layers included, at their current scale), so traced images stay identical to untraced ones.

    >>> pipe.load_lora_weights("my_lora.safetensors", adapter_name="red")   # needs `peft`
    >>> eff = sdlens.lora_effect(pipe, "a circle", "red", scales=[0, 0.5, 1.0], seed=0)
    >>> eff.traces[2].heatmap("circle"); eff.comparisons[1.0].word_change; eff.figure

All scales run as ONE batched pipeline call (batch item i runs adapter ``"red"`` at
``scales[i]``; see :func:`lora_effect` for how and how faithful, and ``batched=False`` for one
call per scale).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from sdlens.analysis.compare import Comparison, compare
from sdlens.engine.batch import cell_trace
from sdlens.engine.options import RecordOptions
from sdlens.engine.session import generate
from sdlens.engine.sites import Hooks
from sdlens.trace.core import Trace

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


# ============================================================================ LoRA
def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is an optional extra
        return None
    return LoraLayer


def lora_adapters(pipe) -> dict[str, list[str]]:
    """The LoRA adapters loaded in ``pipe``: ``{adapter_name: [components]}`` (components among
    "unet", "text_encoder", "text_encoder_2"), in load order. {} without peft or adapters."""
    cls = _lora_layer_class()
    out: dict[str, list[str]] = {}
    if cls is None:
        return out
    for comp in _COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for m in model.modules():
            if isinstance(m, cls):
                for name in m.lora_A:
                    comps = out.setdefault(name, [])
                    if comp not in comps:
                        comps.append(comp)
    return out


def _layers(pipe, adapter: str) -> list:
    """peft LoRA layers of every component that hold ``adapter``; clear errors otherwise."""
    if not isinstance(adapter, str):
        raise TypeError(f"adapter must be the name of a loaded LoRA adapter (a str), got "
                        f"{type(adapter).__name__}; load one with "
                        "pipe.load_lora_weights(path, adapter_name=...)")
    cls = _lora_layer_class()
    if cls is None:
        raise ImportError("LoRA adapters need `peft`: pip install 'sdlens[lora]' (or pip install "
                          "peft)")
    loaded = lora_adapters(pipe)
    if not loaded:
        raise ValueError(f"unknown LoRA adapter {adapter!r}: this pipeline has no LoRA adapters "
                         "loaded (load one with pipe.load_lora_weights(path, adapter_name=...))")
    if adapter not in loaded:
        raise ValueError(f"unknown LoRA adapter {adapter!r}; loaded adapters: "
                         f"{', '.join(repr(a) for a in loaded)}")
    layers = []
    for comp in _COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        layers += [m for m in model.modules() if isinstance(m, cls) and adapter in m.lora_A]
    if any(getattr(m, "disable_adapters", False) for m in layers):
        raise ValueError(f"the LoRA layers of {adapter!r} are disabled (pipe.disable_lora()); "
                         "call pipe.enable_lora() first")
    if any(adapter in getattr(m, "merged_adapters", ()) for m in layers):
        raise ValueError(f"LoRA adapter {adapter!r} is fused into the weights (pipe.fuse_lora()); "
                         "its scale cannot be varied: call pipe.unfuse_lora() first")
    return layers


class _AdapterScale:
    """Saves and restores what varying one adapter's scale touches in its peft layers: the
    active adapters, the adapter's scaling, its parameters' ``requires_grad``."""

    def __init__(self, layers: list, adapter: str):
        self.layers, self.adapter = layers, adapter
        self.saved = []
        for m in layers:
            params = [p for d in (m.lora_A, m.lora_B) for p in d[adapter].parameters()]
            self.saved.append((list(m.active_adapters), m.scaling[adapter],
                               [(p, p.requires_grad) for p in params]))

    def activate(self) -> None:
        for m in self.layers:
            if self.adapter not in m.active_adapters:
                m.set_adapter(list(m.active_adapters) + [self.adapter])

    def set_scale(self, scale: float) -> None:
        for m in self.layers:
            m.set_scale(self.adapter, float(scale))

    def restore(self) -> None:
        for m, (active, scaling, grads) in zip(self.layers, self.saved):
            if list(m.active_adapters) != active:
                m.set_adapter(active)
            m.scaling[self.adapter] = scaling
            for p, g in grads:
                p.requires_grad_(g)


def _per_row_scales(hooks: Hooks, layers: list, adapter: str, scales: Sequence[float]) -> None:
    """For the life of ``hooks``: batch item ``i % len(scales)`` of every LoRA layer of
    ``adapter`` runs at ``scales[i]``.

    peft computes ``base(x) + lora_B(lora_A(x)) * scaling``. Here ``scaling`` is set to 1 and a
    forward hook on ``lora_B`` multiplies its output, row by row, by the scaling peft itself
    computes for each scale (``set_scale``): the same products as one call per scale. Rows are
    batch items; the UNet's batch under classifier-free guidance is ``[uncond x k, text x k]``
    and the text encoders see ``k`` prompts, so row ``r`` belongs to scale ``r % k``.
    NotImplementedError (before anything changes) for adapters that cannot be batched (DoRA).
    """
    k = len(scales)
    for m in layers:
        if adapter in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(adapter):
            raise NotImplementedError("DoRA / LoRA variants cannot be batched over scales")

    def make_hook(row):
        cache: dict = {}

        def hook(module, args, out):
            n = out.shape[0]
            if n % k:
                raise RuntimeError(f"sdlens.lora_effect: a LoRA layer saw batch {n}, not a "
                                   f"multiple of the {k} scales; run with batched=False")
            key = (n, out.dtype, out.device)
            c = cache.get(key)
            if c is None:
                c = torch.tensor(row, dtype=out.dtype, device=out.device).repeat(n // k)
                cache[key] = c
            return out * c.view(n, *([1] * (out.ndim - 1)))
        return hook

    def restore(m, scaling):
        m.scaling[adapter] = scaling

    for m in layers:
        hooks.undo(functools.partial(restore, m, m.scaling[adapter]))
        row = []
        for s in scales:
            m.set_scale(adapter, float(s))
            row.append(float(m.scaling[adapter]))
        m.scaling[adapter] = 1.0
        hooks.forward_hook(m.lora_B[adapter], make_hook(row))


@dataclass
class LoraEffect:
    """Result of :func:`lora_effect`.

    ``traces[i]``: the run at ``scales[i]`` (each a single-image Trace; ``meta["lora"]`` says
    adapter, scale and whether it ran batched); ``comparisons[s]``: :func:`sdlens.compare` of the
    reference run (scale 0 when asked for, else ``scales[0]``) with the run at scale ``s`` (x0
    distance per step, per-word map change); ``figure``: images per scale, x0 distance from the
    reference per step, and each word's map change per scale.
    """

    adapter: str
    scales: list[float]
    traces: list[Trace]
    reference: float
    comparisons: dict[float, Comparison]
    figure: Any
    batched: bool

    def __iter__(self):  # traces, figure = sdlens.lora_effect(...)
        return iter((self.traces, self.figure))

    def trace(self, scale: float) -> Trace:
        """The trace of the run at ``scale``."""
        for s, t in zip(self.scales, self.traces):
            if s == scale:
                return t
        raise KeyError(f"scale {scale} was not run; scales: {self.scales}")

    def word_change(self) -> dict[str, dict[float, float]]:
        """``{word: {scale: mean map change from the reference over the recorded steps}}``."""
        out: dict[str, dict[float, float]] = {}
        for s, c in self.comparisons.items():
            for w, v in c.word_change.items():
                out.setdefault(w, {})[s] = float(np.mean(v)) if len(v) else 0.0
        return out

    def summary(self) -> str:
        lines = [f"LoRA {self.adapter!r} at scales {self.scales} "
                 f"({'one batched call' if self.batched else 'one call per scale'}); "
                 f"reference: scale {self.reference}"]
        for s, c in self.comparisons.items():
            words = ", ".join(f"{w!r} {float(np.mean(v)):.3f}" for w, v in c.word_change.items())
            lines.append(f"  scale {s}: final x0 distance {c.x0_rms[-1]:.4f} (relative "
                         f"{c.x0_relative[-1]:.3f}); word map change: {words or '-'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def lora_effect(pipe, prompt: str, adapter: str, scales: Sequence[float] = (0, 0.5, 1.0),
                seed: int = 0, steps: int = 25, guidance_scale: float | None = None,
                negative_prompt: str | None = None, batched: bool = True,
                words: Sequence[str] | None = None, figure: bool = True,
                options: RecordOptions | None = None, **kwargs) -> LoraEffect:
    """Run ``prompt`` with LoRA ``adapter`` at each of ``scales`` (same seed) and compare.

    Only ``adapter``'s scale varies: other adapters stay as they are (active at their weights, or
    inactive); ``adapter`` is activated for the runs if it was not. Afterwards the pipeline's
    adapters are exactly as before.

    Args:
        pipe: an SD pipeline with ``adapter`` loaded (``pipe.load_lora_weights(..., adapter_name=)``).
        prompt: one prompt (str).
        adapter: the adapter's name; unknown names raise ValueError listing the loaded ones.
        scales: LoRA scales (0 = without the adapter, 1 = as trained).
        seed, steps, guidance_scale, negative_prompt: as :func:`sdlens.generate`.
        batched: run all scales as one pipeline call of ``len(scales)`` images (per-row LoRA
            scales, see below); False: one call per scale. Image i of the batched call is bit
            for bit what diffusers gives for a batch of the same size at ``scales[i]``
            (``set_adapters``), which differs from a call of one image only by the device's
            batch-size rounding (on CPU ~5e-5 on the latents of a plain SD run, more where a
            strong LoRA amplifies it). ``batched=False`` reproduces single calls exactly
            (scale 0 == the pipeline without the LoRA, bit for bit). Adapters that cannot be
            batched (DoRA) run one call per scale with a warning.
        words: words whose maps to compare (default: every word of the prompt).
        figure: build ``LoraEffect.figure`` (matplotlib).
        options, **kwargs: RecordOptions and pipeline arguments, as :func:`sdlens.generate`.

    How the batch works: peft adds ``lora_B(lora_A(x)) * scaling`` to each adapted layer; for the
    call, the adapter's ``scaling`` is set to 1 and a forward hook on ``lora_B`` multiplies each
    batch row by the scaling peft computes for that row's scale (``set_scale``).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"lora_effect takes one prompt (a str), got {type(prompt).__name__}")
    try:
        scales = [float(s) for s in scales]
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a list of numbers, got {scales!r}") from None
    if not scales:
        raise ValueError("scales is empty")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if "num_images_per_prompt" in kwargs:
        raise ValueError("lora_effect runs one image per scale; num_images_per_prompt is not "
                         "supported")
    layers = _layers(pipe, adapter)
    state = _AdapterScale(layers, adapter)
    traces: list[Trace] = []
    ran_batched = False
    try:
        state.activate()
        if batched and len(scales) > 1:
            try:
                with Hooks() as hooks:
                    _per_row_scales(hooks, layers, adapter, scales)
                    full = generate(pipe, [prompt] * len(scales), seed=[seed] * len(scales),
                                    steps=steps, guidance_scale=guidance_scale,
                                    negative_prompt=negative_prompt, options=options, **kwargs)
                ran_batched = True
            except NotImplementedError as e:
                warnings.warn(f"sdlens.lora_effect: {e}; running one call per scale",
                              stacklevel=2)
        if ran_batched:
            traces = [cell_trace(full, i, seed=seed, extra_meta={"lora": {
                "adapter": adapter, "scale": s, "batched": True}})
                for i, s in enumerate(scales)]
        else:
            for s in scales:
                state.set_scale(s)
                tr = generate(pipe, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
                              negative_prompt=negative_prompt, options=options, **kwargs)
                tr._info["meta"]["lora"] = {"adapter": adapter, "scale": s, "batched": False}
                traces.append(tr)
    finally:
        state.restore()
    ref = 0.0 if 0.0 in scales else scales[0]
    ref_trace = traces[scales.index(ref)]
    comparisons = {s: compare(ref_trace, t, words=words) for s, t in zip(scales, traces)}
    eff = LoraEffect(adapter, scales, traces, ref, comparisons, None, ran_batched)
    if figure:
        eff.figure = lora_effect_figure(eff)
    return eff


def lora_effect_figure(effect: LoraEffect):
    """Images per scale (top), x0 distance from the reference run per step, and each word's
    map change (mean over steps) against the scale."""
    from matplotlib.figure import Figure

    n = len(effect.scales)
    fig = Figure(figsize=(max(6.0, 2.0 * n), 5.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.2])
    axes = np.atleast_1d(top.subplots(1, n))
    for ax, s, t in zip(axes, effect.scales, effect.traces):
        imgs = t.images
        if imgs:
            ax.imshow(np.asarray(imgs[0].convert("RGB")))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"scale {s:g}", fontsize=9)
    a, b = bottom.subplots(1, 2)
    for s, c in effect.comparisons.items():
        if s == effect.reference:
            continue
        a.plot(c.steps, c.x0_relative, "o-", ms=3, label=f"scale {s:g}")
    a.set(xlabel="step", ylabel=f"x0 distance from scale {effect.reference:g} (relative)")
    a.set_title("how far the LoRA moves the run", fontsize=10)
    if len(effect.scales) > 1:
        a.legend(fontsize=8)
    change = effect.word_change()
    for w, per in change.items():
        xs = sorted(per)
        b.plot(xs, [per[x] for x in xs], "o-", ms=3, label=repr(w))
    b.set(xlabel="LoRA scale", ylabel="mean |map - reference map|", ylim=(0, None))
    b.set_title("how far each word's map moves", fontsize=10)
    if change:
        b.legend(fontsize=8)
    fig.suptitle(f"LoRA {effect.adapter!r}: {effect.traces[0].prompts[0]!r}", fontsize=10)
    return fig
