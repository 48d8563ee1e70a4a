"""Grids of runs: prompt x guidance x seed (x steps x scheduler), batched, labelled, saved.

>>> grid = sdlens.sweep(pipe, "a red circle", seeds=range(4), guidance_scales=[1, 3, 7.5, 12])
>>> grid.axes                     # {'guidance': [1.0, 3.0, 7.5, 12.0], 'seed': [0, 1, 2, 3]}
>>> grid.images[2, 1]             # PIL image of guidance 7.5, seed 1
>>> grid.arrays[2, 1]             # the same as float32 (H, W, 3) in [0, 1]
>>> grid.traces[2, 1]             # its (light) Trace
>>> grid.plot()                   # a labelled matplotlib figure, like A1111's X/Y/Z plot
>>> grid.save("grid.sdlens"); sdlens.load("grid.sdlens")

How the cells are run
---------------------
Cells that share the number of steps and the scheduler are packed into one pipeline call: a list
of prompts (one per cell) and a list of ``torch.Generator`` s (one per cell, seeded with the cell's
seed); diffusers draws every batch item's starting noise from its own generator, so each cell
starts exactly where the single run ``pipe(prompt, generator=torch.Generator().manual_seed(seed))``
starts.

Different guidance scales share a call too. diffusers takes one scalar ``guidance_scale``; the
call runs with ``G = max(g_i)`` and a forward hook on the denoiser replaces the text half of its
output by ``c'_i = u_i + (g_i / G)(c_i - u_i)``, so that the pipeline's ``u + G (c' - u)`` is
``u + g_i (c - u)``: what the single run with ``g_i`` computes, up to float rounding. Cells with
``g <= 1`` run without classifier-free guidance (as the single runs do: the pipeline then never
computes the unconditional half) in calls of their own. ``guidance_rescale`` (which reads the raw
text prediction) and denoisers that embed the guidance scale (an LCM UNet; a guidance-distilled
transformer, Flux.1: the backbone adapter's ``embeds_guidance``) are handled by giving every
guidance scale calls of its own. The ``guidance`` axis is that value whatever kind of guidance
it is.

Calls are chunked so that a batch fits the memory budget (:func:`estimate_cell_bytes`, a
documented rough estimate) and ``max_batch``; with ``chunk=False`` a grid that does not fit one
call per (steps, scheduler, cfg on/off) group is refused with a ValueError instead.

Under ``accelerate launch`` (more than one process) the batches are shared among the processes
and the cells gathered on every process; ``sdlens sweep`` writes its outputs on the main process
only. Load the pipeline on ``accelerate.PartialState().device`` in each process. On GPUs:
``accelerate launch --multi_gpu --num_processes N -m sdlens.experiments.sweep "PROMPT" ...``; on CPUs the same
command works (the processes use gloo; accelerate's ``--cpu`` flag alone starts one process
unless mpirun is configured), as does ``torchrun --nproc_per_node N -m sdlens.experiments.sweep ...``.

Axis syntax (A1111's X/Y/Z plot), for the CLI and for string arguments: see :func:`parse_axis`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from sdlens.analysis.guidance import guidance_label
from sdlens.engine.arch import adapter_for
from sdlens.engine.batch import Cell, batch_record_options, plan_batches, run_batch, trace_options
from sdlens.engine.options import (RecordOptions, default_memory_budget, estimate_cell_bytes,
                                   estimate_trace_bytes, latent_hw)
from sdlens.engine.session import check_seed
from sdlens.pipeline import recommended_settings
from sdlens.trace.core import Trace

AXES = ("prompt", "scheduler", "steps", "guidance", "seed")  # canonical order, outermost first
AXIS_LABELS = {"prompt": "", "scheduler": "", "steps": "steps ", "guidance": "CFG ", "seed": "seed "}
FORMAT = "sdlens.grid"  # safetensors metadata "format" (traces: "sdlens.trace")
FORMAT_VERSION = 1
KIND = "grid"

AXIS_SYNTAX = """allowed axis syntax (as in A1111's X/Y/Z plot), parts separated by commas:
  7.5            one value
  1,5,9          a list
  0-7            an inclusive range in steps of 1 (0,1,...,7)
  1-10 (+2)      an inclusive range with an increment (1,3,5,7,9); (-2) counts down
  1-13 [5]       5 evenly spaced values from 1 to 13 (1,4,7,10,13)
  parts combine: "0-3, 10, 20-30 [3]\""""


# ---------------------------------------------------------------------------------------------
# axis parsing

_NUM = r"[+-]?\s*\d+(?:\.\d*)?(?:[eE][+-]?\d+)?"
_RANGE = re.compile(
    rf"^\s*({_NUM})\s*-\s*({_NUM})\s*(?:\(\s*({_NUM})\s*\)|\[\s*(\d+)\s*\])?\s*$")
_SINGLE = re.compile(rf"^\s*({_NUM})\s*$")


def _num(text: str) -> float:
    return float(text.replace(" ", ""))


def parse_axis(text: str | Iterable, kind: type = float, name: str = "axis") -> list:
    """Parse an axis like A1111's X/Y/Z plot: ``"0-7"``, ``"1,5,9"``, ``"1-13 [5]"``,
    ``"1-10 (+2)"`` (see ``AXIS_SYNTAX``). ``kind`` is int or float. Lists / ranges of numbers
    pass through (checked). Raises ValueError with the allowed syntax for empty or malformed axes.
    """
    if not isinstance(text, str):
        try:
            values = list(text)
        except TypeError:
            values = [text]
        if not values:
            raise ValueError(f"{name}: the axis is empty; give at least one value\n{AXIS_SYNTAX}")
        return [_check_value(v, kind, name) for v in values]
    if not text.strip():
        raise ValueError(f"{name}: the axis is empty; give at least one value\n{AXIS_SYNTAX}")
    values: list = []
    for part in text.split(","):
        if not part.strip():
            raise ValueError(f"{name}: empty entry in {text!r}\n{AXIS_SYNTAX}")
        m = _SINGLE.match(part)
        if m:
            values.append(_num(m.group(1)))
            continue
        m = _RANGE.match(part)
        if not m:
            raise ValueError(f"{name}: cannot parse {part.strip()!r} in {text!r}\n{AXIS_SYNTAX}")
        a, b = _num(m.group(1)), _num(m.group(2))
        if m.group(4) is not None:  # [count]
            count = int(m.group(4))
            if count < 1:
                raise ValueError(f"{name}: [{count}] must ask for at least one value\n{AXIS_SYNTAX}")
            part_values = [a] if count == 1 else list(np.linspace(a, b, count))
        else:
            step = _num(m.group(3)) if m.group(3) is not None else (1.0 if b >= a else -1.0)
            if step == 0:
                raise ValueError(f"{name}: the increment in {part.strip()!r} is zero\n{AXIS_SYNTAX}")
            n = math.floor((b - a) / step + 1e-9) + 1
            if n < 1:
                raise ValueError(f"{name}: {part.strip()!r} is empty (the increment goes away from "
                                 f"the end)\n{AXIS_SYNTAX}")
            part_values = [a + i * step for i in range(n)]
        values.extend(round(float(v), 10) for v in part_values)
    return [_check_value(v, kind, name) for v in values]


def _check_value(v, kind, name):
    if isinstance(v, str):
        out = parse_axis(v, kind, name)
        if len(out) != 1:
            raise ValueError(f"{name}: {v!r} is not a single value")
        return out[0]
    if isinstance(v, torch.Tensor):
        v = v.item()
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {v!r} is not a number\n{AXIS_SYNTAX}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name}: {v!r} is not finite")
    if kind is int:
        if f != round(f):
            raise ValueError(f"{name}: {v!r} is not an integer\n{AXIS_SYNTAX}")
        return int(round(f))
    return f


class _Scheduler:
    """Sets ``pipe.scheduler`` for an outer-loop scheduler value; restores the original."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.original = pipe.scheduler

    def set(self, name):
        from sdlens.pipeline import make_scheduler

        self.pipe.scheduler = self.original if name is None else make_scheduler(
            name, self.original.config)

    def restore(self):
        self.pipe.scheduler = self.original


def _distributed_state():
    """accelerate's PartialState when launched with more than one process, else None. Without
    CUDA (or with ACCELERATE_USE_CPU set) the processes talk over gloo on the CPU."""
    world = max(int(os.environ.get(k, "1") or 1) for k in
                ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if world <= 1:
        return None
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or \
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=True) if cpu else PartialState()
    return state if state.num_processes > 1 else None


def sweep(pipe, prompts: str | Sequence[str], seeds: Any = (0,), guidance_scales: Any = None,
          steps: Any = 20, scheduler: Any = None, record: Any = "light",
          negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
          max_batch: int | None = None, memory_budget: int | None = None, chunk: bool = True,
          progress: bool = True, keep_axes: Sequence[str] = (), **pipe_kwargs) -> "Grid":
    """Run a grid of prompt x guidance x seed (x steps x scheduler) and return a :class:`Grid`.

    Args:
        pipe: a diffusers pipeline sdlens traces (``sdlens.engine.arch.SUPPORTED_PIPELINES``).
        prompts: one prompt or a list (the "prompt" axis).
        seeds: ints, or an axis string ``"0-7"`` (see :func:`parse_axis`).
        guidance_scales: floats or an axis string ``"1-13 [5]"``; ``<= 1`` runs without CFG.
            None: the model's recommended scale (:func:`sdlens.pipeline.recommended_settings`,
            e.g. the shipped MMDiT's 3), else 7.5.
        steps: int, list of ints or axis string (each value runs as separate calls).
        scheduler: None (the pipeline's), a short name (``sdlens.pipeline.SCHEDULERS``), or a
            list of them (separate calls per value; the pipeline's scheduler is restored).
        record: "light" (default: latents and x0 at every step, cross-attention maps of every
            layer, heads averaged, at ~5 evenly spaced steps; no noise), "full" (the trace
            engine's defaults: everything at every step), None (no traces, fastest) or a dict
            of ``sdlens.RecordOptions`` fields.
        negative_prompt, height, width, **pipe_kwargs: passed to every pipeline call
            (``generator``, ``prompt_embeds``, ``output_type``, ... are set by the sweep); the
            model's other recommended settings (the MMDiT's ``max_sequence_length=0``) fill
            what is not given.
        max_batch: at most this many cells per call.
        memory_budget: bytes a call may use (default :func:`default_memory_budget`).
        chunk: False refuses (ValueError) grids that need more than one call per group.
        progress: a tqdm progress bar (main process only).
        keep_axes: axes kept in ``grid.axes`` even with a single value (by default only axes
            with more than one value are axes; the others are ``grid.fixed``).

    Every cell equals the single run ``pipe(prompt, generator=torch.Generator().manual_seed(
    seed), guidance_scale=g, num_inference_steps=steps)`` within float rounding (on the CPU
    ~1e-5 of the pixel range; on a GPU the kernels depend on the batch size, ~1e-2).
    """
    for key in ("generator", "prompt_embeds", "negative_prompt_embeds", "latents",
                "num_images_per_prompt", "output_type", "prompt", "guidance_scale",
                "num_inference_steps"):
        if key in pipe_kwargs:
            raise TypeError(f"sweep sets {key!r} itself; pass it through the sweep's own arguments")
    if "image" in pipe_kwargs or "mask_image" in pipe_kwargs:
        pass  # img2img / inpaint: the same image for every cell
    rec = recommended_settings(pipe)
    if guidance_scales is None:
        guidance_scales = (float(rec.get("guidance_scale", 7.5)),)
    pipe_kwargs = {**{k: v for k, v in rec.items()
                      if k not in ("guidance_scale", "num_inference_steps")}, **pipe_kwargs}
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("prompts: the axis is empty; give at least one prompt")
    if not all(isinstance(p, str) for p in prompt_list):
        raise TypeError("prompts must be strings")
    seed_list = parse_axis(seeds, int, "seeds") if not isinstance(seeds, int) else [seeds]
    seed_list = [check_seed(s, "seeds") for s in seed_list]  # as generate() takes them
    cfg_list = (parse_axis(guidance_scales, float, "guidance_scales")
                if not isinstance(guidance_scales, (int, float)) else [float(guidance_scales)])
    steps_list = parse_axis(steps, int, "steps") if not isinstance(steps, int) else [steps]
    if any(s < 1 for s in steps_list):
        raise ValueError(f"steps must be >= 1, got {steps_list}")
    sched_list = [scheduler] if scheduler is None or isinstance(scheduler, str) and "," not in \
        scheduler else ([s.strip() for s in scheduler.split(",")] if isinstance(scheduler, str)
                        else list(scheduler))
    if not sched_list:
        raise ValueError("scheduler: the axis is empty")
    from sdlens.pipeline import make_scheduler

    for s in sched_list:  # fail before running anything
        if s is not None:
            make_scheduler(s, pipe.scheduler.config)
    values = {"prompt": prompt_list, "scheduler": sched_list, "steps": steps_list,
              "guidance": cfg_list, "seed": seed_list}
    for k in keep_axes:
        if k not in AXES:
            raise ValueError(f"keep_axes: unknown axis {k!r}; axes: {', '.join(AXES)}")

    cells = [Cell(idx, prompt_list[idx[0]], sched_list[idx[1]], steps_list[idx[2]],
                  cfg_list[idx[3]], seed_list[idx[4]])
             for idx in np.ndindex(*(len(values[a]) for a in AXES))]

    record_opts = batch_record_options(record)
    budget = int(memory_budget) if memory_budget is not None else default_memory_budget(pipe.device)
    trace_bytes = _trace_bytes(pipe, record_opts, steps_list, height, width)
    adapter = adapter_for(pipe)
    # what the guidance axis is: a CFG scale, or a guidance-distilled model's guidance value
    guidance = "distilled" if adapter.distilled_guidance() else "cfg"
    # one call per guidance value where the value is an input of the denoiser (an LCM UNet, a
    # guidance-distilled transformer) or the pipeline does not guide a shared batch
    split_guidance = (pipe_kwargs.get("guidance_rescale", 0.0) or 0.0) > 0 or \
        adapter.embeds_guidance() or not adapter.cfg_by_default
    state = _distributed_state()
    nproc = state.num_processes if state else 1
    batches = plan_batches(
        cells, lambda cfg: estimate_cell_bytes(pipe, height, width, cfg, trace_bytes), budget,
        max_batch=max_batch, chunk=chunk, split_guidance=split_guidance, min_batches=nproc)
    mine = batches[state.process_index::nproc] if state else batches
    # outer loop: the scheduler, then steps (A1111 puts the most expensive axis outside)
    order = sorted(range(len(mine)), key=lambda k: (sched_list.index(mine[k].scheduler),
                                                     steps_list.index(mine[k].steps)))
    main = state is None or state.is_main_process
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cells) if state is None else sum(len(b.cells) for b in mine),
               disable=not progress or not main, desc="sweep", unit="cell")
    results: dict[tuple, tuple] = {}
    sched = _Scheduler(pipe)
    try:
        for k in order:
            b = mine[k]
            sched.set(b.scheduler)
            images, traces = run_batch(pipe, b, negative_prompt, height, width, pipe_kwargs,
                                       record_opts)
            for cell, img, tr in zip(b.cells, images, traces):
                results[cell.index] = (img, tr)
            bar.update(len(b.cells))
    finally:
        sched.restore()
        bar.close()
    if state is not None:
        from accelerate.utils import gather_object

        # traces travel as their own safetensors bytes (they hold a weak reference to the pipeline)
        mine_payload = [(idx, img, None if tr is None else tr.to_bytes())
                        for idx, (img, tr) in results.items()]
        gathered = gather_object(mine_payload)
        own = results
        results = {}
        for idx, img, data in gathered:
            idx = tuple(idx)
            if idx in own:
                results[idx] = own[idx]
            else:
                results[idx] = (img, None if data is None else Trace.from_bytes(data))
    if len(results) != len(cells):
        raise RuntimeError(f"sweep: {len(results)} of {len(cells)} cells came back")

    full_shape = tuple(len(values[a]) for a in AXES)
    keep = [a for a in AXES if len(values[a]) > 1 or a in keep_axes]
    shape = tuple(len(values[a]) for a in keep)
    sample = next(iter(results.values()))[0]
    arrays = np.empty(full_shape + sample.shape, dtype=np.float32)
    traces = np.empty(full_shape, dtype=object)
    for idx, (img, tr) in results.items():
        arrays[idx] = img
        traces[idx] = tr
    arrays = arrays.reshape(shape + sample.shape)
    traces = traces.reshape(shape)
    fixed = {a: values[a][0] for a in AXES if a not in keep}
    meta = dict(
        negative_prompt=negative_prompt, height=int(sample.shape[0]), width=int(sample.shape[1]),
        record=record if isinstance(record, (str, type(None))) else "custom",
        batches=len(batches), processes=nproc, memory_budget=budget,
        pipeline=_pipeline_meta(pipe), pipe_kwargs=_jsonable(pipe_kwargs),
        guidance=guidance,
    )
    return Grid({a: values[a] for a in keep}, fixed, arrays,
                traces if record_opts is not None else None, meta)


def _trace_bytes(pipe, record_opts, steps_list, height, width) -> int:
    """Host memory one cell's trace keeps (:func:`estimate_trace_bytes` for the longest run, 77
    tokens, CFG on: the worst case)."""
    if record_opts is None:
        return 0
    steps = max(steps_list)
    opts = RecordOptions(**trace_options(record_opts, steps))
    return sum(estimate_trace_bytes(pipe, num_inference_steps=steps,
                                    latent_hw=latent_hw(pipe, height, width), options=opts).values())


def _pipeline_meta(pipe) -> dict:
    try:
        from sdlens.pipeline import describe

        info = describe(pipe)
        return {"family": info.family, "pipeline_class": info.pipeline_class,
                "scheduler_class": info.scheduler_class, "name_or_path": info.name_or_path}
    except Exception:  # noqa: BLE001
        return {"pipeline_class": type(pipe).__name__}


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = repr(v)
    return out


# ---------------------------------------------------------------------------------------------
# the grid

def axis_label(axis: str, value, guidance: str = "cfg") -> str:
    """How a grid labels one value of an axis: ``"CFG 7.5"``, ``"seed 3"``, a shortened prompt.
    ``guidance``: the kind of the guidance axis (:attr:`Grid.guidance`; "distilled": a
    guidance-distilled model's value, ``"guidance 3.5 (distilled)"``), named by
    :func:`sdlens.analysis.guidance.guidance_label`."""
    if axis == "prompt":
        text = str(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if axis == "scheduler":
        return str(value or "default scheduler")
    if axis == "guidance":
        return guidance_label(value, guidance)
    return f"{AXIS_LABELS[axis]}{value}"


class Grid:
    """The result of :func:`sweep`.

    Attributes:
        axes: ``{name: values}`` of the axes that vary, outermost first (names from ``AXES``:
            prompt, scheduler, steps, guidance, seed).
        fixed: ``{name: value}`` of the axes with one value.
        arrays: float32 ``axes shape + (H, W, 3)`` in [0, 1].
        images: object array of PIL images, ``axes shape`` (``grid.images[i, j]``).
        traces: object array of Traces (or None when recorded without traces).
        meta: how the grid was run.
    """

    kind = KIND

    def __init__(self, axes: dict, fixed: dict, arrays: np.ndarray, traces: np.ndarray | None,
                 meta: dict | None = None):
        self.axes = dict(axes)
        self.fixed = dict(fixed)
        self.arrays = arrays
        self.traces = traces
        self.meta = dict(meta or {})
        self._images = None

    @property
    def shape(self) -> tuple:
        return tuple(len(v) for v in self.axes.values())

    @property
    def guidance(self) -> str:
        """What the guidance axis holds: "cfg" (a CFG scale) or "distilled" (a
        guidance-distilled model's guidance value, Flux.1-dev), as :func:`axis_label` names it."""
        return "distilled" if self.meta.get("guidance") == "distilled" else "cfg"

    def __len__(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def __repr__(self) -> str:
        axes = ", ".join(f"{k}={v!r}" for k, v in self.axes.items())
        fixed = ", ".join(f"{k}={v!r}" for k, v in self.fixed.items())
        return f"Grid({axes}; fixed {fixed}; traces={'yes' if self.traces is not None else 'no'})"

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            from PIL import Image

            imgs = np.empty(self.shape, dtype=object)
            for idx in np.ndindex(*self.shape):
                imgs[idx] = Image.fromarray(
                    (np.clip(self.arrays[idx], 0, 1) * 255).round().astype(np.uint8))
            self._images = imgs
        return self._images

    def settings(self, index: Sequence[int] | int) -> dict:
        """The run settings of cell ``index``: prompt, scheduler, steps, guidance, seed."""
        index = (index,) if isinstance(index, (int, np.integer)) else tuple(index)
        if len(index) != len(self.axes):
            raise IndexError(f"the grid has {len(self.axes)} axes ({', '.join(self.axes)}), "
                             f"got index {index}")
        out = dict(self.fixed)
        out.update({a: vals[i] for (a, vals), i in zip(self.axes.items(), index)})
        return {a: out[a] for a in AXES}

    def index(self, **coords) -> tuple:
        """The index of the cell with the given axis values: ``grid.index(guidance=7.5, seed=3)``."""
        idx = []
        for a, vals in self.axes.items():
            if a not in coords:
                raise KeyError(f"give a value for every axis: {', '.join(self.axes)}")
            v = coords.pop(a)
            matches = [i for i, x in enumerate(vals) if x == v or (
                isinstance(x, float) and isinstance(v, (int, float)) and abs(x - v) < 1e-9)]
            if not matches:
                raise KeyError(f"{a}={v!r} is not on the grid; values: {vals}")
            idx.append(matches[0])
        for a, v in coords.items():
            if a not in self.fixed or self.fixed[a] != v:
                raise KeyError(f"{a}={v!r}: not an axis of the grid ({', '.join(self.axes)})")
        return tuple(idx)

    def cell(self, **coords):
        """The PIL image at the given axis values."""
        return self.images[self.index(**coords)]

    def trace(self, **coords):
        if self.traces is None:
            raise ValueError("this grid was run without traces (record=None)")
        return self.traces[self.index(**coords)]

    # -- plotting ----------------------------------------------------------------------------
    def plot(self, cell_size: float = 1.6, title: str | None = None):
        """A labelled matplotlib Figure: the last axis runs along the columns, the one before
        along the rows, earlier axes (Z) stack further row blocks with combined labels."""
        import matplotlib.pyplot as plt

        names = list(self.axes)
        shape = self.shape
        if len(shape) == 0:
            rows, cols, row_names, col_name = 1, 1, [], None
        elif len(shape) == 1:
            rows, cols, row_names, col_name = 1, shape[0], [], names[0]
        else:
            cols, col_name = shape[-1], names[-1]
            row_names = names[:-1]
            rows = int(np.prod(shape[:-1]))
        fig, axs = plt.subplots(rows, cols, figsize=(cell_size * cols + 1.2 * bool(row_names) + 0.2,
                                                     cell_size * rows + 0.6), squeeze=False)
        flat = self.arrays.reshape((rows, cols) + self.arrays.shape[len(shape):])
        row_idx = list(np.ndindex(*shape[:-1])) if len(shape) >= 2 else [()]
        for r in range(rows):
            for c in range(cols):
                ax = axs[r, c]
                ax.imshow(np.clip(flat[r, c], 0, 1), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if r == 0 and col_name is not None:
                    ax.set_title(axis_label(col_name, self.axes[col_name][c], self.guidance),
                                 fontsize=9)
                if c == 0 and row_names:
                    label = "\n".join(axis_label(a, self.axes[a][i], self.guidance)
                                      for a, i in zip(row_names, row_idx[r]))
                    ax.set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center")
        fixed = ", ".join(f"{axis_label(a, v, self.guidance)}" for a, v in self.fixed.items()
                          if not (a == "scheduler" and v is None))
        fig.suptitle(title if title is not None else fixed, fontsize=10)
        fig.tight_layout()
        return fig

    def _repr_png_(self):  # notebooks show the plot
        import matplotlib.pyplot as plt

        fig = self.plot()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        return buf.getvalue()

    # -- save / load -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: the float images, each cell's trace (as the bytes of the trace
        engine's own safetensors file, a uint8 tensor) and JSON metadata; the safetensors
        metadata has ``format = "sdlens.grid"`` (traces: ``"sdlens.trace"``). No pickle."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"arrays": torch.from_numpy(np.ascontiguousarray(self.arrays))}
        if self.traces is not None:
            for k, idx in enumerate(np.ndindex(*self.shape)):
                tensors[f"trace.{k}"] = torch.frombuffer(bytearray(self.traces[idx].to_bytes()),
                                                         dtype=torch.uint8)
        header = {"kind": KIND, "format": FORMAT_VERSION,
                  "axes": [[a, v] for a, v in self.axes.items()], "fixed": self.fixed,
                  "traces": self.traces is not None, "meta": _jsonable(self.meta)}
        save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                                "kind": KIND, "sdlens": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Grid":
        """Read a grid written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise ValueError(f"{path} is not an sdlens grid (format={md.get('format')!r}; "
                                 f"grids are written by Grid.save, traces open with sdlens.load)")
            header = json.loads(md["sdlens"])
            if header.get("format", 0) > FORMAT_VERSION:
                raise ValueError(f"{path} was written by a newer sdlens (grid format "
                                 f"{header['format']}); upgrade sdlens")
            arrays = f.get_tensor("arrays").numpy()
            axes = {a: v for a, v in header["axes"]}
            shape = tuple(len(v) for v in axes.values())
            traces = None
            if header.get("traces"):
                traces = np.empty(shape, dtype=object)
                for k, idx in enumerate(np.ndindex(*shape)):
                    traces[idx] = Trace.from_bytes(f.get_tensor(f"trace.{k}").numpy().tobytes())
        return cls(axes, header["fixed"], arrays, traces, header.get("meta"))


def is_grid_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a grid file (for ``sdlens.load``'s dispatch on ``kind``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------------------------------------
# CLI: `sdlens sweep "PROMPT" --seeds 0-3 --cfg "1-13 [5]" --out grid.png`

def add_sweep_parser(subparsers) -> Any:
    """Register ``sdlens sweep`` on an argparse subparsers object (``run_sweep`` is its func)."""
    p = subparsers.add_parser(
        "sweep", help="a labelled grid of prompt x CFG x seed (x steps x scheduler)",
        description="Run a grid of runs, batched, and save a labelled image grid (and traces). "
                    "Works under `accelerate launch` (cells shared among processes).",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
        epilog=AXIS_SYNTAX)
    _add_arguments(p)
    p.set_defaults(func=run_sweep)
    return p


def _add_arguments(p) -> None:
    p.add_argument("prompt", nargs="+", help="one or more prompts (the prompt axis)")
    p.add_argument("--seeds", default="0", help='seed axis, e.g. "0-7" or "1,5,9" (default 0)')
    p.add_argument("--cfg", default=None, help='guidance axis, e.g. "1,3,7.5,12" or "1-13 [5]" '
                   '(default: the model\'s recommended scale, else 7.5)')
    p.add_argument("--steps", default="20", help='steps axis, e.g. "20" or "10,20,40"')
    p.add_argument("--scheduler", default=None,
                   help="scheduler axis: comma-separated short names (ddim, euler, dpm++, ...)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--model", default=None, help="model folder or hub id (default: the shipped model)")
    p.add_argument("--device", default=None, help="default: cuda if available (per process), else cpu")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", default="grid.png", help="the labelled grid image (PNG)")
    p.add_argument("--traces", default=None, help="also save the grid with traces (.sdlens)")
    p.add_argument("--record", default="light", choices=("light", "full"),
                   help="what each cell's trace keeps (with --traces)")
    p.add_argument("--max-batch", type=int, default=None, help="at most this many cells per call")
    p.add_argument("--memory-budget", type=float, default=None, help="GiB a call may use")
    p.add_argument("--no-chunk", action="store_true",
                   help="refuse grids that do not fit one call per group")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_sweep(args) -> int:
    """Run ``sdlens sweep`` from parsed arguments; the main process writes the outputs."""
    from sdlens.pipeline import load_pipeline

    state = _distributed_state()
    device = args.device or (state.device if state is not None else None)
    pipe = load_pipeline(args.model, device=device)
    grid = sweep(
        pipe, args.prompt, seeds=args.seeds, guidance_scales=args.cfg, steps=args.steps,
        scheduler=args.scheduler, record=args.record if args.traces else None,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        max_batch=args.max_batch, chunk=not args.no_chunk, progress=not args.quiet,
        memory_budget=int(args.memory_budget * 2**30) if args.memory_budget else None)
    if state is None or state.is_main_process:
        import matplotlib

        matplotlib.use("Agg")
        fig = grid.plot()
        fig.savefig(args.out, dpi=100)
        print(f"wrote {args.out} ({' x '.join(f'{len(v)} {a}' for a, v in grid.axes.items()) or '1 cell'})")
        if args.traces:
            grid.save(args.traces)
            print(f"wrote {args.traces}")
    if state is not None:
        state.wait_for_everyone()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sdlens.experiments.sweep", description="sdlens sweep",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=AXIS_SYNTAX)
    _add_arguments(p)
    return run_sweep(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
