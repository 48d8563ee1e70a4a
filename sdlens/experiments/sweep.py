"""Grids of runs: prompt x guidance x seed (x steps x scheduler), batched, labelled, saved.

>>> grid = sdlens.sweep(pipe, "a red circle", seeds=range(4), guidance_scales=[1, 3, 7.5, 12])
>>> grid.axes                     # {'guidance': [1.0, 3.0, 7.5, 12.0], 'seed': [0, 1, 2, 3]}
>>> grid.images[2, 1]             # PIL image of guidance 7.5, seed 1
>>> grid.arrays[2, 1]             # the same as float32 (H, W, 3) in [0, 1]
>>> grid.traces[2, 1]             # its (light) Trace
>>> grid.plot()                   # a labelled matplotlib figure, like A1111's X/Y/Z plot
>>> grid.save("grid.sdlens"); sdlens.load("grid.sdlens")
>>> grid = sdlens.sweep(pipe, ..., out="runs/x")  # a resumable folder; sdlens.load_sweep("runs/x")
>>> grid.table()                  # pandas DataFrame: one row of measures per cell

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
only. With a sweep folder (``out=DIR``, ``sdlens sweep --folder DIR``;
:mod:`sdlens.experiments.sweep_folder`) nothing is gathered: each process writes the cells it
runs to the folder as they finish, and every process returns the folder's lazy grid
(:func:`load_sweep`); running the sweep again resumes it. Load the pipeline on
``accelerate.PartialState().device`` in each process. On GPUs:
``accelerate launch --multi_gpu --num_processes N -m sdlens.experiments.sweep "PROMPT" ...``; on CPUs the same
command works (the processes use gloo; accelerate's ``--cpu`` flag alone starts one process
unless mpirun is configured), as does ``torchrun --nproc_per_node N -m sdlens.experiments.sweep ...``.

Axis syntax (A1111's X/Y/Z plot), for the CLI and for string arguments: see :func:`parse_axis`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import time
import warnings
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
from sdlens.experiments.sweep_folder import (CELLS, MANIFEST, TABLE, LazyCells, SweepFolder,
                                            cell_number, write_atomic)
from sdlens.pipeline import recommended_settings
from sdlens.trace.core import Trace, load as load_trace

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
          progress: bool = True, keep_axes: Sequence[str] = (), out: str | os.PathLike | None = None,
          **pipe_kwargs) -> "Grid":
    """Run a grid of prompt x guidance x seed (x steps x scheduler) and return a :class:`Grid`.

    Args:
        pipe: a diffusers pipeline sdlens traces (``sdlens.engine.arch.SUPPORTED_PIPELINES``).
        prompts: one prompt or a list (the "prompt" axis).
        seeds: ints, or an axis string ``"0-7"`` (see :func:`parse_axis`).
        guidance_scales: floats or an axis string ``"1-13 [5]"``; ``<= 1`` runs without CFG
            (Z-Image: 0; the backbone adapter's ``cfg_weight``). The values go to the pipeline's
            guidance argument (the adapter's ``cfg_arg``: Qwen-Image's ``true_cfg_scale``,
            which guides only with a ``negative_prompt``). None: the model's recommended scale
            (:func:`sdlens.pipeline.recommended_settings`, e.g. the shipped MMDiT's 3), else
            7.5 (1, unguided, where the pipeline would need a negative prompt and has none).
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
        out: a folder (:mod:`sdlens.experiments.sweep_folder`; images only, not a video
            pipeline's clips): each cell is written there as it finishes (trace file, PNG, record) and the grid returned opens the folder lazily
            (:func:`load_sweep`). Running the same sweep again resumes it: finished cells are
            skipped; another plan (axes, pipeline, recording options, pipeline arguments) is
            refused with a ValueError naming the difference. Under ``accelerate launch`` each
            process writes its share of the pending cells (no gather).

    Every cell equals the single run ``pipe(prompt, generator=torch.Generator().manual_seed(
    seed), guidance_scale=g, num_inference_steps=steps)`` within float rounding (on the CPU
    ~1e-5 of the pixel range; on a GPU the kernels depend on the batch size, ~1e-2).
    """
    adapter = adapter_for(pipe)
    for key in ("generator", "prompt_embeds", "negative_prompt_embeds", "latents",
                "num_images_per_prompt", "output_type", "prompt", "guidance_scale",
                "num_inference_steps", adapter.cfg_arg):
        if key in pipe_kwargs:
            raise TypeError(f"sweep sets {key!r} itself; pass it through the sweep's own arguments")
    if "image" in pipe_kwargs or "mask_image" in pipe_kwargs:
        pass  # img2img / inpaint: the same image for every cell
    rec = recommended_settings(pipe)
    no_negative = adapter.cfg_needs_negative and negative_prompt is None
    if guidance_scales is None:
        guidance_scales = (1.0,) if no_negative else (float(rec.get("guidance_scale", 7.5)),)
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

    if no_negative and any(adapter.cfg_weight(g) is not None for g in cfg_list):
        raise ValueError(f"{type(pipe).__name__} guides only with a negative prompt: the "
                         f"guidance values {cfg_list} would all run unguided; pass "
                         "negative_prompt= (e.g. ' ')")
    cells = [Cell(idx, prompt_list[idx[0]], sched_list[idx[1]], steps_list[idx[2]],
                  cfg_list[idx[3]], seed_list[idx[4]],
                  cfg=adapter.cfg_weight(cfg_list[idx[3]]) is not None)
             for idx in np.ndindex(*(len(values[a]) for a in AXES))]

    record_opts = batch_record_options(record)
    budget = int(memory_budget) if memory_budget is not None else default_memory_budget(pipe.device)
    trace_bytes = _trace_bytes(pipe, record_opts, steps_list, height, width)
    if out is not None and adapter.video:  # before anything runs: a folder's cells are PNGs
        raise ValueError("out=: a sweep folder holds one image per cell; a video pipeline's "
                         "sweep runs in memory only (leave out= off)")
    # what the guidance axis is: a CFG scale, or a guidance-distilled model's guidance value
    guidance = "distilled" if adapter.distilled_guidance() else "cfg"
    # one call per guidance value where the value is an input of the denoiser (an LCM UNet, a
    # guidance-distilled transformer), the pipeline does not guide a shared batch, or its
    # guidance is not linear in the scale (guidance_rescale, Z-Image's cfg_normalization)
    split_guidance = (pipe_kwargs.get("guidance_rescale", 0.0) or 0.0) > 0 or \
        bool(pipe_kwargs.get("cfg_normalization")) or \
        adapter.embeds_guidance() or not adapter.cfg_by_default
    state = _distributed_state()
    nproc = state.num_processes if state else 1
    full_shape = tuple(len(values[a]) for a in AXES)
    keep = [a for a in AXES if len(values[a]) > 1 or a in keep_axes]
    folder = None
    todo = cells
    if out is not None:
        folder = SweepFolder.start(out, _manifest(pipe, values, negative_prompt, height, width,
                                                  record_opts, pipe_kwargs, guidance, keep), state)
        done = folder.records()
        todo = [c for c in cells if cell_number(c.index, full_shape) not in done]
        if state is not None:  # every process lists the same finished cells before any writes
            state.wait_for_everyone()
    batches = plan_batches(
        todo, lambda cfg: estimate_cell_bytes(pipe, height, width, cfg, trace_bytes), budget,
        max_batch=max_batch, chunk=chunk, split_guidance=split_guidance, min_batches=nproc)
    mine = batches[state.process_index::nproc] if state else batches
    # outer loop: the scheduler, then steps (A1111 puts the most expensive axis outside)
    order = sorted(range(len(mine)), key=lambda k: (sched_list.index(mine[k].scheduler),
                                                     steps_list.index(mine[k].steps)))
    main = state is None or state.is_main_process
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo) if state is None else sum(len(b.cells) for b in mine),
               disable=not progress or not main, desc="sweep", unit="cell")
    results: dict[tuple, tuple] = {}
    sched = _Scheduler(pipe)
    try:
        for k in order:
            b = mine[k]
            sched.set(b.scheduler)
            started, start = time.time(), time.perf_counter()
            images, traces = run_batch(pipe, b, negative_prompt, height, width, pipe_kwargs,
                                       record_opts)
            seconds = (time.perf_counter() - start) / len(b.cells)
            for cell, img, tr in zip(b.cells, images, traces):
                if folder is not None:  # written now; nothing kept in memory
                    folder.write_cell(cell_number(cell.index, full_shape), _settings(cell), img,
                                      tr, seconds, started)
                else:
                    results[cell.index] = (img, tr)
            bar.update(len(b.cells))
    finally:
        sched.restore()
        bar.close()
    if folder is not None:
        if state is not None:
            state.wait_for_everyone()
        if main:
            folder.write_index()
        if state is not None:
            state.wait_for_everyone()
        return load_sweep(folder.path, keep_axes=keep)
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


def _settings(cell: Cell) -> dict:
    return {"prompt": cell.prompt, "scheduler": cell.scheduler, "steps": cell.steps,
            "guidance": cell.guidance, "seed": cell.seed}


def _plan_value(v):
    """A pipeline argument as the manifest records it: JSON as is; images, arrays and tensors
    by a hash of their content (so that a resume with the same image matches)."""
    try:
        json.dumps(v)
        return v
    except TypeError:
        pass
    if isinstance(v, (list, tuple)):
        return [_plan_value(x) for x in v]
    if callable(v) and not hasattr(v, "tobytes"):  # a step callback: by name (its repr has an address)
        return f"callable {getattr(v, '__module__', '')}.{getattr(v, '__qualname__', type(v).__name__)}"
    if hasattr(v, "tobytes") or isinstance(v, torch.Tensor):
        data = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        return f"{type(v).__name__} sha1:{hashlib.sha1(data.tobytes()).hexdigest()[:16]}"
    return repr(v)


def _manifest(pipe, values, negative_prompt, height, width, record_opts, pipe_kwargs, guidance,
              keep) -> dict:
    """A sweep folder's plan (:data:`sdlens.experiments.sweep_folder.PLAN_KEYS`) and layout."""
    identity = _pipeline_meta(pipe)
    denoiser = adapter_for(pipe).denoiser
    config = json.dumps(dict(getattr(denoiser, "config", {}) or {}), sort_keys=True, default=str)
    identity["denoiser_config_sha1"] = hashlib.sha1(config.encode()).hexdigest()[:16]
    return {"axes": [[a, list(values[a])] for a in AXES], "negative_prompt": negative_prompt,
            "height": height, "width": width,
            "record": record_opts if record_opts is None or isinstance(record_opts, str)
            else {k: _plan_value(v) for k, v in sorted(record_opts.items())},
            "pipe_kwargs": {k: _plan_value(v) for k, v in sorted(pipe_kwargs.items())},
            "pipeline": identity, "guidance": guidance, "keep": list(keep)}


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
        folder: the sweep folder a grid from :func:`load_sweep` reads (else None). Its
            ``arrays``, ``images`` and ``traces`` are then :class:`LazyCells`: each cell is read
            from the folder when indexed and not kept (``arrays`` hold the 8-bit PNG / 255).
        missing: bool ``axes shape``: the cells not run yet (a partial sweep).
        problems: ``{index: one-line reason}`` of the cells found damaged so far.
    """

    kind = KIND

    def __init__(self, axes: dict, fixed: dict, arrays: np.ndarray | LazyCells,
                 traces: np.ndarray | LazyCells | None, meta: dict | None = None,
                 images: LazyCells | None = None, missing: np.ndarray | None = None,
                 problems: dict | None = None, folder: Path | None = None):
        self.axes = dict(axes)
        self.fixed = dict(fixed)
        self.arrays = arrays
        self.traces = traces
        self.meta = dict(meta or {})
        self._images = images
        self.missing = missing if missing is not None else np.zeros(self.shape, dtype=bool)
        self.problems = problems if problems is not None else {}
        self.folder = folder

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
    def video(self) -> bool:
        """Whether the cells are clips (a video pipeline's sweep): ``arrays`` is then (*shape,
        frames, H, W, 3)."""
        return self.arrays.ndim == len(self.shape) + 4

    @property
    def images(self) -> np.ndarray:
        """The cells as PIL images (a video grid: each cell the list of its clip's frames)."""
        if self._images is None:
            from PIL import Image

            def pil(a):
                return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))

            imgs = np.empty(self.shape, dtype=object)
            for idx in np.ndindex(*self.shape):
                imgs[idx] = [pil(f) for f in self.arrays[idx]] if self.video \
                    else pil(self.arrays[idx])
            self._images = imgs
        return self._images

    def status(self, index: Sequence[int] | int) -> str:
        """"ok", "missing" (not run yet) or "damaged" (its reason: ``grid.problems[index]``)."""
        index = (index,) if isinstance(index, (int, np.integer)) else tuple(index)
        if self.missing[index]:
            return "missing"
        return "damaged" if index in self.problems else "ok"

    def image_at(self, index: Sequence[int] | int):
        """The PIL image of cell ``index``, or None where the cell is missing or damaged (the
        reason goes to ``grid.problems``): what plots and viewers show as a gap."""
        index = (index,) if isinstance(index, (int, np.integer)) else tuple(index)
        try:
            return self.images[index]
        except ValueError:
            return None

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
    def plot(self, cell_size: float = 1.6, title: str | None = None, frame: int | None = None):
        """A labelled matplotlib Figure: the last axis runs along the columns, the one before
        along the rows, earlier axes (Z) stack further row blocks with combined labels. A video
        grid shows each clip's frame ``frame`` (default: the middle one)."""
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
        if self.video:
            n = self.arrays.shape[len(shape)]
            frame = n // 2 if frame is None else frame
            if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) \
                    or not -n <= frame < n:
                raise ValueError(f"frame={frame!r} is out of range: the clips have {n} frames")
        elif frame is not None:
            raise ValueError("frame= is for a video grid (these cells are images)")
        row_idx = list(np.ndindex(*shape[:-1])) if len(shape) >= 2 else [()]
        for r in range(rows):
            for c in range(cols):
                ax = axs[r, c]
                idx = row_idx[r] + ((c,) if shape else ())
                try:  # one cell at a time: a folder's grid reads it now and lets it go
                    cell = self.arrays[idx]  # a video grid's: (frames, H, W, 3)
                    cell = cell[int(frame)] if self.video else cell
                    ax.imshow(np.clip(cell, 0, 1), interpolation="nearest")
                except ValueError:  # not run yet, or damaged: a labelled gap
                    ax.set_facecolor("0.85")
                    ax.text(0.5, 0.5, self.status(idx), ha="center", va="center",
                            transform=ax.transAxes, fontsize=8, color="0.3")
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
        if self.problems:
            warnings.warn(f"{len(self.problems)} damaged cell(s) shown as gaps, e.g. "
                          f"{next(iter(self.problems.values()))}", stacklevel=2)
        return fig

    # -- measures ----------------------------------------------------------------------------
    def table(self, top: float | None = None, settle_threshold: float | None = None,
              reference: Sequence[int] | dict | None = None, path: str | os.PathLike | None = None):
        """A pandas DataFrame, one row per cell: its five settings (prompt, scheduler, steps,
        guidance, seed), ``status`` (ok / missing / damaged) and measures
        (:mod:`sdlens.analysis.measures`):

        * ``mass@10%:<word>`` / ``entropy:<word>``: per word of the cell's prompt, the share of
          its attention map inside the map's top ``top`` (default 10%) of pixels, and the map's
          entropy / log(pixels) (maps pooled over the recorded steps and layers);
        * ``x0_settle_step``: the first step from which x0 moves by less than
          ``settle_threshold`` (default 0.05, relative L2) at every later step (nan: never);
        * ``distance_to_reference``: the RMS pixel difference (images in [0, 1]) to the
          ``reference`` cell (an index or ``{axis: value}``; default: the first cell).

        Cells are read one at a time. A folder's grid writes the table to ``table.csv`` in its
        folder; others write it where ``path`` says (CSV), if given.
        """
        import pandas as pd

        from sdlens.analysis.measures import (SETTLE_THRESHOLD, TOP, image_distance,
                                              word_measures, x0_settle_step)

        top = TOP if top is None else float(top)
        settle_threshold = SETTLE_THRESHOLD if settle_threshold is None else float(settle_threshold)
        shape = self.shape
        if reference is None:
            ref_idx = (0,) * len(shape)
        elif isinstance(reference, dict):
            ref_idx = self.index(**reference)
        else:
            ref_idx = tuple(reference)
        ref = None
        try:
            ref = np.asarray(self.arrays[ref_idx])
        except ValueError:
            pass  # a missing / damaged reference: distances are nan
        rows = []
        for idx in np.ndindex(*shape):
            row = dict(self.settings(idx))
            try:
                image = np.asarray(self.arrays[idx])
                trace = self.traces[idx] if self.traces is not None else None
            except ValueError:
                rows.append(dict(row, status=self.status(idx)))
                continue
            row["status"] = "ok"
            if trace is not None:
                try:
                    row["x0_settle_step"] = x0_settle_step(trace, settle_threshold)
                    row.update(word_measures(trace, top))
                except Exception as e:  # noqa: BLE001 - a folder's file that fails to read
                    if self.folder is None:
                        raise
                    self.problems[idx] = (f"cell {self.settings(idx)} is damaged: "
                                          f"{' '.join(str(e).split())}")
                    rows.append(dict(self.settings(idx), status="damaged"))
                    continue
            row["distance_to_reference"] = image_distance(image, ref) if ref is not None else math.nan
            rows.append(row)
            del trace, image
        df = pd.DataFrame(rows)
        df.attrs.update(top=top, settle_threshold=settle_threshold, reference=list(ref_idx))
        target = Path(path) if path is not None else (self.folder / TABLE if self.folder else None)
        if target is not None:
            write_atomic(target, df.to_csv(index=False).encode())
        return df

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
        if isinstance(self.arrays, LazyCells):
            if self.missing.any() or self.problems:
                raise ValueError(f"the sweep in {self.folder} is partial or damaged "
                                 f"({int(self.missing.sum())} missing, {len(self.problems)} "
                                 f"damaged): it cannot be saved as one grid file")
            return Grid(self.axes, self.fixed, np.stack(list(self.arrays)).reshape(
                self.shape + np.asarray(self.arrays[(0,) * len(self.shape)]).shape),
                None if self.traces is None else _object_array(list(self.traces), self.shape),
                self.meta).save(path)
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


def _object_array(items: list, shape: tuple) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def load_sweep(path: str | os.PathLike, keep_axes: Sequence[str] | None = None) -> Grid:
    """Open a sweep folder (``sdlens.sweep(..., out=path)``) as a :class:`Grid` whose cells are
    read when indexed (memory bounded by what is viewed, not by the sweep's size).

    A partial sweep opens with its missing cells marked (``grid.missing``; indexing one raises
    ValueError, ``grid.plot()`` and the GridViewer show a gap). A cell whose files are missing,
    truncated or unreadable raises a one-line ValueError naming the cell when indexed (and is
    listed in ``grid.problems``); the other cells open as usual.

    Args:
        keep_axes: axes kept with a single value (default: as the sweep kept them).
    """
    folder = SweepFolder(path)
    m = folder.manifest
    values = {a: v for a, v in m["axes"]}
    full_shape = folder.full_shape
    keep = [a for a in AXES if len(values[a]) > 1 or a in (
        m.get("keep", []) if keep_axes is None else keep_axes)]
    shape = tuple(len(values[a]) for a in keep)
    pos = [AXES.index(a) for a in keep]
    fixed = {a: values[a][0] for a in AXES if a not in keep}
    records = folder.records()
    cells_dir = folder.path / CELLS

    def full(index: tuple) -> tuple:
        out = [0] * len(AXES)
        for p, i in zip(pos, index):
            out[p] = i
        return tuple(out)

    def locate(index: tuple) -> tuple[int, dict | None]:
        number = cell_number(full(index), full_shape)
        return number, records.get(number)

    def describe(index: tuple) -> str:
        s = dict(zip(keep, (values[a][i] for a, i in zip(keep, index))))
        return ", ".join(f"{a}={v!r}" for a, v in s.items()) or "0"

    missing = np.zeros(shape, dtype=bool)
    problems: dict = {}
    for index in np.ndindex(*shape):  # sizes only: the files are not read here
        number, rec = locate(index)
        if rec is None:
            missing[index] = True
            continue
        for key, name in rec.get("files", {}).items():
            file = cells_dir / name
            size = file.stat().st_size if file.exists() else None
            if size != rec.get("bytes", {}).get(key):
                what = "is missing" if size is None else f"has {size} bytes, {rec['bytes'][key]} written"
                problems[index] = f"cell {describe(index)} (cells/{name}) is damaged: it {what}"

    def image(rec):
        from PIL import Image

        with Image.open(cells_dir / rec["files"]["image"]) as im:
            return im.convert("RGB")

    def array(rec):
        return np.asarray(image(rec), dtype=np.float32) / 255.0

    def trace(rec):
        return load_trace(cells_dir / rec["files"]["trace"])

    lazy = lambda opener, what: LazyCells(shape, locate, opener, describe, problems, what)  # noqa: E731
    meta = {k: m.get(k) for k in ("negative_prompt", "height", "width", "record", "pipeline",
                                  "pipe_kwargs", "guidance", "versions", "created")}
    meta.update(folder=str(folder.path), cells=int(np.prod(shape)) if shape else 1,
                finished=int((~missing).sum()))
    return Grid({a: values[a] for a in keep}, fixed, lazy(array, "arrays"),
                None if m.get("record") is None else lazy(trace, "traces"), meta,
                images=lazy(image, "images"), missing=missing, problems=problems,
                folder=folder.path)


def is_sweep_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sweep folder (for ``sdlens.load``)."""
    return (Path(path).expanduser() / MANIFEST).is_file()


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
    p.add_argument("--out", default=None,
                   help="the labelled grid image (PNG; default grid.png, or FOLDER/grid.png)")
    p.add_argument("--folder", default=None,
                   help="a sweep folder: each cell (trace, PNG) is written as it finishes; run "
                        "the same command again to resume (sdlens.load_sweep opens it)")
    p.add_argument("--traces", default=None, help="also save the grid with traces (.sdlens)")
    p.add_argument("--record", default="light", choices=("light", "full"),
                   help="what each cell's trace keeps (with --traces or --folder)")
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
    folder = getattr(args, "folder", None)
    grid = sweep(
        pipe, args.prompt, seeds=args.seeds, guidance_scales=args.cfg, steps=args.steps,
        scheduler=args.scheduler, record=args.record if args.traces or folder else None,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        max_batch=args.max_batch, chunk=not args.no_chunk, progress=not args.quiet,
        memory_budget=int(args.memory_budget * 2**30) if args.memory_budget else None,
        out=folder)
    if state is None or state.is_main_process:
        import matplotlib

        matplotlib.use("Agg")
        out = args.out or (str(Path(folder) / "grid.png") if folder else "grid.png")
        fig = grid.plot()
        fig.savefig(out, dpi=100)
        print(f"wrote {out} ({' x '.join(f'{len(v)} {a}' for a, v in grid.axes.items()) or '1 cell'})")
        if folder:
            print(f"wrote {folder} ({grid.meta['finished']} of {grid.meta['cells']} cells)")
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
