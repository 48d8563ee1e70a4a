"""sdlens: see inside Stable Diffusion while it samples.

The front door::

    pipe = sdlens.load_pipeline()                      # the shipped model (CPU, seconds)
    trace = sdlens.generate(pipe, "a red circle", seed=0)
    trace.heatmap("circle")
"""

from .pipeline import describe, load_pipeline

__version__ = "0.1.0"

__all__ = ["__version__", "describe", "load_pipeline"]
