"""Wrapping ``scheduler.step``: latents, timesteps, sigmas, and x0 for every prediction type.

The wrapper is an *instance attribute* ``scheduler.step`` that shadows the class method; removing
the attribute (``del scheduler.step``) restores the class method. It calls the original step
unchanged and reports ``(sample, model_output, timestep, sigma, x0, prev_sample, reported_x0)`` to
a callback.

x0 (the predicted clean latent) is computed by sdlens for every scheduler of diffusers' SD family,
in the *pipeline's* latent convention (the tensor the pipeline passes to ``step`` as ``sample``):

* alpha form (DDIM, DDPM, PNDM, LCM, ...), ``a_t = alphas_cumprod[t]``:
  epsilon ``x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t)``; v ``x0 = sqrt(a_t) x - sqrt(1-a_t) v``.
* sigma form, k-diffusion schedulers (Euler, Euler ancestral, LMS, Heun, KDPM2, ...), whose
  latents are *not* scaled by ``scale_model_input`` when handed to ``step``; ``sigma`` is the
  sigma the model was evaluated at, ``scheduler.sigmas[step_index]`` (for Heun's second stage
  that is the next sigma; KDPM2's second stage uses its interpolated sigma): epsilon ``x0 = x - sigma eps``; v
  ``x0 = -sigma/sqrt(sigma^2+1) v + x/(sigma^2+1)``.
* alpha/sigma form (DPM-Solver multistep/singlestep, UniPC, DEIS, SA-Solver), with
  ``alpha_t, sigma_t`` from ``scheduler.sigmas[step_index]``: epsilon
  ``x0 = (x - sigma_t eps) / alpha_t``; v ``x0 = alpha_t x - sigma_t v``.
* ``prediction_type == "sample"``: ``x0 = model_output``.

With ``clip_sample=True`` in the scheduler's config (DDIM/DDPM) x0 is clamped to
``[-clip_sample_range, clip_sample_range]`` as the scheduler does; with dynamic ``thresholding``
the scheduler's own ``pred_original_sample`` is used. For schedulers outside these families the scheduler's own
``pred_original_sample`` is used when it returns one, else x0 is not recorded (with a warning).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def schedule_form(scheduler) -> str:
    """Which x0 formula fits ``scheduler``: "alpha", "sigma", "alpha_sigma" or "unknown"."""
    name = type(scheduler).__name__
    if name.startswith(("EDM", "FlowMatch", "CMStochastic", "Cosine")):
        return "unknown"
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t") and hasattr(scheduler, "sigmas"):
        if scheduler.config.get("use_flow_sigmas", False):
            return "unknown"
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
        scheduler: the scheduler (its ``alphas_cumprod`` / ``sigmas`` are read, never changed).
        step_index: the scheduler's ``step_index`` *before* this step (sigma schedulers).
        sigma: the sigma the model was evaluated at (default ``scheduler.sigmas[step_index]``).
    """
    x = sample.float()
    m = model_output.float()
    if prediction_type == "sample":
        return m.clone()
    if form == "alpha":
        ac = scheduler.alphas_cumprod.to(device=x.device, dtype=torch.float32)
        if torch.is_tensor(timestep):  # index on the device: no host sync
            a = ac[timestep.to(device=x.device).long().reshape(())]
        else:
            a = ac[int(timestep)]
        if prediction_type == "epsilon":
            return (x - (1 - a).sqrt() * m) / a.sqrt()
        return a.sqrt() * x - (1 - a).sqrt() * m
    if sigma is None:
        sigma = _sigma_at(scheduler, step_index)
    if sigma is None:
        return None
    sigma = sigma.to(device=x.device, dtype=torch.float32)
    if form == "sigma":
        if prediction_type == "epsilon":
            return x - sigma * m
        return m * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
    if form == "alpha_sigma":
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)
        if prediction_type == "epsilon":
            return (x - sigma_t * m) / alpha_t
        return alpha_t * x - sigma_t * m
    return None


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
            import functools

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
            if self.form in ("sigma", "alpha_sigma") else None
        x0 = None
        if self.want_x0:
            if self.prediction_type not in PREDICTION_TYPES:
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
                        "ancestral, LMS, Heun, DPM-Solver, UniPC; epsilon, v_prediction, sample); "
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
