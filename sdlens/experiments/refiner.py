"""SDXL base + refiner traced as one run.

    >>> tr = trace_base_refiner(base, refiner, "a red circle", steps=25, handover=0.8, seed=0)
    >>> tr.meta["handover_step"]                   # first step run by the refiner
    >>> part(tr, "refiner").tokens                 # the refiner's steps with its own tokens

or trace the two calls yourself and join them with :func:`combine_base_refiner`.
"""

from __future__ import annotations

import json

import torch

from sdlens.engine.options import RecordOptions
from sdlens.engine.session import trace as _trace
from sdlens.trace.core import Trace, denoiser_calls
from sdlens.trace.maps import AttentionMaps
from sdlens.trace.ops import concat_steps, replace, slice_steps

_RUN_FIELDS = ("prompts", "negative_prompts", "token_ids", "tokens", "truncated_words",
               "guidance_scale", "do_cfg")  # Trace.build fields of each run
_PART_FIELDS = _RUN_FIELDS + ("num_steps", "attention")  # what info["parts"] keeps per run


def combine_base_refiner(base_trace: Trace, refiner_trace: Trace) -> Trace:
    """One trace of an SDXL base run (``denoising_end``) followed by a refiner run
    (``denoising_start``, ``image=`` the base's latents), as recorded by two ``sdlens.trace``
    blocks::

        with sdlens.trace(base) as tb:
            lat = base(prompt, num_inference_steps=25, denoising_end=0.8, output_type="latent",
                       generator=g).images
        with sdlens.trace(refiner) as tr:
            image = refiner(prompt, num_inference_steps=25, denoising_start=0.8, image=lat,
                            generator=g).images[0]
        whole = combine_base_refiner(tb, tr)

    The result runs over all steps (:func:`~sdlens.trace.ops.concat_steps`): ``timesteps``,
    ``sigmas``, ``latents`` (x_T of the base ... the refiner's x_0), ``noise*`` and ``x0`` are
    the two runs joined; ``meta["handover_step"]`` is the first step the refiner ran,
    ``meta["parts"]`` describes both runs. ``attention``, ``tokens`` and ``token_ids`` are the
    base's (steps 0 .. handover-1); :func:`part` gives each run as a Trace of its own, the
    refiner with its own tokens (tokenizer_2) and maps. ``images`` are the refiner's. Saves and
    loads as one file.
    """
    base_trace, refiner_trace = base_trace.runs[-1], refiner_trace.runs[-1]
    bi, ri = base_trace._require(), refiner_trace._require()
    if base_trace.batch_size != refiner_trace.batch_size:
        raise ValueError(f"the base run has {base_trace.batch_size} image(s), the refiner run "
                         f"{refiner_trace.batch_size}")
    whole = concat_steps(base_trace, refiner_trace)
    lb, lr = base_trace.latents, refiner_trace.latents
    gap = float((lb[-1] - lr[0]).abs().max()) if lb is not None and lr is not None else None
    h, n = base_trace.num_steps, whole.num_steps
    ra = refiner_trace.attention
    extra = {f"parts/refiner/attention/{layer}": ra.source(layer) for layer in ra.layers} \
        if ra is not None else {}
    bm, rm = base_trace.meta, refiner_trace.meta
    parts = [{"name": name, "start": start, "stop": stop, "meta": meta,
              **{k: info[k] for k in _PART_FIELDS}}
             for name, info, meta, start, stop in (("base", bi, bm, 0, h),
                                                   ("refiner", ri, rm, h, n))]
    meta = dict(bm)
    meta.pop("unet_calls", None)  # the older name of "denoiser_calls"
    calls = [denoiser_calls(m) for m in (bm, rm)]
    meta.update(handover_step=h, steps=n,
                denoiser_calls=(h if calls[0] is None else calls[0])
                + (n - h if calls[1] is None else calls[1]),
                handover=rm.get("denoising_start"),
                refiner_pipeline_class=rm.get("pipeline_class"),
                refiner_family=rm.get("family"), handover_latent_gap=gap,
                parts=[{"name": p["name"], "start": p["start"], "stop": p["stop"],
                        "pipeline_class": p["meta"].get("pipeline_class")} for p in parts])
    return replace(whole, meta=meta, extra_tensors=extra,
                   extra_info={"parts": json.loads(json.dumps(parts, default=str))})


def part(trace: Trace, name: str) -> Trace:
    """One run of a combined base + refiner trace (``"base"`` or ``"refiner"``) as a Trace of its
    own: its steps (indexed from 0, :func:`~sdlens.trace.ops.slice_steps`), its prompts' tokens,
    its attention maps and meta."""
    parts = trace._require().get("parts")
    if not parts:
        raise ValueError("this trace is not a combined base + refiner trace (no parts); see "
                         "sdlens.trace_base_refiner")
    names = [p["name"] for p in parts]
    if name not in names:
        raise ValueError(f"unknown part {name!r}; parts: {names}")
    p = parts[names.index(name)]
    start, stop = int(p["start"]), int(p["stop"])
    steps = slice_steps(trace, start, stop)
    maps = steps.attention
    att = p.get("attention")
    if att is not None and name != parts[0]["name"]:  # the first part's maps are the trace's
        prefix = f"parts/{name}/attention/"
        maps = AttentionMaps({l: (lambda key: lambda: trace._tensor(key))(prefix + l)
                              for l in att["layers"]}, att["resolutions"], att["steps"],
                             att["token_positions"], att["heads"], dtype=att.get("dtype"))
    elif att is None:
        maps = None
    return replace(steps, **{k: p[k] for k in _RUN_FIELDS},
                   noise_uncond=steps.noise_uncond if p["do_cfg"] else None, attention=maps,
                   meta=dict(p["meta"], step_offset=start), extra_tensors={}, extra_info={})


def trace_base_refiner(base, refiner, prompt: str | list[str], seed: int = 0, steps: int = 25,
                       handover: float = 0.8, guidance_scale: float | None = None,
                       negative_prompt: str | list[str] | None = None,
                       options: RecordOptions | None = None, base_kwargs: dict | None = None,
                       refiner_kwargs: dict | None = None, **kwargs) -> Trace:
    """Run SDXL ``base`` for the first ``handover`` of the schedule and ``refiner`` for the rest
    (diffusers' ensemble of experts: ``denoising_end=handover`` / ``denoising_start=handover``,
    the base's latents handed over) and return ONE trace of the whole run (see
    :func:`combine_base_refiner`): ``meta["handover_step"]`` marks the refiner's first step.

    Both calls share one CPU generator seeded with ``seed`` (the base draws x_T from it, the
    refiner continues it), as ``g = torch.Generator().manual_seed(seed)`` passed to both calls
    would. ``kwargs`` go to both calls, ``base_kwargs`` / ``refiner_kwargs`` to one;
    ``options`` (and RecordOptions keyword arguments) apply to both recordings.
    """
    if not 0 < handover < 1:
        raise ValueError(f"handover must be in (0, 1) (the fraction of the schedule the base "
                         f"runs), got {handover!r}")
    if getattr(refiner, "tokenizer_2", None) is None or getattr(refiner, "text_encoder_2",
                                                                None) is None:
        raise TypeError("refiner must be an SDXL refiner (StableDiffusionXLImg2ImgPipeline with "
                        "text_encoder_2 / tokenizer_2)")
    opt_names = {f for f in RecordOptions.__dataclass_fields__}
    opt_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in opt_names}
    opts = RecordOptions.from_kwargs(options, **opt_kwargs)
    if "generator" in kwargs:
        raise ValueError("trace_base_refiner takes seed=, not generator=")
    g = torch.Generator("cpu").manual_seed(int(seed))
    common = dict(prompt=prompt, num_inference_steps=steps, generator=g, **kwargs)
    if guidance_scale is not None:
        common["guidance_scale"] = guidance_scale
    if negative_prompt is not None:
        common["negative_prompt"] = negative_prompt
    with _trace(base, opts) as tb:
        latents = base(**common, denoising_end=handover, output_type="latent",
                       **(base_kwargs or {})).images
    with _trace(refiner, opts) as tr:
        refiner(**common, image=latents, denoising_start=handover, **(refiner_kwargs or {}))
    whole = combine_base_refiner(tb, tr)
    whole._info["meta"].update(handover=float(handover), seeds=[int(seed)])
    return whole
