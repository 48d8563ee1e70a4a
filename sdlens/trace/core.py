"""``Trace``: everything recorded during one pipeline call; save / load (safetensors + JSON).

Shapes (all tensors on the CPU; ``steps`` = number of ``scheduler.step`` calls, which is
``num_inference_steps`` for most schedulers, fewer for img2img/inpaint with ``strength < 1``, and
about twice as many for Heun / KDPM2, whose every step calls the denoiser twice):

==========================  ====================================  =========================================
``images``                  list[PIL.Image]                       the pipeline's output images (empty for
                                                                  ``output_type="latent"``)
``prompts``                 list[str | None]                      one per batch item (after
                                                                  ``num_images_per_prompt``); None if the
                                                                  prompt was given as embeddings
``negative_prompts``        list[str | None]                      likewise
``token_ids`` / ``tokens``  list[list[int]] / list[list[str]]     start token, prompt tokens, end token
``truncated_words``         list[list[str]]                       words cut by the 77-token limit
``timesteps``               (steps,) float32                      the timestep of every step
``sigmas``                  (steps,) float32 or None              sigma the model was evaluated at
                                                                  (sigma-based schedulers only)
``latents``                 (steps+1, batch, C, h, w) float32     x_T ... x_0 as the pipeline held them;
                            video (Wan): (steps+1, batch, C,      ``meta["latent_frames"]`` frames F
                            F, h, w), and noise / x0 likewise     (``meta["vae_scale_factor_temporal"]``)
                                                                  ``latents[-1]`` is what was decoded
``noise_uncond``            (steps, batch, C, h, w) or None       None when guidance is off
``noise_text``              (steps, batch, C, h, w)
``noise``                   (steps, batch, C, h, w)               the guided prediction the scheduler used
``x0``                      (steps, batch, C, h, w)               predicted clean latent (sdlens computes it)
``attention``               AttentionMaps, per layer              :class:`~sdlens.trace.maps.AttentionMaps`;
                            (steps', batch, tokens, h, w)         steps' = its recorded steps; heads kept:
                                                                  (steps', batch, heads, tokens, h, w);
                                                                  float maps, stored as 4-bit codes + per-
                                                                  map scales by default (decoded on access);
                                                                  video: (.., tokens, F, h, w)
``concepts``                ConceptMaps, per layer or None        concept maps (``concepts=[...]``, joint
                            (steps', batch, concepts, h, w)       attention): a softmax over the concepts
``image_to_text``           AttentionMaps, per layer or None      (``record`` "image_to_text", joint
                            (steps', batch, tokens, h, w)         attention) each text token's attention
                                                                  to each image patch
``guidance_scale``          float; ``do_cfg``: bool
``prediction_type``         str                                   what ``noise`` holds: epsilon,
                                                                  v_prediction, sample or flow (velocity)
``text_segments``           list[list[dict]] or None              several text encoders (SD3): each
                                                                  encoder's positions in the text sequence
``meta``                    dict                                  model id, family, task, pipeline and
                                                                  scheduler class + config, prediction type,
                                                                  VAE scaling factor, height, width, seeds,
                                                                  steps, versions, options
==========================  ====================================  =========================================

Tensors that were not recorded (``RecordOptions.record``) are None. Every trace is made by
:meth:`Trace.build`, which takes exactly these fields and checks the shapes; the operations of
:mod:`sdlens.trace.ops` (select batch items, slice or join steps, replace fields) build on it.

Storage: without classifier-free guidance ``noise_text`` *is* ``noise`` (the same tensor,
held and written once); maps recorded as codes
(:mod:`sdlens.trace.compact`) stay codes until read. :meth:`Trace.nbytes` says what is held.

File format (one file, no pickle): a safetensors file whose tensors are ``latents``, ``noise``,
..., ``attention/<layer>`` (``concepts/<layer>``, ``image_to_text/<layer>`` where recorded: the
JSON keys ``concepts`` / ``image_to_text`` are absent otherwise, as in files written before
them; ``concepts`` holds the method and its default layers / steps, "sdlens" and all in files
written before the choice) and ``images/<i>`` (PNG bytes as uint8), and whose ``__metadata__``
holds ``format = "sdlens.trace"``, ``format_version`` and ``sdlens`` (a JSON document with
everything else). Maps stored as codes (format version 2) are two tensors, ``<name>`` (the uint8
codes) and ``<name>/scale`` (float32), listed in the document's ``"compact"`` (name -> bits and
logical shape); a tensor written once for two fields is named in ``"aliases"`` (field -> the
tensor it shares). Version 1 files (float maps, every tensor written) load as they are. Loading
reads only the header; tensors are read on first access. :meth:`Trace.to_bytes` /
:meth:`Trace.from_bytes` are the same file in memory.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch

from sdlens.trace.compact import CompactMaps, maps_nbytes
from sdlens.trace.maps import AttentionMaps, ConceptMaps, ReferenceMaps

FORMAT = "sdlens.trace"
FORMAT_VERSION = 2  # 2: maps as codes + scales ("compact"), shared tensors ("aliases")


class Trace:
    """The record of one traced pipeline call (see the module docstring for every field).

    Created by :func:`sdlens.trace` / :func:`sdlens.generate` or :func:`load`. Every producer
    of a new trace (the recorder, sweep cells, the refiner join, the operations of
    :mod:`sdlens.trace.ops`, test fakes) goes through :meth:`build`, which checks the shapes;
    ``Trace(...)`` itself only holds storage (``load`` reads files into it lazily). Inside
    ``with sdlens.trace(pipe) as tr:`` the object ``tr`` shows the *last* call made in the
    block; ``tr.runs`` lists the traces of all calls, in order.
    """

    #: How a notebook shows a Trace: ``hook(trace, include=, exclude=) -> mimebundle``; None shows
    #: the repr. The Trace imports no views: the front door ``sdlens`` sets it (a TraceViewer).
    display_hook: ClassVar[Callable[..., Any] | None] = None

    def __init__(self, tensors: dict[str, Any] | None = None, info: dict | None = None,
                 images: list | Callable[[], list] | None = None, pipeline=None,
                 source: str | None = None):
        self._tensors = dict(tensors or {})
        self._cache: dict[str, torch.Tensor] = {}
        self._info = info
        self._images = images
        self._pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None
        self._attention: AttentionMaps | None = None
        self._concepts: ConceptMaps | None = None
        self._image_to_text: AttentionMaps | None = None
        self._reference_maps: ReferenceMaps | None = None
        self._source = source
        self._runs: list[Trace] | None = None

    @classmethod
    def build(cls, *, prompts: Sequence, negative_prompts: Sequence, token_ids: Sequence,
              tokens: Sequence, truncated_words: Sequence, timesteps: torch.Tensor,
              sigmas: torch.Tensor | None = None, latents: torch.Tensor | None = None,
              noise_uncond: torch.Tensor | None = None, noise_text: torch.Tensor | None = None,
              noise: torch.Tensor | None = None, x0: torch.Tensor | None = None,
              attention: AttentionMaps | None = None, guidance_scale: float, do_cfg: bool,
              meta: dict, images: list | Callable[[], list] = (), pipeline=None,
              extra_tensors: dict | None = None, extra_info: dict | None = None,
              concepts: ConceptMaps | None = None,
              image_to_text: AttentionMaps | None = None) -> "Trace":
        """THE constructor of a trace from the contract's fields (module docstring), shapes
        checked (ValueError names the field): with ``steps = len(timesteps)`` and ``batch =
        len(prompts)``, ``sigmas`` (steps,), ``latents`` (steps+1, batch, C, h, w), ``noise*`` /
        ``x0`` (steps, batch, C, h, w), each layer of ``attention`` (len(attention.steps), batch,
        [heads,] len(attention.token_positions), h, w) with its recorded steps in 0..steps-1;
        ``image_to_text`` likewise, ``concepts`` (len(concepts.steps), batch,
        len(concepts.concepts), h, w) (both optional: joint-attention models only).

        ``images`` may be a zero-argument callable (read on first access) and the maps of
        ``attention`` may be unloaded (checked when loaded). ``extra_tensors`` (name -> tensor or
        loader) and ``extra_info`` (JSON-able) travel with the trace and its file unchecked
        (e.g. the refiner part of a combined base + refiner trace, sdlens.experiments.refiner).
        """
        steps = int(len(timesteps))
        batch = len(prompts)
        for name, value in (("negative_prompts", negative_prompts), ("token_ids", token_ids),
                            ("tokens", tokens), ("truncated_words", truncated_words)):
            if len(value) != batch:
                raise ValueError(f"Trace.build: {name} has {len(value)} entries, prompts {batch}")
        tensors: dict[str, Any] = {"timesteps": _checked("timesteps", timesteps, (steps,))}
        tensors["sigmas"] = _checked("sigmas", sigmas, (steps,))
        # a video trace (meta "latent_frames", e.g. Wan) has a frame axis: (.., C, F, h, w)
        frames = meta.get("latent_frames") if isinstance(meta, dict) else None
        ndim = 5 if frames is None else 6
        tensors["latents"] = _checked("latents", latents, (steps + 1, batch), ndim)
        for name, t in (("noise_uncond", noise_uncond), ("noise_text", noise_text),
                        ("noise", noise), ("x0", x0)):
            tensors[name] = _checked(name, t, (steps, batch), ndim)
        if frames is not None:
            for name in ("latents", "noise_uncond", "noise_text", "noise", "x0"):
                _checked(name, tensors[name], (None, None, None, int(frames)), ndim)
        if _same_values(tensors["noise_text"], tensors["noise"]):  # no CFG: hold them once
            tensors["noise_text"] = tensors["noise"]
        maps_info = {kind: _maps_info(kind, maps, steps, batch, tensors)
                     for kind, maps in (("attention", attention), ("concepts", concepts),
                                        ("image_to_text", image_to_text))}
        if maps_info["concepts"] is not None:
            maps_info["concepts"]["concepts"] = list(concepts.concepts)
            maps_info["concepts"].update(concepts.info())
        tensors.update(extra_tensors or {})
        info = {"prompts": list(prompts), "negative_prompts": list(negative_prompts),
                "token_ids": [list(t) for t in token_ids], "tokens": [list(t) for t in tokens],
                "truncated_words": [list(t) for t in truncated_words],
                "guidance_scale": float(guidance_scale), "do_cfg": bool(do_cfg),
                "num_steps": steps, "attention": maps_info["attention"], "meta": meta,
                # optional (joint attention only): absent from files that have none
                **{k: v for k, v in maps_info.items() if k != "attention" and v is not None},
                **(extra_info or {})}
        return cls(tensors, info, images if callable(images) else list(images), pipeline)

    def fields(self) -> dict:
        """The keyword arguments of :meth:`build` that make this trace again (tensors are read;
        attention maps and images stay unloaded; ``meta`` is a copy)."""
        info = self._require()
        extra_tensors = {k: v for k, v in self._tensors.items() if k not in _TENSOR_FIELDS
                         and not k.startswith(tuple(f"{m}/" for m in _MAPS + ("images",)))}
        images = self._images
        return {**{k: getattr(self, k) for k in _INFO_FIELDS + _TENSOR_FIELDS + _MAPS},
                "meta": self.meta,
                "images": images if callable(images) else list(images or []),
                "pipeline": self.pipeline, "extra_tensors": extra_tensors,
                "extra_info": {k: v for k, v in info.items() if k not in _BUILT_KEYS}}

    # ------------------------------------------------------------------ plumbing
    def _require(self) -> dict:
        if self._info is None:
            raise RuntimeError("this trace is empty: no pipeline call was recorded inside "
                               "`with sdlens.trace(pipe) as tr:` (call pipe(...) inside the block)")
        return self._info

    def _adopt(self, other: "Trace") -> None:
        """Become a view of ``other`` (used for the live object of ``sdlens.trace``)."""
        self._tensors, self._cache, self._info = other._tensors, other._cache, other._info
        self._images, self._pipeline_ref = other._images, other._pipeline_ref
        self._attention, self._source = other._attention, other._source
        self._concepts, self._image_to_text = other._concepts, other._image_to_text
        self._reference_maps = other._reference_maps

    def _tensor(self, name: str) -> torch.Tensor | None:
        self._require()
        if name in self._cache:
            return self._cache[name]
        src = self._tensors.get(name)
        if src is None:
            return None
        t = src() if callable(src) else src
        self._cache[name] = t
        return t

    @property
    def runs(self) -> list["Trace"]:
        """All calls recorded by the ``with sdlens.trace(...)`` block (a single trace: [self])."""
        return list(self._runs) if self._runs is not None else [self]

    # ------------------------------------------------------------------ fields
    @property
    def images(self) -> list:
        """list[PIL.Image]: the pipeline's output images."""
        self._require()
        if callable(self._images):
            self._images = self._images()
        return list(self._images or [])

    @property
    def prompts(self) -> list:
        return list(self._require()["prompts"])

    @property
    def negative_prompts(self) -> list:
        return list(self._require()["negative_prompts"])

    @property
    def token_ids(self) -> list[list[int]]:
        return [list(t) for t in self._require()["token_ids"]]

    @property
    def tokens(self) -> list[list[str]]:
        return [list(t) for t in self._require()["tokens"]]

    @property
    def truncated_words(self) -> list[list[str]]:
        return [list(t) for t in self._require()["truncated_words"]]

    @property
    def timesteps(self) -> torch.Tensor:
        """(steps,) float32."""
        return self._tensor("timesteps")

    @property
    def sigmas(self) -> torch.Tensor | None:
        """(steps,) float32, or None for schedulers without sigmas."""
        return self._tensor("sigmas")

    @property
    def latents(self) -> torch.Tensor | None:
        """(steps+1, batch, C, h, w) float32."""
        return self._tensor("latents")

    @property
    def noise_uncond(self) -> torch.Tensor | None:
        """(steps, batch, C, h, w) float32; None when guidance is off."""
        return self._tensor("noise_uncond")

    @property
    def noise_text(self) -> torch.Tensor | None:
        """(steps, batch, C, h, w) float32."""
        return self._tensor("noise_text")

    @property
    def noise(self) -> torch.Tensor | None:
        """(steps, batch, C, h, w) float32: the guided prediction the scheduler received."""
        return self._tensor("noise")

    @property
    def x0(self) -> torch.Tensor | None:
        """(steps, batch, C, h, w) float32: predicted clean latent."""
        return self._tensor("x0")

    @property
    def attention(self) -> AttentionMaps | None:
        """Cross-attention maps (None if attention was not recorded)."""
        info = self._require()
        att = info.get("attention")
        if att is None:
            return None
        if self._attention is None:
            self._attention = self._token_maps(info, "attention")
        return self._attention

    @property
    def concepts(self) -> ConceptMaps | None:
        """Concept maps (``sdlens.trace(pipe, concepts=[...])``; ConceptAttention's method,
        :mod:`sdlens.engine.joint`): per site (steps, batch, concepts, h, w), each patch's
        softmax over the concepts (``.method``: "conceptattention" or "sdlens", with its
        default layers / steps for the heatmap); None when no concepts were given."""
        info = self._require()
        c = info.get("concepts")
        if c is None:
            return None
        if self._concepts is None:
            self._concepts = ConceptMaps(
                {l: self._tensors[f"concepts/{l}"] for l in c["layers"]},
                {l: tuple(r) for l, r in c["resolutions"].items()}, c["steps"], c["concepts"],
                family=info.get("meta", {}).get("family"), dtype=c.get("dtype"),
                n_steps=len(self.timesteps), method=c.get("method", "sdlens"),
                default_layers=c.get("default_layers"), default_steps=c.get("default_steps"))
        return self._concepts

    @property
    def reference_maps(self) -> ReferenceMaps | None:
        """Reference maps of an editing model (``record=(..., "reference_maps")``; see
        :class:`sdlens.trace.maps.ReferenceMaps`): per site (steps, batch, reference patches,
        h, w), each output patch's attention on each reference image's patches. None when not
        recorded (or the call had no reference image)."""
        info = self._require()
        m = info.get("reference_maps")
        if m is None:
            return None
        if self._reference_maps is None:
            self._reference_maps = ReferenceMaps(
                {l: self._tensors[f"reference_maps/{l}"] for l in m["layers"]},
                {l: tuple(r) for l, r in m["resolutions"].items()}, m["steps"], m["grids"],
                family=info.get("meta", {}).get("family"), dtype=m.get("dtype"),
                n_steps=len(self.timesteps))
        return self._reference_maps

    @property
    def image_to_text(self) -> AttentionMaps | None:
        """Image->text maps (``record`` with ``"image_to_text"``, joint attention only): per
        site (steps, batch, tokens, h, w), each text token's attention to each image patch (its
        query's softmax over [image; text] keys, the image columns: a token's map sums to its
        image share); tokens, words and selectors as :attr:`attention`'s. None when not
        recorded."""
        info = self._require()
        m = info.get("image_to_text")
        if m is None:
            return None
        if self._image_to_text is None:
            self._image_to_text = self._token_maps(info, "image_to_text")
        return self._image_to_text

    def _token_maps(self, info: dict, kind: str) -> AttentionMaps:
        """The per-token maps recorded under ``kind`` ("attention", "image_to_text"): their
        tensors, resolutions, steps, token positions and heads, with the trace's tokens."""
        m = info[kind]
        return AttentionMaps(
            {l: self._tensors[f"{kind}/{l}"] for l in m["layers"]},
            {l: tuple(r) for l, r in m["resolutions"].items()}, m["steps"],
            m["token_positions"], m["heads"],
            info["tokens"] if info.get("tokens") and all(info["tokens"]) else None,
            family=info.get("meta", {}).get("family"), dtype=m.get("dtype"),
            n_steps=len(self.timesteps), segments=info.get("text_segments"))

    @property
    def text_segments(self) -> list[list[dict]] | None:
        """Per batch item, the text encoders' segments of the text sequence (models of several
        text encoders, SD3: ``[{"encoder": "clip", "start": 0, "length": 77, "tokens": n},
        {"encoder": "t5", "start": 77, "length": 256, "tokens": m}]``, see
        :mod:`sdlens.analysis.tokens`); None where the backbone has one text encoder without
        segments (the UNet models, PixArt, Sana)."""
        segs = self._require().get("text_segments")
        return None if segs is None else [[dict(s) for s in item] for item in segs]

    @property
    def prediction_type(self) -> str:
        """What ``noise`` / ``noise_text`` / ``noise_uncond`` hold: "epsilon" (noise),
        "v_prediction", "sample" (x0 itself) or "flow" (the velocity of flow matching, SD3)."""
        return str(self._require()["meta"].get("prediction_type") or "epsilon")

    @property
    def guidance_scale(self) -> float:
        return float(self._require()["guidance_scale"])

    @property
    def do_cfg(self) -> bool:
        return bool(self._require()["do_cfg"])

    @property
    def meta(self) -> dict:
        return json.loads(json.dumps(_jsonable(self._require()["meta"])))

    @property
    def num_steps(self) -> int:
        """Number of recorded steps (``scheduler.step`` calls)."""
        info = self._require()
        if "num_steps" in info:
            return int(info["num_steps"])
        return int(len(self.timesteps))

    @property
    def batch_size(self) -> int:
        return len(self._require()["prompts"])

    @property
    def pipeline(self):
        """The traced pipeline while it is alive in this session; None after :func:`load`."""
        return self._pipeline_ref() if self._pipeline_ref is not None else None

    def nbytes(self) -> dict[str, int]:
        """Host bytes the trace's tensors hold, per kind of data ("latents", "noise" (with
        ``noise_text`` / ``noise_uncond``), "x0", "attention", "concepts", "image_to_text",
        "other"), as stored (maps as codes, a shared tensor counted once); reads a loaded
        trace's tensors. :func:`sdlens.engine.options.estimate_trace_bytes` predicts it."""
        out = {k: 0 for k in ("latents", "noise", "x0") + _MAPS + ("other",)}
        seen: set[int] = set()
        for name in self._tensors:
            if name.startswith("images/"):
                continue
            t = self._tensor(name)
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            kind = name.split("/")[0] if "/" in name else name
            kind = "noise" if kind.startswith("noise") else kind
            kind = kind if kind in out else "other"
            out[kind] += maps_nbytes(t)
        return out

    def heatmap(self, word, **kwargs):
        """Word heatmap; see :func:`sdlens.analysis.heatmaps.word_heatmap` (all keyword arguments go there)."""
        from sdlens.analysis.heatmaps import word_heatmap

        return word_heatmap(self, word, **kwargs)

    def _repr_mimebundle_(self, include=None, exclude=None):
        """Notebook display through :attr:`display_hook`."""
        hook = type(self).display_hook  # read off the class: the plain function, not bound to self
        if hook is None:
            return {"text/plain": repr(self)}
        return hook(self, include=include, exclude=exclude)

    def __repr__(self) -> str:
        if self._info is None:
            return "Trace(empty)"
        info = self._info
        return (f"Trace({info.get('meta', {}).get('pipeline_class')}, {self.batch_size} image(s), "
                f"{self.num_steps} steps, prompts={info['prompts']!r}"
                f"{', from ' + self._source if self._source else ''})")

    # ------------------------------------------------------------------ save
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to ONE file (safetensors + JSON metadata; see the module docstring).

        The write is atomic: a temporary file in the same folder is renamed over ``path``.
        Returns the path.
        """
        from safetensors.torch import save_file

        tensors, metadata = self._payload()
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def to_bytes(self) -> bytes:
        """The bytes :meth:`save` would write (e.g. to embed a trace in a grid file)."""
        from safetensors.torch import save

        tensors, metadata = self._payload()
        return save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Trace":
        """A trace from the bytes of a trace file (:meth:`to_bytes`), all tensors read now."""
        from safetensors.torch import load as load_tensors

        if len(data) < 8:
            raise ValueError("not an sdlens trace: too short for a safetensors header")
        (n,) = struct.unpack("<Q", data[:8])
        try:
            header = json.loads(data[8: 8 + n].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not an sdlens trace: not a safetensors file ({e})") from None
        try:
            tensors = load_tensors(data)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"trace bytes are damaged: safetensors cannot read them ({e})") from None
        info, _ = _info_from_metadata(header.get("__metadata__") or {}, lambda: set(tensors),
                                      "trace bytes")
        tensors = _stored(tensors, info)
        return cls(tensors, info, _image_reader(tensors, info), None)

    def _payload(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and the ``__metadata__`` of the trace's file."""
        info = self._require()
        tensors: dict[str, torch.Tensor] = {}
        compact: dict[str, dict] = {}
        aliases: dict[str, str] = {}
        written: dict[int, str] = {}
        # every tensor the trace holds: the contract's fields, attention/<layer>, and the extra
        # ones of Trace.build (e.g. 'parts/...' of a combined base + refiner trace); the images
        # are re-encoded below
        for name in list(self._tensors):
            if name.startswith("images/"):
                continue
            t = self._tensor(name)
            if t is None:
                continue
            if id(t) in written:  # one tensor held for two fields (noise_text = noise)
                aliases[name] = written[id(t)]
                continue
            written[id(t)] = name
            if isinstance(t, CompactMaps):
                tensors[name] = t.codes.detach().cpu().contiguous().clone()
                tensors[f"{name}/scale"] = t.scales.detach().cpu().contiguous().clone()
                compact[name] = {"bits": t.bits, "shape": list(t.shape)}
            else:
                tensors[name] = t.detach().cpu().contiguous().clone()
        for i, img in enumerate(self.images):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            tensors[f"images/{i}"] = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        doc = dict(info)
        doc["n_images"] = len(self.images)
        doc["tensors"] = sorted(tensors)
        if compact:
            doc["compact"] = compact
        if aliases:
            doc["aliases"] = aliases
        # version 1 where nothing needs 2: older sdlens still opens such files
        version = FORMAT_VERSION if compact or aliases else 1
        metadata = {"format": FORMAT, "format_version": str(version),
                    "sdlens": json.dumps(_jsonable(doc))}
        return tensors, metadata


_INFO_FIELDS = ("prompts", "negative_prompts", "token_ids", "tokens", "truncated_words",
                "guidance_scale", "do_cfg")
_TENSOR_FIELDS = ("timesteps", "sigmas", "latents", "noise_uncond", "noise_text", "noise", "x0")
_MAPS = ("attention", "concepts", "image_to_text")  # maps by site: tensors "<kind>/<layer>"
_BUILT_KEYS = set(_INFO_FIELDS) | set(_MAPS) | {"num_steps", "meta"}


def _maps_info(kind: str, maps: AttentionMaps | None, steps: int, batch: int,
               tensors: dict) -> dict | None:
    """The JSON entry of one kind of maps (None: none), their tensors put in ``tensors`` as
    ``<kind>/<layer>``, shapes checked."""
    if maps is None:
        return None
    if any(not 0 <= s < steps for s in maps.steps):
        raise ValueError(f"Trace.build: {kind} steps {maps.steps} are not all in 0..{steps - 1}")
    lead = (len(maps.steps), batch) + ((None,) if maps.heads else ())
    resolutions = maps.resolutions
    for layer in maps.layers:
        src = maps.source(layer)
        if torch.is_tensor(src) or isinstance(src, CompactMaps):
            _checked(f"{kind}[{layer!r}]", src,
                     lead + (len(maps.token_positions),) + resolutions[layer])
        tensors[f"{kind}/{layer}"] = src
    return {"layers": list(maps.layers),
            "resolutions": {l: list(r) for l, r in maps.resolutions.items()},
            "steps": list(maps.steps), "token_positions": list(maps.token_positions),
            "heads": maps.heads, "dtype": maps.dtype}


def _checked(name: str, t, lead: tuple, ndim: int | None = None):
    """``t`` (None passes) if its leading sizes are ``lead`` (None: any size) and it has ``ndim``
    dimensions (default ``len(lead)``); ValueError otherwise."""
    if t is None:
        return None
    if not (torch.is_tensor(t) or isinstance(t, CompactMaps)):
        raise ValueError(f"Trace.build: {name} must be a tensor, got {type(t).__name__}")
    want = len(lead) if ndim is None else ndim
    if t.ndim != want or any(n is not None and t.shape[i] != n for i, n in enumerate(lead)):
        dims = ", ".join("*" if n is None else str(n) for n in lead)
        raise ValueError(f"Trace.build: {name} has shape {tuple(t.shape)}, expected {want} "
                         f"dimensions starting ({dims})")
    return t


def _jsonable(x):
    """JSON-safe copy: tuples -> lists, dtypes/paths/numpy scalars -> str/number."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item") and callable(x.item):
        try:
            return x.item()
        except (TypeError, ValueError):
            pass
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (JSON) and the byte count the file must have; ValueError if the
    file is not a safetensors file or is truncated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not an sdlens trace: the file is {size} bytes long, too "
                             "short for a safetensors header (empty or truncated file)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or n < 2:
            raise ValueError(f"{path} is not an sdlens trace: not a safetensors file (no valid "
                             "header; sdlens traces are written by trace.save())")
        if 8 + n > size:
            raise ValueError(f"{path} is truncated: its header says {n} bytes but the file has "
                             f"{size} bytes (the copy or download was cut short)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not an sdlens trace: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not an sdlens trace: not a safetensors file")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise ValueError(f"{path} is not an sdlens trace: malformed safetensors header") from None
    expected = 8 + n + end
    if size < expected:
        raise ValueError(f"{path} is truncated: {size} bytes, but its header describes {expected} "
                         "bytes (the copy or download was cut short); save the trace again")
    return header, expected


def denoiser_calls(meta: dict) -> int | None:
    """The denoiser calls a traced run made, from its ``meta`` (``meta["denoiser_calls"]``;
    traces written before sdlens named it so hold ``meta["unet_calls"]``, for every backbone);
    None where neither is recorded."""
    n = meta.get("denoiser_calls", meta.get("unet_calls"))
    return None if n is None else int(n)


def load(path: str | os.PathLike) -> Trace:
    """Open a trace written by :meth:`Trace.save`.

    Only the header is read now; each tensor is read from the file on first access (a 1 GB trace
    opens instantly). ``trace.pipeline`` is None.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an sdlens trace, truncated/damaged file, or a format version this sdlens
            cannot read (the message says which).
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such trace file: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an sdlens trace file")
    header, _ = _read_header(path)

    def keys() -> set[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return set(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path} is damaged: safetensors cannot read it ({e})") from None

    info, names = _info_from_metadata(header.get("__metadata__") or {}, keys, str(path))

    def loader(name: str):
        def _load():
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        return _load

    tensors = _stored({k: loader(k) for k in names}, info)
    return Trace(tensors, info, _image_reader(tensors, info), None, source=str(path))


def _info_from_metadata(meta: dict, keys: Callable[[], set[str]], where: str
                        ) -> tuple[dict, set[str]]:
    """The trace's JSON document from a safetensors ``__metadata__`` (format and version checked
    first, then that the listed tensors are among ``keys()``, the file's tensor names), and
    those names."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"{where} is a safetensors file but not an sdlens trace (no "
                         f"format={FORMAT!r} metadata); sdlens traces are written by trace.save()")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{where}: unreadable sdlens format version "
                         f"{meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{where} was written by a newer sdlens (trace format version {version}); "
                         f"this sdlens reads format versions up to {FORMAT_VERSION}: upgrade sdlens")
    if version < 1:
        raise ValueError(f"{where}: unknown sdlens trace format version {version}")
    try:
        info = json.loads(meta["sdlens"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: damaged sdlens metadata ({e})") from None
    names = keys()
    missing = [k for k in info.get("tensors", []) if k not in names]
    if missing:
        raise ValueError(f"{where} is damaged: tensors {missing[:5]} are missing")
    info.pop("tensors", None)
    info["n_images"] = int(info.get("n_images", 0))
    return info, names


def _stored(tensors: dict, info: dict) -> dict:
    """A file's tensors (loaded, or loaders) as the trace holds them: maps stored as codes
    (``info["compact"]``: name -> bits and shape, the scales at ``<name>/scale``) as
    :class:`~sdlens.trace.compact.CompactMaps`, and fields that share a tensor
    (``info["aliases"]``) as one; takes both keys out of ``info`` (version 1 files have none)."""
    tensors = dict(tensors)
    for name, spec in info.pop("compact", {}).items():
        codes, scales = tensors[name], tensors.pop(f"{name}/scale")

        def read(codes=codes, scales=scales, spec=spec):
            return CompactMaps(codes() if callable(codes) else codes,
                               scales() if callable(scales) else scales, spec["bits"],
                               spec["shape"])

        tensors[name] = read if callable(codes) else read()
    for name, target in info.pop("aliases", {}).items():
        src = tensors[target]
        if callable(src):  # read once for both fields
            src = functools.cache(src)
            tensors[target] = src
        tensors[name] = src
    return tensors


def _same_values(a, b) -> bool:
    """``a`` and ``b`` are tensors of the same shape, dtype and values."""
    return torch.is_tensor(a) and torch.is_tensor(b) and a is not b and a.shape == b.shape \
        and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _image_reader(tensors: dict, info: dict) -> Callable[[], list]:
    """Reads the PNG images of a trace file (tensors ``images/<i>``, loaded or loaders) on call;
    takes ``n_images`` out of ``info``."""
    n_images = info.pop("n_images")

    def images():
        from PIL import Image

        out = []
        for i in range(n_images):
            src = tensors[f"images/{i}"]
            data = (src() if callable(src) else src).numpy().tobytes()
            img = Image.open(io.BytesIO(data))
            img.load()
            out.append(img)
        return out

    return images
