"""Batched pipeline calls: cells, batches, planning, running.

A *cell* is one run (prompt, scheduler, steps, guidance, seed); a *batch* is the cells that run
in one pipeline call: a list of prompts (one per cell) and a list of CPU ``torch.Generator`` s
(one per cell, seeded with the cell's seed). diffusers draws every batch item's starting noise
from its own generator, so each cell starts exactly where its single run starts. Different
guidance scales share a call through :class:`PerSampleGuidance`. Each cell's trace is cut out of
the batched trace (:func:`cell_trace`). :mod:`sdlens.experiments.sweep` (grids), ``token_effects``
and ``lora_effect`` build on this.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sdlens.engine.arch import adapter_for
from sdlens.engine.options import RecordOptions, human_bytes
from sdlens.engine.session import trace as record_trace
from sdlens.engine.sites import Hooks
from sdlens.trace.core import Trace
from sdlens.trace.ops import replace, select_batch


# ====================================================================== cells and batches

@dataclass(frozen=True)
class Cell:
    """One run; ``index`` is its position in the caller's grid (a sweep: along every axis).
    ``cfg``: whether the pipeline guides at ``guidance`` (the backbone adapter's
    ``cfg_weight``; None: diffusers' rule, above 1)."""

    index: tuple
    prompt: str
    scheduler: str | None
    steps: int
    guidance: float
    seed: int
    cfg: bool | None = None

    def __post_init__(self):
        if self.cfg is None:
            object.__setattr__(self, "cfg", self.guidance > 1)


@dataclass
class Batch:
    """Cells that run in one pipeline call."""

    cells: list[Cell]
    scheduler: str | None
    steps: int
    cfg: bool

    @property
    def guidance(self) -> float:
        return max(c.guidance for c in self.cells) if self.cfg else self.cells[0].guidance


def plan_batches(cells: Sequence[Cell], cell_bytes, budget: int, max_batch: int | None = None,
                 chunk: bool = True, split_guidance: bool = False,
                 min_batches: int = 1) -> list[Batch]:
    """Group cells by (scheduler, steps, cfg on/off[, guidance]) and chunk each group.

    ``cell_bytes(cfg) -> int`` gives a cell's memory. ``min_batches``: split each group into at
    least this many batches where it has the cells (for sharing among processes).
    """
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        key = (c.scheduler, c.steps, c.cfg) + ((c.guidance,) if split_guidance else ())
        groups.setdefault(key, []).append(c)
    batches = []
    for key, group in groups.items():
        scheduler, steps, cfg = key[:3]
        per = cell_bytes(cfg)
        fit = max(1, budget // per) if per > 0 else len(group)
        size = min(fit, max_batch or fit, len(group))
        if size < len(group) and not chunk:
            raise ValueError(
                f"the grid does not fit one pipeline call: {len(group)} cells (steps={steps}, "
                f"scheduler={scheduler or 'default'}, {'with' if cfg else 'without'} CFG) need "
                f"~{human_bytes(per * len(group))} (~{human_bytes(per)} per cell, "
                f"estimate_cell_bytes), the memory budget is {human_bytes(budget)}"
                + (f" and max_batch={max_batch}" if max_batch else "")
                + "; allow chunking (chunk=True, the CLI's default), raise memory_budget / "
                  "max_batch, or make the grid smaller")
        if per > budget:
            warnings.warn(f"one cell needs ~{human_bytes(per)}, more than the memory budget "
                          f"{human_bytes(budget)}; running one cell per call", stacklevel=3)
        n = max(math.ceil(len(group) / size), min(min_batches, len(group)))
        bounds = np.linspace(0, len(group), n + 1).round().astype(int)
        for a, b in zip(bounds[:-1], bounds[1:]):
            batches.append(Batch(group[a:b], scheduler, steps, cfg))
    return batches


# ====================================================================== per-sample guidance

class PerSampleGuidance:
    """Gives every batch item its own guidance scale, through a forward hook on the denoiser.

    The pipeline runs with the scalar ``G``; the hook rewrites the text half of the denoiser's
    output ``c_i`` to ``u_i + (g_i / G)(c_i - u_i)`` so that the pipeline's ``u + G (c' - u)``
    equals ``u + g_i (c - u)``. Here ``g`` and ``G`` are the weights of that combination
    (``adapter.cfg_weight`` of the scales: Z-Image's ``pos + s (pos - neg)`` is ``u + (1 + s)
    (c - u)``). The forward hook is registered at the denoiser's first call
    (from a pre-hook) so that it runs *after* every hook installed before that call, sdlens'
    recording hooks included: traces record the model's true text prediction. The backbone's
    adapter (``adapter``) says where the halves lie in the batch and which tensor the pipeline
    guides with.

    Where the pipeline runs the halves as separate calls per step (Wan: the prompt's, then the
    negative one's; ``adapter.cfg_calls``), the text call is kept as it is and the uncond call's
    output ``u_i`` becomes ``(u_i (1 - g_i) + c_i (g_i - G)) / (1 - G)``, which makes the
    pipeline's ``u' + G (c - u')`` equal ``u + g_i (c - u)`` too. Every expert that predicts a
    step (``adapter.denoisers()``, Wan 2.2's two) is hooked.
    """

    def __init__(self, scales: Sequence[float], G: float, adapter):
        W = adapter.cfg_weight(G)
        if W is None or W <= 1:
            raise ValueError(f"per-sample guidance needs a call that guides, got the guidance "
                             f"scale {G}")
        self.G = float(W)
        weights = [adapter.cfg_weight(g) or 1.0 for g in scales]  # unguided: c, the weight 1
        self.ratios = torch.tensor([w / self.G for w in weights], dtype=torch.float32)
        self.adapter = adapter
        self.order = adapter.cfg_calls({adapter.cfg_arg: float(G)})  # one call per half
        self.pending: torch.Tensor | None = None  # the step's text call (one call per half)
        self.half = 0
        self.post: dict[int, object] = {}
        self.calls = 0

    def install(self, hooks: Hooks) -> None:
        """Install on the adapter's denoisers for the life of ``hooks``."""
        for denoiser in self.adapter.denoisers():
            def register(module, args, denoiser=denoiser):
                if id(denoiser) not in self.post:
                    self.post[id(denoiser)] = hooks.forward_hook(denoiser, self._hook)
                return None

            hooks.forward_pre_hook(denoiser, register)

    def _one_call_per_half(self, output, out: torch.Tensor):
        n = len(self.ratios)
        if out.shape[0] != n:
            raise RuntimeError(f"per-sample guidance expected {n} rows per guidance half's call, "
                               f"got {out.shape[0]}")
        half = self.order[self.half % len(self.order)]
        self.half += 1
        if half == "text":
            self.pending = out
            return None
        c, u = self.pending.float(), out.float()
        g = (self.ratios.to(out.device) * self.G).view(-1, *([1] * (out.ndim - 1)))
        self.calls += 1
        new = (u * (1 - g) + c * (g - self.G)) / (1 - self.G)
        return self.adapter.with_output_tensor(output, new.to(out.dtype))

    def _hook(self, module, args, output):
        out = self.adapter.output_tensor(output)
        if out is not None and self.order:
            return self._one_call_per_half(output, out)
        n = len(self.ratios)
        if out is None or out.shape[0] != 2 * n:
            got = "no tensor" if out is None else f"{out.shape[0]} rows"
            raise RuntimeError(f"per-sample guidance expected the denoiser batch of both guidance "
                               f"halves ({' and '.join(self.adapter.cfg_halves)}, {2 * n} rows), "
                               f"got {got}")
        halves = self.adapter.split_cfg(out)
        u, c = halves["uncond"], halves["text"]
        r = self.ratios.to(out.device).view(-1, *([1] * (out.ndim - 1)))
        halves["text"] = (u.float() + r * (c.float() - u.float())).to(out.dtype)
        self.calls += 1
        return self.adapter.with_output_tensor(output, self.adapter.join_cfg(halves))


# ====================================================================== running

def generator_for(pipe, seed: int) -> torch.Generator:
    """The generator sdlens seeds a run with: a CPU generator (images do not depend on the
    device's random number generator; diffusers moves the noise to the pipeline's device)."""
    return torch.Generator("cpu").manual_seed(int(seed))


def batch_call_kwargs(batch: Batch, negative_prompt, height, width, extra,
                      cfg_arg: str = "guidance_scale") -> dict:
    """The pipeline arguments of one batched call: a prompt and a generator per cell; the
    guidance scale as ``cfg_arg`` (the backbone adapter's: Qwen-Image's ``true_cfg_scale``)."""
    prompts = [c.prompt for c in batch.cells]
    kwargs = dict(extra)
    kwargs.update(prompt=prompts, generator=[generator_for(None, c.seed) for c in batch.cells],
                  num_inference_steps=batch.steps, output_type="np")
    kwargs[cfg_arg] = batch.guidance
    if negative_prompt is not None:
        kwargs["negative_prompt"] = [negative_prompt] * len(prompts)
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    return kwargs


def batch_record_options(record):
    """``record`` for the trace engine: None/False (no traces), "light", "full" (or True), or a
    dict of :class:`~sdlens.engine.options.RecordOptions` fields. Returns None, "light" or a dict."""
    if record is None or record is False:
        return None
    if isinstance(record, dict):
        RecordOptions.from_kwargs(**record)  # unknown / bad options fail before running
        return dict(record)
    if record is True or record == "full":
        return {}
    if record == "light":
        return "light"
    raise ValueError(f"record must be None, 'light', 'full' or a dict of trace options "
                     f"(sdlens.RecordOptions fields); got {record!r}")


LIGHT_ATTENTION_STEPS = 5


def trace_options(record_opts, steps: int) -> dict:
    """A light trace keeps latents and x0 at every step and the cross-attention maps (heads
    averaged, every layer) at ``LIGHT_ATTENTION_STEPS`` evenly spaced steps; no noise."""
    if record_opts == "light":
        every = max(1, math.ceil(steps / LIGHT_ATTENTION_STEPS))
        return {"record": ("latents", "x0", "attention"), "steps": slice(None, None, every)}
    return dict(record_opts)


def run_batch(pipe, batch: Batch, negative_prompt, height, width, extra, record_opts):
    """Run one batch; returns (float images (n, H, W, 3), list of per-cell traces or Nones).
    ``record_opts``: from :func:`batch_record_options`."""
    kwargs = batch_call_kwargs(batch, negative_prompt, height, width, extra,
                               adapter_for(pipe).cfg_arg)
    scales = [c.guidance for c in batch.cells]
    mixed = batch.cfg and len(set(scales)) > 1
    traces: list = [None] * len(batch.cells)
    recording = contextlib.nullcontext() if record_opts is None else \
        record_trace(pipe, **trace_options(record_opts, batch.steps))
    with recording as rec, Hooks() as hooks:
        if mixed:
            PerSampleGuidance(scales, batch.guidance, adapter_for(pipe)).install(hooks)
        out = pipe(**kwargs)
    if rec is not None:
        if not rec.runs:  # sdlens stopped recording the call (it warned why); the images stand
            raise RuntimeError("sdlens could not record this batch (see the warning above)")
        full = rec.runs[-1]
        traces = [cell_trace(full, i, guidance=c.guidance, seed=c.seed, cfg=c.cfg)
                  for i, c in enumerate(batch.cells)]
    # a video pipeline returns clips: (n, frames, H, W, 3)
    images = np.asarray(getattr(out, "images", None) if hasattr(out, "images") else out.frames,
                        dtype=np.float32)
    return images, traces


def cell_trace(trace: Trace, i: int, guidance: float | None = None, seed: int | None = None,
               extra_meta: dict | None = None, cfg: bool | None = None) -> Trace:
    """Batch item ``i`` of a batched Trace as a Trace of its own (what the single run of that
    item records, :func:`~sdlens.trace.ops.select_batch`), with its seed and guidance scale
    (``cfg``: whether that scale guides, :attr:`Cell.cfg`; None: above 1)."""
    cell = select_batch(trace, i)
    changes: dict = {}
    meta = cell.meta
    if guidance is not None:
        guides = guidance > 1 if cfg is None else cfg
        changes.update(guidance_scale=float(guidance), do_cfg=cell.do_cfg and guides)
        meta["guidance_scale"] = float(guidance)
    if seed is not None:
        meta["seeds"] = [int(seed)]
    meta.update(extra_meta or {})
    return replace(cell, meta=meta, **changes)
