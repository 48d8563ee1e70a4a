"""The one collector of a traced call's maps: text->image attention, image->text, concept maps
(and, inside the attention maps, an IP-Adapter's image-prompt tokens).

Every reader of a site (:class:`~sdlens.engine.sites.MapRecorder` at the attention kernel, the
concept pass beside the blocks) speaks one protocol to the call's :class:`Maps`
(:class:`~sdlens.engine.sites.MapSink`): ``request(kind, layer)`` -> what to compute now or None,
``put(kind, layer, maps)``, ``skip(kind, layer, why)``. Each kind has a :class:`MapCollector`
that keeps a site's maps of the recorded steps on the host and builds the Trace's
:class:`~sdlens.trace.maps.AttentionMaps` / :class:`~sdlens.trace.maps.ConceptMaps`.
"""

from __future__ import annotations

from typing import Sequence

import math

import torch

from sdlens.analysis.tokens import IMAGE_PROMPT_POSITION
from sdlens.trace.compact import dtype_name, host_maps, stack_maps, stored_dtype
from sdlens.trace.maps import AttentionMaps, ConceptMaps, ReferenceMaps

#: the kinds of map a call can record, in the order the Trace lists them
KINDS = ("attention", "image_to_text", "concepts", "reference_maps")


class CallState:
    """What the collectors read of the call in progress (the session's ``_Run`` is one): the
    recorded steps, the text rows of the batch, the kept token positions, the sites' map
    resolutions, and how to copy to the host / skip a site (one warning per call)."""

    step: int
    rows: slice | None
    n_tokens: int | list[int] | None
    selected: list[str]
    resolutions: dict[str, tuple[int, int]]
    opts: object
    batch: int
    skipped: dict[str, str]

    def recording(self) -> bool: ...  # a recorded step of a recorded denoiser call

    def skip(self, key: str, what: str) -> None: ...

    def _host(self, t: torch.Tensor, dtype, owned: bool = False) -> torch.Tensor: ...


class MapCollector:
    """Maps of one ``kind`` recorded at a call's recorded steps and selected sites, on its text
    rows. A site that cannot be recorded is left out (``meta["skipped"]``: the site's name for
    attention maps, ``"<kind> <site>"`` for the others), one warning per call.

    Attention maps: every site must have the same tokens (and image-prompt tokens per IP-Adapter,
    ``image_tokens``), and sites are kept (with no steps) when no step was recorded."""

    def __init__(self, run: CallState, kind: str, concepts: Sequence[str] | None = None):
        self.run, self.kind = run, kind
        self.concepts = list(concepts) if concepts is not None else None
        self.chunks: dict[str, list[torch.Tensor]] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.steps: list[int] = []
        self.n_tokens: int | None = None  # the token axis's length every site must have
        self.image_tokens: tuple[int, ...] = ()  # image-prompt tokens per IP-Adapter
        self.grids: tuple = ()  # reference maps: each reference's (rows, columns)
        self.info: dict = {}  # concept maps: how they were computed (ConceptMaps.info)
        self.only: set[str] | None = None  # the sites this kind can have (None: every one)

    def selected(self) -> list[str]:
        """The call's selected sites that this kind can have maps at."""
        sel = self.run.selected
        return sel if self.only is None else [l for l in sel if l in self.only]


    @property
    def dtype(self):
        """How the maps are kept (the run's ``attention_dtype``, "auto" resolved at the first
        denoiser call)."""
        return stored_dtype(self.kind, self.run.opts.attention_dtype)

    def key(self, layer: str) -> str:
        return layer if self.kind == "attention" else f"{self.kind} {layer}"

    def skipped(self, layer: str) -> bool:
        return self.key(layer) in self.run.skipped

    def skip(self, layer: str, what: str) -> None:
        self.run.skip(self.key(layer), what)

    def request(self, layer: str):
        """(rows, tokens, keep_heads, dtype) to compute at this site call, or None."""
        run = self.run
        if not run.recording() or layer not in self.selected() or self.skipped(layer):
            return None
        return run.rows, run.n_tokens, run.opts.heads, self.dtype

    def put(self, layer: str, maps: torch.Tensor, image_tokens: tuple[int, ...] = (),
            grids: tuple = ()) -> None:
        """maps: (n, [heads,] T, HW) on the device (video: (n, [heads,] T, FHW); reference
        maps: T the references' patches on ``grids``)."""
        grid = self.run.resolutions[layer]
        if maps.shape[-1] != math.prod(grid):
            return self.skip(layer, f"{maps.shape[-1]} positions, expected "
                                    f"{'x'.join(map(str, grid))} from the latent size")
        if self.n_tokens is None:
            self.n_tokens, self.image_tokens = int(maps.shape[-2]), tuple(image_tokens)
            self.grids = tuple(grids)
        elif int(maps.shape[-2]) != self.n_tokens or tuple(image_tokens) != self.image_tokens \
                or tuple(grids) != self.grids:
            return self.skip(layer, f"{maps.shape[-2]} tokens, other sites had {self.n_tokens}")
        self.pending[layer] = maps

    def end_step(self) -> None:
        """At a recorded step's ``scheduler.step``: the step's maps to the host."""
        run = self.run
        for layer in self.selected():
            t = self.pending.get(layer)
            if t is None and not self.skipped(layer):
                self.skip(layer, f"not called (or not recorded) at step {run.step}")
            if not self.skipped(layer):
                self.chunks.setdefault(layer, []).append(host_maps(t, run._host))
        self.steps.append(run.step)
        self.pending = {}

    def clear_pending(self) -> None:
        """A denoiser call whose maps do not count (the step's text call comes later)."""
        self.pending = {}

    def positions(self) -> list[int]:
        """The token axis's positions in the text sequence (image-prompt tokens after the
        text's, at ``IMAGE_PROMPT_POSITION + j``)."""
        run = self.run
        if isinstance(run.n_tokens, list):
            positions = list(run.n_tokens)
        else:
            positions = list(range(self.n_tokens if self.n_tokens is not None
                                   else (run.n_tokens or 0)))
        n_img = sum(self.image_tokens)
        return positions[: len(positions) - n_img] + \
            [IMAGE_PROMPT_POSITION + j for j in range(n_img)]

    def build(self, family: str) -> AttentionMaps | None:
        """The maps of the call (None: no step recorded, except for attention maps)."""
        run = self.run
        if not self.steps and self.kind != "attention":
            return None
        if self.kind == "reference_maps" and not self.grids:
            return None  # no site saw a reference image
        layers = {}
        for layer in self.selected():
            chunks = self.chunks.get(layer)
            if self.skipped(layer) or (chunks and len(chunks) != len(self.steps)):
                continue
            if not chunks and self.kind != "attention":
                continue
            empty = (run.batch,) + ((1,) if run.opts.heads else ()) + (len(self.positions()),)
            grid = tuple(run.resolutions[layer])  # (h, w); video (F, h, w)
            layers[layer] = stack_maps(chunks or [], grid, empty,
                                       self.dtype)  # (S, B, [heads,] T, h, w); video T, F, h, w
        self.chunks = {}
        res = {l: run.resolutions[l] for l in layers}
        name = dtype_name(self.dtype)
        if self.concepts is not None:
            return ConceptMaps(layers, res, self.steps, self.concepts, family=family, dtype=name,
                               **self.info)
        if self.kind == "reference_maps":
            return ReferenceMaps(layers, res, self.steps, self.grids, family=family, dtype=name)
        return AttentionMaps(layers, res, self.steps, self.positions(), run.opts.heads,
                             family=family, dtype=name)


class Maps:
    """The call's collectors, one per kind recorded; the one sink every reader speaks to."""

    def __init__(self, run: CallState, kinds: Sequence[str], concepts: Sequence[str] | None):
        self.run = run
        self.by_kind = {k: MapCollector(run, k, concepts if k == "concepts" else None)
                        for k in KINDS if k in kinds}

    def __contains__(self, kind: str) -> bool:
        return kind in self.by_kind

    def request(self, kind: str, layer: str):
        c = self.by_kind.get(kind)
        return c.request(layer) if c is not None else None

    def put(self, kind: str, layer: str, maps: torch.Tensor,
            image_tokens: tuple[int, ...] = (), grids: tuple = ()) -> None:
        self.by_kind[kind].put(layer, maps, image_tokens, grids)

    def skip(self, kind: str, layer: str, what: str) -> None:
        self.by_kind[kind].skip(layer, what)

    def describe(self, kind: str, sites: Sequence[str] | None = None, **info) -> None:
        """How the maps of ``kind`` are computed (concept maps: ``method``, ``default_layers``,
        ``default_steps``: :class:`~sdlens.trace.maps.ConceptMaps`); ``sites``: the only sites
        it has maps at (the concept pass's blocks), the call's other selected sites left out
        without a warning."""
        if kind in self.by_kind:
            self.by_kind[kind].info.update(info)
            if sites is not None:
                self.by_kind[kind].only = set(sites)

    def rows(self) -> slice | None:
        """The batch rows to compute at this denoiser call; None: nothing recorded now."""
        return self.run.rows if self.run.recording() else None

    def end_step(self) -> None:
        for c in self.by_kind.values():
            c.end_step()

    def clear_pending(self) -> None:
        for c in self.by_kind.values():
            c.clear_pending()

    def image_tokens(self) -> tuple[int, ...]:
        c = self.by_kind.get("attention")
        return c.image_tokens if c is not None else ()

    def build(self, family: str) -> dict[str, AttentionMaps | None]:
        """``{"attention": ..., "image_to_text": ..., "concepts": ...}`` for ``Trace.build``."""
        return {k: c.build(family) for k, c in self.by_kind.items()}

