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

from sdlens.views import plot
from sdlens.experiments.adapters import lora_effect, trace_base_refiner
from sdlens.analysis.compare import Comparison, compare
from sdlens.pipeline import describe, load_pipeline
from sdlens.engine.options import RecordOptions, TraceTooLarge
from sdlens.engine.session import generate, trace
from sdlens.experiments.steer import reweight, token_effects
from sdlens.experiments.sweep import Grid, sweep
from sdlens.trace.core import Trace

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``sdlens.testing`` without an explicit import (it pulls in the model builders: lazy)
    if name == "testing":
        import importlib

        return importlib.import_module("sdlens.testing")
    raise AttributeError(f"module 'sdlens' has no attribute {name!r}")


def load(path: str | os.PathLike) -> Trace | Grid:
    """Open a file written by ``Trace.save`` or ``Grid.save`` (lazily: tensors load on access)."""
    from sdlens.experiments.sweep import is_grid_file
    from sdlens.trace.core import load as load_trace

    return Grid.load(path) if is_grid_file(path) else load_trace(path)


__all__ = [
    "Comparison", "Grid", "RecordOptions", "Trace", "TraceTooLarge", "__version__", "compare",
    "describe", "generate", "load", "load_pipeline", "lora_effect", "plot", "reweight", "sweep",
    "token_effects", "trace", "trace_base_refiner",
]
