"""What to record (``RecordOptions``) and the one estimate of memory before a run: a trace's host
bytes (:func:`estimate_trace_bytes`), a batched call's (:func:`estimate_cell_bytes`) and the
budgets they are held to (:func:`default_max_bytes`, :func:`default_memory_budget`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from sdlens.engine.arch import adapter_for
from sdlens.trace.compact import CODE_BITS, dtype_name, map_bytes, stored_dtype
from sdlens.trace.maps import resolve_layers

RECORDABLE = ("latents", "noise", "x0", "attention")  # the default
# opt-in kinds: "controlnet": the ControlNet residuals' RMS per net, block and step (ControlNet
# pipelines only; ``sdlens.analysis.controlnet``); "image_to_text": the text tokens' attention
# to the image patches (joint-attention models only; ``trace.image_to_text``)
# "reference_maps": an editing model's output patches' attention on its reference images'
# patches (``trace.reference_maps``)
OPTIONAL = ("controlnet", "image_to_text", "reference_maps")
KINDS = RECORDABLE + OPTIONAL
_ATT_DTYPES = ("auto", torch.uint4, torch.uint8, torch.float16, torch.bfloat16, torch.float32)
#: ``attention_dtype="auto"``: 8-bit codes while the whole trace fits this many bytes, else 4-bit
AUTO_TRACE_BYTES = 200 << 20
#: how concept maps are computed (RecordOptions.concept_method; sdlens.engine.joint)
CONCEPT_METHODS = ("conceptattention", "sdlens")


class TraceTooLarge(ValueError):
    """The estimated trace size exceeds ``RecordOptions.max_bytes``."""


# ====================================================================== options
@dataclass
class RecordOptions:
    """What to record.

    Args:
        record: which kinds of data to keep, a subset of ("latents", "noise", "x0", "attention",
            "controlnet", "image_to_text", "reference_maps"); the default is all but the opt-in
            kinds "controlnet" (the ControlNet residuals' RMS per block and step),
            "image_to_text" (joint attention: each text token's attention to the image patches,
            ``trace.image_to_text``, at the sites and steps of ``layers`` / ``steps``) and
            "reference_maps" (editing models: each output patch's attention on each reference
            image's patches, ``trace.reference_maps``, at those sites and steps; 8 MiB per site
            and step at 1024 px: :class:`sdlens.trace.maps.ReferenceMaps`). Timesteps, sigmas, prompts, tokens
            and images are always kept.
        layers: which cross-attention sites' maps to keep: None (all), a group ("down" / "mid"
            / "up"), a resolution int (max(h, w) of the map, e.g. 16), an alias ("up.1.0"), a
            module path, or a list of these (see :mod:`sdlens.trace.maps`).
        steps: at which steps to keep attention maps (latents/noise/x0 are small and always kept
            for every step): None (all; a video model's: its adapter's ``default_map_steps``,
            Wan: every 5th step), a list/range of step indices (negative ones count from the
            end), or a slice (``slice(None, None, 5)``: every 5th step; ``slice(None)``: all).
        heads: keep the heads axis of the maps (default: average over heads on the device).
        keep_padding: keep all 77 token positions (default: the start token, the prompt's tokens
            and the end token; rows then no longer sum to 1 over the kept tokens).
        max_bytes: refuse (``TraceTooLarge``, a ValueError) to run when the trace is estimated to
            need more host memory than this; default 50% of the available host memory.
        attention_dtype: how the maps are stored (they always read as float maps):
            ``"auto"`` (the default: ``torch.uint8`` while the whole trace is estimated to fit
            ``AUTO_TRACE_BYTES`` (200 MB), else ``torch.uint4``; the estimate and
            ``trace.meta["options"]`` say which), ``torch.uint4`` (4-bit codes and each map's
            peak, every value within 1/30 of its map's peak; :mod:`sdlens.trace.compact`),
            ``torch.uint8`` (8-bit codes: within 1/510 of the peak, twice the size), or the maps themselves in
            ``torch.float16`` / ``torch.bfloat16`` / ``torch.float32`` (4x / 4x / 8x the size).
            Concept maps stay float16 under a code dtype (each pixel's concepts sum to 1).
        concepts: concept maps (ConceptAttention, :mod:`sdlens.engine.joint`; joint-attention
            models): a list of concepts (words or short phrases, in the prompt or not), each
            mapped at the sites and steps of ``layers`` / ``steps`` (``trace.concepts``,
            ``trace.heatmap("circle", maps="concepts")``); None: no concept maps.
        concept_method: how concept maps are computed (:mod:`sdlens.engine.joint`, whose
            docstring lists every choice): ``"conceptattention"`` (the default: the paper's
            code's choices for Flux.1 and SD3 / SD3.5, its default blocks and steps for the
            heatmap) or ``"sdlens"`` (each concept its own prompt pooled over its tokens, the
            prompt's conditioning, every block, every block and step pooled).
    """

    record: Sequence[str] = RECORDABLE
    layers: Any = None
    steps: Any = None
    heads: bool = False
    keep_padding: bool = False
    max_bytes: int | None = None
    attention_dtype: torch.dtype | str = "auto"
    concepts: Sequence[str] | None = None
    concept_method: str = "conceptattention"

    def __post_init__(self):
        rec = (self.record,) if isinstance(self.record, str) else self.record
        try:
            rec = tuple(rec)
        except TypeError:
            raise ValueError(f"record must be a subset of {KINDS}, got {self.record!r}") from None
        bad = [r for r in rec if r not in KINDS]
        if bad:
            raise ValueError(f"record: unknown kind(s) {bad}; allowed: {', '.join(KINDS)}")
        self.record = tuple(r for r in KINDS if r in rec)
        if self.layers is not None:
            items = self.layers if isinstance(self.layers, (list, tuple, set)) else [self.layers]
            if isinstance(self.layers, tuple) and len(self.layers) == 2 and \
                    all(isinstance(v, int) for v in self.layers):
                items = [self.layers]
            for it in items:
                ok = (isinstance(it, str) and it.strip()) or \
                     (isinstance(it, int) and not isinstance(it, bool) and it > 0) or \
                     (isinstance(it, tuple) and len(it) == 2 and all(isinstance(v, int) for v in it))
                if not ok:
                    raise ValueError(f"layers: invalid selector {it!r}; allowed: None (all), 'down', "
                                     "'mid', 'up', a resolution int, an alias like 'up.1.0', a "
                                     "module path, or a list of these")
        s = self.steps
        if s is not None and not isinstance(s, slice):
            if isinstance(s, (int, bool)):
                raise ValueError(f"steps: got the int {s!r}; use a list of step indices ([{s}]), a "
                                 f"slice (slice(None, None, {s}) for every {s}th step) or None (all)")
            try:
                s = list(s)
            except TypeError:
                raise ValueError(f"steps: expected None, a list of step indices or a slice, got "
                                 f"{type(self.steps).__name__}") from None
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in s):
                raise ValueError(f"steps: step indices must be ints, got {s!r}")
            self.steps = s
        if isinstance(s, slice) and s.step is not None and s.step <= 0:
            raise ValueError(f"steps: slice step must be positive, got {s.step}")
        if not isinstance(self.heads, bool):
            raise ValueError(f"heads must be True or False, got {self.heads!r}")
        if not isinstance(self.keep_padding, bool):
            raise ValueError(f"keep_padding must be True or False, got {self.keep_padding!r}")
        if self.max_bytes is not None and (isinstance(self.max_bytes, bool) or
                                           not isinstance(self.max_bytes, (int, float))
                                           or self.max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive number of bytes or None, got "
                             f"{self.max_bytes!r}")
        if self.concepts is not None:
            self.concepts = check_concepts(self.concepts)
        if self.concept_method not in CONCEPT_METHODS:
            raise ValueError(f"concept_method must be one of {CONCEPT_METHODS}, got "
                             f"{self.concept_method!r}")
        if self.attention_dtype not in _ATT_DTYPES:
            raise ValueError(f"attention_dtype must be one of {_ATT_DTYPES}, got "
                             f"{self.attention_dtype!r}")

    def to_dict(self) -> dict:
        """JSON-friendly form (stored in ``trace.meta['options']``)."""
        steps = self.steps
        if isinstance(steps, slice):
            steps = {"slice": [steps.start, steps.stop, steps.step]}
        layers = self.layers
        if isinstance(layers, (set, tuple)):
            layers = list(layers)
        return dict(record=list(self.record), layers=layers, steps=steps, heads=self.heads,
                    keep_padding=self.keep_padding, max_bytes=self.max_bytes,
                    attention_dtype="auto" if self.attention_dtype == "auto"
                    else dtype_name(self.attention_dtype),
                    **({"concepts": list(self.concepts), "concept_method": self.concept_method}
                       if self.concepts is not None else {}))

    @classmethod
    def from_kwargs(cls, options: "RecordOptions | None" = None, **kwargs) -> "RecordOptions":
        """``options`` updated with keyword arguments; unknown names -> ValueError."""
        names = [f.name for f in dataclasses.fields(cls)]
        bad = [k for k in kwargs if k not in names]
        if bad:
            raise ValueError(f"unknown option(s) {bad}; allowed: {', '.join(names)}")
        if options is None:
            return cls(**kwargs)
        if not isinstance(options, cls):
            raise ValueError(f"options must be a RecordOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **kwargs)


def check_concepts(concepts) -> list[str]:
    """The concepts of ``RecordOptions.concepts`` as a list of distinct non-empty strings;
    ValueError (one line) otherwise."""
    if isinstance(concepts, str):
        concepts = [concepts]
    try:
        concepts = list(concepts)
    except TypeError:
        raise ValueError(f"concepts must be a list of strings, got {concepts!r}") from None
    if not concepts:
        raise ValueError("concepts is empty: give at least one concept, e.g. concepts=['circle', "
                         "'background']")
    bad = [c for c in concepts if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"concepts must be non-empty strings, got {bad!r}")
    out = [c.strip() for c in concepts]
    seen = [c.lower() for c in out]
    twice = sorted({c for c in out if seen.count(c.lower()) > 1})
    if twice:
        raise ValueError(f"concepts must be distinct, got {twice} more than once")
    return out


def map_steps(options: RecordOptions, adapter) -> Any:
    """The steps selector of the maps: ``options.steps``, or where that is None the adapter's
    ``default_map_steps`` (a video model's maps are large: Wan's every 5th step)."""
    return options.steps if options.steps is not None else adapter.default_map_steps


def default_max_bytes() -> int:
    """50% of the host memory available now (MemAvailable), or 8 GiB if it cannot be read: the
    default limit of a trace (``RecordOptions.max_bytes``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        import psutil  # type: ignore

        return int(psutil.virtual_memory().available // 2)
    except Exception:
        return 8 << 30


def default_memory_budget(device: torch.device | str | None = None) -> int:
    """Memory a batched call may use: 80% of the free memory of a CUDA device, else
    :func:`default_max_bytes` (half the available host memory)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    return default_max_bytes()


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def scheduler_steps(scheduler, num_inference_steps: int) -> int:
    """How many steps (denoiser calls) ``scheduler`` takes for ``num_inference_steps``: one more for
    PNDM with ``skip_prk_steps`` (SD 1.5's default), ``2 n - 1`` for Heun / KDPM2. Read from a
    copy's ``set_timesteps``; the pipeline's scheduler is not touched."""
    import copy

    sched = copy.deepcopy(scheduler)
    # dynamic shifting (Flux) moves the sigmas by the image size's ``mu``, not their number
    shift = {"mu": 0.0} if sched.config.get("use_dynamic_shifting") else {}
    try:
        sched.set_timesteps(num_inference_steps, **shift)
    except (TypeError, ValueError) as e:
        raise ValueError(f"num_inference_steps={num_inference_steps!r}: the scheduler refused it "
                         f"({e})") from None
    return len(sched.timesteps)


class TraceEstimate(dict):
    """Bytes per kind of data ("latents", "noise", "x0", "attention", and "concepts" /
    "image_to_text" where recorded), a dict; :attr:`storage` says how each kind is held (the
    defaults that apply: e.g. ``{"attention": "uint4 codes + float32 scale per map", "noise":
    "float32, noise_text is noise (no CFG)", ...}``)."""

    storage: dict[str, str]
    attention_dtype: torch.dtype  # the maps' storage that applies ("auto" resolved)

    def __init__(self, parts: dict[str, int], storage: dict[str, str], attention_dtype=None):
        super().__init__(parts)
        self.storage = dict(storage)
        self.attention_dtype = attention_dtype


def estimate_trace_bytes(pipe, *, batch: int = 1, steps: int = 50,
                         latent_hw: tuple[int, int] | None = None, n_tokens: int | None = None,
                         do_cfg: bool | None = None, options: RecordOptions | None = None,
                         layers: Sequence[str] | None = None,
                         attention_steps: int | None = None,
                         num_inference_steps: int | None = None) -> TraceEstimate:
    """Host bytes a trace of ``pipe`` will take, per kind of data (before running anything): what
    :meth:`Trace.nbytes <sdlens.trace.Trace.nbytes>` will say, and within a few percent of the
    saved file.

    The defaults that apply are counted and named in the result's ``storage``: maps as 4-bit
    codes + a float32 scale per map (``attention_dtype=torch.uint4``; other dtypes as
    chosen) and, without classifier-free guidance, ``noise_text`` held once with ``noise`` (the
    same tensor); latents, noise and x0 in float32.

    Args:
        pipe: the pipeline (its denoiser's sites, heads and latent channels are read).
        batch: batch items (prompts x num_images_per_prompt).
        steps: scheduler steps (denoiser calls). Prefer ``num_inference_steps``, which converts.
        num_inference_steps: the pipeline argument; when given, ``steps`` is the number of steps
            the pipeline's scheduler really takes for it (:func:`scheduler_steps`).
        latent_hw: latent (h, w) (default: the denoiser's default sample size).
        n_tokens: kept token positions (default: every position of the denoiser's text, the
            worst case: 77; SD3 77 + 256; Flux 512).
        do_cfg: classifier-free guidance on (3 noise tensors instead of 2); default: whether
            the pipeline's default call guides (not Flux's: guidance-distilled).
        options: a :class:`RecordOptions` (what is recorded, layers, steps, heads, dtype).
        layers: already-resolved site names (default: from ``options.layers``).
        attention_steps: already-resolved number of steps with attention maps.

    Returns:
        a :class:`TraceEstimate`: {"latents": ..., "noise": ..., "x0": ..., "attention": ...}
        in bytes, and ``.storage``.
    """
    opts = options or RecordOptions()
    if opts.attention_dtype == "auto":  # 8-bit codes where the whole trace fits, else 4-bit
        kw = dict(batch=batch, steps=steps, latent_hw=latent_hw, n_tokens=n_tokens,
                  do_cfg=do_cfg, layers=layers, attention_steps=attention_steps,
                  num_inference_steps=num_inference_steps)
        fine = estimate_trace_bytes(pipe, options=dataclasses.replace(
            opts, attention_dtype=torch.uint8), **kw)
        if sum(fine.values()) <= AUTO_TRACE_BYTES:
            est = fine
        else:
            est = estimate_trace_bytes(pipe, options=dataclasses.replace(
                opts, attention_dtype=torch.uint4), **kw)
        why = (f"auto: 8-bit codes fit {AUTO_TRACE_BYTES >> 20} MB" if est is fine else
               f"auto: 8-bit codes would need {human_bytes(sum(fine.values()))}, over "
               f"{AUTO_TRACE_BYTES >> 20} MB")
        for kind in ("attention", "image_to_text"):
            if kind in est.storage:
                est.storage[kind] += f" ({why})"
        return est
    adapter = adapter_for(pipe)
    if num_inference_steps is not None:
        steps = scheduler_steps(pipe.scheduler, num_inference_steps)
    if latent_hw is None:
        latent_hw = adapter.default_latent_hw()
    if n_tokens is None:
        n_tokens = adapter.max_text_tokens
    if do_cfg is None:
        do_cfg = adapter.cfg_by_default
    res = adapter.resolutions(tuple(latent_hw))  # (h, w); a video model's (F, h, w)
    if layers is None:
        layers = resolve_layers(opts.layers, adapter.sites(), lambda l: res[l], adapter.naming)
    if attention_steps is None:
        spec = map_steps(opts, adapter)
        attention_steps = len(range(steps)[spec]) if isinstance(spec, slice) \
            else (steps if spec is None else len(set(spec)))
    per = batch * adapter.latent_channels() * math.prod(latent_hw) * 4
    rec = opts.record
    # noise, noise_text (noise_uncond): without CFG noise_text is noise (one tensor)
    est = {"latents": (steps + 1) * per if "latents" in rec else 0,
           "noise": steps * per * (3 if do_cfg else 1) if "noise" in rec else 0,
           "x0": steps * per if "x0" in rec else 0, "attention": 0}
    storage = {"latents": "float32", "x0": "float32",
               "noise": "float32" + ("" if do_cfg else ", noise_text is noise (no CFG)")}
    # reference maps: assumed one reference of the output's size, pooled to <= 32 x 32 patches
    kinds = {"attention": n_tokens, "image_to_text": n_tokens, "concepts": None,
             "reference_maps": -1}
    kinds = {k: n for k, n in kinds.items() if k in rec or (k == "concepts" and opts.concepts)}
    for kind, n in kinds.items():  # concept maps: one map per concept, heads pooled
        dtype = stored_dtype(kind, opts.attention_dtype)
        bits = CODE_BITS.get(dtype)
        itemsize = None if bits else torch.empty((), dtype=dtype).element_size()
        storage[kind] = f"{dtype_name(dtype)} codes + float32 scale per map" if bits \
            else dtype_name(dtype)
        est[kind] = 0
        for l in layers:
            lh, lw = res[l][-2:]  # a video site's (F, h, w): its last two
            heads = adapter.heads(l) if opts.heads and n is not None and n >= 0 else 1
            rows = len(opts.concepts) if n is None else n
            if n == -1:
                rows = min(lh, 32) * min(lw, 32)
            size = math.prod(res[l])  # h * w; a video site's F * h * w
            one = map_bytes(size, bits) if bits else size * itemsize
            est[kind] += attention_steps * batch * heads * rows * one
    return TraceEstimate(est, storage, opts.attention_dtype)


def _vae_scale(pipe) -> int:
    # the pipeline's own (Sana's DC-AE: 32; Wan's video pipelines: vae_scale_factor_spatial)
    scale = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None)
    if isinstance(scale, int) and scale > 0:
        return scale
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def latent_hw(pipe, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
    """Latent (h, w) of a ``height`` x ``width`` pixel image (None: the model's default size);
    a video model's (F, h, w), F its default latent frames."""
    *frames, h0, w0 = adapter_for(pipe).default_latent_hw()
    scale = _vae_scale(pipe)
    return (*frames, height // scale if height else h0, width // scale if width else w0)


def estimate_cell_bytes(pipe, height: int | None = None, width: int | None = None,
                        cfg: bool = True, trace_bytes: int = 0) -> int:
    """A rough upper estimate of the memory one batch item (a grid cell) adds to a batched
    pipeline call, in bytes.

    Per row of the denoiser's batch (two per item under classifier-free guidance, one without):
    the denoiser's activations (:meth:`~sdlens.engine.arch.base.BackboneAdapter.activation_bytes`).
    Per item: the VAE decoder's activations at image size (4 tensors of its widest
    top-resolution channel count) and the float32 output image, plus ``trace_bytes`` (what the
    recorder keeps for the item, :func:`estimate_trace_bytes`). Weights are not counted (they
    are loaded already).
    """
    adapter = adapter_for(pipe)
    hw = latent_hw(pipe, height, width)
    height, width = height or hw[-2] * _vae_scale(pipe), width or hw[-1] * _vae_scale(pipe)
    dtype = adapter.denoiser.dtype
    itemsize = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    row = adapter.activation_bytes(hw)
    cfg_vae = pipe.vae.config  # AutoencoderKL: block_out_channels; Sana's DC-AE: decoder_...
    vae_c = (cfg_vae.get("block_out_channels") or cfg_vae.get("decoder_block_out_channels")
             or [cfg_vae.get("base_dim") or 128])[0]  # Wan's video VAE: base_dim
    # a video model decodes every frame of its default clip: (F - 1) * temporal + 1
    frames = (hw[0] - 1) * int(getattr(pipe, "vae_scale_factor_temporal", 4) or 4) + 1 \
        if len(hw) == 3 else 1
    vae = frames * (4 * vae_c * height * width * itemsize + 3 * height * width * 4)
    return int((2 if cfg else 1) * row + vae + trace_bytes)
