"""``ABView(trace_a, trace_b)``: two runs side by side, one step slider, their difference.

Two :class:`TraceViewer` s in columns; above them an :class:`ABPanel` with the one step slider
that moves both (linked in the browser: ``jslink``, no kernel round trip), the difference of the
two x0 predictions at that step and of the selected word's (or concept's) heatmaps (A - B), the
settings that differ (highlighted in each column's header too) and what
:func:`sdlens.analysis.compare.compare` says about where the runs part. The columns share the
maps menu, the concept scale and the selected word: a choice in one column is made in the other
where that column has it, else the other column shows no overlay (never a legend without one).
Studio shows its last two runs this way.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import anywidget
import ipywidgets as W
import numpy as np
import traitlets

from sdlens.analysis.compare import compare, run_settings
from sdlens.analysis.guidance import guidance_label
from sdlens.analysis.heatmaps import word_heatmap
from sdlens.analysis.previews import latent_to_rgb, linear_decoder
from sdlens.views.widgets.frames import DECODER_LABELS, colorbar_css, encode_many, word_chips
from sdlens.views.widgets.trace_viewer import HELP, TraceViewer

_STATIC = Path(__file__).parent / "static"
DIFF_CMAP = "magma"  # |x0_A - x0_B|: 0 black .. the run's largest difference bright
SIGNED_CMAP = "coolwarm"  # heat A - B: blue where B attends more, red where A does


def _lut(cmap: str) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def _colour(values: np.ndarray, cmap: str) -> list[np.ndarray]:
    """(S, h, w) in [0, 1] -> S RGB uint8 images."""
    idx = (np.clip(np.nan_to_num(values), 0, 1) * 255).round().astype(np.uint8)
    return list(_lut(cmap)[idx])


def settings_text(settings: dict, differs: Sequence[str] = ()) -> str:
    """One header line (HTML) of a run's settings, the ones in ``differs`` highlighted."""
    parts = []
    for key, v in settings.items():
        if v is None or (key == "negative prompt" and not v):
            continue
        if key == "model" and key not in differs:  # a long path that says nothing here
            continue
        if key == "guidance":  # run_settings: a CFG scale, "off", or guidance_text's words
            text = guidance_label(v) if isinstance(v, (int, float)) else \
                guidance_label(None, "off") if v == "off" else str(v)
        else:
            text = f"{key} {v!r}" if isinstance(v, str) and key in ("prompt", "negative prompt") \
                else f"{key} {v}"
        text = html.escape(text)
        parts.append(f"<span class='sdl-differs'>{text}</span>" if key in differs else text)
    return " · ".join(parts)


class ABPanel(anywidget.AnyWidget):
    """The shared slider and the difference panels of :class:`ABView` (front end: ab_view.js)."""

    _esm = _STATIC / "ab_view.js"
    _css = _STATIC / "sdlens.css"

    n_steps = traitlets.Int(0).tag(sync=True)
    timesteps = traitlets.List(traitlets.Float()).tag(sync=True)
    step = traitlets.Int(0).tag(sync=True)
    playing = traitlets.Bool(False).tag(sync=True)
    fps = traitlets.Int(8).tag(sync=True)
    word = traitlets.Unicode("").tag(sync=True)
    x0_diff = traitlets.List(traitlets.Bytes()).tag(sync=True)  # one frame per step
    x0_scale = traitlets.Float(0.0).tag(sync=True)
    x0_label = traitlets.Unicode("").tag(sync=True)  # the x0 difference panel's caption
    heat_diff = traitlets.Dict().tag(sync=True)  # word key -> [bytes per step] (b"" : no map)
    concept_diff = traitlets.Dict().tag(sync=True)  # concept -> [bytes per step]: share A - B
    maps = traitlets.Unicode("attention").tag(sync=True)  # A's maps menu (linked)
    timesteps_b = traitlets.List(traitlets.Float()).tag(sync=True)  # B's t (A's: timesteps)
    differs = traitlets.List(traitlets.List()).tag(sync=True)  # [name, A, B]
    summary = traitlets.Unicode("").tag(sync=True)
    notes = traitlets.List(traitlets.Unicode()).tag(sync=True)
    colorbar = traitlets.Unicode("").tag(sync=True)
    signed_colorbar = traitlets.Unicode("").tag(sync=True)
    display_px = traitlets.Int(160).tag(sync=True)
    help = traitlets.Unicode("").tag(sync=True)

    @traitlets.validate("step")
    def _valid_step(self, proposal: dict) -> int:
        v = int(proposal["value"])
        if self.n_steps and not 0 <= v < self.n_steps:
            raise traitlets.TraitError(f"step={v} is out of range 0..{self.n_steps - 1} "
                                       f"(shown as 1..{self.n_steps})")
        return v


class ABView(W.VBox):
    """Run A and run B in two columns with one step slider and their difference.

    Args:
        trace_a, trace_b: the two runs (:class:`~sdlens.trace.Trace`).
        viewer_a, viewer_b: their :class:`TraceViewer` s when already built (Studio's).
        labels: the column names.
        extra_a, extra_b: HTML appended to each column's header (e.g. the run time).
        display_px: panel size in each column (two columns fit a notebook).
        viewer: keyword arguments for the viewers built here.
    """

    def __init__(self, trace_a: Any, trace_b: Any, viewer_a: TraceViewer | None = None,
                 viewer_b: TraceViewer | None = None, labels: tuple[str, str] = ("A", "B"),
                 extra_a: str = "", extra_b: str = "", display_px: int = 128,
                 viewer: dict | None = None, **kwargs: Any):
        vkw = {"display_px": display_px, **(viewer or {})}
        self.trace_a, self.trace_b = trace_a, trace_b
        self.viewer_a = viewer_a if viewer_a is not None else TraceViewer(trace_a, **vkw)
        self.viewer_b = viewer_b if viewer_b is not None else TraceViewer(trace_b, **vkw)
        va, vb = self.viewer_a, self.viewer_b
        for v in (va, vb):
            v.display_px = display_px
        sa, sb = run_settings(trace_a, va.batch), run_settings(trace_b, vb.batch)
        self.differs = {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}
        notes: list[str] = []
        self.comparison = None
        try:
            self.comparison = compare(trace_a, trace_b, va.batch, vb.batch, maps=False)
        except ValueError as e:  # different steps or sizes: no distances, the columns still show
            notes.append(f"no distance curve: {e}")
        summary = ""
        c = self.comparison
        if c is not None:
            if c.parting_step is not None:
                summary = (f"the runs part at step {c.parting_step + 1} of {len(c.x0_rms)} "
                           f"(final x0 relative distance {c.x0_relative[-1]:.3g})")
            elif c.within_noise:
                summary = "never parted: the x0 distance stays within noise at every step"
            else:
                summary = (f"never parted (final x0 relative distance {c.x0_relative[-1]:.3g})")
        n = min(va.n_steps, vb.n_steps)
        linked = va.n_steps == vb.n_steps
        if not linked:
            notes.append(f"A has {va.n_steps} steps, B {vb.n_steps}: the slider moves both by "
                         f"step index up to {n}")
        self._decoded = "linear preview"
        x0_frames, x0_scale = self._x0_diff(n, va.batch, vb.batch, notes)
        self.panel = ABPanel(
            n_steps=n, timesteps=[float(t) for t in trace_a.timesteps[:n]],
            timesteps_b=[float(t) for t in trace_b.timesteps[:n]], maps=va.maps,
            concept_diff=self._concept_diff(n),
            step=min(va.step, n - 1), x0_diff=x0_frames, x0_scale=x0_scale,
            x0_label=f"|x0 A − x0 B| ({self._decoded}, one scale for all steps)",
            heat_diff=self._heat_diff(n, notes), summary=summary, notes=notes,
            differs=[_differs_row(k, a, b) for k, (a, b) in self.differs.items()],
            colorbar=colorbar_css(DIFF_CMAP), signed_colorbar=colorbar_css(SIGNED_CMAP),
            display_px=display_px, help=HELP.replace("←/→ step", "←/→ step both"),
            word=va.word if va.word in self._common_words else "")
        # one slider for both: linked in the browser (and in the kernel through the links)
        self._links = [W.jslink((self.panel, "step"), (va, "step")),
                       W.jslink((self.panel, "step"), (vb, "step"))]
        self._links.append(W.jsdlink((va, "word"), (self.panel, "word")))
        self._links.append(W.jsdlink((va, "maps"), (self.panel, "maps")))
        # the maps menu, the concept scale and the word: the same in both columns (in the
        # kernel: a column loads the other maps' chips before it can take their word)
        for src, dst in ((va, vb), (vb, va)):
            src.observe(lambda ch, dst=dst: self._follow(dst, ch), names=["maps", "concept_scale",
                                                                          "word"])
        for name in ("maps", "concept_scale", "word"):  # Studio's viewers: B takes A's choices
            self._follow(vb, {"name": name, "new": getattr(va, name)})
        cols = []
        for label, v, s, extra in ((labels[0], va, sa, extra_a), (labels[1], vb, sb, extra_b)):
            head = W.HTML(f"<b>{html.escape(label)}</b> · {settings_text(s, self.differs)}"
                          + (f" · {extra}" if extra else ""))
            cols.append(W.VBox([head, v], layout=W.Layout(width="50%", border="1px solid #ddd",
                                                          padding="4px", margin="2px",
                                                          overflow="hidden")))
        self.columns = W.HBox(cols, layout=W.Layout(width="100%", flex_flow="row nowrap"))
        self.columns.add_class("sdl-ab-columns")
        super().__init__([self.panel, self.columns], **kwargs)

    def _follow(self, dst: TraceViewer, change: dict) -> None:
        """Make ``change`` (maps, concept scale or word of one column) in the other column where
        it has that choice; a word it lacks clears its overlay."""
        name, new = change["name"], change["new"]
        if getattr(dst, name) == new:
            return
        if name == "maps":
            if new in {k for k, _ in dst.maps_options}:
                dst.maps = new
        elif name == "concept_scale":
            dst.concept_scale = new
        else:
            dst.word = new if new in dst.word_keys else ""

    # ---------------------------------------------------------------- differences
    @property
    def _common_words(self) -> list[str]:
        # the prompts' words (the difference panels show attention maps, whatever maps menu
        # the columns' viewers are on)
        b = {c.key for c in word_chips(self.trace_b, self.viewer_b.batch)}
        return [c.key for c in word_chips(self.trace_a, self.viewer_a.batch) if c.key in b]

    def _x0_diff(self, n: int, ba: int, bb: int, notes: list[str]) -> tuple[list[bytes], float]:
        """|x0_A - x0_B| per step in the linear preview's RGB, averaged over channels, one scale
        over all steps (the largest difference is brightest)."""
        ta, tb = self.trace_a, self.trace_b
        if ta.x0 is None or tb.x0 is None:
            xa, xb = ta.latents[1:n + 1, ba], tb.latents[1:n + 1, bb]
            what = "x_t after the step (x0 not recorded)"
        else:
            xa, xb = ta.x0[:n, ba], tb.x0[:n, bb]
            what = None
        if xa.shape != xb.shape:
            notes.append(f"no x0 difference: latents {tuple(xa.shape[1:])} vs {tuple(xb.shape[1:])}")
            return [], 0.0
        if what:
            notes.append(f"difference of {what}")
        try:
            m, _b = linear_decoder(ta)
            da = latent_to_rgb(xa.float(), m, None) - latent_to_rgb(xb.float(), m, None)
        except ValueError:  # a family without a linear decoder: the first 3 channels, said so
            da = xa[:, :3].float() - xb[:, :3].float()
            self._decoded = DECODER_LABELS["channels"]
        d = da.abs().mean(1).numpy()  # (S, h, w)
        scale = float(d.max())
        frames = encode_many(_colour(d / scale if scale > 0 else d, DIFF_CMAP), "png")
        return frames, scale

    def _heat_diff(self, n: int, notes: list[str]) -> dict[str, list[bytes]]:
        """Per word in both prompts: A's map minus B's at each step (each map as the viewers show
        it: per step, min-max), signed colours; b"" before the first recorded step."""
        va, vb = self.viewer_a, self.viewer_b
        ta, tb = self.trace_a, self.trace_b
        if ta.attention is None or tb.attention is None:
            return {}
        words = self._common_words
        if not words:
            notes.append("no word in both prompts: no heatmap difference")
            return {}
        chips_a = {c.key: c for c in word_chips(ta, va.batch)}
        chips_b = {c.key: c for c in word_chips(tb, vb.batch)}
        size = va.trace_frames.heat_size
        ia, ib = va.trace_frames.heat_index()[:n], vb.trace_frames.heat_index()[:n]
        out: dict[str, list[bytes]] = {}
        for key in words:
            ca, cb = chips_a[key], chips_b[key]
            ma = word_heatmap(ta, ca.text, per_step=True, batch=va.batch, occurrence=ca.occurrence,
                              size=size)
            mb = word_heatmap(tb, cb.text, per_step=True, batch=vb.batch, occurrence=cb.occurrence,
                              size=size)
            frames: list[bytes] = []
            todo, where = [], []
            for s in range(n):
                if ia[s] >= 0 and ib[s] >= 0:
                    todo.append(((ma[ia[s]] - mb[ib[s]]).float().numpy() + 1) / 2)
                    where.append(s)
            enc = encode_many(_colour(np.stack(todo), SIGNED_CMAP), "png") if todo else []
            frames = [b""] * n
            for s, e in zip(where, enc):
                frames[s] = e
            out[key] = frames
        return out

    def _concept_diff(self, n: int) -> dict[str, list[bytes]]:
        """Per concept of both runs: A's share minus B's at each step (the shares, unstretched:
        -1 .. 1), signed colours; b"" before the first recorded step."""
        va, vb = self.viewer_a, self.viewer_b
        ca, cb = getattr(self.trace_a, "concepts", None), getattr(self.trace_b, "concepts", None)
        if ca is None or cb is None:
            return {}
        size = va.trace_frames.heat_size
        ia, ib = va.trace_frames.heat_index("concepts")[:n], vb.trace_frames.heat_index("concepts")[:n]
        out: dict[str, list[bytes]] = {}
        for c in [c for c in ca.concepts if c in set(cb.concepts)]:
            kw = dict(maps="concepts", per_step=True, normalize=False, size=size)
            ma = word_heatmap(self.trace_a, c, batch=va.batch, **kw)
            mb = word_heatmap(self.trace_b, c, batch=vb.batch, **kw)
            where = [s for s in range(n) if ia[s] >= 0 and ib[s] >= 0]
            todo = [((ma[ia[s]] - mb[ib[s]]).clamp(-1, 1).float().numpy() + 1) / 2 for s in where]
            enc = encode_many(_colour(np.stack(todo), SIGNED_CMAP), "png") if todo else []
            frames = [b""] * n
            for s, e in zip(where, enc):
                frames[s] = e
            out[c] = frames
        return out

    # ---------------------------------------------------------------- API
    @property
    def step(self) -> int:
        return self.panel.step

    @step.setter
    def step(self, value: int) -> None:
        self.panel.step = value
        self.viewer_a.step = value
        self.viewer_b.step = value


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _differs_row(key: str, a: Any, b: Any) -> list[str]:
    """``[name, A, B]`` of a setting that differs, in the columns' headers' words (guidance: "CFG"
    for two CFG scales, else each run's guidance as its header names it)."""
    if key != "guidance":
        return [key, _show(a), _show(b)]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return ["CFG", _show(a), _show(b)]

    def name(v: Any) -> str:
        return guidance_label(v) if isinstance(v, (int, float)) else \
            guidance_label(None, "off") if v == "off" else str(v)
    return ["guidance", name(a), name(b)]


__all__ = ["ABPanel", "ABView", "settings_text"]
