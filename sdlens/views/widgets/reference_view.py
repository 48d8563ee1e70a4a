"""``ReferenceView(trace)``: an editing model's reference maps as a panel.

The output image on the left, each reference image on the right. Click a point of the output:
each reference shows where that output patch looks in it (its attention over the reference's
patches, renormalised over the reference: :meth:`sdlens.trace.maps.ReferenceMaps.at`). Click a
point of a reference: the output shows where it lands (:meth:`~sdlens.trace.maps.ReferenceMaps.
lands`). The slider scrubs the recorded steps; ``layers`` picks the sites averaged (None: all
recorded). The trace needs ``record=(..., "reference_maps")`` (Flux.1 Kontext, Flux.2 with
``image=[...]``).

The overlays are computed in the kernel on each change of ``step`` / ``point`` / ``direction``
(traits, synced): ``point`` is ``[y, x]`` in the clicked image's own patch grid (the output's
map resolution, or the reference's ``grids[i]``), ``direction`` ``"output"`` (a point of the
output) or ``"reference i"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import anywidget
import torch
import torch.nn.functional as F
import traitlets
from PIL import Image

from sdlens.views.overlay import GREY_NOTE
from sdlens.views.widgets.frames import encode, heat_rgba

_STATIC = Path(__file__).parent / "static"


def _rgb(image: Any, size: tuple[int, int]) -> Image.Image:
    """A PIL image (or a grey one where None) at ``size`` (W, H)."""
    if image is None:
        return Image.new("RGB", size, (128, 128, 128))
    if not isinstance(image, Image.Image):
        raise TypeError(f"references must be PIL images, got {type(image).__name__}")
    return image.convert("RGB").resize(size, Image.BILINEAR)


class ReferenceView(anywidget.AnyWidget):
    """Click a point of the output to see its attention over the reference image(s), or a
    point of a reference to see where it lands in the output; scrub the steps.

    Args:
        trace: a Trace with reference maps (``trace.reference_maps``).
        references: the reference images as given to the pipeline (PIL), to draw the overlays
            on (the trace does not keep them; grey where not given).
        layers: the sites averaged (any layer selector; None: every recorded site).
        batch: the batch item.
        px: the side of each image on screen.
        grey: the image under an overlay shown in grey (its luminance: the heat's hue never
            meets the picture's; the title says so); False: in colour.
    """

    _esm = _STATIC / "reference_view.js"
    _css = _STATIC / "sdlens.css"

    title = traitlets.Unicode("").tag(sync=True)
    output = traitlets.Bytes(b"").tag(sync=True)
    references = traitlets.List(traitlets.Bytes()).tag(sync=True)
    output_grid = traitlets.List(traitlets.Int()).tag(sync=True)
    reference_grids = traitlets.List(traitlets.List(traitlets.Int())).tag(sync=True)
    output_overlay = traitlets.Bytes(b"").tag(sync=True)
    reference_overlays = traitlets.List(traitlets.Bytes()).tag(sync=True)
    steps = traitlets.List(traitlets.Int()).tag(sync=True)
    step = traitlets.Int(0).tag(sync=True)  # index into ``steps``
    point = traitlets.List(traitlets.Int(), [0, 0]).tag(sync=True)
    direction = traitlets.Unicode("output").tag(sync=True)
    px = traitlets.Int(256).tag(sync=True)
    # the image under an overlay in grey (sdlens.views.overlay); False: in colour
    grey = traitlets.Bool(True).tag(sync=True)

    def __init__(self, trace: Any, references: Sequence[Any] | None = None, layers: Any = None,
                 batch: int = 0, px: int = 256, grey: bool = True, **kwargs: Any):
        maps = getattr(trace, "reference_maps", None)
        if maps is None:
            raise ValueError("this trace holds no reference maps; trace an editing model "
                             "(Flux.1 Kontext, Flux.2 with image=[...]) with "
                             "record=(..., 'reference_maps')")
        self.maps, self.layers, self.batch = maps, layers, int(batch)
        names = maps.names(layers)
        if not names:
            raise ValueError(f"no recorded reference-map layer matches {layers!r}")
        refs = list(references or [])
        size = (int(px), int(px))
        images = getattr(trace, "images", None) or []
        out = images[batch] if len(images) > batch and isinstance(images[batch], Image.Image) \
            else None
        h, w = maps.resolution(names[0])
        super().__init__(
            title=self._title(len(names), grey), grey=bool(grey),
            output=encode(_rgb(out, size), "png"),
            references=[encode(_rgb(refs[i] if i < len(refs) else None, size), "png")
                        for i in range(len(maps.grids))],
            output_grid=[h, w], reference_grids=[list(g) for g in maps.grids],
            steps=list(maps.steps), step=len(maps.steps) - 1, point=[h // 2, w // 2],
            px=int(px), **kwargs)
        self.observe(lambda _: self.redraw(), names=["step", "point", "direction"])
        self.observe(lambda c: setattr(self, "title", self._title(len(names), c["new"])),
                     names="grey")
        self.redraw()

    @staticmethod
    def _title(sites: int, grey: bool) -> str:
        return (f"reference maps · {sites} site(s) · click the output or a reference"
                + (f" · {GREY_NOTE}" if grey else ""))

    def _overlay(self, values: torch.Tensor) -> bytes:
        v = values.float()
        v = v / v.max().clamp_min(1e-30)  # each overlay scaled to its own maximum
        v = F.interpolate(v[None, None], size=(self.px, self.px), mode="nearest")[0, 0]
        return encode(Image.fromarray(heat_rgba(v)), "png")

    def redraw(self) -> None:
        """The overlays for the current step, point and direction."""
        step = self.steps[min(max(self.step, 0), len(self.steps) - 1)]
        y, x = (int(v) for v in self.point)
        if self.direction == "output":
            self.reference_overlays = [
                self._overlay(self.maps.at(y, x, self.layers, i, step, self.batch))
                for i in range(len(self.maps.grids))]
            self.output_overlay = b""
        else:
            i = int(self.direction.rsplit(" ", 1)[1])
            self.output_overlay = self._overlay(
                self.maps.lands(y, x, self.layers, i, step, self.batch))
            self.reference_overlays = [b""] * len(self.maps.grids)

    def click_output(self, y: int, x: int) -> None:
        """As a click on output patch (y, x)."""
        self.direction, self.point = "output", [int(y), int(x)]

    def click_reference(self, index: int, row: int, col: int) -> None:
        """As a click on reference ``index``'s patch (row, col)."""
        self.direction, self.point = f"reference {int(index)}", [int(row), int(col)]
