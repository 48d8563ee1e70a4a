"""Classifier-free guidance and the scheduler, seen from a trace (no denoiser call).

CFG: the denoiser predicts twice (noise, or a velocity for flow models: :func:`prediction_label`),
without the prompt (``noise_uncond``) and with it (``noise_text``); the scheduler gets
``uncond + g * (text - uncond)``. The *CFG delta* ``text - uncond`` is what guidance amplifies:
:func:`cfg_delta` gives it per step, :func:`guidance_stats` its size, and :func:`x0_at_guidance`
what the predicted clean latent x0 of one step would have been at another scale ``g'`` (the
prediction is affine in the model output, so the recorded predictions suffice). Only that step changes: later steps would differ too, which no
recorded data can tell without running the denoiser again.

x0 uses the formula of the trace's scheduler, from the schedule table
(:mod:`sdlens.engine.schedules`, the one the recorder uses) on a scheduler rebuilt from the
trace's ``meta``: ``x0 = a * x_t + b * prediction`` with ``(a, b)`` from
:func:`x0_coefficients`; ``prediction_type == "sample"``: ``x0`` is the prediction itself.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sdlens.engine import schedules
from sdlens.trace.steps import select_step


def _meta(trace: Any) -> dict:
    return getattr(trace, "meta", None) or {}


def _first(d: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def scheduler_class(trace: Any) -> str | None:
    meta = _meta(trace)
    cls = _first(meta, "scheduler_class", "scheduler")
    if isinstance(cls, dict):
        cls = cls.get("class") or cls.get("_class_name")
    return cls if isinstance(cls, str) else None


def scheduler_config(trace: Any) -> dict:
    meta = _meta(trace)
    cfg = _first(meta, "scheduler_config", default=None)
    if cfg is None and isinstance(meta.get("scheduler"), dict):
        cfg = meta["scheduler"].get("config")
    return dict(cfg or {})


def prediction_type(trace: Any) -> str:
    meta = _meta(trace)
    return _first(meta, "prediction_type", default=None) or scheduler_config(trace).get(
        "prediction_type", "epsilon")


#: What the model's prediction (``noise`` / ``noise_text`` / ``noise_uncond``) is, in the words
#: the views use, per ``Trace.prediction_type``: flow matching predicts a velocity, not noise.
PREDICTION_LABELS = {"epsilon": "noise", "v_prediction": "v", "sample": "x0", "flow": "velocity",
                     schedules.FLOW_PREDICTION: "velocity"}


def prediction_label(source: Any) -> str:
    """What the trace's ``noise`` tensors hold, as every view labels them: "noise" (epsilon),
    "v" (v_prediction), "x0" (sample) or "velocity" (flow: SD3, Flux, Sana's flow schedulers).
    ``source``: a trace or a prediction type string."""
    ptype = source if isinstance(source, str) else prediction_type(source)
    return PREDICTION_LABELS.get(ptype, ptype)


#: The kinds of guidance a run can have (:func:`guidance_kind`).
GUIDANCE_KINDS = ("cfg", "off", "distilled", "true_cfg")


def guidance_kind(trace: Any) -> str:
    """What kind of guidance a run had: "cfg" (classifier-free guidance: an unconditional and a
    text prediction per step), "off" (neither CFG nor a guidance value), "distilled" (a
    guidance-distilled model, Flux.1-dev: the guidance value is an input of the denoiser, one
    call per step) or "true_cfg" (Flux's ``true_cfg_scale`` with a negative prompt: CFG over a
    guidance-distilled model). Read from the trace (``do_cfg``, ``meta["distilled_guidance"]``,
    which the guidance-distilled families' adapters record)."""
    meta = _meta(trace)
    distilled = meta.get("distilled_guidance")
    if getattr(trace, "do_cfg", True):
        return "true_cfg" if "distilled_guidance" in meta else "cfg"
    return "distilled" if distilled is not None else "off"


def check_guidance_scale(value: Any) -> float | None:
    """``guidance_scale`` as a float (None stays None: the pipeline's default); ValueError for
    a value that is not a finite number (NaN would silently run unguided: diffusers compares it
    with 1 and the comparison is false)."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_scale must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"guidance_scale must be a finite number, got {value!r} (1 or below "
                         "turns guidance off; the model card's value is a good start)")
    return v


def guidance_label(scale: Any, kind: str = "cfg", distilled: Any = None) -> str:
    """A guidance value named by its kind (:data:`GUIDANCE_KINDS`): "CFG 7.5", "guidance off",
    "guidance 3.5 (distilled)", "true CFG 4 (guidance 3.5)" (``distilled``: the distilled
    guidance value under true CFG). Sweeps' axes label their values with it."""
    if kind not in GUIDANCE_KINDS:
        raise ValueError(f"kind must be one of {GUIDANCE_KINDS}, got {kind!r}")
    if kind == "off":
        return "guidance off"
    try:
        value = f"{float(scale):g}"
    except (TypeError, ValueError):
        value = "?"
    if kind == "distilled":
        return f"guidance {value} (distilled)"
    if kind == "true_cfg":
        return f"true CFG {value}" + (f" (guidance {float(distilled):g})"
                                      if distilled is not None else "")
    return f"CFG {value}" if value != "nan" else "CFG ?"


#: What a control that sets ``guidance_scale`` is called, per kind of guidance the model takes.
GUIDANCE_SETTINGS = {"cfg": "CFG scale", "distilled": "guidance (distilled)"}


def guidance_setting(kind: str = "cfg") -> str:
    """The name of the ``guidance_scale`` setting for a model whose guidance is ``kind``
    ("cfg": "CFG scale"; "distilled", a guidance-distilled model such as Flux.1-dev, whose
    ``guidance_scale`` is an input of the denoiser: "guidance (distilled)")."""
    if kind not in GUIDANCE_SETTINGS:
        raise ValueError(f"kind must be one of {tuple(GUIDANCE_SETTINGS)}, got {kind!r}")
    return GUIDANCE_SETTINGS[kind]


def guidance_text(trace: Any, explain: bool = False) -> str:
    """How the views name a run's guidance: "CFG 7.5", "guidance off", "guidance 3.5
    (distilled)" (a guidance-distilled model, Flux.1-dev: no unconditional pass) or "true CFG 4
    (guidance 3.5)" (Flux with ``true_cfg_scale`` and a negative prompt).

    The one place for the kind of guidance (:func:`guidance_kind`). ``explain``: say why there
    is no unconditional prediction where there is none ("guidance off (scale 1; diffusers
    guides only above 1)", the family's own rule where ``meta["cfg_rule"]`` holds one,
    "guidance 3.5 (distilled), no unconditional pass")."""
    kind = guidance_kind(trace)
    meta = _meta(trace)
    gs = getattr(trace, "guidance_scale", None)
    if kind == "distilled":
        gs = meta.get("distilled_guidance", gs)
    text = guidance_label(gs, kind, meta.get("distilled_guidance"))
    if not explain:
        return text
    if kind == "distilled":
        return text + ", no unconditional pass"
    if kind == "off":
        if "distilled_guidance" in meta:  # a family that takes a guidance value, but not this model
            return text + " (the model takes no guidance value)"
        # the family's rule where its adapter recorded one (Z-Image guides above 0; Qwen-Image
        # with a negative prompt and true_cfg_scale above 1)
        rule = meta.get("cfg_rule") or "diffusers guides only above 1"
        scale = _scale_text(gs)
        return text + (f" (scale {scale}; {rule})" if scale not in ("?", "nan") else f" ({rule})")
    return text


def _scale_text(gs: Any) -> str:
    try:
        return f"{float(gs):g}"
    except (TypeError, ValueError):
        return "?"


def _scheduler(trace: Any):
    """The trace's scheduler, rebuilt from ``meta`` (class name + config), or None."""
    return schedules.rebuild_scheduler(scheduler_class(trace), scheduler_config(trace))


def schedule_form(trace: Any) -> str:
    """The row of the schedule table (``sdlens.engine.schedules.FORMS``: "alpha", "sigma",
    "alpha_sigma", "flow") that fits the trace's scheduler."""
    meta = _meta(trace)
    form = _first(meta, "schedule_form", "x0_form")
    if form in schedules.FORMS:
        return form
    cls = scheduler_class(trace) or ""
    sigmas = getattr(trace, "sigmas", None)
    if sigmas is None:
        return "alpha"
    form = schedules.form_of_class(cls)
    if form is not None:
        return form
    sched = _scheduler(trace)
    if sched is not None:
        try:
            sched.set_timesteps(len(trace.timesteps))
            form = schedules.schedule_form(sched)
            if form in schedules.FORMS:
                return form
        except Exception:  # noqa: BLE001
            pass
    known = sorted({part for part, _ in schedules.CLASS_FORMS})
    raise ValueError(f"cannot tell the x0 formula of scheduler {cls or '(unknown)'}: the trace "
                     f"has sigmas but the scheduler is none of {known} nor DDIM-like")


def _alpha_bars(trace: Any) -> torch.Tensor:
    """``(num_train_timesteps,)``: ``a_t`` of the trace's scheduler, rebuilt from ``meta``."""
    ab = schedules.alpha_bars(_scheduler(trace))
    if ab is None:
        raise ValueError("this trace's metadata holds no scheduler class/config from which "
                         "the a_t table can be rebuilt (meta['scheduler_class'] / "
                         "meta['scheduler_config'])")
    return ab


def _batch_index(trace: Any, batch: Any) -> Any:
    if batch is None:
        return slice(None)
    n = trace.latents.shape[1]
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)):
        raise TypeError(f"batch must be None or an int, got {type(batch).__name__}")
    if not -n <= batch < n:
        raise ValueError(f"batch={batch} is out of range: the trace holds {n} image(s)")
    return int(batch)


def x0_coefficients(trace: Any, step: int) -> tuple[float, float]:
    """``(A, B)`` with ``x0 = A * x_t + B * prediction`` at ``step`` for the trace's scheduler."""
    step = select_step(step, len(trace.timesteps))
    ptype = prediction_type(trace)
    form, level = None, None
    if ptype in ("epsilon", "v_prediction", "flow"):  # "sample" needs no schedule
        form = schedule_form(trace)
        if schedules.TABLE[form].level == "alpha_bar":
            level = float(_alpha_bars(trace)[int(round(float(trace.timesteps[step])))])
        else:
            level = float(trace.sigmas[step])
    return schedules.x0_coefficients(form, ptype, level)


def _require_cfg(trace: Any) -> None:
    if getattr(trace, "noise_uncond", None) is None or getattr(trace, "noise_text", None) is None:
        if guidance_kind(trace) == "distilled":
            raise ValueError(f"this trace has no unconditional prediction: "
                             f"{guidance_text(trace, explain=True)} (true_cfg_scale > 1 with a "
                             "negative prompt runs one); there is no CFG delta")
        raise ValueError("this trace has no unconditional prediction (guidance was off, "
                         "guidance_scale <= 1, or noise was not recorded): there is no CFG delta")


def cfg_delta(trace: Any, step: Any = None, batch: Any = None) -> torch.Tensor:
    """``noise_text - noise_uncond``: ``(steps, batch, C, h, w)``, or one step / one image."""
    _require_cfg(trace)
    d = trace.noise_text.float() - trace.noise_uncond.float()
    if step is not None:
        d = d[select_step(step, len(trace.timesteps))]
        return d[_batch_index(trace, batch)]
    return d[:, _batch_index(trace, batch)]


@dataclass
class GuidanceStats:
    """Per step (``(steps,)`` arrays for one image): RMS of the CFG delta, of the unconditional
    and text predictions, the cosine between them and the effective push
    ``guidance_scale * rms(delta)``."""

    steps: np.ndarray
    timesteps: np.ndarray
    delta_rms: np.ndarray
    uncond_rms: np.ndarray
    text_rms: np.ndarray
    cosine: np.ndarray
    guidance_scale: float
    push_rms: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.push_rms = self.guidance_scale * self.delta_rms


def _rms(x: torch.Tensor) -> np.ndarray:
    return x.flatten(1).pow(2).mean(1).sqrt().numpy()


def guidance_stats(trace: Any, batch: int = 0) -> GuidanceStats:
    """How hard CFG pulls at each step (see :class:`GuidanceStats`)."""
    _require_cfg(trace)
    b = _batch_index(trace, batch)
    u = trace.noise_uncond[:, b].float()
    t = trace.noise_text[:, b].float()
    d = t - u
    cos = torch.nn.functional.cosine_similarity(u.flatten(1), t.flatten(1), dim=1).numpy()
    n = len(trace.timesteps)
    return GuidanceStats(np.arange(n), np.asarray(trace.timesteps, dtype=np.float64), _rms(d),
                         _rms(u), _rms(t), cos, float(trace.guidance_scale))


def x0_at_guidance(trace: Any, step: int, scale: float, batch: Any = None) -> torch.Tensor:
    """x0 that ``step`` would have predicted at guidance scale ``scale`` (same x_t, same uncond
    and text predictions): ``(batch, C, h, w)`` or ``(C, h, w)`` for one image. At the recorded
    scale it equals ``trace.x0[step]``."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    _require_cfg(trace)
    step = select_step(step, len(trace.timesteps))
    b = _batch_index(trace, batch)
    u = trace.noise_uncond[step][b].float()
    t = trace.noise_text[step][b].float()
    pred = u + float(scale) * (t - u)
    a, c = x0_coefficients(trace, step)
    return a * trace.latents[step][b].float() + c * pred


def x0_guidance_sweep(trace: Any, step: int, scales: Any, batch: int = 0) -> torch.Tensor:
    """:func:`x0_at_guidance` for several scales: ``(len(scales), C, h, w)``."""
    return torch.stack([x0_at_guidance(trace, step, float(s), batch) for s in scales])


# --------------------------------------------------------------------------- scheduler view
@dataclass
class SchedulerView:
    """The schedule the run used, one entry per step (``(steps,)`` arrays):

    ``timesteps``; ``alpha_bar`` = ``a_t`` at each timestep (NaN if not rebuildable);
    ``sigmas`` (recorded for sigma schedulers, else ``sqrt((1 - a_t) / a_t)``);
    ``log_snr = log(a_t / (1 - a_t)) = -2 log sigma``; ``dt`` = timestep minus the next step's
    (the last step goes to 0) and ``dsigma`` the same for sigma: the step sizes.
    """

    scheduler: str
    prediction_type: str
    form: str
    timesteps: np.ndarray
    sigmas: np.ndarray
    alpha_bar: np.ndarray
    log_snr: np.ndarray
    dt: np.ndarray
    dsigma: np.ndarray

    def to_dict(self) -> dict:
        out = {}
        for k, v in vars(self).items():
            out[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return out


def scheduler_view(trace: Any) -> SchedulerView:
    """Timesteps, sigmas / alphas and step sizes per step (see :class:`SchedulerView`)."""
    ts = np.asarray(trace.timesteps, dtype=np.float64)
    n = len(ts)
    try:
        form = schedule_form(trace)
    except ValueError:
        form = "unknown"
    try:
        ac_table = _alpha_bars(trace).double().numpy()
        idx = np.clip(np.round(ts).astype(int), 0, len(ac_table) - 1)
        ac = ac_table[idx]
    except ValueError:
        ac = np.full(n, np.nan)
    if getattr(trace, "sigmas", None) is not None:
        sig = np.asarray(trace.sigmas, dtype=np.float64)
        if form == "flow":  # x_t = (1 - sigma) x0 + sigma eps: SNR = ((1 - sigma) / sigma)^2
            ac = (1 - sig) ** 2 / ((1 - sig) ** 2 + sig**2)
        elif np.isnan(ac).all():
            ac = 1 / (1 + sig**2)
    else:
        sig = np.sqrt((1 - ac) / ac)
    with np.errstate(divide="ignore"):
        log_snr = np.log(ac / (1 - ac))
    dt = ts - np.append(ts[1:], 0.0)
    dsig = sig - np.append(sig[1:], 0.0)
    return SchedulerView(scheduler_class(trace) or "unknown", prediction_type(trace), form, ts,
                         sig, ac, log_snr, dt, dsig)
