"""The schedule table: x0 / eps / v / flow maths for every scheduler and prediction type, and
the ``scheduler.step`` wrapper that records with it.

Every reader of schedule maths reads it here: the step hook (x0 of every step, on the device),
``sdlens.analysis.guidance`` (x0 at another guidance scale, the scheduler view) and
``sdlens.analysis.previews`` (latents as the model sees them) — the analysis side on a scheduler
rebuilt from a saved trace's ``meta`` (:func:`rebuild_scheduler`).

x0 (the predicted clean latent) is in the *pipeline's* latent convention (the tensor the
pipeline passes to ``step`` as ``sample``). One row per *form* of scheduler (:data:`TABLE`);
each row gives x0 from ``x`` (the sample) and the prediction ``m`` at the step's noise *level*,
and the same as coefficients ``x0 = a * x + b * m``:

=============  ==================================  =============================================
form           schedulers (level)                  x0 for epsilon / v_prediction
=============  ==================================  =============================================
alpha          DDIM, DDPM, PNDM, LCM, ...          ``(x - sqrt(1-a_t) eps) / sqrt(a_t)`` /
               (``a_t = alphas_cumprod[t]``)       ``sqrt(a_t) x - sqrt(1-a_t) v``
sigma          Euler, Euler ancestral, LMS, Heun,  ``x - sigma eps`` /
               KDPM2, ... (``sigma``; latents not  ``-sigma/sqrt(sigma^2+1) v + x/(sigma^2+1)``
               scaled by ``scale_model_input``)
alpha_sigma    DPM-Solver multistep/singlestep,    ``(x - sigma_t eps) / alpha_t`` /
               UniPC, DEIS, SA-Solver (``sigma``;  ``alpha_t x - sigma_t v``
               ``alpha_t = 1/sqrt(sigma^2+1)``,
               ``sigma_t = sigma alpha_t``)
flow           flow matching (FlowMatch Euler /    ``x - sigma v`` (the model predicts the
               Heun, ...; DPM-Solver / UniPC with  velocity ``v = eps - x0``; the config's
               ``use_flow_sigmas``; ``sigma``)     ``flow_prediction`` means v)
=============  ==================================  =============================================

``prediction_type == "sample"``: ``x0 = m`` in every form. ``sigma`` is the sigma the model was
evaluated at, ``scheduler.sigmas[step_index]`` (Heun's second stage: the next sigma; KDPM2's
second stage: its interpolated sigma, :func:`model_sigma`). The sigma form's model input is the
latents scaled by ``1/sqrt(sigma^2+1)`` (:func:`input_scale`; 1 in the other forms).

The wrapper is an *instance attribute* ``scheduler.step`` that shadows the class method; removing
the attribute (``del scheduler.step``) restores the class method. It calls the original step
unchanged and reports ``(sample, model_output, timestep, sigma, x0, prev_sample, reported_x0)`` to
a callback. With ``clip_sample=True`` in the scheduler's config (DDIM/DDPM) x0 is clamped to
``[-clip_sample_range, clip_sample_range]`` as the scheduler does; with dynamic ``thresholding``
the scheduler's own ``pred_original_sample`` is used. For schedulers outside these forms the
scheduler's own ``pred_original_sample`` is used when it returns one, else x0 is not recorded
(with a warning).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# what flow-sigma DPM-Solver / UniPC configs call the velocity (Sana); the flow row reads it
FLOW_PREDICTION = "flow_prediction"


# --------------------------------------------------------------------------- the table
def _alpha_x0(x, m, eps: bool, a, scheduler):
    if eps:
        return (x - (1 - a).sqrt() * m) / a.sqrt()
    return a.sqrt() * x - (1 - a).sqrt() * m


def _alpha_coefficients(eps: bool, a: float) -> tuple[float, float]:
    if eps:
        return 1 / math.sqrt(a), -math.sqrt(1 - a) / math.sqrt(a)
    return math.sqrt(a), -math.sqrt(1 - a)


def _sigma_x0(x, m, eps: bool, sigma, scheduler):
    if eps:
        return x - sigma * m
    return m * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)


def _sigma_coefficients(eps: bool, sigma: float) -> tuple[float, float]:
    if eps:
        return 1.0, -sigma
    return 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)


def _alpha_sigma_x0(x, m, eps: bool, sigma, scheduler):
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)  # the scheduler's own split
    if eps:
        return (x - sigma_t * m) / alpha_t
    return alpha_t * x - sigma_t * m


def _alpha_sigma_coefficients(eps: bool, sigma: float) -> tuple[float, float]:
    alpha = 1 / math.sqrt(sigma**2 + 1)
    sigma_t = sigma * alpha
    if eps:
        return 1 / alpha, -sigma_t / alpha
    return alpha, -sigma_t


def _flow_x0(x, m, eps: bool, sigma, scheduler):
    return x - sigma * m  # m is the velocity whatever the config's prediction_type says


def _flow_coefficients(eps: bool, sigma: float) -> tuple[float, float]:
    return 1.0, -sigma


@dataclass(frozen=True)
class Form:
    """One row of the schedule table.

    Attributes:
        level: what the row reads at a step: ``"alpha_bar"`` (``alphas_cumprod[t]``) or
            ``"sigma"`` (the sigma the model was evaluated at).
        x0: ``(x, m, eps, level, scheduler) -> x0`` on tensors (``eps``: the prediction is
            epsilon, else v); the recorder's formula, computed on the device.
        coefficients: ``(eps, level) -> (a, b)`` with ``x0 = a * x + b * m``, in Python floats.
        scaled_input: the model sees ``x / sqrt(sigma^2 + 1)`` (k-diffusion convention).
    """

    level: str
    x0: Callable
    coefficients: Callable[[bool, float], tuple[float, float]]
    scaled_input: bool = False


TABLE: dict[str, Form] = {
    "alpha": Form("alpha_bar", _alpha_x0, _alpha_coefficients),
    "sigma": Form("sigma", _sigma_x0, _sigma_coefficients, scaled_input=True),
    "alpha_sigma": Form("sigma", _alpha_sigma_x0, _alpha_sigma_coefficients),
    "flow": Form("sigma", _flow_x0, _flow_coefficients),
}
FORMS = tuple(TABLE)

# class-name parts -> form, for traces whose scheduler cannot be rebuilt (first match wins:
# "FlowMatchEuler..." is flow, not sigma)
CLASS_FORMS = (("FlowMatch", "flow"), ("DPMSolver", "alpha_sigma"), ("UniPC", "alpha_sigma"),
               ("DEIS", "alpha_sigma"), ("SASolver", "alpha_sigma"), ("Euler", "sigma"),
               ("LMS", "sigma"), ("Heun", "sigma"), ("KDPM2", "sigma"))


def form_of_class(name: str) -> str | None:
    """The form of the scheduler class ``name`` by its name alone (see :data:`CLASS_FORMS`)."""
    return next((form for part, form in CLASS_FORMS if part in name), None)


def schedule_form(scheduler) -> str:
    """Which row of the table fits ``scheduler`` (a live one, or one rebuilt by
    :func:`rebuild_scheduler`): "alpha", "sigma", "alpha_sigma", "flow" or "unknown"."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):
        return "flow" if hasattr(scheduler, "sigmas") else "unknown"
    if name.startswith(("EDM", "CMStochastic", "Cosine")):
        return "unknown"
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t") and hasattr(scheduler, "sigmas"):
        if scheduler.config.get("use_flow_sigmas", False):
            # DPM-Solver / UniPC on flow sigmas (Sana): alpha_t = 1 - sigma, sigma_t = sigma,
            # the model predicts the velocity and x0 = x - sigma v
            return "flow"
        return "alpha_sigma"
    if hasattr(scheduler, "sigmas") and hasattr(scheduler, "step_index"):
        try:
            scaled = float(scheduler.init_noise_sigma) > 1.0 + 1e-6
        except (TypeError, ValueError, RuntimeError):
            scaled = False
        if scaled:  # k-diffusion convention: x = x0 + sigma * eps, model input scaled down
            return "sigma"
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        return "alpha"
    return "unknown"


def prediction_kind(scheduler) -> str:
    """What the model predicts under ``scheduler``, as ``Trace.prediction_type`` says it:
    "flow" (a velocity) for flow-matching schedulers (their configs name no prediction type),
    else the config's "epsilon" / "v_prediction" / "sample"."""
    if type(scheduler).__name__.startswith("FlowMatch") or schedule_form(scheduler) == "flow":
        return "flow"
    return scheduler.config.get("prediction_type", "epsilon") or "epsilon"


def rebuild_scheduler(class_name: str | None, config: dict):
    """The diffusers scheduler ``class_name`` made from ``config`` (a saved trace's
    ``meta["scheduler_class"]`` / ``meta["scheduler_config"]``), or None if it cannot be."""
    if not class_name:
        return None
    import diffusers

    klass = getattr(diffusers, class_name, None)
    if klass is None:
        return None
    try:
        return klass.from_config(config)
    except Exception:  # noqa: BLE001 - an odd config: the caller reports what is missing
        return None


def alpha_bars(scheduler) -> torch.Tensor | None:
    """``(num_train_timesteps,)`` float32: ``a_t`` (``alphas_cumprod``) of every training
    timestep, or None for schedulers without one."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    return None if ac is None else ac.float()


def x0_coefficients(form: str | None, prediction_type: str, level: float | None
                    ) -> tuple[float, float]:
    """``(a, b)`` with ``x0 = a * x_t + b * prediction`` for a row of the table at noise
    ``level`` (``a_t`` for the alpha form, else sigma; neither is read for "sample"; "flow", the
    velocity, is read by the flow row only); ValueError for an unknown prediction type or form."""
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type in ("flow", FLOW_PREDICTION):  # a velocity: only the flow row reads it
        form = "flow" if form in (None, "flow") else form
        if form != "flow":
            raise ValueError(f"prediction_type {prediction_type!r} is not supported by the "
                             f"{form!r} form (only by the flow form); allowed: epsilon, "
                             "v_prediction, sample, flow")
    elif prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; allowed: "
                         "epsilon, v_prediction, sample, flow")
    if form not in TABLE:
        raise ValueError(f"unknown schedule form {form!r}; forms: {FORMS}")
    return TABLE[form].coefficients(prediction_type == "epsilon", float(level))


def input_scale(form: str, sigma: float) -> float:
    """The factor the model input is the latents times, at ``sigma``: ``1/sqrt(sigma^2+1)`` in
    the sigma form, else 1."""
    row = TABLE.get(form)
    return 1.0 / float(np.sqrt(float(sigma) ** 2 + 1)) if row is not None and row.scaled_input \
        else 1.0


def _sigma_at(scheduler, index: int | None):
    sigmas = getattr(scheduler, "sigmas", None)
    if index is None or sigmas is None or not torch.is_tensor(sigmas) or index >= len(sigmas):
        return None
    return sigmas[index]


def model_sigma(scheduler, step_index: int | None, first_order: bool = True):
    """The sigma the model was evaluated at for the step at ``step_index`` (the index *before*
    the step): ``sigmas[step_index]``, except in the second stage of KDPM2 / KDPM2 ancestral,
    which evaluate the model at an interpolated sigma (``sigmas_interpol``)."""
    interpol = getattr(scheduler, "sigmas_interpol", None)
    if not first_order and interpol is not None and step_index is not None:
        name = type(scheduler).__name__
        idx = step_index - 1 if name == "KDPM2AncestralDiscreteScheduler" else step_index
        if 0 <= idx < len(interpol):
            return interpol[idx]
    return _sigma_at(scheduler, step_index)


def compute_x0(form: str, prediction_type: str, sample: torch.Tensor, model_output: torch.Tensor,
               timestep, scheduler, step_index: int | None,
               sigma: torch.Tensor | None = None) -> torch.Tensor | None:
    """Predicted clean latent (float32, on ``sample``'s device) or None if the form is unknown.

    Args:
        form: from :func:`schedule_form`.
        prediction_type: "epsilon", "v_prediction" or "sample".
        sample: (B, C, h, w) the latents the pipeline passed to ``step``.
        model_output: (B, C, h, w) what the scheduler received (guided prediction).
        timestep: the timestep passed to ``step``.
        scheduler: the scheduler (its ``a_t`` table / ``sigmas`` are read, never changed).
        step_index: the scheduler's ``step_index`` *before* this step (sigma schedulers).
        sigma: the sigma the model was evaluated at (default ``scheduler.sigmas[step_index]``).
    """
    x = sample.float()
    m = model_output.float()
    if prediction_type == "sample":
        return m.clone()
    row = TABLE.get(form)
    if row is None:
        return None
    eps = prediction_type == "epsilon"
    if row.level == "alpha_bar":
        ac = alpha_bars(scheduler).to(device=x.device)
        if torch.is_tensor(timestep):  # index on the device: no host sync
            a = ac[timestep.to(device=x.device).long().reshape(())]
        else:
            a = ac[int(timestep)]
        return row.x0(x, m, eps, a, scheduler)
    if sigma is None:
        sigma = _sigma_at(scheduler, step_index)
    if sigma is None:
        return None
    return row.x0(x, m, eps, sigma.to(device=x.device, dtype=torch.float32), scheduler)


class StepWrapper:
    """Callable installed as ``scheduler.step``; reports every call to ``on_step``.

    ``on_step(sample, model_output, timestep, sigma, x0, prev_sample, reported_x0)`` where all
    tensors are on the pipeline's device (the callback decides what to copy to the host):

    * sample: (B, C, h, w) latents before the step, as the pipeline held them
    * model_output: (B, C, h, w) the guided prediction the scheduler received
    * timestep: the timestep argument; sigma: 0-d tensor or None
    * x0: (B, C, h, w) float32 computed by sdlens (None if the scheduler's form is unknown)
    * prev_sample: (B, C, h, w) the returned latents
    * reported_x0: the scheduler's own ``pred_original_sample`` if it returned one, else None
    """

    def __init__(self, scheduler, on_step: Callable, want_x0: bool = True):
        self.scheduler = scheduler
        self.original = type(scheduler).step.__get__(scheduler) if "step" not in vars(scheduler) \
            else vars(scheduler)["step"]
        self.had_instance_attr = "step" in vars(scheduler)
        self.on_step = on_step
        self.want_x0 = want_x0
        self.form = None  # decided at the first step (sigmas exist after set_timesteps)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self._warned = False
        # diffusers inspects the signature of scheduler.step (eta, generator): keep it visible.
        try:
            functools.update_wrapper(self, self.original)
        except (AttributeError, TypeError):
            pass

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        sched = self.scheduler
        if self.form is None:
            self.form = schedule_form(sched)
        index_before = getattr(sched, "step_index", None)
        first_order = bool(getattr(sched, "state_in_first_order", True))
        out = self.original(model_output, timestep, sample, *args, **kwargs)
        index_after = getattr(sched, "step_index", None)
        if index_before is None and index_after is not None:
            index_before = index_after - 1
        if isinstance(out, tuple):
            prev_sample = out[0]
            reported = out[1] if len(out) > 1 and torch.is_tensor(out[1]) \
                and out[1].shape == prev_sample.shape else None
        else:
            prev_sample = out.prev_sample
            reported = getattr(out, "pred_original_sample", None)
        sigma = model_sigma(sched, index_before, first_order) \
            if self.form in TABLE and TABLE[self.form].level == "sigma" else None
        x0 = None
        if self.want_x0:
            if self.prediction_type not in PREDICTION_TYPES and not (
                    self.prediction_type == FLOW_PREDICTION and self.form == "flow"):
                x0 = None
            else:
                x0 = compute_x0(self.form, self.prediction_type, sample, model_output, timestep,
                                sched, index_before, sigma)
            cfg = sched.config
            if x0 is not None and cfg.get("thresholding", False) and reported is not None:
                x0 = reported.float()  # dynamic thresholding: the scheduler's own x0
            elif x0 is not None and cfg.get("clip_sample", False):
                r = float(cfg.get("clip_sample_range", 1.0))
                x0 = x0.clamp(-r, r)  # what DDIM/DDPM use (and report) with clip_sample=True
            if x0 is None:
                if reported is not None:
                    x0 = reported.float()
                elif not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"sdlens cannot compute x0 for {type(sched).__name__} with prediction_type="
                        f"{self.prediction_type!r} (supported: DDIM, DDPM, PNDM, Euler, Euler "
                        "ancestral, LMS, Heun, DPM-Solver, UniPC, flow matching; epsilon, "
                        "v_prediction, sample); "
                        "trace.x0 will be None", stacklevel=2)
        self.on_step(sample, model_output, timestep, sigma, x0, prev_sample, reported)
        return out


def install(scheduler, on_step: Callable, want_x0: bool = True) -> StepWrapper:
    """Shadow ``scheduler.step`` with a :class:`StepWrapper`; undo with :func:`uninstall`."""
    wrapper = StepWrapper(scheduler, on_step, want_x0)
    scheduler.step = wrapper
    return wrapper


def uninstall(scheduler, wrapper: StepWrapper) -> None:
    """Restore what ``scheduler.step`` was before :func:`install` (the class method, normally)."""
    if wrapper.had_instance_attr:
        scheduler.step = wrapper.original
    elif "step" in vars(scheduler):
        del scheduler.step
