"""``GridViewer(grid)``: a labelled CFG x seed (x prompt ...) grid; click a cell for its steps.

The grid (a :class:`sdlens.experiments.sweep.Grid`) is laid out as ``Grid.plot`` does: the last axis runs
along the columns, the axes before it along the rows (combined labels). Thumbnails are sent once;
clicking a cell sets ``selected`` (a flat cell index) and the kernel opens that cell's
:class:`TraceViewer` below the grid (built on first use; the last few are reused). A sweep
folder's grid (``sdlens.load_sweep``) is read one cell at a time; missing cells show grey.
"""

from __future__ import annotations

import gc
import io
from pathlib import Path
from typing import Any

import anywidget
import ipywidgets as W
import numpy as np
import traitlets
from PIL import Image

from sdlens.experiments.sweep import axis_label
from sdlens.views.plot import save_gif
from sdlens.views.widgets.frames import encode
from sdlens.views.widgets.trace_viewer import TraceViewer

_STATIC = Path(__file__).parent / "static"


def _label(axis: str, value: Any, guidance: str = "cfg") -> str:
    try:
        return axis_label(axis, value, guidance)
    except (KeyError, TypeError, ValueError):  # an axis sweep does not know (a grid-like object)
        return f"{axis} {value}"


class GridPanel(anywidget.AnyWidget):
    """The clickable thumbnail table (front end of :class:`GridViewer`)."""

    _esm = _STATIC / "grid.js"
    _css = _STATIC / "sdlens.css"

    title = traitlets.Unicode("").tag(sync=True)
    axis_text = traitlets.Unicode("").tag(sync=True)
    col_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    row_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    thumbs = traitlets.List(traitlets.Bytes()).tag(sync=True)
    cell_px = traitlets.Int(96).tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)


class GridViewer(W.VBox):
    """A sweep grid with labelled rows and columns; clicking a cell opens its TraceViewer.

    Args:
        grid: a :class:`sdlens.experiments.sweep.Grid` (``axes``, ``fixed``, ``images``, ``traces``).
        cell_px: thumbnail size on screen.
        viewer: keyword arguments for the cells' :class:`TraceViewer` s.
    """

    KEEP_VIEWERS = 4

    def __init__(self, grid: Any, cell_px: int = 96, viewer: dict | None = None, **kwargs: Any):
        for attr in ("axes", "images"):
            if not hasattr(grid, attr):
                raise TypeError(f"GridViewer needs a sdlens.experiments.sweep.Grid (with .{attr}), got "
                                f"{type(grid).__name__}")
        self.grid = grid
        self.viewer_kwargs = dict(viewer or {})
        self._viewers: dict[int, TraceViewer] = {}
        names = list(grid.axes)
        # the guidance axis' kind (Grid.guidance: "cfg", or "distilled" for Flux.1-dev)
        kind = self._guidance = getattr(grid, "guidance", "cfg")
        shape = tuple(len(v) for v in grid.axes.values())
        self.shape = shape
        if len(shape) == 0:
            col_labels, row_index = [""], [()]
        else:
            col_labels = [_label(names[-1], v, kind) for v in grid.axes[names[-1]]]
            row_index = list(np.ndindex(*shape[:-1])) if len(shape) > 1 else [()]
        row_labels = ["\n".join(_label(a, grid.axes[a][i], kind) for a, i in zip(names[:-1], idx))
                      for idx in row_index]
        images = None if hasattr(grid, "image_at") else np.asarray(grid.images, dtype=object).reshape(shape)
        thumbs = []

        def thumb(im):
            im = im.convert("RGB")
            if max(im.size) > 256:
                im.thumbnail((256, 256), Image.BILINEAR)
            return im

        for idx in (np.ndindex(*shape) if shape else [()]):
            # one cell at a time (a sweep folder's grid reads each image now and lets it go);
            # a cell not run yet or damaged shows as a grey square
            im = grid.image_at(idx) if images is None else images[idx]
            if isinstance(im, list):  # a video grid's clip: an animated GIF, the browser plays it
                buf = io.BytesIO()
                save_gif([thumb(f) for f in im], buf, fps=8)
                thumbs.append(buf.getvalue())
            else:
                im = Image.new("RGB", (64, 64), (215, 215, 215)) if im is None else im
                thumbs.append(encode(thumb(im), "auto"))
        fixed = getattr(grid, "fixed", {}) or {}
        title = ", ".join(_label(a, v, kind) for a, v in fixed.items() if v is not None and a != "prompt")
        prompt = fixed.get("prompt")
        if prompt:
            title = f"{prompt!r}" + (f" · {title}" if title else "")
        axis_text = (f"columns: {names[-1]}" + (f" · rows: {', '.join(names[:-1])}" if len(names) > 1 else "")
                     if names else "")
        if getattr(grid, "traces", None) is None:
            axis_text += " · (run without traces: cells do not open)"
        self.panel = GridPanel(title=title, axis_text=axis_text, col_labels=col_labels,
                               row_labels=row_labels, thumbs=thumbs, cell_px=int(cell_px))
        self.detail_title = W.HTML("")
        self.detail = W.VBox([])
        self.detail.add_class("sdl-grid-detail")
        self.panel.observe(self._on_select, names="selected")
        super().__init__([self.panel, self.detail_title, self.detail], **kwargs)

    # ---------------------------------------------------------------- cells
    def index_of(self, flat: int) -> tuple:
        """Grid index (one int per axis) of flat cell number ``flat``."""
        return tuple(int(i) for i in np.unravel_index(flat, self.shape)) if self.shape else ()

    def settings(self, flat: int) -> dict:
        return self.grid.settings(self.index_of(flat)) if hasattr(self.grid, "settings") else {}

    def trace_at(self, flat: int) -> Any:
        traces = getattr(self.grid, "traces", None)
        if traces is None:
            raise ValueError("this grid was run without traces (record=None): no steps to show")
        if isinstance(traces, (list, tuple)):
            traces = np.asarray(traces, dtype=object).reshape(self.shape)
        return traces[self.index_of(flat)]  # a sweep folder's grid opens the cell's file now

    def viewer_at(self, flat: int) -> TraceViewer:
        """The TraceViewer of cell ``flat`` (built on first use; the ``KEEP_VIEWERS`` most
        recently opened are kept and older ones closed, so that scrolling a large sweep holds a
        bounded memory)."""
        if flat in self._viewers:
            self._viewers[flat] = self._viewers.pop(flat)  # most recent last
        else:
            self._viewers[flat] = TraceViewer(self.trace_at(flat), **self.viewer_kwargs)
            while len(self._viewers) > self.KEEP_VIEWERS:
                # closed, or ipywidgets' registry of live widgets would keep it (and its trace)
                self._viewers.pop(next(iter(self._viewers))).close()
                gc.collect()  # a viewer's observers form reference cycles: free its trace now
        return self._viewers[flat]

    def select(self, *index: int) -> TraceViewer:
        """Open a cell as a click does: ``select(flat)`` or ``select(i, j, ...)``."""
        flat = index[0] if len(index) == 1 else int(np.ravel_multi_index(index, self.shape))
        self.panel.selected = int(flat)
        return self.viewer

    @property
    def selected(self) -> int:
        return self.panel.selected

    @property
    def viewer(self) -> TraceViewer | None:
        """The TraceViewer on show (None before a click)."""
        return self.detail.children[0] if self.detail.children else None

    def _on_select(self, change: dict) -> None:
        flat = change["new"]
        n = len(self.panel.thumbs)
        if flat < 0:
            self.detail.children = ()
            self.detail_title.value = ""
            return
        if flat >= n:
            self.panel.selected = change["old"]
            raise ValueError(f"cell {flat} is out of range: the grid has {n} cells")
        s = self.settings(flat)
        desc = ", ".join(_label(k, v, self._guidance) for k, v in s.items() if v is not None)  # as the axes read
        try:
            v = self.viewer_at(flat)
        except ValueError as e:
            self.detail_title.value = f"<b>cell {self.index_of(flat)}</b>: {e}"
            self.detail.children = ()
            return
        self.detail_title.value = f"<b>cell {self.index_of(flat)}</b>: {desc}"
        self.detail.children = (v,)
