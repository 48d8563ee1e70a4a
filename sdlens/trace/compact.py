"""Compact attention maps: codes + a per-map scale (the default storage of recorded maps).

Maps are probabilities in [0, 1], but a map's values can all be tiny (joint attention's text
columns share each row with thousands of image keys), so a fixed [0, 1] grid would lose them.
Each map (one step, batch item, [head,] token: its h x w values) is stored as its maximum
``scale`` (float32) and ``bits``-bit codes ``round(p / scale * (2**bits - 1))``, so every value
comes back within ``scale / (2 * (2**bits - 1))`` of the recorded one: a relative error of at most
1/30 of the map's peak at 4 bits, 1/510 at 8 bits, whatever the map's magnitude. Measured against
float32 maps in ``benchmarks/bench_compact.py`` (RESULTS-compact.md).

``RecordOptions.attention_dtype`` picks the storage: ``"auto"`` (the default: 8-bit codes while
the whole trace fits 200 MB, else 4-bit), ``torch.uint4`` (4-bit codes, two per byte),
``torch.uint8`` (8-bit codes), or a float dtype (``torch.float16`` etc.:
the maps themselves, as before codes existed).

* :func:`store_maps`: the recorder's side, on the device: float maps ``(B, [heads,] T, HW)`` ->
  what is kept (a :class:`CompactMaps` for code dtypes, else the tensor in that dtype); no
  device sync. :func:`stored_dtype`: concept maps stay float16.
* :class:`CompactMaps`: codes + scales with the maps' logical shape; ``decode()`` gives float32
  maps. :class:`~sdlens.trace.maps.AttentionMaps` decodes on access, the trace file stores the
  codes and scales (``<kind>/<layer>`` and ``<kind>/<layer>/scale``).
* :func:`host_maps`, :func:`stack_maps`: a recorder's per-step maps to the host and into
  ``(steps, B, [heads,] T, h, w)`` (a video's ``(..., T, F, h, w)``), whatever their storage.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

#: storage dtype -> code bits
CODE_BITS = {torch.uint8: 8, torch.uint4: 4}
SCALE_DTYPE = torch.float32


def is_code_dtype(dtype) -> bool:
    """True for the dtypes stored as codes + scales (``torch.uint4``, ``torch.uint8``)."""
    return dtype in CODE_BITS


def dtype_name(dtype) -> str:
    """``torch.uint4`` -> ``"uint4"``."""
    return str(dtype).replace("torch.", "")


def code_dtype(name: str):
    """``"uint4"`` -> ``torch.uint4``; None for a name that is not a code dtype."""
    return next((d for d in CODE_BITS if dtype_name(d) == name), None)


def packed_size(n: int, bits: int) -> int:
    """Bytes of ``n`` codes of ``bits`` bits (4-bit codes two per byte)."""
    return math.ceil(n * bits / 8)


def map_bytes(hw: int, bits: int) -> int:
    """Stored bytes of one map of ``hw`` values (h * w; a video map's F * h * w): its codes
    and its scale."""
    return packed_size(hw, bits) + torch.empty((), dtype=SCALE_DTYPE).element_size()


class CompactMaps:
    """Maps of logical ``shape`` (``(..., T, HW)``, ``(..., T, h, w)`` or a video's
    ``(..., T, F, h, w)``) stored as ``codes``
    (uint8, ``(..., T, packed_size(HW, bits))``: the spatial values flattened, 4-bit codes
    two per byte, low nibble first) and ``scales`` (float32, ``(..., T)``: each map's maximum)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int,
                 shape: Sequence[int]):
        if bits not in CODE_BITS.values():
            raise ValueError(f"bits must be one of {sorted(CODE_BITS.values())}, got {bits}")
        self.codes, self.scales, self.bits = codes, scales, int(bits)
        self.shape = torch.Size(int(s) for s in shape)

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype (``torch.uint4`` / ``torch.uint8``)."""
        return next(d for d, b in CODE_BITS.items() if b == self.bits)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and scales."""
        return self.codes.numel() * self.codes.element_size() + \
            self.scales.numel() * self.scales.element_size()

    def __repr__(self) -> str:
        return f"CompactMaps(shape={tuple(self.shape)}, bits={self.bits}, {self.nbytes} bytes)"

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "CompactMaps":
        """``fn`` applied to the codes and the scales alike: a copy (to the host, ...) or an
        indexing of the leading axes (steps, batch, [heads,] tokens), which the codes
        ``(..., T, bytes)`` and the scales ``(..., T)`` share."""
        codes, scales = fn(self.codes), fn(self.scales)
        spatial = tuple(self.shape[self.scales.ndim:])
        return CompactMaps(codes, scales, self.bits, tuple(scales.shape) + spatial)

    def spatial(self, *grid: int) -> "CompactMaps":
        """The same maps with their spatial values read as ``grid``: ``spatial(h, w)``; a
        video's ``spatial(F, h, w)`` (no data moves)."""
        grid = tuple(int(g) for g in grid)
        lead = self.shape[:self.scales.ndim]
        return CompactMaps(self.codes, self.scales, self.bits, tuple(lead) + grid)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The maps, ``shape``, in ``dtype`` (float32 by default)."""
        n = self.codes.shape[-1] * 8 // self.bits
        hw = self._hw()
        if self.bits == 4:
            codes = torch.stack([self.codes & 15, self.codes >> 4], dim=-1).flatten(-2)
        else:
            codes = self.codes
        codes = codes[..., :hw] if n != hw else codes
        levels = (1 << self.bits) - 1
        step = self.scales.to(torch.float32) / levels
        return (codes.to(torch.float32) * step[..., None]).reshape(self.shape).to(dtype)

    def _hw(self) -> int:
        lead = self.scales.ndim
        return math.prod(self.shape[lead:])

    @staticmethod
    def encode(maps: torch.Tensor, bits: int, spatial_dims: int = 1) -> "CompactMaps":
        """``maps`` (..., T, <spatial_dims axes>) float, values in [0, 1], as codes + per-map
        scales, on their device; no device sync."""
        shape = maps.shape
        flat = maps.flatten(-spatial_dims) if spatial_dims > 1 else maps
        flat = flat.to(torch.float32)
        levels = (1 << bits) - 1
        scales = flat.amax(dim=-1)  # (..., T): each map's peak
        inv = torch.where(scales > 0, levels / scales, torch.zeros_like(scales))
        codes = (flat * inv[..., None]).round_().clamp_(0, levels).to(torch.uint8)
        if bits == 4:
            if codes.shape[-1] % 2:
                codes = torch.nn.functional.pad(codes, (0, 1))
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return CompactMaps(codes.contiguous(), scales.to(SCALE_DTYPE), bits, shape)

    @staticmethod
    def stack(items: Sequence["CompactMaps"]) -> "CompactMaps":
        """Along a new first axis (the steps)."""
        first = items[0]
        return CompactMaps(torch.stack([m.codes for m in items]),
                           torch.stack([m.scales for m in items]), first.bits,
                           (len(items),) + tuple(first.shape))


def stored_dtype(kind: str, dtype):
    """How maps of ``kind`` ("attention", "image_to_text", "concepts", "reference_maps") are
    stored under ``RecordOptions.attention_dtype`` = ``dtype``: as asked, except concept maps under a code
    dtype, kept in float16: each pixel's concepts sum to 1 and per-map codes would not keep
    that sum (they are opt-in and few: a map per concept, not per token); reference maps
    likewise (their maps are the reference's patches: opt-in, and a patch's share is a sum)."""
    return torch.float16 if kind in ("concepts", "reference_maps") and is_code_dtype(dtype) \
        else dtype


def store_maps(maps: torch.Tensor, dtype) -> torch.Tensor | CompactMaps:
    """What a recorder keeps of float maps ``(B, [heads,] T, HW)`` (on their device, no device
    sync): :class:`CompactMaps` for a code dtype (``torch.uint4`` / ``torch.uint8``), else the
    maps in ``dtype`` (contiguous)."""
    if is_code_dtype(dtype):
        return CompactMaps.encode(maps, CODE_BITS[dtype])
    return maps.to(dtype).contiguous()


def host_maps(maps: torch.Tensor | CompactMaps,
              host: Callable[..., torch.Tensor]) -> torch.Tensor | CompactMaps:
    """``maps`` (what :func:`store_maps` kept) copied by the recorder's ``host(t, dtype,
    owned=True)`` (its device-to-host copy), codes and scales alike."""
    if isinstance(maps, CompactMaps):
        return maps.apply(lambda t: host(t, t.dtype, owned=True))
    return host(maps, maps.dtype, owned=True)


def stack_maps(chunks: Sequence[torch.Tensor | CompactMaps], grid: Sequence[int],
               empty: Sequence[int], dtype) -> torch.Tensor | CompactMaps:
    """Per-step maps ``(B, [heads,] T, HW)`` stacked as ``(steps, B, [heads,] T, *grid)``
    (``grid``: (h, w); a video's (F, h, w), HW = F * h * w, flattened row-major); no chunks: zero
    steps of maps ``(B, [heads,] T)`` = ``empty`` in ``dtype``."""
    grid = tuple(int(g) for g in grid)
    if not chunks:
        shape = (0,) + tuple(empty)
        if is_code_dtype(dtype):
            bits = CODE_BITS[dtype]
            codes = torch.zeros(shape + (packed_size(math.prod(grid), bits),), dtype=torch.uint8)
            return CompactMaps(codes, torch.zeros(shape, dtype=SCALE_DTYPE), bits, shape + grid)
        return torch.zeros(shape + grid, dtype=dtype)
    if isinstance(chunks[0], CompactMaps):
        return CompactMaps.stack(chunks).spatial(*grid)
    t = torch.stack(list(chunks))
    return t.reshape(t.shape[:-1] + grid)


def take(maps: torch.Tensor | CompactMaps,
         fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | CompactMaps:
    """Stored maps ``(steps, batch, [heads,] T, h, w)`` with ``fn`` applied to their leading
    axes (``lambda t: t[:, idx]``: some batch items), kept as they are stored."""
    return maps.apply(fn) if isinstance(maps, CompactMaps) else fn(maps)


def decoded(maps: torch.Tensor | CompactMaps) -> torch.Tensor:
    """Float maps: ``maps`` itself, or its codes decoded (float32)."""
    return maps.decode() if isinstance(maps, CompactMaps) else maps


def maps_nbytes(maps: torch.Tensor | CompactMaps) -> int:
    """Bytes ``maps`` holds (codes and scales, or the tensor's)."""
    if isinstance(maps, CompactMaps):
        return maps.nbytes
    return maps.numel() * maps.element_size()
