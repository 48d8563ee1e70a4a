"""``AttentionMaps``: named access to the cross-attention maps recorded in a trace.

One tensor per cross-attention site (a place where image tokens attend to text tokens), at that
site's own resolution::

    maps[layer]     (steps, batch, tokens, h, w)            heads averaged (default), or
                    (steps, batch, heads, tokens, h, w)     with ``RecordOptions(heads=True)``

A video model's (Wan) maps have a frame axis before (h, w): (steps, batch, [heads,] tokens,
frames, h, w), ``frames`` the latent frames (``trace.meta["latent_frames"]``), and its
resolutions are (frames, h, w); a resolution selector (int or (h, w)) reads (h, w).

* ``steps`` runs over ``maps.steps`` (indices into ``trace.timesteps``; all steps by default).
* ``batch`` is the batch item (``trace.prompts[b]``); under classifier-free guidance the maps are
  those of the text-conditioned half of the denoiser batch (the unconditional half attends to the
  negative / empty prompt and is not recorded).
* ``tokens`` runs over ``maps.token_positions`` (positions in the text encoder's sequence; by
  default ``0 .. n-1`` where n is the longest ``trace.token_ids[b]`` in the batch: the start token,
  the prompt's tokens and the end token; all 77 with ``keep_padding=True``). With
  ``keep_padding=True`` the maps sum to 1 over the tokens axis (softmax rows).
* values are attention probabilities, float32 (float16 / bfloat16 when recorded in that dtype).
  By default they are stored compactly (:mod:`sdlens.trace.compact`: 4-bit codes and each map's
  peak, within 1/30 of the peak of the recorded value) and decoded on access.

Layers are named by the site's module path in the denoiser; the model family's naming
(:func:`sdlens.engine.arch.naming_for`, from ``trace.meta["family"]``) gives them aliases, groups
and an order. Wherever layers are chosen, these forms are accepted (see :func:`resolve_layers`):

* ``None``: all recorded layers
* a group: every layer of that part of the denoiser (the UNet's ``"down"``, ``"mid"``, ``"up"``)
* an int ``r``: layers whose map has ``max(h, w) == r`` (e.g. 16 for the 16x16 layers of SD 1.5
  at 512 px); a tuple ``(h, w)`` matches exactly
* an alias (the UNet's ``"down.1.0"``: block 1, attention 0, all its transformer blocks;
  ``"down.1.0.2"``: its transformer block 2; ``"mid"``; ``"up.1"``: all of up block 1); or a
  module path (or a prefix of one)
* a list of any of these (union, in the denoiser's order)
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from sdlens.analysis.tokens import match_word, words_from_tokens
from sdlens.engine.arch import naming_for
from sdlens.engine.arch.base import SiteNaming
from sdlens.trace.compact import CompactMaps, dtype_name
from sdlens.trace.steps import select_step

Stored = torch.Tensor | CompactMaps  # a layer's maps as held: float maps, or codes + scales


def resolve_layers(spec, layers: Sequence[str],
                   resolution: Callable[[str], tuple[int, int]] | None = None,
                   naming: SiteNaming | None = None) -> list[str]:
    """The layers (in the denoiser's order) that ``spec`` names among ``layers``; ValueError if
    none match.

    Args:
        spec: None, a group ("down"/"mid"/"up"), an int resolution, a (h, w) tuple, an alias
            ("up.1.0"), a module path or prefix of one, or a list of these.
        layers: the available layer names (module paths).
        resolution: layer -> (h, w); needed for int / tuple specs.
        naming: the family's naming (default: the UNet's, :func:`naming_for` ``(None)``).
    """
    layers = list(layers)
    naming = naming or naming_for(None)
    if spec is None:
        return sorted(layers, key=naming.sort_key)
    items = list(spec) if isinstance(spec, (list, set, frozenset)) else [spec]
    if isinstance(spec, tuple) and not (len(spec) == 2 and all(isinstance(v, int) for v in spec)):
        items = list(spec)
    chosen: set[str] = set()
    for item in items:
        chosen.update(_resolve_one(item, layers, resolution, naming))
    return sorted(chosen, key=naming.sort_key)


def _available(layers: Sequence[str], resolution, naming: SiteNaming) -> str:
    desc = []
    for layer in sorted(layers, key=naming.sort_key):
        res = ""
        if resolution is not None:
            try:
                h, w = resolution(layer)
                res = f" {h}x{w}"
            except (KeyError, ValueError):
                pass
        desc.append(f"{naming.alias(layer)} ({layer}{res})")
    return ", ".join(desc)


def _forms(naming: SiteNaming) -> str:
    """The selector forms, for error messages."""
    groups = "".join(f"{g!r}, " for g in naming.groups)
    return f"None, {groups}a resolution int, an alias, a module path, or a list of these"


def _resolve_one(item, layers: Sequence[str], resolution, naming: SiteNaming) -> list[str]:
    if isinstance(item, bool) or item is None:
        raise ValueError(f"invalid layer selector {item!r}; use {_forms(naming)}")
    if isinstance(item, int) or (isinstance(item, tuple) and len(item) == 2
                                 and all(isinstance(v, int) for v in item)):
        if resolution is None:
            raise ValueError("layer resolutions are not known yet; choose layers by name or place")
        if isinstance(item, int):
            out = [l for l in layers if max(resolution(l)[-2:]) == item]  # video: (F, h, w)
        else:
            out = [l for l in layers if tuple(resolution(l))[-2:] == tuple(item)]
        if not out:
            avail = sorted({tuple(resolution(l)) for l in layers}, reverse=True)
            raise ValueError(f"no attention layer has resolution {item!r}; available resolutions "
                             f"(h, w): {avail} (an int matches max(h, w))")
        return out
    if not isinstance(item, str):
        raise ValueError(f"invalid layer selector {item!r} of type {type(item).__name__}; use "
                         f"{_forms(naming)}")
    name = item.strip()
    if name.endswith(".processor"):
        name = name[: -len(".processor")]
    if name in layers:
        return [name]
    prefixes = naming.expand(name) or name
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    out = [l for l in layers if any(l == p or l.startswith(p + ".") for p in prefixes)]
    if not out:
        raise ValueError(f"unknown attention layer {item!r}; available layers: "
                         f"{_available(layers, resolution, naming)}; or {_forms(naming)}")
    return out


class AttentionMaps:
    """Recorded cross-attention maps, by layer (see the module docstring for shapes and selectors).

    Args:
        tensors: layer -> maps (a float tensor, or :class:`~sdlens.trace.compact.CompactMaps`:
            codes + scales, decoded on access), or layer -> zero-argument loader returning them
            (lazy loading).
        resolutions: layer -> (h, w) of that layer's maps (a video model's: (frames, h, w)).
        steps: indices (into ``trace.timesteps``) of the recorded steps.
        n_steps: the number of steps of the run (``len(trace.timesteps)``); default: up to the
            last recorded step. Negative steps count back from it.
        token_positions: positions (in the text encoder's sequence) along the tokens axis.
        heads: True if the heads axis was kept.
        tokens: per batch item, the token strings (``trace.tokens``), for word lookup.
        family: the model family (``trace.meta["family"]``) whose naming resolves layer
            selectors (None: the UNet's, as in traces that did not record one).
        dtype: the maps' storage dtype name ("uint4": 4-bit codes, "uint8", "float16", ...);
            default: that of the first layer's.
        segments: per batch item, the text encoders' segments (``trace.text_segments``: SD3's
            CLIP and T5 positions) whose words are pooled; None: one text encoder.
    """

    def __init__(self, tensors: Mapping[str, Stored | Callable[[], Stored]],
                 resolutions: Mapping[str, Sequence[int]], steps: Sequence[int],
                 token_positions: Sequence[int], heads: bool = False,
                 tokens: Sequence[Sequence[str]] | None = None, family: str | None = None,
                 dtype: str | None = None, n_steps: int | None = None,
                 segments: Sequence[Sequence[dict]] | None = None):
        self.family = family
        self.segments = [list(s) for s in segments] if segments else None
        self.naming: SiteNaming = naming_for(family)
        self._tensors = dict(tensors)
        self._cache: dict[str, Stored] = {}  # loaded maps, as stored
        self._decoded: dict[str, torch.Tensor] = {}  # the last layer decoded from codes
        self._resolutions = {k: tuple(int(n) for n in v) for k, v in resolutions.items()}
        self.layers: list[str] = sorted(self._tensors, key=self.naming.sort_key)
        self.steps: list[int] = [int(s) for s in steps]
        self.n_steps: int = int(n_steps) if n_steps is not None else max(self.steps, default=-1) + 1
        self.token_positions: list[int] = [int(p) for p in token_positions]
        self.heads: bool = bool(heads)
        self.tokens = [list(t) for t in tokens] if tokens is not None else None
        missing = [l for l in self.layers if l not in self._resolutions]
        if missing:
            raise ValueError(f"no resolution given for layers {missing}")
        self._dtype = dtype

    @property
    def dtype(self) -> str | None:
        """The maps' storage dtype name ("uint4": 4-bit codes + per-map scales, the default;
        "uint8"; "float16", ...; None when no layer was recorded). Indexing always gives float
        maps."""
        if self._dtype is None and self.layers:
            self._dtype = dtype_name(self.stored(self.layers[0]).dtype)
        return self._dtype

    def source(self, layer: str) -> Stored | Callable[[], Stored]:
        """``layer``'s maps (module path) as stored if loaded, else the zero-argument loader
        that reads them: what a new trace over the same maps holds without reading them."""
        return self._cache.get(layer, self._tensors[layer])

    def stored(self, layer: str) -> Stored:
        """``layer``'s maps (module path) as stored, loaded: a float tensor, or
        :class:`~sdlens.trace.compact.CompactMaps` (codes + scales, not decoded)."""
        t = self._cache.get(layer)
        if t is None:
            src = self._tensors[layer]
            t = src() if callable(src) else src
            self._cache[layer] = t
        return t

    # ------------------------------------------------------------------ layers
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __contains__(self, layer) -> bool:
        try:
            return bool(self.select(layer).layers)
        except ValueError:
            return False

    def __bool__(self) -> bool:
        return bool(self.layers)

    def __repr__(self) -> str:
        res = sorted({self._resolutions[l] for l in self.layers}, reverse=True)
        return (f"AttentionMaps({len(self.layers)} layers at {res}, {len(self.steps)} steps, "
                f"{len(self.token_positions)} tokens{', heads kept' if self.heads else ''})")

    def resolution(self, layer: str) -> tuple[int, int]:
        """(h, w) of ``layer``'s maps (a module path or an alias naming one layer)."""
        return self._resolutions[self._one(layer)]

    @property
    def resolutions(self) -> dict[str, tuple[int, int]]:
        """layer -> (h, w)."""
        return {l: self._resolutions[l] for l in self.layers}

    def alias(self, layer: str) -> str:
        """Short alias of a layer (``"down.1.0"``)."""
        return self.naming.alias(self._one(layer))

    def names(self, layers=None) -> list[str]:
        """Module paths of the layers ``layers`` selects (see the module docstring)."""
        return resolve_layers(layers, self.layers, lambda l: self._resolutions[l], self.naming)

    def select(self, layers=None) -> "AttentionMaps":
        """A view restricted to the layers ``layers`` selects. Iterating it (or ``.layers``) gives
        their module paths; indexing it gives their maps. ValueError for unknown names (the
        message lists the available layers)."""
        chosen = self.names(layers)
        sub = self.like({l: self._tensors[l] for l in chosen})
        sub._cache, sub._decoded = self._cache, self._decoded  # share loaded tensors
        return sub

    def like(self, tensors: Mapping[str, Stored | Callable[[], Stored]],
             steps: Sequence[int] | None = None,
             token_positions: Sequence[int] | None = None) -> "AttentionMaps":
        """Maps of the same kind and naming over other tensors (or loaders) of some of these
        layers, optionally at other recorded steps or token positions (their storage dtype read
        from them: float tensors given for codes are kept as floats)."""
        return AttentionMaps(tensors, {l: self._resolutions[l] for l in tensors},
                             self.steps if steps is None else steps,
                             self.token_positions if token_positions is None else token_positions,
                             self.heads, self.tokens, family=self.family,
                             dtype=_same_dtype(self, tensors),
                             n_steps=self.n_steps, segments=self.segments)

    def _one(self, layer: str) -> str:
        chosen = self.names(layer)
        if len(chosen) != 1:
            raise ValueError(f"{layer!r} names {len(chosen)} layers ({', '.join(chosen)}); "
                             "name one layer")
        return chosen[0]

    # ------------------------------------------------------------------ tensors
    def __getitem__(self, layer: str) -> torch.Tensor:
        """(steps, batch, tokens, h, w) maps of one layer (heads kept: (steps, batch, heads,
        tokens, h, w)). ``layer``: module path or alias naming a single layer."""
        name = self._one(layer) if layer not in self._tensors else layer
        t = self.stored(name)
        if not isinstance(t, CompactMaps):
            return t
        out = self._decoded.get(name)
        if out is None:  # decoded on access; only the last layer is kept decoded
            out = t.decode()
            self._decoded.clear()
            self._decoded[name] = out
        return out

    def step_position(self, step: int) -> int:
        """Position along the steps axis of trace step ``step`` (an int, negative counting from
        the end of the run; see :func:`sdlens.trace.steps.select_step`). StepError (a ValueError
        and an IndexError) if it is out of range or was not recorded."""
        return self.steps.index(select_step(step, self.n_steps, self.steps))

    def token_index(self, token: int | str, batch: int = 0, occurrence: int = 0) -> list[int]:
        """Indices along the tokens axis for ``token``: a position in the text encoder's sequence
        (int), or a word of batch item ``batch`` (str: the words of
        :mod:`sdlens.analysis.tokens`, as the heatmaps take them: ``"dreambeach"`` gives both its
        sub-word tokens, ``"red circle"`` the tokens of both words; ``occurrence`` picks among
        repeats). ValueError lists the words available."""
        if isinstance(token, int) and not isinstance(token, bool):
            positions: Sequence[int] = [token]
        elif isinstance(token, str):
            if self.tokens is None:
                raise ValueError("this trace has no token strings (the prompt was given as "
                                 "embeddings); use token positions")
            if not 0 <= batch < len(self.tokens):
                raise IndexError(f"batch item {batch} out of range (batch size {len(self.tokens)})")
            words = words_from_tokens(self.tokens[batch], segments=self.segments[batch]
                                      if self.segments and batch < len(self.segments) else None)
            positions = match_word(words, token, occurrence, where=f"prompt {batch}").positions
        else:
            raise TypeError(f"token must be a position (int) or a word (str), got "
                            f"{type(token).__name__}")
        for p in positions:
            if p not in self.token_positions:
                raise IndexError(f"token position {p} was not recorded; recorded positions: "
                                 f"{self.token_positions[0]}..{self.token_positions[-1]}")
        return [self.token_positions.index(p) for p in positions]

    def get(self, layer: str, step: int | None = None, token: int | str | None = None,
            batch: int | None = None, occurrence: int = 0) -> torch.Tensor:
        """Maps of one layer, optionally at one trace step, one token and one batch item;
        indexed axes are dropped. ``token``: a position, or a word / phrase whose sub-word
        tokens are pooled by their **mean** (as the heatmaps pool them); ``occurrence`` picks
        among a word's repeats.

        Returns (steps?, batch?, [heads,] h, w) with the tokens axis dropped when ``token`` is
        given, else (steps?, batch?, [heads,] tokens, h, w).
        """
        t = self[layer]
        if token is not None:
            idx = self.token_index(token, batch or 0, occurrence)
            tok_axis = 3 if self.heads else 2
            t = t.index_select(tok_axis, torch.tensor(idx)).float().mean(tok_axis)
        if batch is not None:
            if not -t.shape[1] <= batch < t.shape[1]:
                raise IndexError(f"batch item {batch} out of range (batch size {t.shape[1]})")
            t = t[:, batch]
        if step is not None:
            t = t[self.step_position(step)]
        return t


class ConceptMaps(AttentionMaps):
    """Concept maps (ConceptAttention's, :mod:`sdlens.engine.joint`): per recorded site and step,
    each image patch's softmax over the concepts named at trace time::

        maps[layer]     (steps, batch, concepts, h, w)     sums to 1 over the concepts axis

    Layers, aliases, resolutions and steps are read as :class:`AttentionMaps`'; the concepts axis
    runs over :attr:`concepts` (the tokens axis of the attention maps; ``token_positions`` are
    ``0 .. len(concepts) - 1``), and ``get(layer, token="circle")`` / :meth:`token_index` take a
    concept's name.

    How they were computed (:mod:`sdlens.engine.joint`): :attr:`method` (``"conceptattention"``,
    the paper's choices, or ``"sdlens"``; files written before the choice existed: "sdlens");
    :attr:`default_layers`, the layers a heatmap pools when it is given no ``layers`` (None: all
    recorded; the paper's default blocks otherwise); :attr:`default_steps`, the steps it pools
    when given no ``steps`` (None: all recorded; ``"last"``: the last recorded step, whose map is
    made of the vectors averaged over every recorded step, the paper's SD3 recipe; per-step
    views still get every recorded step, each the map of the steps up to it).
    """

    def __init__(self, tensors, resolutions, steps, concepts: Sequence[str],
                 family: str | None = None, dtype: str | None = None,
                 n_steps: int | None = None, method: str = "sdlens",
                 default_layers: Sequence[str] | None = None, default_steps: str | None = None):
        super().__init__(tensors, resolutions, steps, range(len(concepts)), heads=False,
                         family=family, dtype=dtype, n_steps=n_steps)
        self.concepts: list[str] = [str(c) for c in concepts]
        self.method = str(method)
        self.default_layers = None if default_layers is None else \
            [l for l in default_layers if l in self._tensors]
        self.default_steps = default_steps

    def info(self) -> dict:
        """The JSON entry of how the maps were computed (a trace file's ``concepts`` entry)."""
        return {"method": self.method, "default_layers": self.default_layers,
                "default_steps": self.default_steps}

    def __repr__(self) -> str:
        res = sorted({self._resolutions[l] for l in self.layers}, reverse=True)
        return (f"ConceptMaps({len(self.layers)} layers at {res}, {len(self.steps)} steps, "
                f"concepts {self.concepts})")

    def like(self, tensors, steps=None, token_positions=None) -> "ConceptMaps":
        if token_positions is not None and list(token_positions) != self.token_positions:
            raise ValueError("concept maps keep every concept")
        return ConceptMaps(tensors, {l: self._resolutions[l] for l in tensors},
                           self.steps if steps is None else steps, self.concepts,
                           family=self.family, dtype=_same_dtype(self, tensors),
                           n_steps=self.n_steps, **self.info())

    def concept_index(self, concept: str) -> int:
        """Index of ``concept`` along the concepts axis (its name as given at trace time, case
        and surrounding spaces ignored); ValueError listing the recorded concepts."""
        key = str(concept).strip().lower()
        for i, c in enumerate(self.concepts):
            if c.strip().lower() == key:
                return i
        raise ValueError(f"no concept {concept!r} was recorded; recorded concepts: "
                         f"{', '.join(map(repr, self.concepts))}")

    def token_index(self, token: int | str, batch: int = 0, occurrence: int = 0) -> list[int]:
        """``[index]`` of a concept (its name, or its index along the concepts axis)."""
        if isinstance(token, str):
            return [self.concept_index(token)]
        return super().token_index(token, batch, occurrence)


class ReferenceMaps(AttentionMaps):
    """Reference maps of an editing model (``record=(..., "reference_maps")``: Flux.1 Kontext,
    Flux.2 with ``image=[...]``, Qwen-Image-Edit / EditPlus; any family whose kernel layout names
    ``"reference i"`` segments with their patch grids): where each output patch looks in each
    reference image::

        maps[layer]     (steps, batch, R, h, w)

    ``h, w``: the output's patches (the site's map resolution); ``R``: the reference images'
    patches, reference 0's ``grids[0]`` = (rows, columns) row-major, then reference 1's, ...
    ``maps[layer][s, b, r, y, x]`` is output patch (y, x)'s attention probability on reference
    patch r: its query's softmax over *all* the kernel's keys (text, the output, every
    reference), heads averaged, **not** renormalised over the reference (a row sums to the
    output patch's share on that reference: :meth:`share`; divide by it for the distribution
    within the reference). A reference wider than 32 patches a side is sum-pooled to at most 32
    (each cell the sum of an ``f x f`` block of patches: the mass is kept; the grids say what
    was kept).

    Size: ``steps x sites x batch x (h w) x R x 2`` bytes (fp16). At 1024 px with a 1024-px
    reference (64 x 64 patches each, the reference pooled to 32 x 32) that is 8 MiB per site and
    step: record a few (``layers="single.37"``, ``steps=[...]``), which the size check
    (``max_bytes``) enforces. Both directions come from the one tensor: :meth:`at` (an output
    point -> its distribution over a reference) and :meth:`lands` (a reference point -> where
    it lands in the output)."""

    def __init__(self, tensors, resolutions, steps, grids: Sequence[Sequence[int]],
                 family: str | None = None, dtype: str | None = None,
                 n_steps: int | None = None):
        self.grids: list[tuple[int, int]] = [(int(g[0]), int(g[1])) for g in grids]
        n = sum(r * c for r, c in self.grids)
        super().__init__(tensors, resolutions, steps, range(n), heads=False, family=family,
                         dtype=dtype, n_steps=n_steps)

    def __repr__(self) -> str:
        return (f"ReferenceMaps({len(self.layers)} layers, {len(self.steps)} steps, "
                f"references {self.grids})")

    def like(self, tensors, steps=None, token_positions=None) -> "ReferenceMaps":
        if token_positions is not None and list(token_positions) != self.token_positions:
            raise ValueError("reference maps keep every reference patch")
        return ReferenceMaps(tensors, {l: self._resolutions[l] for l in tensors},
                             self.steps if steps is None else steps, self.grids,
                             family=self.family, dtype=_same_dtype(self, tensors),
                             n_steps=self.n_steps)

    def reference(self, layer: str, index: int = 0) -> torch.Tensor:
        """(steps, batch, rows, columns, h, w) float32: reference ``index``'s part of
        ``maps[layer]``. IndexError for a reference not recorded."""
        if not 0 <= index < len(self.grids):
            raise IndexError(f"reference {index} was not recorded; references 0.."
                             f"{len(self.grids) - 1} (\"image 1\" is reference 0)")
        start = sum(r * c for r, c in self.grids[:index])
        r, c = self.grids[index]
        t = self[layer][:, :, start: start + r * c].float()
        return t.unflatten(2, (r, c))

    def _pooled(self, layers, index: int, step, batch: int) -> torch.Tensor:
        """(rows, columns, h, w): reference ``index``'s maps averaged over ``layers`` (None:
        all) and over the recorded steps (or at trace step ``step``), batch item ``batch``."""
        names = self.names(layers)
        if not names:
            raise ValueError(f"no recorded layer matches {layers!r}")
        t = torch.stack([self.reference(l, index)[:, batch] for l in names]).mean(0)
        return t.mean(0) if step is None else t[self.step_position(step)]

    def share(self, layers=None, index: int = 0, step: int | None = None,
              batch: int = 0) -> torch.Tensor:
        """(h, w): each output patch's attention share on reference ``index`` (its probability
        summed over the reference's patches), averaged over ``layers`` and the steps (or at
        ``step``): the output-side map of a reference image (``trace.heatmap("image 1")``)."""
        return self._pooled(layers, index, step, batch).sum((0, 1))

    def at(self, y: int, x: int, layers=None, index: int = 0, step: int | None = None,
           batch: int = 0, normalise: bool = True) -> torch.Tensor:
        """(rows, columns): where output patch (``y``, ``x``) (map coordinates) looks in
        reference ``index``; ``normalise``: as a distribution over the reference (divided by
        the patch's share on it), else the raw probabilities."""
        m = self._pooled(layers, index, step, batch)[:, :, y, x]
        return m / m.sum().clamp_min(1e-30) if normalise else m

    def lands(self, row: int, col: int, layers=None, index: int = 0, step: int | None = None,
              batch: int = 0) -> torch.Tensor:
        """(h, w): how much each output patch attends to reference patch (``row``, ``col``)
        (reference grid coordinates): where that point of the reference lands in the output."""
        return self._pooled(layers, index, step, batch)[row, col]


def _same_dtype(maps: AttentionMaps, tensors: Mapping) -> str | None:
    """``maps``' storage dtype name for new maps over ``tensors`` when those are stored alike
    (loaders, or maps in that storage), else None (read from the new maps)."""
    for src in tensors.values():
        if torch.is_tensor(src) or isinstance(src, CompactMaps):
            if dtype_name(src.dtype) != maps._dtype:
                return None
    return maps._dtype
