"""Recording a diffusers Stable Diffusion run: ``trace()``, ``generate()`` and ``RecordOptions``.

>>> with sdlens.trace(pipe) as tr:                 # every pipeline call inside is recorded
...     out = pipe("a red circle", num_inference_steps=25, generator=torch.Generator().manual_seed(0))
>>> tr.latents.shape                                # tr shows the last call; tr.runs all of them
>>> tr = sdlens.generate(pipe, "a red circle", seed=0, steps=25)

How it works (everything is installed through :class:`~sdlens.engine.sites.Hooks` and undone on
exit, also on exceptions and KeyboardInterrupt):

* ``pipe``'s class is swapped, for the length of the ``with`` block, for a subclass whose
  ``__call__`` reads the call's arguments (prompts, batch size, seeds) and then runs the
  original ``__call__`` with exactly the arguments it was given (sdlens adds only its step-end
  callback, composed with the user's). For the length of each call sdlens installs:
* a :class:`~sdlens.engine.sites.SiteProcessor` with a
  :class:`~sdlens.engine.sites.MapRecorder` around the processor of every attention site that
  the pipeline's backbone adapter (:mod:`sdlens.engine.arch`) names; it reads the attention at
  the processor's kernel call (:mod:`sdlens.engine.kernel`), laid out by the adapter, into the
  call's one map collector (:mod:`sdlens.engine.collect`); the original processor still
  computes the output: traced images are identical,
* forward (pre-)hooks on the denoiser (batch layout, uncond/text noise),
* a ``scheduler.step`` wrapper (latents, guided noise, timesteps, sigmas, x0),
* a ``callback_on_step_end`` composed with the user's (latents after the step as the pipeline
  holds them, e.g. after inpainting's re-blending or a user callback that edits them).

Device tensors are reduced on the device, and copied to the host after each step with
non-blocking copies; nothing synchronises the device inside a layer.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import inspect
import random
import warnings

import torch

from sdlens.analysis.guidance import check_guidance_scale
from sdlens.analysis.tokens import check_user_tokens, image_prompt_tokens, tokenize_segments
from sdlens.engine import schedules as sched_hooks
from sdlens.engine.arch import BackboneAdapter, adapter_for
from sdlens.engine.collect import Maps
from sdlens.engine.joint import ConceptPass, check_joint_options
from sdlens.engine.options import (RecordOptions, TraceTooLarge, default_max_bytes,
                                   estimate_trace_bytes, human_bytes, map_steps)
from sdlens.engine.sites import Hooks, KernelSeam, MapRecorder, reweighting
from sdlens.engine.text import text_axis
from sdlens.pipeline import pipeline_task, recommended_settings
from sdlens.trace.core import Trace
from sdlens.trace.maps import resolve_layers
from sdlens.trace.steps import select_steps


def check_pipeline(pipe) -> BackboneAdapter:
    """The backbone adapter of ``pipe``; TypeError if sdlens cannot trace it."""
    adapter = adapter_for(pipe)
    cls = type(pipe).__name__
    if getattr(pipe, "scheduler", None) is None or not hasattr(pipe.scheduler, "step"):
        raise TypeError(f"sdlens cannot trace {cls}: it has no scheduler with a step() method")
    return adapter


@functools.lru_cache(maxsize=None)
def _version(pkg: str) -> str:  # cached: the metadata lookup costs ms at every traced call
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ====================================================================== one run
class _Run:
    """State of one traced pipeline call (hook callbacks land here)."""

    def __init__(self, session: "_Session", pipe, params: dict):
        self.session = session
        self.opts = session.options
        self.pipe = pipe
        self.params = params
        self.step = 0
        self.layout: str | None = None  # "cfg" | "single"
        self.batch = None  # number of latents (batch items)
        self.latent_hw = None
        # which of the adapter's denoisers predicted each step (Wan 2.2's two experts)
        self.denoiser_now: str | None = None
        self.denoiser_steps: list[str | None] = []
        self.total_steps = None
        self.att_steps: set[int] = set()
        self.maps_now = False  # a recorded step: maps of every kind (attention, concepts, ...)
        kinds = [k for k in ("attention", "image_to_text", "reference_maps")
                 if k in self.opts.record]
        # the one collector of every kind of map (engine/collect.py); its sink protocol is what
        # the kernel readers and the concept pass speak
        self.maps = Maps(self, kinds + (["concepts"] if self.opts.concepts else []),
                         self.opts.concepts)
        self.rows = None
        self.n_tokens = None
        self.denoiser_calls_this_step = 0
        self.denoiser_calls = 0
        self.warned_double = False
        self.pending_noise = None  # (uncond | None, text)
        self.selected: list[str] = list(session.selected_layers)
        self.resolutions: dict[str, tuple[int, int]] = {}
        self.aux = False  # inside an auxiliary denoiser call (not recorded)
        # guidance as separate denoiser calls per step (Flux's true CFG), in call order
        self.cfg_calls = session.adapter.cfg_calls(params)
        self.half: str | None = None  # the half of the current denoiser call (cfg_calls)
        self.pending_halves: dict[str, torch.Tensor] = {}
        self.segments = None  # per item: the text encoders' segments (several encoders)
        self.skipped: dict[str, str] = {}  # layer -> what could not be recorded
        self.control: list[torch.Tensor] = []  # per step (batch, nets, blocks) residual RMS
        self.pending_control: dict[int, torch.Tensor] = {}  # net -> (batch, blocks)
        self.n_nets = 0
        self.abandoned: str | None = None  # why this call is not recorded (it still runs)
        # host data
        self.latents: list[torch.Tensor | None] = []
        self.noise: list[torch.Tensor] = []
        self.noise_text: list[torch.Tensor] = []
        self.noise_uncond: list[torch.Tensor | None] = []
        self.x0: list[torch.Tensor | None] = []
        self.timesteps: list[float] = []
        self.sigmas: list[float | None] = []
        self.devices: set[torch.device] = set()

    # ---------------------------------------------------------------- host copies
    def _host(self, t: torch.Tensor, dtype=torch.float32, owned: bool = False) -> torch.Tensor:
        """A host copy of ``t`` (``owned``: ``t`` was made by sdlens, nothing else holds it, so
        on the CPU it is kept as it is instead of copied)."""
        self.devices.add(t.device)
        if t.device.type == "cpu":
            if owned and t.dtype == dtype:
                return t.detach()
            return t.detach().to(dtype=dtype, copy=True)
        return t.detach().to(device="cpu", dtype=dtype, non_blocking=True)

    def abandon(self, reason: str) -> None:
        """Stop recording this call (a layout sdlens does not understand); the pipeline runs on
        untouched, one warning, and the call adds no trace."""
        if self.abandoned is None:
            self.abandoned = reason
            self.maps_now = False
            warnings.warn(f"sdlens: stopped recording this pipeline call: {reason}; the "
                          "generation is not affected, but this call has no trace", stacklevel=3)

    # ---------------------------------------------------------------- denoiser hooks
    def recording(self) -> bool:
        """Whether the maps of the denoiser call in progress are recorded (a recorded step; not
        an auxiliary call; not true CFG's negative call, whose maps are the text call's)."""
        return self.maps_now and not self.aux and not self.abandoned and self.half != "uncond"

    def before_denoiser(self, sample: torch.Tensor) -> None:
        if self.abandoned:
            return
        n = sample.shape[0]
        if self.layout is None:
            self._first_denoiser_call(sample)
            if self.abandoned:
                return
        expected = 2 * self.batch if self.layout == "cfg" and not self.cfg_calls else self.batch
        if n != expected:
            return self.abandon(f"the denoiser was called with batch {n} at step {self.step}, "
                                f"expected {expected} (a batch layout sdlens does not know)")
        calls = len(self.cfg_calls or ())
        self.half = self.cfg_calls[self.denoiser_calls_this_step] \
            if self.denoiser_calls_this_step < calls else None
        self.denoiser_calls_this_step += 1
        self.denoiser_calls += 1
        if self.denoiser_calls_this_step > max(1, calls) and not self.warned_double:
            self.warned_double = True
            warnings.warn("sdlens: the denoiser was called more than once before a scheduler "
                          "step; noise and attention are recorded from the last call",
                          stacklevel=2)
        self.maps_now = self.step in self.att_steps
        if self.half != "uncond":  # the text call's maps stay when the uncond call follows
            self.maps.clear_pending()

    def _first_denoiser_call(self, sample: torch.Tensor) -> None:
        n = sample.shape[0]
        b = self.session_batch
        if n == b and self.cfg_calls:  # one call per half (Flux's true CFG)
            self.layout = "cfg"
            self.rows = slice(0, b)
        elif n == 2 * b:
            self.layout = "cfg"
            self.rows = self.session.adapter.cfg_rows(b)["text"]
        elif n == b:
            self.layout = "single"
            self.rows = slice(0, b)
        else:
            return self.abandon(f"the denoiser sees batch {n} but the call has {b} batch items "
                                "(prompts x num_images_per_prompt); cannot tell the guidance layout")
        self.batch = b
        self.latent_hw = self.session.adapter.latent_size(sample)  # (h, w); video (F, h, w)
        total = getattr(self.pipe, "_num_timesteps", None)
        if not isinstance(total, int) or total <= 0:
            ts = getattr(self.pipe.scheduler, "timesteps", None)
            total = len(ts) - int(getattr(self.pipe.scheduler, "begin_index", None) or 0) if ts is not None else 0
        self.total_steps = int(total)
        adapter = self.session.adapter
        self.att_steps = set(select_steps(map_steps(self.opts, adapter), self.total_steps))
        self.resolutions = adapter.resolutions(self.latent_hw)
        self.selected = resolve_layers(self.opts.layers, self.session.layers,
                                       lambda l: self.resolutions[l], adapter.naming)
        if self.opts.keep_padding:
            self.n_tokens = None
        elif self.segments is not None:  # each segment's own tokens, its padding left out
            self.n_tokens = [p for i, seg in enumerate(self.segments[0]) for p in range(
                seg["start"], seg["start"] + max(item[i]["tokens"] for item in self.segments))]
            self.n_tokens = self.n_tokens or None  # prompts given as embeddings: keep them all
        else:
            self.n_tokens = self.max_token_len
        self._check_size()


    def estimate_bytes(self) -> dict[str, int]:
        """Estimated host bytes per kind of data (from the shapes known at the first denoiser
        call)."""
        return estimate_trace_bytes(
            self.pipe, batch=self.batch, steps=self.total_steps, latent_hw=self.latent_hw,
            n_tokens=(len(self.n_tokens) if isinstance(self.n_tokens, list) else self.n_tokens)
            or self.text_length(),
            do_cfg=self.layout == "cfg", options=self.opts,
            layers=self.selected, attention_steps=len(self.att_steps))

    def text_length(self) -> int:
        """Positions of the denoiser's text sequence (77; SD3: CLIP + T5)."""
        if self.segments:
            return sum(int(seg["length"]) for seg in self.segments[0])
        return self.session.adapter.max_text_tokens

    def _check_size(self) -> None:
        est = self.estimate_bytes()
        total = sum(est.values())
        self.estimated = est
        if self.opts.attention_dtype == "auto":  # the storage the estimate chose, from now on
            self.opts = dataclasses.replace(self.opts, attention_dtype=est.attention_dtype)
        limit = self.opts.max_bytes if self.opts.max_bytes is not None else default_max_bytes()
        if total > limit:
            parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in est.items() if v)
            raise TraceTooLarge(
                f"sdlens: this trace would need about {human_bytes(total)} ({parts}), more than "
                f"max_bytes={human_bytes(limit)}. Shrink it with: layers= (e.g. 'up' or 16: fewer "
                "attention layers), steps= (e.g. slice(None, None, 5): attention every 5th step), "
                "heads=False (average heads), keep_padding=False, record=(...) without "
                "'attention' or 'noise', fewer images per call; or raise max_bytes")

    def skip(self, key: str, what: str) -> None:
        """A site (``key``: its name, or ``"<kind> <site>"``) sdlens cannot record: its maps are
        left out of the trace (named in ``meta["skipped"]``), one warning per call of the
        pipeline, and the run goes on."""
        if key in self.skipped:
            return
        if not self.skipped:
            warnings.warn(f"sdlens: cannot record the attention of layer {key} ({what}); its "
                          "maps are left out of the trace (see trace.meta['skipped'] for every "
                          "layer skipped); the generation is not affected", stacklevel=2)
        self.skipped[key] = what

    def after_denoiser(self, out: torch.Tensor) -> None:
        if "noise" not in self.opts.record or self.abandoned:
            return
        out = self.session.adapter.spatial(out, self.latent_hw)
        if self.cfg_calls:  # one call per half: this call's half
            if self.half is not None:
                self.pending_halves[self.half] = self._host(out)
            self.pending_noise = (self.pending_halves.get("uncond"),
                                  self.pending_halves.get("text"))
        elif self.layout == "cfg":
            halves = self.session.adapter.split_cfg(out)
            self.pending_noise = (self._host(halves["uncond"]), self._host(halves["text"]))
        else:
            self.pending_noise = (None, self._host(out))

    def after_controlnet(self, net: int, output) -> None:
        """One ControlNet's residuals (down blocks, then mid) at this step: their RMS per batch
        item (the text rows under CFG; guess mode runs the net on those alone)."""
        if self.abandoned or not self.n_nets:
            return
        try:
            if isinstance(output, (tuple, list)):
                down, mid = output[0], output[1]
            else:
                down, mid = output.down_block_res_samples, output.mid_block_res_sample
            res = list(down) + [mid]
            n, b = res[0].shape[0], self.session_batch
            rows = self.session.adapter.cfg_rows(b)["text"] if n == 2 * b else slice(0, n)
            rms = torch.stack([r[rows].detach().float().pow(2).mean(dim=(1, 2, 3)).sqrt()
                               for r in res], 1)
        except Exception as e:  # noqa: BLE001 - a ControlNet output sdlens does not know
            self.n_nets, self.control = 0, []
            return self.skip("controlnet residuals", f"{type(e).__name__}: {e}")
        self.pending_control[net] = self._host(rms, owned=True)

    # ---------------------------------------------------------------- scheduler
    def on_step(self, sample, model_output, timestep, sigma, x0, prev_sample, reported) -> None:
        rec = self.opts.record
        if self.abandoned:
            return
        if self.layout is None:
            return self.abandon("scheduler.step was called before the denoiser")
        if sample.shape[0] != self.batch:
            return self.abandon(f"scheduler.step got {sample.shape[0]} latents, expected "
                                f"{self.batch}")
        # packed latents (Flux) as (B, C, h, w)
        sample, model_output, x0, prev_sample = (
            None if t is None else self.session.adapter.spatial(t, self.latent_hw)
            for t in (sample, model_output, x0, prev_sample))
        if "latents" in rec:
            if self.step == 0:
                self.latents.append(self._host(sample))
            self.latents.append(self._host(prev_sample))
        if "noise" in rec:
            uncond, text = self.pending_noise if self.pending_noise is not None else (None, None)
            self.noise_uncond.append(uncond)
            self.noise_text.append(text)
            self.noise.append(self._host(model_output))
            self.pending_noise = None
            self.pending_halves = {}
        if "x0" in rec:
            self.x0.append(self._host(x0) if x0 is not None else None)
        self.denoiser_steps.append(self.denoiser_now)
        self.timesteps.append(float(timestep) if not torch.is_tensor(timestep)
                              else self._host(timestep.reshape(()), torch.float32))
        self.sigmas.append(None if sigma is None else self._host(sigma.reshape(()), torch.float32))
        if self.maps_now:
            self.maps.end_step()
        if self.n_nets:
            blocks = next(iter(self.pending_control.values())).shape[1] if self.pending_control \
                else None
            if blocks is not None:  # a net not called at this step: NaN
                nan = torch.full((self.batch, blocks), float("nan"))
                self.control.append(torch.stack([self.pending_control.get(i, nan)
                                                 for i in range(self.n_nets)], 1))
            else:
                self.control.append(None)
            self.pending_control = {}
        self.maps.clear_pending()
        self.maps_now = False
        self.denoiser_calls_this_step = 0
        self.last = {"step": self.step, "timestep": timestep, "sigma": sigma, "sample": sample,
                     "noise": model_output, "x0": x0, "prev_sample": prev_sample}
        self.step += 1

    def on_step_end(self, latents) -> None:
        """Latents after the step as the pipeline holds them (after re-blending / callbacks)."""
        if "latents" in self.opts.record and not self.abandoned and torch.is_tensor(latents) \
                and self.step > 0 \
                and len(self.latents) == self.step + 1:
            self.latents[self.step] = self._host(
                self.session.adapter.spatial(latents, self.latent_hw))

    # ---------------------------------------------------------------- result
    def finish(self, output) -> Trace | None:
        """The call's Trace; None when it was not recorded (:meth:`abandon`)."""
        for dev in self.devices:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        if not self.abandoned and (self.layout is None or self.step == 0):
            self.abandon("the pipeline call finished without any denoising step")
        if self.abandoned:
            return None

        def scal(xs):
            return torch.stack([x if torch.is_tensor(x) else torch.tensor(float(x)) for x in xs]).float()

        rec = self.opts.record
        recorded = {}
        if "latents" in rec:
            recorded["latents"] = torch.stack(self.latents)
        if "noise" in rec:
            recorded["noise"] = torch.stack(self.noise)
            recorded["noise_text"] = torch.stack(self.noise_text)
            recorded["noise_uncond"] = torch.stack(self.noise_uncond) if self.layout == "cfg" \
                and all(u is not None for u in self.noise_uncond) else None
        if "x0" in rec and all(x is not None for x in self.x0):
            recorded["x0"] = torch.stack(self.x0)
        maps = self.maps.build(self.session.adapter.family())
        extra, extra_info = {}, {}
        refs = maps.pop("reference_maps", None)
        if refs is not None:  # travels as the trace's extra tensors (Trace.reference_maps)
            extra.update({f"reference_maps/{l}": refs.stored(l) for l in refs.layers})
            extra_info["reference_maps"] = {
                "layers": list(refs.layers), "steps": list(refs.steps), "grids": refs.grids,
                "resolutions": {l: list(refs.resolution(l)) for l in refs.layers},
                "dtype": refs.dtype}
        if self.segments is not None:
            extra_info["text_segments"] = self.segments
        if self.n_nets and any(c is not None for c in self.control):
            like = next(c for c in self.control if c is not None)
            extra["controlnet/residual_rms"] = torch.stack(
                [c if c is not None else torch.full_like(like, float("nan")) for c in self.control])
        tokens = self.tokens
        if self.maps.image_tokens() and maps.get("attention") is not None:
            image_tokens = image_prompt_tokens(self.maps.image_tokens())
            tokens = [list(t) + image_tokens for t in tokens]
        return Trace.build(
            prompts=self.prompts, negative_prompts=self.negative_prompts,
            token_ids=self.token_ids, tokens=tokens, truncated_words=self.truncated_words,
            timesteps=scal(self.timesteps),
            sigmas=scal(self.sigmas) if all(s is not None for s in self.sigmas) else None,
            guidance_scale=self.guidance_scale, do_cfg=self.layout == "cfg",
            meta=self.meta(), images=_output_images(self.pipe, output), pipeline=self.pipe,
            extra_info=extra_info or None,
            extra_tensors=extra or None,
            **maps, **recorded)

    def meta(self) -> dict:
        pipe, p = self.pipe, self.params
        denoiser = self.session.adapter.denoiser
        sched = pipe.scheduler
        vae = getattr(pipe, "vae", None)
        vsf = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8)
        h, w = self.latent_hw[-2:]
        adapter = self.session.adapter
        experts = {}
        if len(adapter.denoisers()) > 1:  # which expert predicted each step; the first switch
            names = list(self.denoiser_steps)
            switch = next((i for i in range(1, len(names)) if names[i] != names[i - 1]), None)
            experts = {"denoiser_steps": names, "switch_step": switch}
        return {
            "sdlens_version": _version("sdlens"), "diffusers_version": _version("diffusers"),
            "torch_version": torch.__version__,
            "model_id": str(getattr(pipe, "name_or_path", None)
                            or pipe.config.get("_name_or_path", "") or ""),
            "family": self.session.adapter.family(), "task": pipeline_task(pipe),
            "pipeline_class": self.session.orig_cls.__name__,
            "scheduler_class": type(sched).__name__, "scheduler_config": dict(sched.config),
            "prediction_type": sched_hooks.prediction_kind(sched),
            "vae_scaling_factor": _scaling_factor(vae),
            "vae_shift_factor": _shift_factor(vae),
            "height": h * vsf, "width": w * vsf, "latent_height": h, "latent_width": w,
            "seeds": self.seeds, "num_inference_steps": p.get("num_inference_steps"),
            "steps": self.step, "strength": p.get("strength"),
            "guidance_scale": float(self.guidance_scale),
            "guidance_rescale": p.get("guidance_rescale"),
            **self.session.adapter.guidance_meta(p),
            "num_images_per_prompt": p.get("num_images_per_prompt") or 1,
            "device": str(denoiser.device), "dtype": str(denoiser.dtype).replace("torch.", ""),
            "options": self.opts.to_dict(), "estimated_bytes": self.estimated,
            "estimated_storage": dict(getattr(self.estimated, "storage", {}) or {}),
            "denoiser_calls": self.denoiser_calls,
            "text_length": self.session.adapter.text_length(p),  # None: the tokenizer's (77)
            **({"skipped": dict(self.skipped)} if self.skipped else {}),
            **({"image_prompt_tokens": list(self.maps.image_tokens())}
               if self.maps.image_tokens() else {}),
            **({"words_unknown": True} if self.words_unknown else {}),
            **adapter.video_meta(self.latent_hw, p), **experts,
            **self.conditioning(),
        }

    def conditioning(self) -> dict:
        """What conditions the run besides the text: ControlNet's scales, IP-Adapter's scales."""
        p, out = self.params, {}
        if getattr(self.pipe, "controlnet", None) is not None:
            scale = p.get("controlnet_conditioning_scale")
            out["controlnet"] = {
                "class": type(self.pipe.controlnet).__name__,
                "conditioning_scale": [float(x) for x in scale] if isinstance(scale, (list, tuple))
                else (float(scale) if scale is not None else None),
                "guess_mode": bool(p.get("guess_mode") or False),
                "control_guidance_start": p.get("control_guidance_start"),
                "control_guidance_end": p.get("control_guidance_end")}
        if self.maps.image_tokens():
            scales = []
            for proc in self.session.adapter.denoiser.attn_processors.values():
                if hasattr(proc, "to_k_ip") and hasattr(proc, "scale"):
                    scales = [s if isinstance(s, (int, float)) else list(s) for s in proc.scale]
                    break
            if scales:
                out["ip_adapter"] = {"adapters": len(self.maps.image_tokens()), "scale": scales}
            else:  # the model's own image conditioning (Wan 2.1 I2V's image-context keys)
                out["image_context"] = {"tokens": list(self.maps.image_tokens())}
        return out


def _scaling_factor(vae) -> float | None:
    """The VAE's latent scale (None where it has none: Flux.2's VAE normalises with a batch
    norm instead)."""
    scale = vae.config.get("scaling_factor", None) if vae is not None else None
    return float(scale) if scale is not None else None


def _shift_factor(vae) -> float | None:
    """The VAE's latent shift (SD3: latents are ``z / scaling + shift`` before decoding)."""
    shift = vae.config.get("shift_factor", None) if vae is not None else None
    return float(shift) if shift is not None else None


def _output_images(pipe, output) -> list:
    """PIL images from a pipeline output (output_type pil / np / pt); [] for latents."""
    images = output[0] if isinstance(output, (tuple, list)) else getattr(output, "images", None)
    if images is None:
        return []
    from PIL import Image

    if isinstance(images, list) and all(isinstance(i, Image.Image) for i in images):
        return [i.copy() for i in images]
    try:
        import numpy as np

        if torch.is_tensor(images):
            if images.ndim != 4 or images.shape[1] not in (1, 3):
                return []  # latents
            arr = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        elif isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[-1] not in (1, 3):
                return []
            arr = images
        else:
            return []
        arr = (np.clip(arr, 0, 1) * 255).round().astype("uint8")
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
    except Exception:
        return []


# ====================================================================== session
def live_state(pipe) -> dict | None:
    """While ``pipe`` is being traced (e.g. from a ``callback_on_step_end``): the step just
    taken, as device tensors (no copy, no sync)::

        {"step": i, "timestep": t, "sigma": sigma or None, "sample": x_t (B, C, h, w),
         "noise": guided prediction, "x0": predicted clean latent (float32) or None,
         "prev_sample": what the scheduler returned}

    None when ``pipe`` is not being traced or no step has been taken yet.
    """
    session = _ACTIVE.get(id(pipe))
    run = getattr(session, "current", None) if session is not None else None
    return dict(run.last) if run is not None and getattr(run, "last", None) else None


_ACTIVE: dict[int, "_Session"] = {}
_SUBCLASSES: dict[type, type] = {}


def _traced_class(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        def __call__(self, *args, **kwargs):
            session = _ACTIVE.get(id(self))
            if session is None:  # not traced (should not happen): behave as the original
                return cls.__call__(self, *args, **kwargs)
            return session.run(self, args, kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                         "__doc__": cls.__doc__, "_sdlens_traced": True})
        _SUBCLASSES[cls] = sub
    return sub


class _Session:
    def __init__(self, pipe, options: RecordOptions, tokens=None):
        self.pipe = pipe
        self.options = options
        self.tokens = tokens  # the user's token strings for prompt_embeds calls
        self.adapter = check_pipeline(pipe)
        check_joint_options(self.adapter, options)
        self.layers = self.adapter.sites()
        self.selected_layers = list(self.layers)
        self.orig_cls = type(pipe)
        self.live = Trace()
        self.live._runs = []
        self.active = False
        self.current: _Run | None = None
        self.abandoned: list[str] = []  # why calls were not recorded

    # -------------------------------------------------------------- enter / exit
    def __enter__(self) -> Trace:
        pipe = self.pipe
        if id(pipe) in _ACTIVE or getattr(type(pipe), "_sdlens_traced", False):
            raise RuntimeError("this pipeline is already being traced (nested sdlens.trace)")
        _ACTIVE[id(pipe)] = self
        try:
            pipe.__class__ = _traced_class(self.orig_cls)
        except BaseException:
            _ACTIVE.pop(id(pipe), None)
            raise
        self.active = True
        return self.live

    def __exit__(self, *exc) -> None:
        try:
            if type(self.pipe) is not self.orig_cls:
                self.pipe.__class__ = self.orig_cls
        finally:
            _ACTIVE.pop(id(self.pipe), None)
            self.active = False

    # -------------------------------------------------------------- one call
    def run(self, pipe, args, kwargs):
        orig_call = self.orig_cls.__call__
        sig = inspect.signature(orig_call)
        bound = sig.bind(pipe, *args, **kwargs)
        # what the caller gave, by name: a ``**kwargs`` bundle is read as its own keywords (it is
        # forwarded as the caller wrote it, never as one keyword named after the bundle)
        params = {}
        for name, value in bound.arguments.items():
            kind = sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                params.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL and name != "self":
                params[name] = value
        defaults = {k: v.default for k, v in sig.parameters.items()
                    if v.default is not inspect.Parameter.empty}
        full = {**defaults, **params}  # read only: the pipeline fills its own defaults
        run = _Run(self, pipe, full)
        run.last = None
        self._prepare(run, full)
        self.current = run
        # the call goes on as the caller wrote it (positional stays positional, keywords stay
        # keywords); the one thing sdlens puts in is its step-end callback
        args, kwargs = list(args), dict(kwargs)
        if "callback_on_step_end" in sig.parameters:
            for name, value in self._compose_callback(run, full).items():
                pos = list(sig.parameters).index(name) - 1  # -1: self
                if name not in kwargs and pos < len(args):  # given positionally: replaced there
                    args[pos] = value
                else:
                    kwargs[name] = value
        adapter = self.adapter

        def before(module, args, kwargs):
            run.denoiser_now = adapter.denoiser_name(module)
            run.aux = adapter.auxiliary_call(args, kwargs)
            if run.aux:  # e.g. SD3.5's skip-layer guidance: not a step's prediction
                return
            sample = adapter.denoiser_input(args, kwargs)
            if sample is not None:
                run.before_denoiser(sample)

        def after(module, args, kwargs, output):
            if run.aux:
                run.aux = False
                return
            out = adapter.denoiser_output(output)
            if out is not None:
                run.after_denoiser(out)

        try:
            with Hooks() as hooks:
                kinds = [k for k in ("attention", "image_to_text", "reference_maps")
                         if k in run.maps]
                readers = [MapRecorder(run.maps, kinds)] if kinds else []
                seam = KernelSeam(adapter)
                # every expert that predicts a step (Wan 2.2: two), recorded as one denoiser
                for model in adapter.denoisers():
                    hooks.wrap_sites(model, self.layers, readers=readers, seam=seam)
                    hooks.forward_pre_hook(model, before, with_kwargs=True)
                    hooks.forward_hook(model, after, with_kwargs=True)
                if self.options.concepts:  # after `before`: its blocks see this step's state
                    ConceptPass(adapter, self.options.concepts, run.maps, full,
                                self.options.concept_method).install(hooks)
                control = getattr(pipe, "controlnet", None)
                if "controlnet" in self.options.record and control is not None:
                    nets = list(getattr(control, "nets", None) or [control])
                    run.n_nets = len(nets)
                    for i, net in enumerate(nets):
                        hooks.forward_hook(net, functools.partial(
                            lambda i, module, args, output: run.after_controlnet(i, output), i))
                wrapper = sched_hooks.install(pipe.scheduler, run.on_step,
                                              want_x0="x0" in self.options.record)
                hooks.undo(functools.partial(sched_hooks.uninstall, pipe.scheduler, wrapper))
                output = orig_call(pipe, *args, **kwargs)
        finally:
            self.current = None
        result = run.finish(output)
        if result is not None:
            self.live._runs.append(result)
            self.live._adopt(result)
        else:
            self.abandoned.append(run.abandoned)
        return output

    def _compose_callback(self, run: _Run, full: dict) -> dict:
        """The arguments sdlens puts into the call (``full``: the call's arguments by name,
        defaults included): its step-end callback, composed with the user's (the user's runs
        first and its outputs are what the pipeline gets back), and the tensor inputs only where
        ``"latents"`` must be added to what the call would use."""
        put = {}
        user_cb = full.get("callback_on_step_end")
        inputs = full.get("callback_on_step_end_tensor_inputs")
        try:
            from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

            if isinstance(user_cb, (PipelineCallback, MultiPipelineCallbacks)):
                # the pipeline reads these from such a callback; sdlens's callback stands in front
                # of it, so they are passed as the pipeline would have set them
                inputs = list(user_cb.tensor_inputs)
        except ImportError:
            pass
        if inputs is not None and "latents" not in inputs:
            inputs = list(inputs) + ["latents"]
        if inputs is not None and list(inputs) != list(full.get(
                "callback_on_step_end_tensor_inputs") or ()):
            put["callback_on_step_end_tensor_inputs"] = list(inputs)

        def callback(pipe, i, t, cb_kwargs):
            outputs = cb_kwargs
            if user_cb is not None:
                outputs = user_cb(pipe, i, t, cb_kwargs)
                if outputs is None:
                    outputs = {}
            lat = outputs.get("latents", cb_kwargs.get("latents")) if isinstance(outputs, dict) \
                else cb_kwargs.get("latents")
            run.on_step_end(lat)
            return outputs if user_cb is not None else {}

        put["callback_on_step_end"] = callback
        return put

    def _prepare(self, run: _Run, p: dict) -> None:
        """Prompts, tokens, batch size, seeds, guidance from the call's arguments."""
        pipe = self.pipe
        prompt = p.get("prompt")
        n_per = int(p.get("num_images_per_prompt") or 1)
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)):
            prompts = list(prompt)
        elif prompt is None and (shape := _embeds_shape(p.get("prompt_embeds"))) is not None:
            prompts = [None] * shape[0]
        else:
            raise TypeError(f"sdlens: prompt must be a str or a list of str (or prompt_embeds "
                            f"given), got {type(prompt).__name__}")
        neg = p.get("negative_prompt")
        if neg is None:
            negs = [None] * len(prompts)
        elif isinstance(neg, str):
            negs = [neg] * len(prompts)
        else:
            negs = list(neg)
            if len(negs) != len(prompts):
                negs = (negs + [None] * len(prompts))[: len(prompts)]
        run.prompts = [q for q in prompts for _ in range(n_per)]
        run.negative_prompts = [q for q in negs for _ in range(n_per)]
        run.session_batch = len(run.prompts)
        run.token_ids, run.tokens, run.truncated_words = [], [], []
        parts = self.adapter.text_parts(p)
        segments = [] if parts is not None else None
        no_tokens = [{"encoder": name, "start": sum(n for _, _, n in parts[:i]), "length": n,
                      "tokens": 0} for i, (name, _, n) in enumerate(parts)] \
            if parts is not None else None
        given = None
        if prompt is None and self.tokens is not None:
            given = check_user_tokens(self.tokens, len(prompts), _embeds_shape(p["prompt_embeds"])[1])
            given = [t for t in given for _ in range(n_per)]
        run.words_unknown = prompt is None and given is None
        cache: dict[str, tuple] = {}
        adapter = self.adapter
        # the text the attended encoder reads (Flux's T5: prompt_2 where given)
        texts = [t for t in adapter.text_prompts(prompts, p) for _ in range(n_per)]
        for b, q in enumerate(run.prompts):
            segs = no_tokens
            if given is not None:
                ids, toks, cut = [], given[b], []
            elif q is None:
                ids, toks, cut = [], [], []
            else:
                q = texts[b]
                if q not in cache:  # as the pipeline encodes it (multi-vector TI expanded)
                    try:
                        if parts is None:  # one text encoder: the adapter lays the text out
                            axis = text_axis(pipe, q, p, adapter)
                            cache[q] = (axis.ids, axis.tokens, axis.truncated_words, None,
                                        axis.limit)
                        else:  # several (SD3: CLIP then T5)
                            view = tokenize_segments(q, parts)
                            cache[q] = (view.ids, view.tokens, view.truncated_words,
                                        view.segments, None)
                    except Exception as e:  # noqa: BLE001 - never the reason a call fails
                        # a prompt sdlens cannot cut into tokens: recorded without its words
                        warnings.warn(f"sdlens: cannot tell the tokens of the prompt {q[:60]!r} "
                                      f"({type(e).__name__}: {e}); the trace has no words for "
                                      f"it", stacklevel=4)
                        cache[q] = ([], [], [], no_tokens, None)
                        run.words_unknown = True
                ids, toks, cut, segs, _ = cache[q]
            run.token_ids.append(list(ids))
            run.tokens.append(list(toks))
            run.truncated_words.append(list(cut))
            if segments is not None:
                segments.append([dict(seg) for seg in segs])
        run.segments = segments
        for q, (ids, toks, cut, _, limit) in cache.items():
            if cut:
                what = f"{limit} tokens" if limit else "every text encoder's limit"
                warnings.warn(f"sdlens: the prompt {q[:60]!r}... is longer than {what}; the "
                              f"pipeline cuts these words: {cut} (see trace.truncated_words)",
                              stacklevel=4)
        run.max_token_len = max((len(t) for t in run.tokens), default=0) or None
        if segments is not None and run.max_token_len is None:
            run.max_token_len = sum(n for _, _, n in parts)
        gs = self.adapter.cfg_scale(p)
        run.guidance_scale = float(gs) if gs is not None else float("nan")
        gen = p.get("generator")
        gens = gen if isinstance(gen, (list, tuple)) else ([gen] if gen is not None else [])
        run.seeds = [int(g.initial_seed()) for g in gens if isinstance(g, torch.Generator)] or None


def _embeds_shape(embeds) -> tuple[int, int] | None:
    """(prompts, text positions) of a call's ``prompt_embeds``: a (B, L, D) tensor, or a list
    of one (L_i, D) tensor per prompt (Z-Image: each prompt its own length; L the longest);
    None for anything else."""
    if torch.is_tensor(embeds) and embeds.ndim >= 2:
        return int(embeds.shape[0]), int(embeds.shape[1])
    if isinstance(embeds, (list, tuple)) and embeds and all(
            torch.is_tensor(e) and e.ndim >= 1 for e in embeds):
        return len(embeds), max(int(e.shape[0]) for e in embeds)
    return None


def trace(pipe, options: RecordOptions | None = None, tokens=None, **kwargs):
    """Record every call of ``pipe`` made inside the ``with`` block.

    >>> with sdlens.trace(pipe, layers="up", steps=slice(None, None, 2)) as tr:
    ...     pipe("a red circle", num_inference_steps=25, generator=torch.Generator().manual_seed(0))
    >>> tr.latents.shape        # (26, 1, 4, h, w)

    Args:
        pipe: a diffusers Stable Diffusion pipeline (SD 1.x/2.x/SDXL, SD3 / SD3.5, Flux.1,
            PixArt-Σ, Sana; txt2img, img2img, inpaint; ControlNet variants; IP-Adapters loaded
            or not; with or without a tokenizer). Other pipelines raise TypeError naming the
            supported ones.
        options: a :class:`RecordOptions`; keyword arguments (``record``, ``layers``, ``steps``,
            ``heads``, ``keep_padding``, ``max_bytes``, ``attention_dtype``, ``concepts``,
            ``concept_method``) override its fields. ``concepts=["circle", "background"]`` (the
            joint-attention backbones: SD3 / SD3.5, Flux.1, Flux.1 Kontext, Chroma, Flux.2,
            Qwen-Image, Z-Image) records concept maps (:mod:`sdlens.engine.joint`, ``trace.concepts``),
            by default as ConceptAttention's code computes them (``concept_method=
            "conceptattention"``; ``"sdlens"``: sdlens's own variant); other backbones raise
            TypeError.
        tokens: for calls made with ``prompt_embeds`` (and no ``prompt``): the token strings
            the embeddings were made from, position by position (``["<|startoftext|>", "a</w>",
            "red</w>", ...]``; plain words without ``</w>`` are one word each), one list for
            every prompt or one list per prompt. Without it the words are unknown: the maps keep
            every position and the views show positions (``trace.meta["words_unknown"]``).

    Returns:
        a context manager whose ``as`` value is a :class:`~sdlens.trace.Trace` that shows the
        *last* recorded call (``tr.runs``: every call, in order). The pipeline's own return value
        is untouched. On exit the pipeline is exactly as before (same processor objects, no
        hooks, ``scheduler.step`` the class method), also after an exception.
    """
    opts = RecordOptions.from_kwargs(options, **kwargs)
    return _Session(pipe, opts, tokens)


_GENERATE_ARGS = {"steps": "num_inference_steps"}


#: Seeds ``torch.Generator.manual_seed`` keeps as given (a negative seed wraps to 2**64 - |seed|).
SEED_MAX = 2 ** 64 - 1


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int in ``0..SEED_MAX``, or ValueError naming the range (never wrapped)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{name} must be an int, got {seed!r}")
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name}={seed} is outside 0..2**64-1, the seeds torch.Generator keeps as "
                         f"given (a negative seed would silently become {seed % 2 ** 64})"
                         if seed < 0 else f"{name}={seed} is outside 0..2**64-1 (torch.Generator's range)")
    return int(seed)


def generate(pipe, prompt: str | list[str], seed: int | list[int] | None = 0, steps: int = 25,
             guidance_scale: float | None = None, negative_prompt: str | list[str] | None = None,
             height: int | None = None, width: int | None = None,
             options: RecordOptions | None = None, reweight: dict | None = None,
             reweight_steps=None, tokens=None, **kwargs) -> Trace:
    """Run ``pipe`` once, traced, and return the :class:`~sdlens.trace.Trace` (images included).

    Args:
        pipe: a diffusers SD pipeline (see :func:`trace`).
        prompt: a prompt or a list of prompts (None with ``prompt_embeds=`` given).
        seed: an int in ``0..2**64-1`` (one CPU generator for the whole batch), a list of ints
            (one generator per batch item: prompts x num_images_per_prompt), or None (a random
            seed, recorded in ``trace.meta['seeds']``). Outside that range is an error: torch
            would wrap a negative seed silently.
        steps: ``num_inference_steps``.
        guidance_scale: classifier-free guidance scale (None: the model's recommended value
            where its folder has one (:func:`sdlens.recommended_settings`: the shipped
            "shapes-mmdit"), else the pipeline's default; <= 1 turns guidance off, below 1 with a
            warning; NaN / inf: ValueError). The model's other recommended call settings (e.g.
            ``max_sequence_length``) apply unless given. Flux: the distilled guidance value the
            transformer is given (true CFG: ``true_cfg_scale=`` and ``negative_prompt=``).
            Qwen-Image: its ``true_cfg_scale`` (guidance needs a ``negative_prompt``); Z-Image:
            0 turns guidance off (its pipeline guides above 0).
        negative_prompt: a negative prompt (or one per prompt).
        height, width: image size in pixels (None: the model's default).
        options: a :class:`RecordOptions`.
        reweight: ``{word: weight}`` scales those words' attention (prompt-to-prompt's
            equalizer; cross- or joint attention, see :func:`sdlens.engine.sites.reweighting`);
            ``reweight_steps``:
            ``(start, end)`` step range (None: every step). The weights are recorded in
            ``meta["reweight"]``.
        **kwargs: RecordOptions fields (``record``, ``layers``, ``steps`` is the step count here,
            use ``attention_steps`` for RecordOptions.steps, ``heads``, ``keep_padding``,
            ``max_bytes``, ``attention_dtype``, ``concepts``); everything else goes to the
            pipeline call
            (``num_images_per_prompt``, ``image``, ``mask_image``, ``strength``,
            ``prompt_embeds``, ``ip_adapter_image_embeds``, ...).
        tokens: the token strings of ``prompt_embeds`` (see :func:`trace`).
    """
    cfg_arg = adapter_for(pipe).cfg_arg
    if guidance_scale is not None and cfg_arg != "guidance_scale":  # Qwen-Image's true CFG
        if cfg_arg in kwargs:
            raise ValueError(f"give the guidance scale once: guidance_scale= or {cfg_arg}=")
        kwargs[cfg_arg], guidance_scale = check_guidance_scale(guidance_scale), None
    if reweight is not None:
        n_images = int(kwargs.get("num_images_per_prompt", 1) or 1)
        with reweighting(pipe, prompt, reweight, reweight_steps, num_images_per_prompt=n_images,
                         params={**kwargs, "negative_prompt": negative_prompt,
                                 **({} if guidance_scale is None
                                    else {"guidance_scale": guidance_scale})}) as editor:
            tr = generate(pipe, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
                          negative_prompt=negative_prompt, height=height, width=width,
                          options=options, **kwargs)
        tr._require()["meta"]["reweight"] = editor.describe(reweight)
        return tr
    if reweight_steps is not None:
        raise ValueError("reweight_steps= needs reweight={word: weight, ...}")
    opt_names = {f.name for f in dataclasses.fields(RecordOptions)} - {"steps"}
    opt_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in opt_names}
    if "attention_steps" in kwargs:
        opt_kwargs["steps"] = kwargs.pop("attention_steps")
    if "generator" in kwargs:
        raise ValueError("generate() takes seed=, not generator= (use sdlens.trace with your own "
                         "generator)")
    if seed is None:
        seed = random.randrange(2 ** 31)
    if isinstance(seed, (list, tuple)):
        seeds = [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
        generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    elif isinstance(seed, int) and not isinstance(seed, bool):
        seeds = [check_seed(seed)]
        generator = torch.Generator("cpu").manual_seed(seeds[0])
    else:
        raise ValueError(f"seed must be an int, a list of ints or None, got {seed!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    guidance_scale = check_guidance_scale(guidance_scale)  # NaN would run unguided, silently
    recommended = recommended_settings(pipe)  # the model's own (its card's) call settings
    if guidance_scale is None and "guidance_scale" in recommended \
            and adapter_for(pipe).cfg_arg not in kwargs:
        guidance_scale = float(recommended["guidance_scale"])
    for key, value in recommended.items():
        if key not in ("guidance_scale", "num_inference_steps"):
            kwargs.setdefault(key, value)
    adapter = adapter_for(pipe)
    if guidance_scale is not None and float(guidance_scale) < 1 and adapter.cfg_by_default \
            and adapter.cfg_weight(1.0) is None:  # not Flux's distilled value, not Z-Image's
        # diffusers guides only above 1; below it runs unguided, as 1 does (1 is the usual
        # "no guidance" and stays quiet)
        warnings.warn(f"sdlens: guidance_scale={guidance_scale:g} is below 1: the pipeline runs "
                      "without classifier-free guidance (as at 1)", UserWarning, stacklevel=2)
    call = dict(prompt=prompt, num_inference_steps=steps, generator=generator, **kwargs)
    if guidance_scale is not None:
        call[adapter.cfg_arg] = guidance_scale
    if negative_prompt is not None:
        if isinstance(prompt, (list, tuple)) and isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)  # SD pipelines want the same type
        call["negative_prompt"] = negative_prompt
    if height is not None:
        call["height"] = height
    if width is not None:
        call["width"] = width
    if prompt is None:
        call.pop("prompt")
    session = trace(pipe, options, tokens=tokens, **opt_kwargs)
    with session as tr:
        pipe(**call)
    if session.abandoned:  # the pipeline ran, but there is no trace to return
        raise RuntimeError(f"sdlens could not record this call: {session.abandoned[-1]}")
    return tr.runs[-1]
