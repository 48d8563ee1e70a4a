"""The Trace: what one traced pipeline call recorded, and its file format.

``Trace`` (tensors + metadata, save / load), ``AttentionMaps`` (named access to the recorded
maps). Nothing here needs a live pipeline: a saved trace opens on a laptop without a GPU.
"""

from sdlens.trace.core import FORMAT, FORMAT_VERSION, Trace, load
from sdlens.trace.maps import AttentionMaps

__all__ = ["AttentionMaps", "FORMAT", "FORMAT_VERSION", "Trace", "load"]
