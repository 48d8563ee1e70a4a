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
(512 px, 50 steps, fp16 on CUDA), and on the shipped model at its own size, 25 steps.
Target: traced / untraced <= 1.10 on the CPU.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

TARGET = 1.10


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
    budget = s.extra.get("sd15_loop_budget_s")
    # quick: DAAM's method (benchmark 3b) timed once, and a second round of the other two only
    # when the loop's budget allows it (on 2 CPU cores it does not: one round is ~2.7 minutes)
    quick = s.mode == "quick"
    fewer = {"daam-method": 1} if quick and with_daam else None
    stats = C.alternate(sides, s, reps=s.reps, warmup=0, budget_s=budget, keep=("sdlens",),
                        max_runs=fewer, min_reps=1 if quick else 2)
    out = {"stats": stats, "settings": s.describe(), "build_s": s.extra.get("sd15_build_s"),
           "steps": {n: c.steps for n, c in clocks.items() if c.steps}}
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
    if s.device == "cpu":
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
    r_sd = st["sdlens"].median / st["untraced"].median
    r_sh = sst["sdlens"].median / sst["untraced"].median
    steps = sd["steps"]
    r_step = statistics.median(steps["sdlens"]) / statistics.median(steps["untraced"])
    verdict = lambda r: "meets" if r <= TARGET else "misses"  # noqa: E731
    rows = [
        ["SD 1.5 " + ("(full size)" if s.sd15_scale >= 1 else f"(scale {s.sd15_scale})")]
        + C.time_row("untraced", st["untraced"], st["untraced"]),
        [""] + C.time_row("sdlens (default recording)", st["sdlens"], st["untraced"]),
        [sh["label"]] + C.time_row("untraced", sst["untraced"], sst["untraced"]),
        [""] + C.time_row("sdlens (default recording)", sst["sdlens"], sst["untraced"]),
    ]
    if "untraced, 1 thread" in sst:
        rows.append([""] + C.time_row("untraced, 1 torch thread", sst["untraced, 1 thread"],
                                      sst["untraced"]))
    gen_s = {k: sst[k].median for k in ("untraced", "untraced, 1 thread") if k in sst}
    notes = [
        f"SD 1.5: {sd['settings']}; ratio {r_sd:.3f}x {verdict(r_sd)} the target <= {TARGET}x.",
        f"SD 1.5 per denoising step (wall time between step ends, first step left out; "
        f"{len(steps['untraced'])} / {len(steps['sdlens'])} steps): untraced median "
        f"{C.fmt_s(statistics.median(steps['untraced']))}, sdlens "
        f"{C.fmt_s(statistics.median(steps['sdlens']))}: **{r_step:.3f}x** {verdict(r_step)} the "
        "target. With few runs per side (quick mode) this ratio is the steadier one: a burst of "
        "load moves a few steps, not the median.",
        f"Shipped model: {sh['size']} px, {s.shipped_steps} steps, CFG {s.guidance}; ratio "
        f"{r_sh:.3f}x {verdict(r_sh)} the target <= {TARGET}x. Its {s.shipped_steps}-step "
        f"generation (untraced, median): {C.fmt_s(gen_s['untraced'])} with torch's default "
        f"threads" + (f", {C.fmt_s(gen_s['untraced, 1 thread'])} with one thread"
                      if len(gen_s) > 1 else "")
        + (" (target: well under 1 s on the CPU)." if s.shipped_steps == 25 else "."),
        "Timed: prompt encoding + the denoising loop (output_type='latent'); the VAE decode is "
        "not timed (sdlens does not touch it; it would only dilute the ratio). Traced side "
        "includes building the Trace object.",
    ]
    if sd.get("build_s"):
        notes.append(f"Building the random-weight SD 1.5 pipeline took {sd['build_s']:.0f} s "
                     "(not timed).")
    return {"tables": [C.table("1. Overhead: traced (default recording) vs untraced",
                               ["model"] + C.TIME_COLUMNS, rows, notes)],
            "raw": {"sd15": {k: v.to_dict() for k, v in st.items()},
                    "shipped": {k: v.to_dict() for k, v in sst.items()},
                    "sd15_steps_s": steps, "ratio_sd15_per_step": r_step,
                    "ratio_sd15": r_sd, "ratio_shipped": r_sh, "target": TARGET,
                    "shipped_generation_s": gen_s, "shipped_steps": s.shipped_steps}}


def main(argv=None) -> int:
    return C.standalone(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
