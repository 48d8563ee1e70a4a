"""``TraceViewer(trace)``: scrub the denoising steps of a traced run in a notebook.

Every frame (x_t, x0, the guided prediction (noise, or velocity for flow models), CFG delta per step; each word's heatmap per step and summed)
is encoded once in the kernel (:mod:`sdlens.widgets.frames`) and sent to the browser as binary
buffers; the step slider, play/pause, word chips and the per-step/summed toggle switch images in
the browser with no kernel round trip. Changing the layer choice or the batch item asks the kernel
once for that choice's frames (cached on both sides of the wire afterwards).

State lives in synced traitlets, so the kernel sees what the user did (``viewer.step``,
``viewer.word``, ...) and can drive the view (``viewer.step = 10``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anywidget
import traitlets

from sdlens.analysis.guidance import guidance_text, prediction_label
from sdlens.analysis.previews import linear_available
from sdlens.views.overlay import GREY_NOTE
from sdlens.views.widgets.frames import (CONCEPT_SCALES, DECODER_LABELS, MAP_LABELS, MAX_ALPHA,
                                         WINNER, TraceFrames, chips_for, colorbar_css,
                                         heat_norms, layer_options, map_options, panel_label,
                                         panel_notes)

_STATIC = Path(__file__).parent / "static"
HEAT_MODES = ("step", "sum")
OVERLAY_STYLES = ("fill", "outline")
#: The keyboard, as the panel's help line states it.
HELP = ("keys: ←/→ step · space play/pause · Home/End first/last step · click a word for its "
        "heatmap, point at it for the value")
#: A video trace's keyboard: the frame keys too.
HELP_VIDEO = HELP.replace("· click", "· ↑/↓ frame · click")


def describe_trace(trace: Any, batch: int = 0) -> str:
    """One line: prompt, seed, CFG ("guidance off" for an unguided run), steps, scheduler."""
    meta = getattr(trace, "meta", None) or {}
    prompts = getattr(trace, "prompts", None) or [""]
    prompt = prompts[batch] if batch < len(prompts) else prompts[0]
    parts = [repr(prompt) if prompt is not None
             else "prompt embeddings (words unknown: token positions shown)"]
    negs = getattr(trace, "negative_prompts", None) or []
    if batch < len(negs) and negs[batch]:
        parts.append(f"negative {negs[batch]!r}")
    seeds = meta.get("seeds")
    if seeds:
        parts.append(f"seed {seeds[batch] if batch < len(seeds) else seeds[0]}")
    parts.append(guidance_text(trace))
    parts.append(f"{len(trace.timesteps)} steps")
    sched = meta.get("scheduler_class") or meta.get("scheduler")
    if sched:
        parts.append(str(sched).replace("Scheduler", ""))
    return " · ".join(parts)


class TraceViewer(anywidget.AnyWidget):
    """Step scrubber for a trace: x_t, x0, the guided prediction (labelled as what the model
    predicts: noise, velocity, v or x0) and CFG delta side by side, the output
    image, and the prompt's words as chips that overlay their heatmap (at the current step, or
    summed over steps).

    Args:
        trace: a :class:`~sdlens.trace.Trace`.
        step: the step to show first (default: the last).
        word: a word to overlay from the start (as typed; None: no overlay).
        layers: layer choice for heatmaps (``"all"``, ``"res:16"``, ``"up"``, a module path;
            see :attr:`layer_options`).
        batch: which image of the batch.
        heat_mode: ``"step"`` (the map at the current step) or ``"sum"`` (summed over steps).
        maps: which recorded maps the chips overlay: ``"attention"`` (the words' attention
            maps), ``"concepts"`` (the concept maps of a trace made with ``concepts=[...]``: one
            chip per concept, in the prompt or not) or ``"image_to_text"`` (the words'
            image->text maps); :attr:`maps_options` lists what the trace holds, the "maps"
            menu switches in the browser.
        concept_scale: how concept maps are coloured: ``"share"`` (the default: each patch's
            share among the concepts on the fixed 0-1 scale, as :func:`sdlens.plot.concept_maps`
            shows them) or ``"minmax"`` (each map stretched min-max, as word heatmaps are; the
            legend says so). Beside the concepts' chips, "winning concept per pixel" colours
            each pixel by the concept of largest share.
        max_side, heat_side, decoder, vae, fmt, cmap: frame rendering, see
            :class:`~sdlens.widgets.frames.TraceFrames`.
        fps: playback speed.
        frame: a video trace's latent frame to show first (its frame slider, beside the step
            slider, and ↑ / ↓ move it; ``viewer.frame``).
        grey: under a filled heatmap, the x0 and image panels in grey (their luminance: the
            heat's hue never meets the object's, a red map on a red object still reads; the
            legend says so); False, or the "grey image" box, shows them in colour.

    In the browser: ←/→ step, space plays / pauses, Home / End go to the first / last step (the
    panel keeps these keys: JupyterLab does not see them). Steps show as 1..N, as diffusers'
    progress bar counts them (``step`` is the index, 0..N-1). x_t and x0 say how they are
    decoded ("linear preview" or "VAE decode"; ``decoder`` switches, a VAE decode is made on
    first use when the trace's pipeline or ``vae=`` is at hand). Under the panels, the heat
    legend: colour bar, the normalisation in words, the value under the pointer;
    ``overlay_style`` ``"fill"`` or ``"outline"`` (contours at 0.25 / 0.5 / 0.75). ``notes``
    say why a panel or the word chips are missing.
    """

    # the sources as text, not paths: anywidget connects every instance of a path-based widget
    # to a file-watch signal with a strong reference, which would keep each closed viewer (and
    # its trace) alive; a GridViewer over a large sweep opens and closes many
    _esm = (_STATIC / "trace_viewer.js").read_text()
    _css = (_STATIC / "sdlens.css").read_text()

    # what the view shows (kernel -> browser)
    title = traitlets.Unicode("").tag(sync=True)
    n_steps = traitlets.Int(0).tag(sync=True)
    timesteps = traitlets.List(traitlets.Float()).tag(sync=True)
    panels = traitlets.List(traitlets.Dict()).tag(sync=True)
    frames = traitlets.Dict().tag(sync=True)  # panel -> [bytes per step]  (binary buffers)
    image = traitlets.Bytes(b"").tag(sync=True)
    words = traitlets.List(traitlets.Dict()).tag(sync=True)
    heat = traitlets.Dict().tag(sync=True)  # word key -> {"steps": [bytes], "sum": bytes}
    heat_index = traitlets.List(traitlets.Int()).tag(sync=True)
    layer_options = traitlets.List(traitlets.List()).tag(sync=True)
    batch_options = traitlets.List(traitlets.List()).tag(sync=True)
    notes = traitlets.List(traitlets.Unicode()).tag(sync=True)
    display_px = traitlets.Int(160).tag(sync=True)

    n_frames = traitlets.Int(1).tag(sync=True)  # latent frames (a video trace); 1: an image

    # what the user does (browser <-> kernel)
    step = traitlets.Int(0).tag(sync=True)
    frame = traitlets.Int(0).tag(sync=True)  # a video trace's latent frame
    playing = traitlets.Bool(False).tag(sync=True)
    fps = traitlets.Int(8).tag(sync=True)
    word = traitlets.Unicode("").tag(sync=True)
    heat_mode = traitlets.Unicode("step").tag(sync=True)
    # low enough that the object's own shading stays readable under the heat colours
    opacity = traitlets.Float(0.45).tag(sync=True)
    # the x0 / image panels in grey under a filled heat: the heat's hue never meets the
    # object's (sdlens.views.overlay); False shows them in colour
    grey = traitlets.Bool(True).tag(sync=True)
    grey_note = traitlets.Unicode(GREY_NOTE).tag(sync=True)
    overlay_style = traitlets.Unicode("fill").tag(sync=True)
    decoder = traitlets.Unicode("linear").tag(sync=True)
    decoder_options = traitlets.List(traitlets.List()).tag(sync=True)
    colorbar = traitlets.Unicode("").tag(sync=True)
    heat_norms = traitlets.Dict().tag(sync=True)  # mode -> the legend's words for the scale
    concept_scale = traitlets.Unicode("share").tag(sync=True)
    concept_scale_options = traitlets.List(traitlets.List()).tag(sync=True)
    winner_key = traitlets.Unicode(WINNER).tag(sync=True)
    max_alpha = traitlets.Float(MAX_ALPHA).tag(sync=True)
    help = traitlets.Unicode(HELP).tag(sync=True)
    layers = traitlets.Unicode("all").tag(sync=True)
    maps = traitlets.Unicode("attention").tag(sync=True)
    maps_options = traitlets.List(traitlets.List()).tag(sync=True)
    batch = traitlets.Int(0).tag(sync=True)
    loading = traitlets.Bool(False).tag(sync=True)

    def __init__(self, trace: Any, step: int = -1, word: str | None = None, layers: str = "all",
                 batch: int = 0, heat_mode: str = "step", max_side: int = 256,
                 heat_side: int = 128, decoder: str = "auto", vae: Any = None, fmt: str = "auto",
                 cmap: str = "jet", fps: int = 8, display_px: int = 160, maps: str = "attention",
                 frame: int = 0, concept_scale: str = "share", grey: bool = True, **kwargs: Any):
        if trace is None or getattr(trace, "timesteps", None) is None:
            raise TypeError(f"TraceViewer needs a Trace, got {type(trace).__name__}")
        self._frames = TraceFrames(trace, max_side, heat_side, decoder, vae, fmt, cmap)
        fr = self._frames
        n = fr.n_steps
        if heat_mode not in HEAT_MODES:
            raise ValueError(f"heat_mode must be one of {HEAT_MODES}, got {heat_mode!r}")
        if not isinstance(step, int) or not -n <= step < n:
            raise ValueError(f"step={step!r} is out of range: the trace has {n} steps (indices "
                             f"0..{n - 1}, shown as 1..{n}; negative counts from the end)")
        if not isinstance(frame, int) or isinstance(frame, bool) or \
                not -fr.n_frames <= frame < fr.n_frames:
            raise ValueError(f"frame={frame!r} is out of range: the trace has {fr.n_frames} "
                             f"latent frame(s) (0..{fr.n_frames - 1})")
        if not isinstance(batch, int) or not 0 <= batch < fr.n_batch:
            raise ValueError(f"batch={batch!r} is out of range: the trace holds {fr.n_batch} image(s)")
        kinds = map_options(trace)
        if maps not in MAP_LABELS:
            raise ValueError(f"maps must be one of {tuple(MAP_LABELS)}, got {maps!r}")
        if kinds and maps not in dict(kinds):
            raise ValueError(f"maps={maps!r}: this trace holds no {MAP_LABELS[maps]}; it holds "
                             f"{[k for k, _ in kinds]}")
        if concept_scale not in CONCEPT_SCALES:
            raise ValueError(f"concept_scale must be one of {tuple(CONCEPT_SCALES)}, got "
                             f"{concept_scale!r}")
        opts = layer_options(trace, maps)
        keys = [k for k, _ in opts]
        if opts and layers not in keys:
            raise ValueError(f"layers={layers!r} is not a choice for this trace; choices: {keys}")
        super().__init__(**kwargs)
        self.trace = trace
        prompts = list(getattr(trace, "prompts", None) or [])
        with self.hold_trait_notifications():
            self.n_steps = n
            self.n_frames = fr.n_frames
            self.frame = frame % fr.n_frames
            if fr.n_frames > 1:
                self.help = HELP_VIDEO
            self.timesteps = [float(v) for v in trace.timesteps]
            self.decoder = fr.decoder  # "auto" resolved (the VAE decode where it is cheap)
            self.decoder_options = [[d, DECODER_LABELS.get(d, d)] for d in fr.decoders()]
            self.panels = self._panel_specs()
            self.colorbar = colorbar_css(cmap)
            self.maps_options = [[k, label] for k, label in kinds]
            self.maps = maps
            self.concept_scale = concept_scale
            self.concept_scale_options = [[k, label] for k, label in CONCEPT_SCALES.items()]
            self.heat_norms = heat_norms(maps, concept_scale)
            self.heat_index = fr.heat_index(maps)
            self.layer_options = [[k, label] for k, label in opts]
            self.batch_options = [[i, f"{i}: {prompts[i] if i < len(prompts) else ''}"[:80]]
                                  for i in range(fr.n_batch)]
            self.notes = panel_notes(trace, batch)
            self.fps = int(fps)
            self.display_px = int(display_px)
            self.heat_mode = heat_mode
            self.layers = layers if opts else "all"
            self.batch = batch
            self.step = step % n
            self.grey = bool(grey)
        self._load_batch()
        if word:
            self.select_word(word)
        self.observe(self._on_batch, names="batch")
        self.observe(self._on_layers, names="layers")
        self.observe(self._on_maps, names="maps")
        self.observe(self._on_decoder, names="decoder")
        self.observe(self._on_scale, names="concept_scale")

    def _panel_specs(self) -> list[dict]:
        pred = prediction_label(self.trace)
        lin = linear_available(self.trace, self._frames.vae)
        return [{"name": p, "label": panel_label(p, self.decoder, pred, lin)}
                for p in self._frames.panels()]

    # ---------------------------------------------------------------- loading
    def _load_batch(self) -> None:
        fr, b = self._frames, self.batch
        self.loading = True
        try:
            chips = chips_for(self.trace, b, self.maps)
            frames = fr.base(b, self.decoder)
            heat = fr.heat(b, self.layers, chips, self.maps, self.concept_scale) if chips else {}
            words = [c.to_dict() for c in chips]
            if WINNER in heat:  # concept maps: the winner view, beside the concepts' chips
                words.append({"key": WINNER, "text": "winning concept per pixel", "winner": True,
                              "colors": [list(c) for c in fr.winner_colours()],
                              "occurrence": 0, "positions": [], "tokens": [], "encoders": []})
            with self.hold_trait_notifications():
                self.title = describe_trace(self.trace, b)
                self.notes = panel_notes(self.trace, b)
                self.frames = frames
                self.image = fr.image(b)
                self.words = words
                self.heat_norms = heat_norms(self.maps, self.concept_scale)
                self.heat = heat
                if self.word and self.word not in heat:
                    self.word = ""
        finally:
            self.loading = False

    def _on_batch(self, change: dict) -> None:
        if not 0 <= change["new"] < self._frames.n_batch:
            self.batch = change["old"]
            raise ValueError(f"batch={change['new']} is out of range: the trace holds "
                             f"{self._frames.n_batch} image(s)")
        self._load_batch()

    def _on_layers(self, change: dict) -> None:
        keys = [k for k, _ in self.layer_options]
        if change["new"] not in keys:
            self.layers = change["old"]
            raise ValueError(f"layers={change['new']!r} is not a choice; choices: {keys}")
        self._load_batch()

    def _on_maps(self, change: dict) -> None:
        kinds = [k for k, _ in self.maps_options]
        if change["new"] not in kinds:
            self.maps = change["old"]
            raise ValueError(f"maps={change['new']!r} is not a choice for this trace; choices: "
                             f"{kinds}")
        opts = layer_options(self.trace, change["new"])
        with self.hold_trait_notifications():
            self.layer_options = [[k, label] for k, label in opts]
            self.heat_index = self._frames.heat_index(change["new"])
            if self.layers not in {k for k, _ in opts}:
                self.layers = "all"  # the other maps' layers (concept maps: their own blocks)
        self._load_batch()

    def _on_scale(self, change: dict) -> None:
        if change["new"] not in CONCEPT_SCALES:
            self.concept_scale = change["old"]
            raise ValueError(f"concept_scale={change['new']!r} is not a choice; choices: "
                             f"{tuple(CONCEPT_SCALES)}")
        if self.maps == "concepts":
            self._load_batch()
        else:
            self.heat_norms = heat_norms(self.maps, change["new"])

    def _on_decoder(self, change: dict) -> None:
        if change["new"] not in self._frames.decoders():
            self.decoder = change["old"]
            raise ValueError(f"decoder={change['new']!r} is not available; choices: "
                             f"{self._frames.decoders()} (a VAE decode needs vae= or a live "
                             "trace.pipeline)")
        self.loading = True
        try:
            frames = self._frames.base(self.batch, change["new"])  # decoded once, then cached
            with self.hold_trait_notifications():
                self.frames = frames
                self.panels = self._panel_specs()
        finally:
            self.loading = False

    @traitlets.validate("overlay_style")
    def _valid_style(self, proposal: dict) -> str:
        if proposal["value"] not in OVERLAY_STYLES:
            raise traitlets.TraitError(f"overlay_style must be one of {OVERLAY_STYLES}, got "
                                       f"{proposal['value']!r}")
        return proposal["value"]

    @traitlets.validate("step")
    def _valid_step(self, proposal: dict) -> int:
        v = int(proposal["value"])
        n = self.n_steps
        if n and not 0 <= v < n:
            raise traitlets.TraitError(f"step={v} is out of range 0..{n - 1} (shown as 1..{n})")
        return v

    @traitlets.validate("frame")
    def _valid_frame(self, proposal: dict) -> int:
        v = int(proposal["value"])
        n = self.n_frames
        if not 0 <= v < max(n, 1):
            raise traitlets.TraitError(f"frame={v} is out of range 0..{n - 1} (latent frames)")
        return v

    @traitlets.validate("heat_mode")
    def _valid_mode(self, proposal: dict) -> str:
        if proposal["value"] not in HEAT_MODES:
            raise traitlets.TraitError(f"heat_mode must be one of {HEAT_MODES}, got {proposal['value']!r}")
        return proposal["value"]

    @traitlets.validate("word")
    def _valid_word(self, proposal: dict) -> str:
        v = proposal["value"]
        if v and self.words and v not in {w["key"] for w in self.words}:
            raise traitlets.TraitError(f"word {v!r} is not a word of the prompt; words: "
                                       f"{[w['key'] for w in self.words]}")
        return v

    # ---------------------------------------------------------------- API
    @property
    def trace_frames(self) -> TraceFrames:
        """The frame renderer of this viewer (sizes, decoders, cached frames)."""
        return self._frames

    @property
    def word_keys(self) -> list[str]:
        return [w["key"] for w in self.words]

    def select_word(self, word: str | None) -> None:
        """Overlay ``word``'s heatmap (as typed, case-insensitive; None or '' clears); clicking a
        chip in the browser does the same."""
        if not word:
            self.word = ""
            return
        keys = self.word_keys
        if word in keys:
            self.word = word
            return
        low = {k.lower(): k for k in keys}
        if word.lower() in low:
            self.word = low[word.lower()]
            return
        if self.maps == "concepts":
            raise ValueError(f"{word!r} is not a recorded concept; concepts: {keys}")
        raise ValueError(f"{word!r} is not a word of prompt {self.batch}; words: {keys}")

    def overlay(self, step: int | None = None) -> bytes | None:
        """The heatmap frame overlaid now (or at ``step``): None without a selected word."""
        if not self.word or self.word not in self.heat:
            return None
        h = self.heat[self.word]
        if self.heat_mode == "sum":
            return h["sum_frames"][self.frame] if "sum_frames" in h else h["sum"]
        i = self.heat_index[self.step if step is None else step]
        return h["steps"][i * self.n_frames + self.frame] if i >= 0 else None

    def displayed(self) -> dict[str, bytes | None]:
        """What the view shows at the current state: ``{panel: frame bytes, "image": ...,
        "overlay": heatmap bytes or None}`` (the browser shows the same frames)."""
        at = self.step * self.n_frames + self.frame  # video: step-major (step, frame)
        out: dict[str, bytes | None] = {p: self.frames[p][at] for p in self.frames}
        out["image"] = self.image
        out["overlay"] = self.overlay()
        return out

    def frame_bytes(self) -> int:
        """Bytes of encoded frames currently held by the view (what went over the wire)."""
        n = sum(len(b) for fr in self.frames.values() for b in fr) + len(self.image)
        n += sum(len(b) for h in self.heat.values() for b in h["steps"]) + \
            sum(sum(map(len, h.get("sum_frames") or [h["sum"]])) for h in self.heat.values())
        return n

    def play(self) -> None:
        self.playing = True

    def pause(self) -> None:
        self.playing = False
