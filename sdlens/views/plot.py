"""Matplotlib figures of a trace. Every function returns a ``matplotlib.figure.Figure``.

Figures are built with ``matplotlib.figure.Figure`` (not pyplot), so they show once in a notebook
(as the cell's value), never pile up in pyplot's state, and save with ``fig.savefig("x.png")``.
Functions that draw one panel take ``ax=`` to draw into an axes of yours.

>>> from sdlens import plot
>>> plot.heatmap_grid(trace)                 # every word's heatmap over the image
>>> plot.step_strip(trace, n=8)              # x_t / x0 / prediction / CFG delta over 8 steps
>>> plot.token_view(trace); plot.scheduler_curves(trace); plot.commitment_curves(trace)
>>> plot.concept_maps(trace)                 # traced with concepts=[...]: one panel per concept
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from sdlens.analysis.controlnet import controlnet_residuals as control_residuals
from sdlens.analysis.guidance import (cfg_delta, guidance_stats, guidance_text, prediction_label,
                                     scheduler_view, x0_guidance_sweep)
from sdlens.analysis.heatmaps import (Commitment, commitments, output_size, resolve_layers,
                                     word_heatmap)
from sdlens.analysis.previews import (latent_to_rgb, linear_decoder, previews, resolve_decoder,
                                      to_image)
from sdlens.views.overlay import GREY_NOTE, blend, underlay
from sdlens.analysis.tokens import (BOS, encoder_name, find_word, token_text,
                                    token_view as _token_view, word_texts)
from sdlens.trace.steps import select_step, select_steps

STRIP_ROWS = ("latents", "x0", "noise", "cfg")
_ROW_TITLES = {"latents": "x_t (latents)", "x0": "x0 (predicted)", "noise": "{} (guided)",
               "cfg": "|CFG delta|", "image": "image"}  # "noise": the prediction, as it is named


def _new_axes(ax: Any, figsize: tuple[float, float]):
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    return ax.figure, ax


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _image(trace: Any, batch: int) -> np.ndarray | None:
    images = getattr(trace, "images", None)
    if images and len(images) > batch:
        return np.asarray(images[batch].convert("RGB"))
    return None


def _strip_axis(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """A figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# --------------------------------------------------------------------------- heatmaps
def overlay(trace: Any, word: str, ax: Any = None, batch: int = 0, alpha: float = 0.55,
            cmap: str = "jet", colorbar: bool = True, title: str | None = None,
            grey: bool = True, **heatmap_kwargs: Any) -> Figure:
    """One word's heatmap over the image (``heatmap_kwargs`` go to ``word_heatmap``); the image
    in grey under the heat (``grey=False``: in colour; :mod:`sdlens.views.overlay`)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    fig, ax = _new_axes(ax, (3.2, 3.2))
    img = _image(trace, batch)
    size = heatmap_kwargs.pop("size", None) or (img.shape[:2] if img is not None else None)
    h = _np(word_heatmap(trace, word, batch=batch, size=size, **heatmap_kwargs))
    if img is not None:
        ax.imshow(underlay(img, grey))
        im = ax.imshow(h, cmap=cmap, alpha=alpha, vmin=0, vmax=1 if h.max() <= 1 else None)
    else:
        im = ax.imshow(h, cmap=cmap)
    kind = heatmap_kwargs.get("maps", "attention")
    if title is None and kind == "concepts":  # a concept need not be a word of the prompt
        title = f"{word!r} (concept)"
    elif title is None:
        w = find_word(trace, word, batch, heatmap_kwargs.get("occurrence", 0))
        sub = "" if len(w.tokens) == 1 else f"\n({' + '.join(token_text(t) for t in w.tokens)})"
        title = f"{w.text!r}{sub}"
    ax.set_title(title, fontsize=10)
    _strip_axis(ax)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03,
                     label=_colorbar_label(kind, heatmap_kwargs.get("normalize", True),
                                           grey and img is not None))
    return fig


#: What a heatmap's values are, per kind of recorded maps (``analysis.heatmaps.MAPS``).
_MAP_VALUES = {"attention": "attention", "concepts": "concept share",
               "image_to_text": "image→text attention"}


def _colorbar_label(kind: str, normalize: bool = True, grey: bool = False) -> str:
    what = _MAP_VALUES.get(kind, kind)
    if kind == "concepts" and not normalize:
        label = f"{what} (softmax over the concepts)"
    else:
        label = f"{what} ({'min–max per panel' if normalize else 'mean probability, unstretched'})"
    return f"{label}\n{GREY_NOTE}" if grey else label


def heatmap_grid(trace: Any, words: Iterable[str] | None = None, batch: int = 0, ncols: int = 4,
                 alpha: float = 0.55, cmap: str = "jet", show_image: bool = True,
                 panel_size: float = 2.6, grey: bool = True, **heatmap_kwargs: Any) -> Figure:
    """Heatmap overlays of several words (default: every word of the prompt, punctuation left
    out) in a grid, the image first (in colour), one shared colour bar; under the heat the
    image is grey (``grey=False``: in colour)."""
    if words is None:
        words = word_texts(trace, batch)
    elif isinstance(words, str):
        words = [words]
    words = list(words)
    if not words:
        raise ValueError("no words to show")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    img = _image(trace, batch)
    n = len(words) + (1 if show_image and img is not None else 0)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel_size * ncols + 0.8, panel_size * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    i = 0
    if show_image and img is not None:
        axes[0].imshow(img)
        axes[0].set_title("image", fontsize=10)
        _strip_axis(axes[0])
        i = 1
    for w in words:
        overlay(trace, w, ax=axes[i], batch=batch, alpha=alpha, cmap=cmap, colorbar=False,
                grey=grey, **heatmap_kwargs)
        i += 1
    for ax in axes[i:]:
        ax.set_visible(False)
    mappable = axes[i - 1].images[-1]
    fig.colorbar(mappable, ax=list(axes[:i]), fraction=0.03, pad=0.02,
                 label="attention (normalised)" + (f"\n{GREY_NOTE}" if grey and img is not None
                                                   else ""))
    pooling = heatmap_kwargs.get("pooling", "sdlens")
    fig.suptitle(f"{trace.prompts[batch]!r}  -  word heatmaps ({pooling} pooling)", fontsize=11)
    return fig


def heatmap_steps(trace: Any, word: str, steps: Any = None, n: int = 8, batch: int = 0,
                  cmap: str = "jet", alpha: float = 0.55, grey: bool = True,
                  **heatmap_kwargs: Any) -> Figure:
    """A word's map forming: its per-step heatmap at ``n`` evenly spaced recorded steps (or the
    ``steps`` given), each normalised on its own, over the image in grey (``grey=False``: in
    colour)."""
    kind = heatmap_kwargs.get("maps", "attention")  # concept maps have steps of their own
    recorded = getattr(trace, kind, None)
    chosen = _pick_steps(steps, n, len(trace.timesteps),
                         recorded.steps if recorded is not None else trace.attention.steps)
    maps = _np(word_heatmap(trace, word, steps=chosen, per_step=True, batch=batch,
                                      **heatmap_kwargs))
    img = _image(trace, batch)
    fig = Figure(figsize=(1.9 * len(chosen) + 0.8, 2.3), layout="constrained")
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, s, m in zip(axes, chosen, maps):
        if img is not None:
            ax.imshow(underlay(img, grey))
        im = ax.imshow(m, cmap=cmap, alpha=alpha if img is not None else 1, vmin=0, vmax=1)
        ax.set_title(f"step {s + 1}", fontsize=9)
        _strip_axis(ax)
    fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.02,
                 label=GREY_NOTE if grey and img is not None else None)
    what = {"concepts": " (concept map)", "image_to_text": " (image→text)"}.get(kind, "")
    fig.suptitle(f"{word!r}{what} per step", fontsize=10)
    return fig


def _map_grid(trace: Any, kind: str, names: list[str], titles: list[str], batch: int,
              per_block: bool, layers: Any, alpha: float, cmap: str, panel_size: float,
              normalize: bool, heading: str, grey: bool = True, **heatmap_kwargs: Any) -> Figure:
    """One panel per name (a concept, a word) of the recorded maps ``kind``: pooled over the
    chosen layers (one row), or one row per block (``per_block``); the image first (in
    colour), grey under the heat unless not ``grey``."""
    if not names:
        raise ValueError("no concepts or words to show")
    rows = resolve_layers(trace, layers, kind) if per_block else [layers]
    maps = getattr(trace, kind)
    img = _image(trace, batch)
    size = heatmap_kwargs.pop("size", None) or (img.shape[:2] if img is not None else None)
    lead = 1 if img is not None else 0
    ncols = len(names) + lead
    fig = Figure(figsize=(panel_size * ncols + (1.6 if per_block else 0.8),
                          panel_size * len(rows) + 0.7), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    mappable = None
    for r, sel in enumerate(rows):
        if img is not None:
            axes[r, 0].imshow(img)
            _strip_axis(axes[r, 0])
            if r == 0:
                axes[r, 0].set_title("image", fontsize=10)
        if per_block:
            axes[r, 0].set_ylabel(maps.alias(sel), fontsize=9)
        for c, name in enumerate(names):
            ax = axes[r, c + lead]
            h = _np(word_heatmap(trace, name, layers=sel, batch=batch, size=size, maps=kind,
                                 normalize=normalize, **heatmap_kwargs))
            if img is not None:
                ax.imshow(underlay(img, grey))
            mappable = ax.imshow(h, cmap=cmap, alpha=alpha if img is not None else 1, vmin=0,
                                 vmax=1)
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
            _strip_axis(ax)
            if per_block and img is None and c == 0:
                ax.set_ylabel(maps.alias(sel), fontsize=9)
    fig.colorbar(mappable, ax=list(axes.ravel()), fraction=0.03, pad=0.02,
                 label=_colorbar_label(kind, normalize, grey and img is not None))
    where = "per block" if per_block else (
        "all blocks" if layers is None else f"layers {layers!r}")
    fig.suptitle(f"{trace.prompts[batch]!r}  -  {heading} ({where})", fontsize=11)
    return fig


def concept_maps(trace: Any, concepts: Iterable[str] | None = None, batch: int = 0,
                 per_block: bool = False, layers: Any = None, normalize: bool = False,
                 alpha: float = 0.55, cmap: str = "jet", panel_size: float = 2.4,
                 grey: bool = True, **heatmap_kwargs: Any) -> Figure:
    """The concept maps of a trace made with ``concepts=[...]`` (ConceptAttention's maps,
    ``trace.concepts``): one panel per concept over the image, pooled over ``layers`` (default
    every recorded block) and the recorded steps (``steps=``), or one row per block with
    ``per_block=True``. ``normalize=False`` (the default) shows each pixel's share among the
    concepts (a softmax: the concepts' panels sum to 1 at every pixel, on one colour scale);
    ``True`` min-max normalises each panel as the word heatmaps are. ``concepts``: a subset
    (default all, in the order given at trace time); ``heatmap_kwargs`` go to
    :func:`~sdlens.analysis.heatmaps.word_heatmap` (``steps``, ``pooling``)."""
    cmaps = getattr(trace, "concepts", None)
    if cmaps is None:
        raise ValueError("this trace holds no concept maps; trace with concepts=[...] (a "
                         "joint-attention model) to get them")
    if concepts is None:
        names = list(cmaps.concepts)
    else:
        names = [concepts] if isinstance(concepts, str) else list(concepts)
        names = [cmaps.concepts[cmaps.concept_index(c)] for c in names]  # ValueError: unknown
    return _map_grid(trace, "concepts", names, [repr(c) for c in names], batch, per_block,
                     layers, alpha, cmap, panel_size, normalize, "concept maps", grey,
                     **heatmap_kwargs)


def image_to_text_maps(trace: Any, words: Iterable[str] | None = None, batch: int = 0,
                       per_block: bool = False, layers: Any = None, normalize: bool = True,
                       alpha: float = 0.55, cmap: str = "jet", panel_size: float = 2.4,
                       grey: bool = True, **heatmap_kwargs: Any) -> Figure:
    """The image->text maps of a trace recorded with ``record=(..., "image_to_text")``
    (``trace.image_to_text``: each word's tokens' attention to the image patches): one panel
    per word (default every word of the prompt), pooled over ``layers``, or one row per block
    with ``per_block=True``; each panel min-max normalised (``normalize``)."""
    if getattr(trace, "image_to_text", None) is None:
        raise ValueError("this trace holds no image->text maps; trace with record=(..., "
                         "'image_to_text') (a joint-attention model) to get them")
    if words is None:
        words = word_texts(trace, batch)
    names = [words] if isinstance(words, str) else list(words)
    return _map_grid(trace, "image_to_text", names, [repr(w) for w in names], batch, per_block,
                     layers, alpha, cmap, panel_size, normalize, "image→text maps", grey,
                     **heatmap_kwargs)


# --------------------------------------------------------------------------- step strip
def _pick_steps(steps: Any, n: int, n_steps: int, recorded: Sequence[int] | None = None
                ) -> list[int]:
    """``steps`` as :func:`sdlens.trace.steps.select_steps` reads it; None: ``n`` evenly spaced
    steps of ``recorded`` (default all ``n_steps``)."""
    if steps is not None:
        return select_steps(steps, n_steps, recorded)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    available = list(recorded) if recorded is not None else list(range(n_steps))
    if len(available) <= n:
        return available
    idx = np.linspace(0, len(available) - 1, n).round().astype(int)
    return [int(available[i]) for i in idx]


def _signed_rgb(x: torch.Tensor) -> np.ndarray:
    """(C, h, w) noise -> false-colour (h, w, 3): its first 3 channels, each scaled by the
    largest absolute value to [-1, 1] then to [0, 1]."""
    x = x.float()[:3]
    x = x / x.abs().amax().clamp(min=1e-8)
    return ((x + 1) / 2).permute(1, 2, 0).numpy()


def step_strip(trace: Any, steps: Any = None, n: int = 8, rows: Sequence[str] = STRIP_ROWS,
               batch: int = 0, decoder: str = "auto", vae: Any = None,
               panel_size: float = 1.7) -> Figure:
    """How the picture forms: one column per chosen step (default ``n`` evenly spaced), rows

    * ``latents``: x_t before the step (linear preview / VAE), ``x0``: the predicted clean image,
    * ``noise``: the guided prediction (false colour: first 3 channels, symmetric scale),
      labelled as what it is (``prediction_label``: noise, velocity for flow models, v, x0),
    * ``cfg``: per-pixel norm over channels of ``noise_text - noise_uncond`` (shared colour scale).
    """
    rows = [rows] if isinstance(rows, str) else list(rows)
    decoder = resolve_decoder(trace, decoder, vae)  # "auto": the VAE decode where it is cheap
    bad = [r for r in rows if r not in STRIP_ROWS]
    if bad or not rows:
        raise ValueError(f"rows must be a non-empty list of {STRIP_ROWS}, got {rows}")
    chosen = _pick_steps(steps, n, len(trace.timesteps))
    if "cfg" in rows and getattr(trace, "noise_uncond", None) is None:
        rows = [r for r in rows if r != "cfg"]  # guidance off: no delta to show
    if "noise" in rows and getattr(trace, "noise", None) is None:
        rows = [r for r in rows if r != "noise"]
    if "x0" in rows and getattr(trace, "x0", None) is None:
        rows = [r for r in rows if r != "x0"]
    fig = Figure(figsize=(panel_size * len(chosen) + 1.6, panel_size * len(rows) + 0.5),
                 layout="constrained")
    axes = fig.subplots(len(rows), len(chosen), squeeze=False)
    cfg_max = None
    if "cfg" in rows:
        delta = cfg_delta(trace, batch=batch)[chosen].norm(dim=1)  # (S, h, w)
        cfg_max = float(delta.max())
    for r, row in enumerate(rows):
        if row in ("latents", "x0"):
            ims = previews(trace, row, chosen, batch, decoder, vae)
        for c, s in enumerate(chosen):
            ax = axes[r, c]
            if row in ("latents", "x0"):
                ax.imshow(np.asarray(ims[c]))
            elif row == "noise":
                ax.imshow(_signed_rgb(trace.noise[s, batch]), interpolation="nearest")
            else:
                im = ax.imshow(_np(delta[c]), cmap="magma", vmin=0, vmax=cfg_max,
                               interpolation="nearest")
            _strip_axis(ax)
            if r == 0:
                ax.set_title(f"step {s + 1}\nt={float(trace.timesteps[s]):.0f}", fontsize=9)
            if c == 0:
                ax.set_ylabel(_ROW_TITLES[row].format(prediction_label(trace)), fontsize=9)
        if row == "cfg":
            fig.colorbar(im, ax=list(axes[r]), fraction=0.02, pad=0.01, label="L2 over channels")
    how = "VAE decode" if decoder == "vae" else f"{decoder} preview"
    fig.suptitle(f"{trace.prompts[batch]!r}: step by step ({how}; {guidance_text(trace)})",
                 fontsize=10)
    return fig


def guidance_strip(trace: Any, step: int, scales: Sequence[float] = (1, 3, 5, 7.5, 10, 15),
                   batch: int = 0, panel_size: float = 1.8) -> Figure:
    """What x0 of ``step`` would have been at other guidance scales (linear preview)."""
    x0s = x0_guidance_sweep(trace, step, scales, batch)
    m, b = linear_decoder(trace)
    size = output_size(trace)
    fig = Figure(figsize=(panel_size * len(scales), panel_size + 0.5), layout="constrained")
    axes = fig.subplots(1, len(scales), squeeze=False)[0]
    for ax, s, x in zip(axes, scales, x0s):
        ax.imshow(np.asarray(to_image(latent_to_rgb(x, m, b), size)))
        rec = " (recorded)" if abs(float(s) - float(trace.guidance_scale)) < 1e-6 else ""
        ax.set_title(f"cfg {s:g}{rec}", fontsize=9)
        _strip_axis(ax)
    fig.suptitle(f"x0 at step {select_step(step, len(trace.timesteps)) + 1} for other guidance scales",
                 fontsize=10)
    return fig


# --------------------------------------------------------------------------- curves
def guidance_curves(trace: Any, batch: int = 0, ax: Any = None) -> Figure:
    """Per step: RMS of the CFG delta, of the unconditional and text predictions, and the
    cosine between the two predictions (right axis)."""
    st = guidance_stats(trace, batch)
    fig, ax = _new_axes(ax, (5.5, 3.2))
    x = np.asarray(st.steps) + 1  # steps 1..N, as diffusers' progress bar counts them
    ax.plot(x, st.delta_rms, "o-", ms=3, label="RMS(text - uncond)")
    ax.plot(x, st.uncond_rms, "--", label="RMS(uncond)")
    ax.plot(x, st.text_rms, ":", label="RMS(text)")
    ax.set_xlabel("step")
    ax.set_ylabel("RMS")
    ax2 = ax.twinx()
    ax2.plot(x, st.cosine, color="grey", alpha=0.6, label="cos(uncond, text)")
    ax2.set_ylabel("cosine", color="grey")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
    ax.set_title(f"classifier-free guidance ({guidance_text(trace)})", fontsize=10)
    return fig


def controlnet_residuals(trace: Any, batch: int = 0, net: int | None = None, ax: Any = None) -> Figure:
    """Where a ControlNet's condition acts: the RMS of its residuals per block (columns: the
    UNet's skip connections in order, then the mid block) and step (rows), for batch item
    ``batch`` (``net``: one net of a multi-ControlNet; None: their mean). Needs a trace recorded
    with ``record`` including "controlnet" (:mod:`sdlens.analysis.controlnet`)."""
    res = control_residuals(trace)
    rms = res.rms[:, batch]  # (steps, nets, blocks)
    rms = rms.nanmean(1) if net is None else rms[:, net]
    fig, ax = _new_axes(ax, (max(4.0, 0.4 * len(res.blocks) + 1.5), 3.2))
    im = ax.imshow(_np(rms), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks(range(len(res.blocks)))
    ax.set_xticklabels(res.blocks, rotation=90, fontsize=7)
    ax.set_ylabel("step")
    ax.set_title(f"ControlNet residual RMS (scale {res.scale})", fontsize=10)
    fig.colorbar(im, ax=ax)
    return fig


def scheduler_curves(trace: Any) -> Figure:
    """Timesteps, sigma (log scale), alpha_bar a_t / log-SNR and step sizes per step."""
    v = scheduler_view(trace)
    steps = np.arange(1, len(v.timesteps) + 1)  # 1..N
    fig = Figure(figsize=(8, 5), layout="constrained")
    (a, b), (c, d) = fig.subplots(2, 2)
    a.plot(steps, v.timesteps, "o-", ms=3)
    a.set(title="timestep t", xlabel="step", ylabel="t")
    b.semilogy(steps, v.sigmas, "o-", ms=3)
    b.set(title="sigma = sqrt((1-a)/a)", xlabel="step", ylabel="sigma (log)")
    c.plot(steps, v.alpha_bar, "o-", ms=3, label="alpha_bar a_t")
    c.set(title="signal level", xlabel="step", ylabel="a_t")
    c2 = c.twinx()
    c2.plot(steps, v.log_snr, color="tab:orange", alpha=0.7)
    c2.set_ylabel("log SNR", color="tab:orange")
    d.bar(steps, v.dt, label="dt")
    d.set(title="step size", xlabel="step", ylabel="t - t_next")
    d2 = d.twinx()
    d2.plot(steps, v.dsigma, color="tab:red", marker="o", ms=3)
    d2.set_ylabel("sigma - sigma_next", color="tab:red")
    fig.suptitle(f"{v.scheduler} ({v.form} form, predicts {prediction_label(v.prediction_type)}), "
                 f"{len(steps)} steps",
                 fontsize=11)
    return fig


def commitment_curves(source: Any, words: Iterable[str] | None = None, threshold: float = 0.9,
                      ax: Any = None, **kwargs: Any) -> Figure:
    """Per word, the correlation of its step-t map with its final map, the threshold and the
    commitment step (marker). ``source``: a trace or a list of ``Commitment`` s."""
    if isinstance(source, (list, tuple)) and all(isinstance(c, Commitment) for c in source):
        comms = list(source)
    else:
        comms = commitments(source, words, threshold, **kwargs)
    if not comms:
        raise ValueError("no words to show")
    fig, ax = _new_axes(ax, (5.5, 3.2))
    for c in comms:
        label = f"{c.word!r} (step {c.step + 1})" if c.step is not None else f"{c.word!r} (never)"
        (line,) = ax.plot(np.asarray(c.steps) + 1, c.correlation, "o-", ms=3, label=label)
        if c.step is not None:
            ax.axvline(c.step + 1, color=line.get_color(), ls=":", alpha=0.7)
    ax.axhline(comms[0].threshold, color="k", ls="--", lw=0.8, label=f"threshold {comms[0].threshold}")
    ax.set(xlabel="step", ylabel="corr(map_t, final map)", ylim=(-1.05, 1.05))
    ax.set_title("when does each word commit to its place?", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def token_view(trace: Any, batch: int = 0, ax: Any = None, include_start: bool = False) -> Figure:
    """The prompt's tokens (one bar each, coloured by word) and the share of cross-attention
    each received over the run. The start token, which takes most of the attention in every
    layer, is left out unless ``include_start``. Several text encoders (SD3): each token's label
    names its encoder (CLIP / T5), the title each encoder's count."""
    view = _token_view(trace, batch)
    start = view.rows[0].position if view.rows and view.rows[0].token == BOS else None
    rows = [r for r in view.rows if (include_start or r.position != start)]
    rows = [r for r in rows if r.attention is not None]
    if not rows:
        raise ValueError("no token of this trace has recorded attention")
    fig, ax = _new_axes(ax, (max(4.0, 0.55 * len(rows) + 1.5), 3.4))
    colours = [f"C{r.word_index % 10}" if r.word_index >= 0 else "grey" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x, [r.attention for r in rows], color=colours)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r.text}\n{encoder_name(r.encoder) + ' ' if r.encoder else ''}"
                        f"{r.position}" for r in rows], rotation=60, fontsize=8)
    ax.set_ylabel("share of attention to the text")
    encoders = view.encoders()
    counts = (", ".join(f"{e['name']} {e['tokens']} of {e['limit']}" for e in encoders)
              if encoders else f"{view.n_prompt_tokens} of {view.limit}")
    title = f"{counts} tokens: {view.prompt!r}"
    if view.truncated:
        title += f"\nCUT by the {view.limit}-token limit: {' '.join(view.truncated_words)}"
    ax.set_title(title, fontsize=9, color="red" if view.truncated else "black")
    return fig


def comparison(cmp: Any, axes: Any = None) -> Figure:
    """A :class:`sdlens.analysis.compare.Comparison`: x0 distance per step (with the parting step) and
    the change of each word's map."""
    if axes is None:
        fig = Figure(figsize=(9, 3.2), layout="constrained")
        a, b = fig.subplots(1, 2)
    else:
        a, b = axes
        fig = a.figure
    a.plot(cmp.steps + 1, cmp.x0_relative, "o-", ms=3, label="x0 relative distance")
    a.plot(np.arange(len(cmp.latent_rms)), cmp.latent_rms / max(cmp.latent_rms.max(), 1e-12),
           "--", label="x_t RMS distance (scaled to max 1)")
    if cmp.parting_step is not None:
        a.axvline(cmp.parting_step + 1, color="red", ls=":",
                  label=f"part ways: step {cmp.parting_step + 1}")
    elif cmp.within_noise:
        a.text(0.5, 0.5, "never parted (within noise)", transform=a.transAxes, ha="center")
    a.set(xlabel="step (x_t: after that many steps)", ylabel="distance")
    a.legend(fontsize=8)
    a.set_title("how far apart are the runs?", fontsize=10)
    for w, c in cmp.word_change.items():
        b.plot(np.asarray(cmp.map_steps) + 1, c, "o-", ms=3, label=repr(w))
    b.set(xlabel="step", ylabel="mean |map_a - map_b|", ylim=(0, 1))
    b.set_title("change of each word's map", fontsize=10)
    if cmp.word_change:
        b.legend(fontsize=8)
    differs = ", ".join(cmp.differs) or "no recorded setting"
    fig.suptitle(f"A: {cmp.label_a}\nB: {cmp.label_b}\ndiffer in: {differs}", fontsize=9)
    return fig


heatmaps = heatmap_grid  # the README's name for it


# --------------------------------------------------------------------------- video
def word_activity(trace: Any, words: Iterable[str] | None = None, batch: int = 0,
                  steps: Any = None, layers: Any = None, ax: Any = None) -> Figure:
    """A video trace's words over time: each word's map mass per latent frame
    (:func:`sdlens.analysis.heatmaps.word_activity`), one line per word (default: every word
    of the prompt)."""
    from sdlens.analysis.heatmaps import word_activity as activity

    words = list(word_texts(trace, batch, False) if words is None else
                 ([words] if isinstance(words, str) else words))
    fig, ax = _new_axes(ax, (5.0, 3.0))
    for w in words:
        ax.plot(_np(activity(trace, w, steps=steps, layers=layers, batch=batch)), marker="o",
                label=w)
    t = trace.meta.get("vae_scale_factor_temporal", 4)
    ax.set_xlabel(f"latent frame (1 = video frames 1..{t}, f = {t}f-{t - 1}..{t}f)")
    ax.set_ylabel("mean attention on the word")
    ax.set_title("word activity over time", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def heatmap_clip(trace: Any, word: str, alpha: float = 0.5, cmap: str = "jet",
                 kind: str = "x0", step: int = -1, batch: int = 0, vae: Any = None,
                 grey: bool = True, **heatmap_kwargs: Any) -> list:
    """``word``'s heatmap over a video trace's clip: one PIL image per clip frame, the decoded
    clip (:func:`sdlens.analysis.previews.decode_clip` of ``kind`` at ``step``; in grey unless
    not ``grey``) under the heatmap of its latent frame (normalised over the clip).
    ``heatmap_kwargs`` go to ``word_heatmap`` (``steps``, ``layers``, ...)."""
    from PIL import Image

    from sdlens.analysis.previews import decode_clip
    from sdlens.analysis.video import latent_frames_of_clip

    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    clip = decode_clip(trace, kind, step, batch, vae)  # (frames, H, W, 3) uint8
    heat = _np(word_heatmap(trace, word, batch=batch, size=clip.shape[1:3], **heatmap_kwargs))
    return [Image.fromarray(blend(clip[i], heat[f], alpha, cmap, grey))
            for i, f in enumerate(latent_frames_of_clip(trace))]


def save_gif(frames: Sequence[Any], target: Any, fps: int = 8) -> None:
    """PIL ``frames`` as an animated GIF (looping) to a path or a binary file object (Pillow;
    equal consecutive frames are merged into one longer frame, as GIF writers do)."""
    if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
        raise ValueError(f"fps must be an int >= 1, got {fps!r}")
    frames[0].save(target, format="GIF", save_all=True, append_images=list(frames[1:]),
                   duration=int(1000 / fps), loop=0)


def heatmap_video(trace: Any, word: str, path: Any, fps: int = 8, alpha: float = 0.5,
                  cmap: str = "jet", kind: str = "x0", step: int = -1, batch: int = 0,
                  vae: Any = None, grey: bool = True, **heatmap_kwargs: Any):
    """Write ``word``'s heatmap over a video trace's clip (:func:`heatmap_clip`) as an
    animated GIF (Pillow; no ffmpeg needed); returns the path. Without a VAE the clip is a
    per-latent-frame preview: the GIF then holds one still per latent frame, each lasting the
    clip frames it stands for."""
    from pathlib import Path

    path = Path(path).expanduser()
    if path.suffix.lower() != ".gif":
        raise ValueError(f"heatmap_video writes GIF files (give a .gif path), got {path.name!r}")
    if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
        raise ValueError(f"fps must be an int >= 1, got {fps!r}")
    frames = heatmap_clip(trace, word, alpha, cmap, kind, step, batch, vae, grey,
                          **heatmap_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_gif(frames, path, fps)
    return path


__all__ = ["overlay", "heatmap_grid", "heatmaps", "heatmap_steps", "concept_maps",
           "image_to_text_maps", "step_strip", "guidance_strip", "word_activity", "heatmap_clip",
           "heatmap_video", "save_gif",
           "guidance_curves", "scheduler_curves", "commitment_curves", "token_view", "comparison",
           "to_png"]
