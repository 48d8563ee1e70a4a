"""``Trace``: everything recorded during one pipeline call; save / load (safetensors + JSON).

Shapes (all tensors on the CPU; ``steps`` = number of ``scheduler.step`` calls, which is
``num_inference_steps`` for most schedulers, fewer for img2img/inpaint with ``strength < 1``, and
about twice as many for Heun / KDPM2, whose every step calls the UNet twice):

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
                                                                  ``latents[-1]`` is what was decoded
``noise_uncond``            (steps, batch, C, h, w) or None       None when guidance is off
``noise_text``              (steps, batch, C, h, w)
``noise``                   (steps, batch, C, h, w)               the guided prediction the scheduler used
``x0``                      (steps, batch, C, h, w)               predicted clean latent (sdlens computes it)
``attention``               :class:`~sdlens.attention.AttentionMaps`
``guidance_scale``          float; ``do_cfg``: bool
``meta``                    dict                                  model id, family, task, pipeline and
                                                                  scheduler class + config, prediction type,
                                                                  VAE scaling factor, height, width, seeds,
                                                                  steps, versions, options
==========================  ====================================  =========================================

Tensors that were not recorded (``RecordOptions.record``) are None.

File format (one file, no pickle): a safetensors file whose tensors are ``latents``, ``noise``,
..., ``attention/<layer>`` and ``images/<i>`` (PNG bytes as uint8), and whose ``__metadata__``
holds ``format = "sdlens.trace"``, ``format_version`` and ``sdlens`` (a JSON document with
everything else). Loading reads only the header; tensors are read on first access.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from sdlens.trace.maps import AttentionMaps

FORMAT = "sdlens.trace"
FORMAT_VERSION = 1


class Trace:
    """The record of one traced pipeline call (see the module docstring for every field).

    Created by :func:`sdlens.trace` / :func:`sdlens.generate` or :func:`load`; not meant to be
    built by hand. Inside ``with sdlens.trace(pipe) as tr:`` the object ``tr`` shows the *last*
    call made in the block; ``tr.runs`` lists the traces of all calls, in order.
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
        self._source = source
        self._runs: list[Trace] | None = None

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
            self._attention = AttentionMaps(
                {l: self._tensors[f"attention/{l}"] for l in att["layers"]},
                {l: tuple(r) for l, r in att["resolutions"].items()}, att["steps"],
                att["token_positions"], att["heads"],
                info["tokens"] if info.get("tokens") and all(info["tokens"]) else None)
        return self._attention

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

    def heatmap(self, word, **kwargs):
        """Word heatmap; see :func:`sdlens.heatmaps.word_heatmap` (all keyword arguments go there)."""
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

        info = self._require()
        path = Path(path).expanduser()
        tensors: dict[str, torch.Tensor] = {}
        # every tensor the trace holds: the contract's fields, attention/<layer>, and any extra
        # ones other sdlens modules add (e.g. 'parts/...' of a combined base + refiner trace,
        # sdlens.adapters); the images are re-encoded below
        for name in list(self._tensors):
            if name.startswith("images/"):
                continue
            t = self._tensor(name)
            if t is not None:
                tensors[name] = t.detach().cpu().contiguous().clone()
        for i, img in enumerate(self.images):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            tensors[f"images/{i}"] = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        doc = dict(info)
        doc["n_images"] = len(self.images)
        doc["tensors"] = sorted(tensors)
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                    "sdlens": json.dumps(_jsonable(doc))}
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
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not an sdlens trace (no "
                         f"format={FORMAT!r} metadata); sdlens traces are written by trace.save()")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{path}: unreadable sdlens format version "
                         f"{meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer sdlens (trace format version {version}); "
                         f"this sdlens reads format versions up to {FORMAT_VERSION}: upgrade sdlens")
    if version < 1:
        raise ValueError(f"{path}: unknown sdlens trace format version {version}")
    try:
        info = json.loads(meta["sdlens"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged sdlens metadata ({e})") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is damaged: safetensors cannot read it ({e})") from None
    missing = [k for k in info.get("tensors", []) if k not in keys]
    if missing:
        raise ValueError(f"{path} is damaged: tensors {missing[:5]} are missing")

    def loader(name: str):
        def _load():
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        return _load

    tensors = {k: loader(k) for k in keys}
    n_images = int(info.get("n_images", 0))

    def images():
        from PIL import Image

        out = []
        for i in range(n_images):
            data = tensors[f"images/{i}"]().numpy().tobytes()
            img = Image.open(io.BytesIO(data))
            img.load()
            out.append(img)
        return out

    info.pop("tensors", None)
    info.pop("n_images", None)
    return Trace(tensors, info, images, None, source=str(path))
