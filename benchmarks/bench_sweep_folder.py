"""Benchmark: a sweep folder written by 1 process vs 2 processes (``accelerate launch``), and the
folder's bytes per cell against sdlens' size estimates.

    python benchmarks/bench_sweep_folder.py            # shipped model, 16 cells x 10 steps, 3 rounds
    python benchmarks/bench_sweep_folder.py --smoke    # 4 cells x 2 steps, 1 round: checks the script
    python benchmarks/bench_sweep_folder.py --device cuda --processes 2   # on a machine with 2 GPUs

Each round runs the same ``sdlens sweep ... --folder`` command (light traces) into a fresh folder
once with 1 process and once under ``accelerate launch --num_processes 2``, in alternating
order. Two rates per run, in cells per minute: **wall** (the whole command: interpreter start,
model load, the cells; what a user waits for) and **steady** (the cells only: the cells divided
by the span from the first cell's start to the last cell's end, from the processes' logs in the
folder). Each process runs ``--threads-per-process`` torch threads (default 1: on a shared
machine, more threads than free cores makes a tiny model's calls many times slower, which would
swamp the comparison). Every 2-process folder is checked to hold every cell once, and compared with the
1-process folder (largest PNG difference in 8-bit levels: the processes batch the cells
differently, and a cell's float rounding depends on its call's batch size). On the CPU the processes share the cores: 2 processes only help where one
process leaves cores idle; the load average is recorded, and a run on a machine with a 1-minute
load above half its CPUs is marked LOADED.

Bytes per cell: the trace file against :func:`sdlens.engine.options.estimate_trace_bytes` (light
options; 77 tokens and CFG on: an upper estimate), the PNG, and the whole cell against
:func:`~sdlens.engine.options.estimate_cell_bytes` (a batch item's *memory* during the call:
activations + VAE + trace, not a file size; given for scale).

Writes the markdown table (``--md``, default ``benchmarks/RESULTS-sweep-folder.md``) and the raw
numbers (``--json``, default beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a red circle and a blue square"


def command(folder: Path, processes: int, seeds: str, cfg: str, steps: int, device: str) -> list:
    sweep = ["-m", "sdlens.experiments.sweep", PROMPT, "--seeds", seeds, "--cfg", cfg,
             "--steps", str(steps), "--quiet", "--folder", str(folder), "--device", device]
    if processes == 1:
        return [sys.executable, *sweep]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--multi_gpu", *sweep]


def run_once(folder: Path, processes: int, args, device: str) -> dict:
    from sdlens.experiments.sweep_folder import SweepFolder

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    if device == "cpu":
        env.update(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS=str(args.threads_per_process))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    out = subprocess.run(command(folder, processes, args.seeds, args.cfg, args.steps,
                                 "cuda" if device == "cuda" else "cpu"),
                         cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"sweep failed ({processes} process(es)):\n{out.stderr[-3000:]}")
    lines = SweepFolder(folder).log_lines()
    numbers = [line["number"] for line in lines]
    first = min(line["started"] for line in lines)
    last = max(line["time"] for line in lines)
    return {"processes": processes, "cells": len(numbers), "unique": len(set(numbers)),
            "wall_s": wall, "steady_s": last - first, "wall_cpm": 60 * len(numbers) / wall,
            "steady_cpm": 60 * len(numbers) / (last - first), "load_before": load,
            "load_after": os.getloadavg()[0], "writers": len({line["file"] for line in lines})}


def image_difference(a: Path, b: Path) -> int:
    """The largest difference between the two folders' PNGs, in 8-bit levels (cells in calls of
    other batch sizes differ by float rounding); -1 where the folders hold other cells."""
    import numpy as np
    from PIL import Image

    names = sorted(p.name for p in (a / "cells").glob("*.png"))
    if names != sorted(p.name for p in (b / "cells").glob("*.png")):
        return -1
    return max(int(np.abs(np.asarray(Image.open(a / "cells" / n), dtype=np.int16)
                          - np.asarray(Image.open(b / "cells" / n), dtype=np.int16)).max())
               for n in names)


def sizes(folder: Path, args) -> dict:
    import sdlens
    from sdlens.engine.batch import trace_options
    from sdlens.engine.options import RecordOptions, estimate_cell_bytes, estimate_trace_bytes
    from sdlens.experiments.sweep_folder import SweepFolder

    recs = SweepFolder(folder).records().values()
    trace = statistics.mean(r["bytes"]["trace"] for r in recs)
    png = statistics.mean(r["bytes"]["image"] for r in recs)
    record = statistics.mean((folder / "cells" / f"{r['number']:05d}.json").stat().st_size
                             for r in recs)
    pipe = sdlens.load_pipeline(device="cpu")
    opts = RecordOptions(**trace_options("light", args.steps))
    est_trace = sum(estimate_trace_bytes(pipe, num_inference_steps=args.steps, options=opts).values())
    # the positions a trace keeps by default: the start token, the prompt's tokens, the end token
    n_tokens = len(pipe.tokenizer(PROMPT).input_ids)
    est_prompt = sum(estimate_trace_bytes(pipe, num_inference_steps=args.steps, options=opts,
                                          n_tokens=n_tokens).values())
    est_cell = estimate_cell_bytes(pipe, cfg=True, trace_bytes=est_trace)
    return {"trace_bytes": trace, "png_bytes": png, "record_bytes": record,
            "cell_bytes": trace + png + record, "estimate_trace_bytes": est_trace,
            "estimate_trace_bytes_prompt": est_prompt, "prompt_tokens": n_tokens,
            "estimate_cell_bytes": est_cell}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--cfg", default="1,7.5")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2, help="the multi-process side")
    ap.add_argument("--threads-per-process", type=int, default=1,
                    help="torch CPU threads of each process (default 1)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--smoke", action="store_true", help="4 cells x 2 steps, 1 round")
    ap.add_argument("--md", default=str(ROOT / "benchmarks" / "RESULTS-sweep-folder.md"))
    ap.add_argument("--json", default=None, help="raw numbers (default: --md with .json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds, args.cfg, args.steps, args.rounds = "0-1", "1,7.5", 2, 1
    work = Path(tempfile.mkdtemp(prefix="sdlens-bench-sweep-"))
    runs: list[dict] = []
    try:
        for r in range(args.rounds):
            order = (1, args.processes) if r % 2 == 0 else (args.processes, 1)
            folders, this = {}, {}
            for n in order:
                folders[n] = work / f"r{r}-p{n}"
                this[n] = dict(run_once(folders[n], n, args, args.device), round=r)
                runs.append(this[n])
            this[args.processes]["png_difference"] = image_difference(folders[1],
                                                                      folders[args.processes])
        size = sizes(work / "r0-p1", args)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def side(n):
        rs = [x for x in runs if x["processes"] == n]
        return {k: statistics.median(x[k] for x in rs) for k in ("wall_cpm", "steady_cpm")} | {
            "min_wall_cpm": min(x["wall_cpm"] for x in rs), "max_wall_cpm": max(x["wall_cpm"] for x in rs),
            "min_steady_cpm": min(x["steady_cpm"] for x in rs),
            "max_steady_cpm": max(x["steady_cpm"] for x in rs)}

    one, many = side(1), side(args.processes)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    loaded = any(max(x["load_before"], x["load_after"]) > 0.5 * cpus for x in runs)
    checks = [x for x in runs if x["processes"] == args.processes]
    cells = runs[0]["cells"]
    result = {"runs": runs, "one": one, "many": many, "sizes": size, "cpus": cpus,
              "loaded": loaded, "machine": platform.processor() or platform.machine(),
              "device": args.device, "args": vars(args), "cells": cells}
    md = [f"# Sweep folder: 1 vs {args.processes} processes, bytes per cell",
          "",
          f"Written by `python benchmarks/bench_sweep_folder.py{' --smoke' if args.smoke else ''}"
          f"{'' if args.device == 'cpu' else ' --device ' + args.device}` on "
          f"{result['machine']} ({cpus} usable CPUs, device {args.device}); {cells} cells "
          f"(seeds {args.seeds} x CFG {args.cfg}, {args.steps} steps, light traces, the shipped "
          f"model), {args.threads_per_process} torch thread(s) per process, {args.rounds} round(s) "
          f"in alternating order"
          f"{'; LOADED (1-minute load above half the CPUs)' if loaded else ''}.",
          "",
          "| processes | cells/min, wall (median, min-max) | cells/min, steady (median, min-max) | "
          "every cell once | largest PNG difference to 1 process (8-bit levels) |",
          "|---|---|---|---|---|"]
    for n, s in ((1, one), (args.processes, many)):
        rs = [x for x in runs if x["processes"] == n]
        once = all(x["unique"] == x["cells"] == cells for x in rs)
        eq = "-" if n == 1 else str(max(x["png_difference"] for x in checks))
        md.append(f"| {n} | {s['wall_cpm']:.1f} ({s['min_wall_cpm']:.1f}-{s['max_wall_cpm']:.1f}) | "
                  f"{s['steady_cpm']:.1f} ({s['min_steady_cpm']:.1f}-{s['max_steady_cpm']:.1f}) | "
                  f"{'yes' if once else 'NO'} | {eq} |")
    ratio = [m["steady_cpm"] / o["steady_cpm"] for o, m in zip(
        [x for x in runs if x["processes"] == 1], checks)]
    md += ["", f"Steady-rate ratio {args.processes} / 1 process (median of rounds, min-max): "
           f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f})"
           + (" — within noise" if min(ratio) <= 1 <= max(ratio) else "") + "."
           + (f" The machine was LOADED (shared with other work): there {args.processes} "
              f"processes get {args.processes} shares of the CPUs against the other work's "
              f"processes, so this ratio overstates what they gain on an idle machine."
              if loaded else ""),
           "",
           "| bytes per cell | measured | estimate | measured / estimate |",
           "|---|---|---|---|",
           f"| trace file (`.sdlens`) | {size['trace_bytes']:,.0f} | {size['estimate_trace_bytes']:,} "
           f"(`estimate_trace_bytes`, light, 77 tokens) | {size['trace_bytes'] / size['estimate_trace_bytes']:.2f} |",
           f"| trace file (`.sdlens`) | {size['trace_bytes']:,.0f} | "
           f"{size['estimate_trace_bytes_prompt']:,} (the same at the prompt's "
           f"{size['prompt_tokens']} kept tokens) | "
           f"{size['trace_bytes'] / size['estimate_trace_bytes_prompt']:.2f} |",
           f"| image (`.png`) | {size['png_bytes']:,.0f} | - | - |",
           f"| record (`.json`) | {size['record_bytes']:,.0f} | - | - |",
           f"| whole cell on disk | {size['cell_bytes']:,.0f} | {size['estimate_cell_bytes']:,} "
           f"(`estimate_cell_bytes`: memory in the call) | "
           f"{size['cell_bytes'] / size['estimate_cell_bytes']:.3f} |", ""]
    Path(args.md).write_text("\n".join(md))
    Path(args.json or Path(args.md).with_suffix(".json")).write_text(json.dumps(result, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
