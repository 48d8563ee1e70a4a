"""The Trace: what one traced pipeline call recorded, and its file format.

``Trace`` (tensors + metadata, ``Trace.build`` the one constructor, save / load),
``AttentionMaps`` (named access to the recorded maps) and the operations on traces (``ops``:
replace, select_batch, slice_steps, concat_steps). Nothing here needs a live pipeline: a saved trace opens on a laptop without a GPU.
"""

from sdlens.trace.core import FORMAT, FORMAT_VERSION, Trace, load
from sdlens.trace.maps import AttentionMaps
from sdlens.trace.ops import concat_steps, replace, select_batch, slice_steps

__all__ = ["AttentionMaps", "FORMAT", "FORMAT_VERSION", "Trace", "concat_steps", "load", "replace",
           "select_batch", "slice_steps"]
