"""sdlens: see inside Stable Diffusion while it samples.

The front door::

    pipe = sdlens.load_pipeline()                       # the shipped model (CPU, seconds)
    trace = sdlens.generate(pipe, "a red circle", seed=0)
    trace.heatmap("circle")                             # (H, W) in [0, 1]
    with sdlens.trace(pipe) as tr: pipe(...)            # record ordinary pipeline calls
    grid = sdlens.sweep(pipe, "a red circle", seeds=range(4), guidance_scales=[1, 3, 7.5])
    sdlens.compare(trace_a, trace_b); sdlens.token_effects(pipe, "a red circle")
    sdlens.load("run.sdlens")                           # a saved Trace or Grid
"""

from __future__ import annotations

import os

from sdlens.analysis.compare import Comparison, compare
from sdlens.analysis.heatmaps import Commitment
from sdlens.engine.options import RecordOptions, TraceTooLarge
from sdlens.engine.session import generate, trace
from sdlens.experiments.lora import lora_effect
from sdlens.experiments.refiner import trace_base_refiner
from sdlens.experiments.steer import reweight, token_effects
from sdlens.experiments.sweep import Grid, is_grid_file, sweep
from sdlens.pipeline import describe, load_pipeline, recommended_settings
from sdlens.trace.core import Trace, load as load_trace
from sdlens.version import __version__
from sdlens.views import plot


def _show_trace(trace: Trace, include=None, exclude=None):
    """A Trace in a notebook: a TraceViewer; its repr where the widget packages are missing."""
    try:  # imported on first display: `import sdlens` does not load anywidget / ipywidgets
        from sdlens.views.widgets import trace_mimebundle
    except ImportError:
        return {"text/plain": repr(trace)}
    return trace_mimebundle(trace, include=include, exclude=exclude)


# Data flows one way: the Trace and the analysis results import no views. The front door, which
# every `import sdlens.<anything>` runs first, tells them how to show themselves.
Trace.display_hook = _show_trace
Commitment.plot_hook = plot.commitment_curves
Comparison.plot_hook = plot.comparison


def __getattr__(name: str):
    # ``sdlens.testing`` without an explicit import (it pulls in the model builders: lazy)
    if name == "testing":
        import importlib

        return importlib.import_module("sdlens.testing")
    raise AttributeError(f"module 'sdlens' has no attribute {name!r}")


def load(path: str | os.PathLike) -> Trace | Grid:
    """Open a file written by ``Trace.save`` or ``Grid.save`` (lazily: tensors load on access)."""
    return Grid.load(path) if is_grid_file(path) else load_trace(path)


__all__ = [
    "Comparison", "Grid", "RecordOptions", "Trace", "TraceTooLarge", "__version__", "compare",
    "describe", "generate", "load", "load_pipeline", "lora_effect", "plot", "recommended_settings", "reweight",
    "sweep",
    "token_effects", "trace", "trace_base_refiner",
]
