"""Encoded frames for the widgets: every image a panel can show, rendered once in the kernel.

A :class:`TraceFrames` turns a trace into PNG/JPEG bytes that the browser switches between
without asking the kernel again:

* ``base(batch)``: per step, ``x_t`` (the latents the denoiser saw), the ``x0`` prediction, the
  guided prediction ``noise`` (noise, or the velocity of a flow model: :func:`panel_label` says
  which) and the ``cfg_delta`` (``noise_text - noise_uncond``), plus the output image.
  ``x_t`` / ``x0`` go through the latent->RGB decoder of :mod:`sdlens.analysis.previews`
  (linear by default); noise and delta through the same linear map, scaled by one robust maximum
  over all steps (so their magnitude over the run stays comparable), and are sent at the latent
  resolution (the browser scales them up, pixelated).
* ``heat(batch, layers, maps=...)``: per word of the prompt, its heatmap at every recorded step
  and summed over steps (:func:`sdlens.analysis.heatmaps.word_heatmap`), as RGBA PNGs (a colormap
  whose alpha is the heat, for overlaying on an image). ``maps`` picks the recorded maps
  (:data:`MAP_LABELS`): the raw attention maps (the default), the concept maps of the concepts
  given at trace time (one chip per concept, :func:`concept_chips`), or the image->text maps.

Everything is cached per (batch) and per (batch, layers, maps): switching back is free.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from sdlens.analysis.guidance import cfg_delta, guidance_text, prediction_label
from sdlens.analysis.heatmaps import output_size, token_heatmap, word_heatmap
from sdlens.analysis.previews import (latent_to_rgb, linear_available, linear_decoder, previews,
                                      resolve_decoder)
from sdlens.analysis.tokens import encoder_name, trace_words

PANELS = ("x_t", "x0", "noise", "cfg_delta")
PANEL_LABELS = {"x_t": "x_t (latents)", "x0": "x0 prediction", "noise": "guided {}",
                "cfg_delta": "CFG delta (text - uncond)"}  # "noise": what the model predicts
#: What a latent->RGB decoder shows, in the words a panel's caption uses.
DECODER_LABELS = {"linear": "linear preview", "vae": "VAE decode", "tiny": "tiny VAE decode",
                  "channels": "first 3 latent channels"}
#: How a heatmap frame is normalised, per mode (``word_heatmap``: each map min-max to [0, 1]).
HEAT_NORMS = {"step": "per step, min–max", "sum": "summed over steps, min–max"}
#: How a concept map is scaled: its share among the concepts (a softmax over the concepts at
#: each patch: fixed 0-1, the default) or stretched min-max per map (the word heatmaps' way).
CONCEPT_SCALES = {"share": "share among the concepts (fixed 0–1)",
                  "minmax": "min–max per map (stretched)"}
#: The chip key of the "winning concept per pixel" view of concept maps.
WINNER = "(winner)"
WINNER_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                  "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324")
FORMATS = ("png", "jpeg", "auto")
#: The recorded maps a heatmap chip can show (``analysis.heatmaps.MAPS``), in the views' words.
MAP_LABELS = {"attention": "attention maps", "concepts": "concept maps",
              "image_to_text": "image→text maps"}
MAX_ALPHA = 0.85  # a heat frame's alpha at value 1 (the browser inverts it for the value shown)


def panel_label(panel: str, decoder: str = "linear", prediction: str = "noise",
                linear: bool = True) -> str:
    """A panel's caption: x_t and x0 say how they were decoded, the prediction panel what the
    model predicts (``prediction``: :func:`~sdlens.analysis.guidance.prediction_label`'s
    "noise", "velocity", "v" or "x0"); the prediction and CFG-delta panels say whether they went
    through the linear preview's matrix (``linear``) or show the first 3 latent channels."""
    label = PANEL_LABELS[panel].format(prediction)
    if panel in ("x_t", "x0"):
        label += f" · {DECODER_LABELS.get(decoder, decoder)}"
    else:
        label += f" · {DECODER_LABELS['linear' if linear else 'channels']}"
    return label


def heat_norms(maps: str = "attention", scale: str = "share") -> dict[str, str]:
    """The legend's words for the heat frames of ``maps`` per mode ("step", "sum"): what the
    colour bar's 0 and 1 mean (concept maps: ``scale``, a key of :data:`CONCEPT_SCALES`)."""
    if maps != "concepts":
        return dict(HEAT_NORMS)
    if scale not in CONCEPT_SCALES:
        raise ValueError(f"scale must be one of {tuple(CONCEPT_SCALES)}, got {scale!r}")
    if scale == "share":
        return {"step": "share among the concepts at this step, fixed 0–1",
                "sum": "share among the concepts, mean over steps, fixed 0–1"}
    return {"step": "per step, min–max (stretched: not its share)",
            "sum": "summed over steps, min–max (stretched: not its share)"}


def colorbar_css(cmap: str = "jet", stops: int = 11) -> str:
    """A CSS ``linear-gradient`` of ``cmap`` from 0 (left) to 1 (right): the heat legend."""
    lut = _lut(cmap)
    cols = [lut[round(i * 255 / (stops - 1))] for i in range(stops)]
    return "linear-gradient(to right, " + ", ".join(
        f"rgb({c[0]},{c[1]},{c[2]}) {100 * i / (stops - 1):.0f}%" for i, c in enumerate(cols)) + ")"


def recorded_kinds(trace: Any) -> list[str] | None:
    """The kinds the run recorded (``meta['options']['record']``); None when not written down."""
    opts = (getattr(trace, "meta", None) or {}).get("options") or {}
    rec = opts.get("record")
    return list(rec) if isinstance(rec, (list, tuple)) else None


def panel_notes(trace: Any, batch: int = 0) -> list[str]:
    """Why a panel or the word chips are missing, in words: the real reason, read from the
    trace (what it recorded, whether guidance ran, whether the prompt has words)."""
    notes = []
    rec = recorded_kinds(trace)
    hint = "sweeps record light traces; `record=...` keeps it"

    def missing(kind: str) -> bool:
        return getattr(trace, kind, None) is None

    if missing("attention"):
        notes.append("attention not recorded: no word heatmaps" + (
            f" ({hint})" if rec is not None and "attention" not in rec else ""))
    if missing("noise"):
        why = hint if rec is None or "noise" not in rec else "not kept"
        notes.append(f"noise not recorded: {why} (no guided-{prediction_label(trace)} or "
                     "CFG-delta panel)")
    elif not getattr(trace, "do_cfg", True) or missing("noise_uncond"):
        notes.append(f"no CFG delta: {guidance_text(trace, explain=True)}")
    if missing("x0"):
        notes.append("x0 not recorded: " + (hint if rec is None or "x0" not in rec else "not kept"))
    prompts = getattr(trace, "prompts", None) or []
    if batch < len(prompts) and not str(prompts[batch]).strip():
        notes.append("empty prompt: no words to map")
    return notes


# --------------------------------------------------------------------------- encoding
def encode(img: Image.Image | np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """PIL image or uint8 array (H, W[, 3|4]) -> PNG / JPEG bytes (``fmt='auto'``: PNG up to
    128 px or with alpha, JPEG above)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = "png" if (max(img.size) <= 128 or img.mode in ("RGBA", "LA")) else "jpeg"
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def mime(data: bytes) -> str:
    """'image/png' or 'image/jpeg' from the bytes' signature."""
    return "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"


def decode(data: bytes) -> Image.Image:
    """Bytes -> PIL image (tests, debugging)."""
    return Image.open(io.BytesIO(data)).copy()


_LUTS: dict[str, np.ndarray] = {}


def _lut(cmap: str) -> np.ndarray:
    if cmap not in _LUTS:
        import matplotlib

        cm = matplotlib.colormaps[cmap]
        _LUTS[cmap] = (cm(np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    return _LUTS[cmap]


def heat_rgba(values: Any, cmap: str = "jet", max_alpha: float = 0.85) -> np.ndarray:
    """(..., H, W) values in [0, 1] -> RGBA uint8 (..., H, W, 4) overlay: colour from ``cmap``,
    alpha grows with the value (0 is fully transparent)."""
    v = values.detach().float().cpu().numpy() if torch.is_tensor(values) else np.asarray(values, np.float32)
    if v.ndim < 2:
        raise ValueError(f"expected an (H, W) map, got shape {v.shape}")
    v = np.nan_to_num(np.clip(v, 0.0, 1.0))
    idx = (v * 255).round().astype(np.uint8)
    rgb = _lut(cmap)[idx]
    alpha = (np.sqrt(v) * max_alpha * 255).round().astype(np.uint8)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


_POOL = None


def encode_many(images: Sequence[Any], fmt: str = "png") -> list[bytes]:
    """:func:`encode` over a list, in threads (PIL's encoders release the GIL)."""
    global _POOL
    if len(images) < 8:
        return [encode(im, fmt) for im in images]
    if _POOL is None:
        import os
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                   thread_name_prefix="sdlens-encode")
    return list(_POOL.map(lambda im: encode(im, fmt), images))


def signed_rgb(x: torch.Tensor, scale: float) -> np.ndarray:
    """(3, h, w) roughly centred at 0 -> uint8 (h, w, 3), ``scale`` mapping to full saturation."""
    y = (x.float() / max(scale, 1e-12)).clamp(-1, 1)
    return ((y + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def _display_size(trace: Any, max_side: int) -> tuple[int, int]:
    h, w = output_size(trace)
    s = min(1.0, max_side / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


# --------------------------------------------------------------------------- words & layers
@dataclass(frozen=True)
class WordChip:
    """A word of the prompt as a chip: ``key`` is unique (:attr:`Word.name`: "a", "a#2");
    ``encoders``: the text encoders that saw it ("CLIP", "T5"; several-encoder models only)."""

    key: str
    text: str
    occurrence: int
    positions: tuple[int, ...]
    tokens: tuple[str, ...]
    encoders: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"key": self.key, "text": self.text, "occurrence": self.occurrence,
                "positions": list(self.positions), "tokens": list(self.tokens),
                "encoders": list(self.encoders)}


POSITION_CHIPS = 12  # words unknown: chips for the positions after the start token


def map_options(trace: Any) -> list[tuple[str, str]]:
    """``[(kind, label)]`` of the recorded maps a heatmap can show (:data:`MAP_LABELS`): the
    attention maps, then concept maps and image->text maps where the trace holds them."""
    out = []
    for kind, label in MAP_LABELS.items():
        maps = getattr(trace, kind, None)
        if maps is not None and list(maps.layers):
            n = len(maps.concepts) if kind == "concepts" else None
            out.append((kind, label if n is None else f"{label} ({n} concept{'s' * (n != 1)})"))
    return out


def concept_chips(trace: Any) -> list[WordChip]:
    """The concepts of ``trace.concepts`` (given at trace time, in the prompt or not) as chips,
    in the order given; ``positions``: the index along the concepts axis."""
    maps = getattr(trace, "concepts", None)
    if maps is None:
        return []
    return [WordChip(c, c, 0, (i,), (c,)) for i, c in enumerate(maps.concepts)]


def chips_for(trace: Any, batch: int = 0, maps: str = "attention") -> list[WordChip]:
    """The chips of the maps ``maps`` shows: the concepts for concept maps, the prompt's words
    (:func:`word_chips`) for attention and image->text maps; [] where those are not recorded."""
    if getattr(trace, maps, None) is None:
        return []
    if maps == "concepts":
        return concept_chips(trace)
    return word_chips(trace, batch, maps)


def word_chips(trace: Any, batch: int = 0, maps: str = "attention") -> list[WordChip]:
    """The prompt's words (punctuation left out) as chips, in prompt order. Words unknown (a
    ``prompt_embeds`` call): chips for token positions 1..12 instead, keyed ``"#3"`` (no tokens)."""
    if not getattr(trace, "tokens", None) or not trace.tokens[batch]:
        maps = getattr(trace, maps, None)
        if maps is None or not getattr(trace, "tokens", None):
            return []
        return [WordChip(f"#{p}", f"#{p}", 0, (p,), ())
                for p in maps.token_positions[1: 1 + POSITION_CHIPS]]
    chips = []
    for w in trace_words(trace, batch, punctuation=False):
        chips.append(WordChip(w.name, w.text, w.occurrence, tuple(w.positions), tuple(w.tokens),
                              tuple(encoder_name(e) for e in w.encoders)))
    return chips


def layer_options(trace: Any, maps: str = "attention") -> list[tuple[str, str]]:
    """``[(key, label)]`` of the layer choices of the recorded maps ``maps`` (attention, concept
    or image->text maps): all layers, each resolution, down / mid / up, then each layer by
    alias. Keys are selectors :func:`sdlens.analysis.heatmaps.word_heatmap` takes (``'all'``
    stands for None, ``'res:16'`` for the int 16)."""
    maps = getattr(trace, maps, None)
    if maps is None or not list(maps.layers):
        return []
    layers = list(maps.layers)
    opts = [("all", f"all layers ({len(layers)})")]
    res = sorted({tuple(maps.resolution(l)) for l in layers}, reverse=True)
    if len(res) > 1:
        for h, w in res:
            n = sum(1 for l in layers if tuple(maps.resolution(l)) == (h, w))
            opts.append((f"res:{max(h, w)}", f"{h}x{w} ({n} layer{'s' * (n != 1)})"))
    groups = [g for g in maps.naming.groups if _selects_any(maps, g)]
    if len(groups) > 1:
        for g in groups:
            opts.append((g, f"{g} blocks"))
    if len(layers) > 1:
        for l in layers:
            h, w = maps.resolution(l)
            opts.append((l, f"{maps.alias(l)} ({h}x{w})"))
    return opts


def _selects_any(maps: Any, selector: Any) -> bool:
    try:
        return bool(maps.names(selector))
    except ValueError:  # AttentionMaps' answer when a selector matches none of its layers
        return False


def layer_selector(key: str) -> Any:
    """Option key -> selector for :func:`sdlens.analysis.heatmaps.word_heatmap`."""
    if key == "all":
        return None
    if key.startswith("res:"):
        return int(key[4:])
    return key


# --------------------------------------------------------------------------- frames
class TraceFrames:
    """Encoded frames of one trace (see the module docstring), cached.

    Args:
        trace: a :class:`~sdlens.trace.Trace` (anything following the trace contract).
        max_side: longest side in pixels of the x_t / x0 / image frames (default 256).
        heat_side: longest side of heatmap frames (default 128; the browser scales them).
        decoder: latent->RGB decoder for x_t / x0 (``"auto"``: the VAE decode where it is cheap,
            else linear, or the first latent channels where there is no linear decoder;
            ``"linear"``, ``"vae"``, ``"tiny"``, ``"channels"``).
        vae: the VAE / AutoencoderTiny for ``decoder='vae'|'tiny'``.
        fmt: ``"png"``, ``"jpeg"`` or ``"auto"`` (PNG up to 128 px, else JPEG) for image frames.
        cmap: matplotlib colormap of the heatmaps.
    """

    def __init__(self, trace: Any, max_side: int = 256, heat_side: int = 128,
                 decoder: str = "auto", vae: Any = None, fmt: str = "auto", cmap: str = "jet"):
        if decoder != "auto" and decoder not in DECODER_LABELS:
            raise ValueError(f"decoder must be 'auto' or one of {tuple(DECODER_LABELS)}, got "
                             f"{decoder!r}")
        decoder = resolve_decoder(trace, decoder, vae)  # "auto": the VAE where it is cheap
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        if not isinstance(max_side, int) or max_side < 8:
            raise ValueError(f"max_side must be an int >= 8, got {max_side!r}")
        if not isinstance(heat_side, int) or heat_side < 4:
            raise ValueError(f"heat_side must be an int >= 4, got {heat_side!r}")
        self.trace = trace
        self.max_side = max_side
        self.heat_side = heat_side
        self.decoder = decoder
        self.vae = vae
        self.fmt = fmt
        self.cmap = cmap
        self.size = _display_size(trace, max_side)
        self.heat_size = _display_size(trace, min(heat_side, max(self.size)))
        self._base: dict[tuple[int, str], dict[str, list[bytes]]] = {}
        self._image: dict[int, bytes] = {}
        self._heat: dict[tuple[int, str, str, bool], dict[str, dict]] = {}
        self._winner: dict[tuple[int, str], dict[str, Any]] = {}
        self._scales: dict[tuple[str, int], float] = {}

    # ---------------------------------------------------------------- facts
    @property
    def n_steps(self) -> int:
        return int(len(self.trace.timesteps))

    @property
    def n_batch(self) -> int:
        for name in ("latents", "x0", "noise"):
            t = getattr(self.trace, name, None)
            if t is not None:
                return int(t.shape[1])
        return len(self.trace.prompts)

    def panels(self) -> list[str]:
        """Panels this trace can fill (x0 needs x0 recorded, cfg_delta a CFG run, ...)."""
        t = self.trace
        out = []
        if getattr(t, "latents", None) is not None:
            out.append("x_t")
        if getattr(t, "x0", None) is not None:
            out.append("x0")
        if getattr(t, "noise", None) is not None:
            out.append("noise")
        if getattr(t, "noise_uncond", None) is not None and getattr(t, "noise_text", None) is not None:
            out.append("cfg_delta")
        return out

    def heat_index(self, maps: str = "attention") -> list[int]:
        """For each step, the index into the recorded steps of ``maps`` (attention, concept or
        image->text maps) to show (the latest recorded step at or before it; -1 before the
        first recorded one)."""
        maps = getattr(self.trace, maps, None)
        if maps is None:
            return [-1] * self.n_steps
        rec = [int(s) for s in maps.steps]
        out, j = [], -1
        for s in range(self.n_steps):
            while j + 1 < len(rec) and rec[j + 1] <= s:
                j += 1
            out.append(j)
        return out

    # ---------------------------------------------------------------- base frames
    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C, h, w) -> (..., 3, h, w) with the family's linear decoder (first 3 channels
        when the family has none)."""
        try:
            m, b = linear_decoder(self.trace, self.vae)
            return latent_to_rgb(x, m, None)  # no bias: noise and deltas are centred at 0
        except ValueError:
            return x[..., :3, :, :].float()

    def _scale(self, name: str, data: torch.Tensor, batch: int) -> float:
        key = (name, batch)
        if key not in self._scales:
            v = data.abs().flatten().float()
            if v.numel() > 2_000_000:
                v = v[torch.linspace(0, v.numel() - 1, 2_000_000).long()]
            self._scales[key] = float(torch.quantile(v, 0.995)) or 1.0
        return self._scales[key]

    def decoders(self) -> list[str]:
        """Decoders x_t / x0 can be shown with: "linear" (or, for a model without a linear
        decoder and no VAE at hand, "channels"), "vae" when a VAE is at hand (``vae=`` or the
        live ``trace.pipeline``), the one given at construction."""
        out = ["linear" if linear_available(self.trace, self.vae) else "channels"]
        pipe = getattr(self.trace, "pipeline", None)
        if self.vae is not None or getattr(pipe, "vae", None) is not None \
                or resolve_decoder(self.trace, "auto") == "vae":  # e.g. the shipped model's own
            out.append("vae")
        if self.decoder not in out:
            out.append(self.decoder)
        return out

    def base(self, batch: int = 0, decoder: str | None = None) -> dict[str, list[bytes]]:
        """``{panel: [bytes per step]}`` for image ``batch``; x_t / x0 with ``decoder`` (default
        the one given at construction; each decoder's frames are made on first use, cached)."""
        if not 0 <= batch < self.n_batch:
            raise ValueError(f"batch={batch} is out of range: the trace holds {self.n_batch} image(s)")
        decoder = decoder or self.decoder
        if decoder not in self.decoders():
            raise ValueError(f"decoder={decoder!r} is not available here; choices: {self.decoders()}"
                             " (a VAE decode needs vae= or a live trace.pipeline)")
        if (batch, decoder) in self._base:
            return self._base[(batch, decoder)]
        t, n = self.trace, self.n_steps
        out: dict[str, list[bytes]] = {}
        for panel in self.panels():
            if panel in ("x_t", "x0"):
                kind = "latents" if panel == "x_t" else "x0"
                imgs = previews(t, kind, list(range(n)), batch, decoder, self.vae, self.size)
                out[panel] = encode_many(imgs, self.fmt)
            else:
                if panel == "noise":
                    data = t.noise[:n, batch].float()
                else:
                    data = cfg_delta(t, batch=batch)[:n].float()
                rgb = self._linear(data)  # (S, 3, h, w)
                scale = self._scale(panel, rgb, batch)
                out[panel] = encode_many([signed_rgb(r, scale) for r in rgb], "png")
        self._base[(batch, decoder)] = out
        return out

    def image(self, batch: int = 0) -> bytes:
        """The pipeline's output image ``batch`` (resized to the display size)."""
        if batch not in self._image:
            images = getattr(self.trace, "images", None) or []
            if batch >= len(images):
                return b""
            im = images[batch].convert("RGB")
            if (im.size[1], im.size[0]) != self.size:
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            self._image[batch] = encode(im, self.fmt)
        return self._image[batch]

    # ---------------------------------------------------------------- heatmaps
    def heat(self, batch: int = 0, layers: str = "all",
             words: Sequence[WordChip] | None = None, maps: str = "attention",
             scale: str = "share") -> dict[str, dict]:
        """``{word key: {"steps": [bytes per recorded step], "sum": bytes}}`` for the words of
        prompt ``batch`` (concept maps: for the concepts) with the layer choice ``layers`` (a
        key of :func:`layer_options`) of the recorded maps ``maps`` (:data:`MAP_LABELS`).

        Word maps are min-max normalised (:data:`HEAT_NORMS`); concept maps are scaled by
        ``scale`` (:data:`CONCEPT_SCALES`: their share, fixed 0-1, or min-max) and, with two
        concepts or more, come with the :data:`WINNER` entry: the concept with the largest
        share at each pixel, in the colours of :meth:`winner_colours` (alpha fixed)."""
        if maps not in MAP_LABELS:
            raise ValueError(f"maps must be one of {tuple(MAP_LABELS)}, got {maps!r}")
        if getattr(self.trace, maps, None) is None:
            return {}
        keys = [k for k, _ in layer_options(self.trace, maps)]
        if layers not in keys:
            raise ValueError(f"layers={layers!r} is not a choice here; choices: {keys}")
        if maps == "concepts" and scale not in CONCEPT_SCALES:
            raise ValueError(f"scale must be one of {tuple(CONCEPT_SCALES)}, got {scale!r}")
        share = maps == "concepts" and scale == "share"
        cache_key = (batch, layers, maps, share)
        if cache_key in self._heat:
            return self._heat[cache_key]
        sel = layer_selector(layers)
        out: dict[str, dict] = {}
        for chip in (words if words is not None else chips_for(self.trace, batch, maps)):
            kw = dict(layers=sel, batch=batch, occurrence=chip.occurrence, size=self.heat_size,
                      maps=maps, normalize=not share)
            import warnings

            with warnings.catch_warnings():  # constant maps (e.g. a 1x1 layer) are fine here
                warnings.simplefilter("ignore", RuntimeWarning)
                if chip.tokens:
                    per = word_heatmap(self.trace, chip.text, per_step=True, **kw)
                    total = word_heatmap(self.trace, chip.text, per_step=False, **kw)
                else:  # a position chip (words unknown)
                    kw.pop("occurrence")
                    per = token_heatmap(self.trace, list(chip.positions), per_step=True, **kw)
                    total = token_heatmap(self.trace, list(chip.positions), per_step=False, **kw)
            rgba = heat_rgba(torch.cat([per, total[None]]), self.cmap, MAX_ALPHA)
            frames = encode_many(list(rgba), "png")
            out[chip.key] = {"steps": frames[:-1], "sum": frames[-1]}
        if maps == "concepts":
            win = self.winner(batch, layers)
            if win:
                out[WINNER] = win
        self._heat[cache_key] = out
        return out

    def winner_colours(self) -> list[tuple[str, str]]:
        """``[(concept, "#rrggbb")]``: the colour of each concept in the winner view."""
        maps = getattr(self.trace, "concepts", None)
        names = list(maps.concepts) if maps is not None else []
        return [(c, WINNER_COLOURS[i % len(WINNER_COLOURS)]) for i, c in enumerate(names)]

    def winner(self, batch: int = 0, layers: str = "all") -> dict[str, Any]:
        """The "winning concept per pixel" frames: ``{"steps": [bytes per recorded step],
        "sum": bytes}``, each pixel coloured by the concept of largest share (argmax of the
        concept maps, unnormalised); {} with fewer than two concepts."""
        cols = self.winner_colours()
        if len(cols) < 2:
            return {}
        if (batch, layers) in self._winner:  # the same for either concept scale
            return self._winner[(batch, layers)]
        sel = layer_selector(layers)
        kw = dict(layers=sel, batch=batch, size=self.heat_size, maps="concepts", normalize=False)
        per = torch.stack([word_heatmap(self.trace, c, per_step=True, **kw) for c, _ in cols])
        total = torch.stack([word_heatmap(self.trace, c, per_step=False, **kw) for c, _ in cols])
        idx = torch.cat([per.argmax(0), total.argmax(0)[None]]).numpy()  # (S + 1, H, W)
        lut = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] + [round(MAX_ALPHA * 255)]
                        for _, h in cols], np.uint8)
        frames = encode_many(list(lut[idx]), "png")
        self._winner[(batch, layers)] = {"steps": frames[:-1], "sum": frames[-1]}
        return self._winner[(batch, layers)]
