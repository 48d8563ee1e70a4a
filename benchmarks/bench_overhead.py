"""Benchmark 1: the time sdlens's default recording adds to a generation.

    python benchmarks/bench_overhead.py [--smoke | --quick | --full] [--device cuda]

Sides, alternating in one process after a warm-up, same seed and call:
- **untraced**: ``pipe(...)`` (diffusers' default SDPA attention);
- **sdlens**: the same call inside ``sdlens.trace(pipe)`` with the default ``RecordOptions``
  (latents, noise, x0 every step; head-averaged cross-attention maps of all 16 ``attn2`` layers at
  every step);
- **daam-method** (SD 1.5 only; reported by benchmark 3b): DAAM's way of getting the maps, see
  ``bench_daam.py``.

On the full-size SD 1.5 architecture (random weights) at 256 px, 10 steps, CFG 7.5 on the CPU
(quick mode: 128 px, 4 steps; CUDA: 512 px, 50 steps, fp16), and on the shipped model at its own
size, 25 steps. Method: ``common.alternate`` (a warm-up per side, >= 5 rounds in rotating order;
ratios are medians of per-round ratios with their min-max). Target: traced / untraced <= 1.10 on
the CPU, goal <= 1.03 (met only when the whole spread is below).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

TARGET = 1.10  # traced / untraced on the CPU
GOAL = 1.03
GENERATION_TARGET_S = 1.0  # the shipped model's 25-step generation: well under 1 s on the CPU


def sd15_loop(s: C.Settings, ctx: dict, with_daam: bool = True) -> dict:
    """The SD 1.5 alternating loop (shared with benchmarks 3b and 4 through ``ctx``)."""
    if "sd15_loop" in ctx:
        return ctx["sd15_loop"]
    import bench_daam

    pipe = C.sd15_pipeline(s)
    kw = lambda: C.call_kwargs(s)  # noqa: E731
    clocks = {n: C.StepClock(s.device) for n in ("untraced", "sdlens", "daam-method")}
    sides = {"untraced": C.untraced(pipe, clocks["untraced"].wrap(kw)),
             "sdlens": C.traced(pipe, clocks["sdlens"].wrap(kw))}
    if with_daam:
        sides["daam-method"] = bench_daam.daam_method_side(pipe, clocks["daam-method"].wrap(kw))
    # warm-up with 1 step (the same code paths, a tenth of the time)
    warm_kw = lambda: C.call_kwargs(s, steps=1)  # noqa: E731
    warm = {"untraced": C.untraced(pipe, warm_kw), "sdlens": C.traced(pipe, warm_kw)}
    if with_daam:
        warm["daam-method"] = bench_daam.daam_method_side(pipe, warm_kw)
    print(f"  SD 1.5 loop: {s.describe()}")
    C.alternate(warm, s, reps=0, warmup=s.warmup, log=None)
    stats = C.alternate(sides, s, reps=s.reps, warmup=0, keep=("sdlens",))
    out = {"stats": stats, "settings": s.describe(), "build_s": s.extra.get("sd15_build_s"),
           "steps": {n: c.steps for n, c in clocks.items() if c.steps},
           "run_step_medians": {n: c.run_step_medians() for n, c in clocks.items() if c.runs}}
    ctx["sd15_loop"] = out
    return out


def shipped_loop(s: C.Settings, ctx: dict) -> dict:
    if "shipped_loop" in ctx:
        return ctx["shipped_loop"]
    pipe, label = C.shipped_pipeline(s)
    size = C.shipped_size(pipe)
    kw = lambda: C.call_kwargs(s, steps=s.shipped_steps, height=size)  # noqa: E731
    print(f"  shipped model loop: {label}, {size} px, {s.shipped_steps} steps")
    sides = {"untraced": C.untraced(pipe, kw), "sdlens": C.traced(pipe, kw)}
    if s.device == "cpu" and torch.get_num_threads() > 1:
        # the shipped model's ops are tiny (16x16 latents, 64-128 channels): on few cores one
        # thread is often faster than torch's default, so the generation time is given both ways
        sides["untraced, 1 thread"] = one_thread(C.untraced(pipe, kw))
    stats = C.alternate(sides, s, reps=s.shipped_reps, warmup=max(1, s.warmup), keep=("sdlens",))
    out = {"stats": stats, "label": label, "size": size}
    ctx["shipped_loop"] = out
    return out


def one_thread(fn):
    """``fn`` run with one torch thread (the thread count is restored after)."""
    import torch

    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)
    return run


def run(s: C.Settings, ctx: dict) -> dict:
    sd = sd15_loop(s, ctx)
    st = sd["stats"]
    sh = shipped_loop(s, ctx)
    sst = sh["stats"]
    sd_name = "SD 1.5 " + ("(full size)" if s.sd15_scale >= 1 else f"(scale {s.sd15_scale})")
    r_sd = C.round_ratios(st["sdlens"].times, st["untraced"].times)
    rsm = sd["run_step_medians"]
    r_step = C.round_ratios(rsm["sdlens"], rsm["untraced"])
    r_sh = C.round_ratios(sst["sdlens"].times, sst["untraced"].times)
    rows = [
        [sd_name] + C.time_row("untraced", st["untraced"], st["untraced"]),
        [""] + C.time_row("sdlens (default recording)", st["sdlens"], st["untraced"], TARGET, GOAL),
        [sh["label"]] + C.time_row("untraced", sst["untraced"], sst["untraced"]),
        [""] + C.time_row("sdlens (default recording)", sst["sdlens"], sst["untraced"], TARGET, GOAL),
    ]
    if "untraced, 1 thread" in sst:
        rows.append([""] + C.time_row("untraced, 1 torch thread", sst["untraced, 1 thread"],
                                      sst["untraced"]))
    gen = {k: sst[k].times for k in ("untraced", "untraced, 1 thread") if k in sst}
    figs = {
        "overhead_sd15": C.figure(f"{sd_name}, {s.height} px, {s.steps} steps, CFG {s.guidance}: "
                                  "default recording / untraced, whole run", r_sd, TARGET, GOAL,
                                  rounds=st, height=s.height, steps=s.steps),
        "overhead_sd15_per_step": C.figure(f"{sd_name}, {s.height} px, {s.steps} steps: per "
                                           "denoising step (median step of each run)", r_step,
                                           TARGET, GOAL, rounds=st, height=s.height, steps=s.steps),
        "overhead_shipped": C.figure(f"{sh['label']}, {sh['size']} px, {s.shipped_steps} steps: "
                                     "default recording / untraced", r_sh, TARGET, GOAL, rounds=sst),
    }
    if s.shipped_steps == 25 and s.device == "cpu":
        n = torch.get_num_threads()
        for k, label in (("untraced", f"{n} torch thread{'s' if n > 1 else ''}"),
                         ("untraced, 1 thread", "one thread")):
            if k in gen:
                figs["generation_shipped" + ("_1thread" if "1" in k else "")] = C.value_figure(
                    f"the shipped model's 25-step generation (CFG {s.guidance}, untraced, {label})",
                    gen[k], "s", GENERATION_TARGET_S, "well under 1 s on the CPU", rounds=sst)
    notes = [
        f"SD 1.5: {sd['settings']}. Each ratio is the median of the per-round ratios (side / "
        f"untraced in the same round) with their min–max; {len(r_sd)} rounds. Target <= "
        f"{TARGET}x, goal <= {GOAL}x: met only when the whole spread is below it.",
        f"SD 1.5 per denoising step (each run's median step time, wall time between step ends, "
        f"first step left out; per-round ratios): sdlens / untraced "
        f"**{C.fmt_ratio(figs['overhead_sd15_per_step']['median'])}**, "
        f"{figs['overhead_sd15_per_step']['verdict']}.",
        C.load_note(st) + " (SD 1.5 loop)",
        f"Shipped model: {sh['size']} px, {s.shipped_steps} steps, CFG {s.guidance}; "
        + C.load_note(sst),
        "Timed: prompt encoding + the denoising loop (output_type='latent'); the VAE decode is "
        "not timed (sdlens does not touch it; it would only dilute the ratio). Traced side "
        "includes building the Trace object. Warm-up: one run of every side (SD 1.5: 1 step).",
    ]
    for k in ("generation_shipped", "generation_shipped_1thread"):
        if k in figs:
            f = figs[k]
            notes.append(f"{f['label'].capitalize()}: median {C.fmt_s(f['median'])} (min "
                         f"{C.fmt_s(f['min'])}, max {C.fmt_s(f['max'])}); target "
                         f"{f['target_text']}: **{f['target_status'].upper()}**.")
    if s.mode == "quick" and s.device == "cpu":
        notes.append(f"Quick mode is smaller in size, not in rounds: SD 1.5 at {s.height} px, "
                     f"{s.steps} steps (`--full`: 256 px, 10 steps).")
    if sd.get("build_s"):
        notes.append(f"Getting the random-weight SD 1.5 pipeline took {sd['build_s']:.0f} s "
                     f"(not timed; {s.extra.get('sd15_source', '')}).")
    return {"tables": [C.table("1. Overhead: traced (default recording) vs untraced",
                               ["model"] + C.TIME_COLUMNS, rows, notes)],
            "raw": {"sd15": {k: v.to_dict() for k, v in st.items()},
                    "shipped": {k: v.to_dict() for k, v in sst.items()},
                    "sd15_run_step_medians_s": rsm, "target": TARGET, "goal": GOAL,
                    "shipped_steps": s.shipped_steps, "figures": figs}}


def main(argv=None) -> int:
    return C.standalone(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
