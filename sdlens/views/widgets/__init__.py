"""Notebook panels (anywidget + ipywidgets).

* :class:`TraceViewer` — scrub a trace's steps: x_t, x0, the guided prediction (noise, velocity), CFG delta; word heatmaps.
* :class:`Studio` — prompt box + Generate; streams x0 previews while sampling; A/B of two runs.
* :class:`ABView` — two runs in columns with one step slider and their difference.
* :class:`GridViewer` — a labelled CFG x seed (x prompt) grid; click a cell for its TraceViewer.
* :class:`TokenView` — the prompt's tokens with their share of attention; hover for ids.
* :class:`ReferenceView` — an editing model's reference maps: click the output, see where it
  looks in each reference image (or click a reference, see where it lands); scrub the steps.

``Trace`` displays as a :class:`TraceViewer` in a notebook through :func:`trace_mimebundle`.
"""

from __future__ import annotations

from typing import Any

from sdlens.views.widgets.ab_view import ABView
from sdlens.views.widgets.frames import TraceFrames
from sdlens.views.widgets.grid_viewer import GridViewer
from sdlens.views.widgets.reference_view import ReferenceView
from sdlens.views.widgets.studio import Interrupted, Studio
from sdlens.views.widgets.token_view import TokenView
from sdlens.views.widgets.trace_viewer import TraceViewer


def trace_mimebundle(trace: Any, include: Any = None, exclude: Any = None):
    """The notebook representation of ``trace``: a :class:`TraceViewer` (what
    ``Trace._repr_mimebundle_`` returns; a mimebundle dict or ``(data, metadata)``, both of which
    IPython accepts)."""
    return TraceViewer(trace)._repr_mimebundle_(include=include, exclude=exclude)


__all__ = ["ABView", "GridViewer", "Interrupted", "ReferenceView", "Studio", "TokenView",
           "TraceFrames", "TraceViewer", "trace_mimebundle"]
