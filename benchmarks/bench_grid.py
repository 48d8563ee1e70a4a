"""Benchmark: a 4 seeds x 4 CFG grid, batched by ``sdlens.sweep`` vs the same 16 runs as
sequential pipeline calls, measured side by side in one process (alternating, same machine).

    python benchmarks/bench_grid.py                 # shipped model (64 px) + full-size SD 1.5 UNet at 256 px
    python benchmarks/bench_grid.py --only shapes   # one of: shapes, sd15
    python benchmarks/bench_grid.py --smoke         # tiny random pipelines, seconds
    python benchmarks/bench_grid.py --only sd15 --steps 4 --md benchmarks/RESULTS-grid-sd15.md
    python benchmarks/bench_grid.py --device cuda   # on a GPU: SD 1.5 in float16 at 512 px

``--md PATH`` also writes the table, with the machine and the command, to a markdown file
(``run.py --quick`` includes ``RESULTS-grid-sd15.md``, the SD 1.5 grid being too slow for its
10-minute budget). Method: a warm-up of both ways, then ``--repeats`` rounds (at least 3) in
alternating order. Prints one markdown table row per model: median (min-max) seconds of each way,
the speed-up (median of the per-round ratios sequential / batched, with their min-max) and the
largest pixel difference between the two ways' images, checked against a stated tolerance
(they must agree: every grid cell equals its single run). ``--json PATH``: the raw numbers. Random weights for
SD 1.5 (``sdlens.testing.random_pipeline("sd15", scale=1.0)``: the real 859M-parameter UNet);
timings do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py

S = __import__("importlib").import_module("sdlens.experiments.sweep")  # noqa: E402 (sdlens.sweep: the function once exported)
from sdlens.pipeline import SHIPPED_MODEL  # noqa: E402

SEEDS = [0, 1, 2, 3]
CFGS = [1.0, 3.0, 7.5, 12.0]
PROMPT = "a red circle and a blue square"


def sequential(pipe, steps, size):
    out = []
    for g in CFGS:
        for s in SEEDS:
            out.append(pipe(PROMPT, generator=torch.Generator().manual_seed(s), guidance_scale=g,
                            num_inference_steps=steps, height=size, width=size,
                            output_type="np").images[0])
    return np.stack(out).reshape(len(CFGS), len(SEEDS), *out[0].shape)


def batched(pipe, steps, size, max_batch):
    grid = S.sweep(pipe, PROMPT, seeds=SEEDS, guidance_scales=CFGS, steps=steps, height=size,
                   width=size, record=None, progress=False, max_batch=max_batch)
    return grid.arrays, grid.meta["batches"]


# The two ways must give the same images: a batched cell equals its single run up to float
# rounding that depends on the batch size. On the CPU in float32 that is ~1e-5; the tolerance is
# a quarter of one 8-bit level (the saved PNGs agree). On CUDA (fp16 for SD 1.5, TF32 and
# cuDNN algorithms that change with the batch) measured up to 2e-2: the tolerance is 0.05.
TOLERANCE = {"cpu": 0.25 / 255, "cuda": 0.05}
MIN_REPEATS = 3


def bench(name, pipe, steps, size, repeats, max_batch, device="cpu", results=None):
    """Warm-up of both ways (untimed), then ``max(repeats, MIN_REPEATS)`` rounds in alternating
    order; the speed-up is the median of the per-round ratios sequential / batched, with their
    min-max; the images of the two ways are compared in every round."""
    from common import fmt_spread, loadavg, spread, verdict

    repeats = max(repeats, MIN_REPEATS)
    load_before = loadavg()
    sequential(pipe, steps, size)  # warm-up, both ways
    batched(pipe, steps, size, max_batch)
    seq_t, bat_t = [], []
    diff = 0.0
    calls = None
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # alternate which way runs first
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                a = sequential(pipe, steps, size)
                seq_t.append(time.perf_counter() - t0)
            else:
                b, calls = batched(pipe, steps, size, max_batch)
                bat_t.append(time.perf_counter() - t0)
        diff = max(diff, float(np.abs(a - b).max()))
    load_after = loadavg()

    def fmt(ts):
        return f"{statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f})"

    ratios = [q / b for q, b in zip(seq_t, bat_t)]
    sp = spread(ratios)
    tol = TOLERANCE[device]
    equal = diff <= tol
    row = (f"| {name} | {size} px | {steps} | 4 seeds x 4 CFG ({calls} batched calls) | "
           f"{fmt(seq_t)} | {fmt(bat_t)} | {sp['median']:.2f}x: "
           f"{verdict(sp, what='speedup')} | {diff:.1e} | {'yes' if equal else 'NO'} (<= {tol:.1e}) | "
           f"{repeats} |")
    print(row, flush=True)
    if results is not None:
        results.append({"name": name, "size": size, "steps": steps, "calls": calls,
                        "sequential_s": seq_t, "batched_s": bat_t, "ratios": ratios, **sp,
                        "max_abs_diff": diff, "tolerance": tol, "equal": equal,
                        "load_before": load_before, "load_after": load_after})
    return row


def machine(device: str) -> str:
    import os
    import platform

    import diffusers

    from common import cpu_model

    return (f"{cpu_model()}, {len(os.sched_getaffinity(0))} usable CPUs, {torch.get_num_threads()} torch "
            f"threads; python {platform.python_version()}, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}; "
            + (f"{torch.cuda.get_device_name(0)}, SD 1.5 in float16, the shipped model in float32"
               if device == "cuda" else "float32 on the CPU"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random pipelines, 3 steps, 1 repeat")
    p.add_argument("--only", choices=("shapes", "sd15"), default=None)
    p.add_argument("--steps", type=int, default=None, help="default 20 (smoke: 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (at least 3, the default)")
    p.add_argument("--max-batch", type=int, default=None, help="cells per call (default: memory budget)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: SD 1.5 in float16 at 512 px (default cpu: float32, 256 px)")
    p.add_argument("--md", type=Path, default=None, help="also write the table to this markdown file")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers to this file")
    args = p.parse_args(argv)
    t_start = time.time()
    from sdlens.testing import random_pipeline

    steps = args.steps or (3 if args.smoke else 20)
    repeats = max(args.repeats or MIN_REPEATS, MIN_REPEATS)
    dev = args.device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dev}, "
          f"{'smoke' if args.smoke else 'full'} run", flush=True)
    header = ("| model | size | steps | grid | sequential s, median (min-max) | batched s | "
              "speed-up: median of per-round ratios (min-max) | max abs difference of the images "
              "| equal within tolerance? | rounds |\n|---|---|---|---|---|---|---|---|---|---|")
    print(header)
    rows, results = [], []
    if args.only in (None, "shapes"):
        if args.smoke or not (SHIPPED_MODEL / "model_index.json").exists():
            pipe = random_pipeline("shapes", device=dev)
            name = "shapes architecture (random weights)"
        else:
            from sdlens.pipeline import load_pipeline

            pipe = load_pipeline(device=dev, dtype=torch.float32)
            name = "shipped shapes model"
        rows.append(bench(name, pipe, steps, 64, repeats, args.max_batch, dev, results))
    if args.only in (None, "sd15"):
        if args.smoke:
            pipe, size, name = random_pipeline("sd15", device=dev), 64, "SD 1.5 architecture, scale 0.05"
        elif dev == "cuda":
            pipe = random_pipeline("sd15", scale=1.0, device=dev, dtype=torch.float16)
            size, name = 512, "SD 1.5 full-size UNet, float16"
        else:
            pipe, size, name = random_pipeline("sd15", scale=1.0), 256, "SD 1.5 full-size UNet"
        rows.append(bench(name, pipe, steps, size, repeats, args.max_batch, dev, results))
    if args.md:
        cmd = "python benchmarks/bench_grid.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.md.write_text(
            f"# Grid benchmark: 4 seeds x 4 CFG, batched vs sequential\n\n"
            f"`{cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t_start))} "
            f"({(time.time() - t_start) / 60:.1f} min). Machine: {machine(dev)}.\n\n"
            f"{header}\n" + "\n".join(rows) + "\n\n"
            f"Both ways in one process: a warm-up of each, then {repeats} rounds in alternating "
            f"order; prompt {PROMPT!r}, seeds {SEEDS}, CFG {CFGS}.\n")
    if args.json:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": results, "device": dev, "steps": steps,
                                         "repeats": repeats}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
