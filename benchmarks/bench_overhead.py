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

Diffusion transformers (issue 20), same method and targets, at 256 px, 2 steps on the CPU
(``--full``: 3; smoke: the shrunk test beds at 64 px):
- **SD3**: ``sdlens.testing.random_pipeline("sd3", scale=1, t5=False)``: the full SD3-medium
  transformer (24 joint blocks, 2.0B parameters) and full CLIP-L / CLIP-G; no T5 encoder
  (``text_encoder_3=None``: the pipeline fills T5's 256 positions with zeros, so the
  transformer's sequence, 77 + 256 text tokens, is the real one), CFG on.
- **Flux.1**: the full-width Flux.1-dev transformer (24 heads x 128, diffusers'
  ``FluxTransformer2DModel`` defaults) with fewer blocks (``FLUX_DEPTH``: 12B parameters in
  float32 are 48 GB; the overhead is per block, so the ratio does not need all 57), on the
  text encoders, tokenizers and VAE of the shrunk test bed ``random_pipeline("flux")``;
  guidance-distilled (guidance 3.5, no CFG). Reported as "not run" where that test bed does not
  exist yet.
- **Flux trace size**: a default Flux.1 trace (1024 px, 28 steps): what
  ``estimate_trace_bytes`` predicts for the full 57-block transformer, and the estimator's error
  against real traces of the test bed (2 + 2 blocks) at 1024 px / 28 steps and a smaller size.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

TARGET = 1.10  # traced / untraced on the CPU
GOAL = 1.03
GENERATION_TARGET_S = 1.0  # the shipped model's 25-step generation: well under 1 s on the CPU
# Flux.1-dev has 19 double- and 38 single-stream blocks (12B parameters); on the CPU (23 GB of
# memory here) the full-width transformer runs with this many of each
FLUX_DEPTH = (2, 4)
FLUX_TRACE_TARGET_MB = 200  # a default Flux.1-dev trace must fit (issue 29)
FLUX_GUIDANCE = 3.5  # Flux.1-dev's default (a distilled guidance embedding, no CFG)


class NotRun(Exception):
    """A row that cannot run here; the message says why."""


def transformer_size(s: C.Settings) -> tuple[int, int]:
    """(pixels, steps) of the transformer overhead loops."""
    if s.smoke:
        return 64, 2
    if s.device.startswith("cuda"):
        return 1024, 28
    return 256, 2 if s.mode == "quick" else 3


def transformer_pipeline(arch: str, s: C.Settings):
    """(pipe, label, guidance) of the SD3 or Flux.1 overhead row (see the module docstring)."""
    from sdlens.testing import random_pipeline

    if arch == "sd3":
        if s.smoke:
            return (random_pipeline("sd3", device=s.device, dtype=s.dtype),
                    "SD3 (shrunk test bed)", s.guidance)
        pipe = random_pipeline("sd3", scale=1.0, t5=False, device=s.device, dtype=s.dtype)
        n = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
        return (pipe, f"SD3-medium transformer (full size, {n:.1f}B parameters), full CLIP-L / "
                      "CLIP-G, no T5 (its 256 positions zeros)", s.guidance)
    try:
        pipe = random_pipeline("flux", device=s.device, dtype=s.dtype)
    except ValueError as e:
        raise NotRun(f"`random_pipeline('flux')` is not available in this checkout ({e})") from None
    if s.smoke:
        return pipe, "Flux.1 (shrunk test bed)", FLUX_GUIDANCE
    import diffusers

    small = pipe.transformer.config
    torch.manual_seed(0)
    full_width = diffusers.FluxTransformer2DModel(  # diffusers' defaults: Flux.1-dev's sizes
        num_layers=FLUX_DEPTH[0], num_single_layers=FLUX_DEPTH[1], guidance_embeds=True,
        in_channels=small.in_channels, joint_attention_dim=small.joint_attention_dim,
        pooled_projection_dim=small.pooled_projection_dim).eval()
    if s.device != "cpu" or s.dtype != torch.float32:
        full_width.to(s.device, s.dtype)
    pipe.register_modules(transformer=full_width)
    n = sum(p.numel() for p in full_width.parameters()) / 1e9
    cfg = full_width.config
    return (pipe, f"Flux.1-dev transformer at full width ({cfg.num_attention_heads} heads x "
                  f"{cfg.attention_head_dim}), {FLUX_DEPTH[0]} double + {FLUX_DEPTH[1]} single "
                  f"blocks (real: 19 + 38; {n:.1f}B parameters), the test bed's small text "
                  "encoders", FLUX_GUIDANCE)


def transformer_loop(arch: str, s: C.Settings) -> dict:
    """Untraced vs sdlens (default recording) on a transformer pipeline; raises NotRun."""
    import gc

    height, steps = transformer_size(s)
    pipe, label, guidance = transformer_pipeline(arch, s)
    try:
        kw = lambda: C.call_kwargs(s, steps=steps, height=height, guidance=guidance)  # noqa: E731
        warm_kw = lambda: C.call_kwargs(s, steps=1, height=height, guidance=guidance)  # noqa: E731
        print(f"  {arch} loop: {label}, {height} px, {steps} steps")
        C.alternate({"untraced": C.untraced(pipe, warm_kw), "sdlens": C.traced(pipe, warm_kw)},
                    s, reps=0, warmup=s.warmup, log=None)
        stats = C.alternate({"untraced": C.untraced(pipe, kw), "sdlens": C.traced(pipe, kw)}, s,
                            reps=s.reps, warmup=0, keep=("sdlens",))
        tr = stats["sdlens"].result
        sites = len(tr.attention.layers) if tr is not None and tr.attention is not None else 0
        stats["sdlens"].result = None
    finally:
        del pipe
        gc.collect()
    return {"stats": stats, "label": label, "height": height, "steps": steps,
            "guidance": guidance, "sites": sites}


def flux_trace_size(s: C.Settings) -> dict:
    """A default Flux.1 trace (1024 px, 28 steps): the estimator's prediction for the full
    transformer, and its error against real traces of the test bed. Raises NotRun."""
    import diffusers

    import bench_recording as R
    from sdlens.engine.options import estimate_trace_bytes
    from sdlens.engine.session import trace
    from sdlens.testing import random_pipeline

    try:
        pipe = random_pipeline("flux")
    except ValueError as e:
        raise NotRun(f"`random_pipeline('flux')` is not available in this checkout ({e})") from None
    vsf = int(pipe.vae_scale_factor)
    sizes = [(128, 4)] if s.smoke else [(256, 4), (1024, 28)]
    rows, errors, kept_tokens = [], [], None
    for height, steps in sizes:
        with trace(pipe) as tr:
            pipe(**C.call_kwargs(s, steps=steps, height=height, guidance=FLUX_GUIDANCE))
        t = tr.runs[-1]
        actual = sum(R.trace_nbytes(t).values())
        kept_tokens = int(t.attention[t.attention.layers[0]].shape[-3])
        before = sum((t.meta.get("estimated_bytes") or {}).values())
        called = sum(estimate_trace_bytes(pipe, num_inference_steps=steps, do_cfg=False,
                                          latent_hw=(height // vsf, height // vsf),
                                          n_tokens=kept_tokens).values())
        saved = R.file_size(t)
        errors += [before / actual - 1, called / actual - 1]
        rows.append({"height": height, "steps": steps, "sites": len(t.attention.layers),
                     "tokens": kept_tokens, "actual": actual, "estimate_in_meta": before,
                     "estimate_called": called, "saved_file": saved})
        del t, tr
    # the full Flux.1-dev transformer, built on the meta device (no memory): its sites and heads
    with torch.device("meta"):
        full = diffusers.FluxTransformer2DModel(
            guidance_embeds=True, in_channels=pipe.transformer.config.in_channels,
            joint_attention_dim=pipe.transformer.config.joint_attention_dim,
            pooled_projection_dim=pipe.transformer.config.pooled_projection_dim)
    pipe.register_modules(transformer=full)
    est = estimate_trace_bytes(pipe, num_inference_steps=28, do_cfg=False,
                               latent_hw=(1024 // vsf, 1024 // vsf), n_tokens=kept_tokens)
    n_sites = full.config.num_layers + full.config.num_single_layers
    del pipe, full
    return {"rows": rows, "errors": errors, "full_estimate": dict(est), "full_sites": n_sites,
            "tokens": kept_tokens, "storage": est.storage}


def flux_trace_rows(s: C.Settings) -> dict:
    """Figures, notes, raw numbers and not-run reasons of the Flux.1 trace-size rows."""
    figs, notes, raw, not_run = {}, [], {}, {}
    try:
        fx = flux_trace_size(s)
    except NotRun as e:
        not_run["flux_trace_mb"] = str(e)
        notes.append(f"Flux.1 trace size (1024 px, 28 steps): not run: {e}.")
    except Exception as e:
        notes.append(f"Flux.1 trace size (1024 px, 28 steps): FAILED: `{type(e).__name__}: "
                     f"{str(e)[:300]}`.")
        raw["flux_trace_error"] = traceback.format_exc()[-2000:]
    else:
        worst = max(fx["errors"], key=abs)
        full = sum(fx["full_estimate"].values())
        figs["flux_trace_mb"] = C.value_figure(
            f"a default Flux.1-dev trace (1024 px, 28 steps, {fx['full_sites']} blocks, "
            f"{fx['tokens']} text tokens kept), as estimate_trace_bytes predicts it", full / 1e6,
            "MB", FLUX_TRACE_TARGET_MB, f"<= {FLUX_TRACE_TARGET_MB} MB (issue 29)",
            parts_mb={k: v / 1e6 for k, v in fx["full_estimate"].items()},
            storage=fx["storage"])
        figs["flux_estimate_error"] = C.value_figure(
            "trace-size estimate vs real Flux.1 test-bed traces, worst error", abs(worst),
            "fraction", 0.10, "within 10%", signed=worst, measured=fx["rows"])
        for r in fx["rows"]:
            notes.append(
                f"Flux.1 test bed ({r['sites']} blocks), {r['height']} px, {r['steps']} steps, "
                f"{r['tokens']} tokens kept: trace tensors {C.fmt_bytes(r['actual'])}; estimate "
                f"in trace.meta (before the first step) {C.fmt_bytes(r['estimate_in_meta'])} "
                f"({r['estimate_in_meta'] / r['actual'] - 1:+.1%}); estimate_trace_bytes called "
                f"before the run {C.fmt_bytes(r['estimate_called'])} "
                f"({r['estimate_called'] / r['actual'] - 1:+.1%}); saved file "
                f"{C.fmt_bytes(r['saved_file'])}.")
        notes.append(
            f"A default Flux.1-dev trace (1024 px, 28 steps, all {fx['full_sites']} blocks, no "
            f"CFG): estimate_trace_bytes predicts **{full / 1e6:.0f} MB** ("
            + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in fx["full_estimate"].items())
            + "; stored as: " + "; ".join(f"{k} {v}" for k, v in fx["storage"].items())
            + f"; the maps grow by {fx['full_estimate']['attention'] / fx['tokens'] / 1e6:.1f} MB "
            f"per kept text token: the {fx['tokens']} tokens are the test bed's local T5 "
            "SentencePiece pieces of this prompt); the full transformer does not fit this "
            "machine, so that size is an estimate, whose worst error on the test bed's real "
            f"traces above is {worst:+.1%}.")
        raw["flux_trace"] = fx
    return {"figures": figs, "notes": notes, "raw": raw, "not_run": not_run}


def update_flux_trace_size(s: C.Settings) -> None:
    """``--flux-trace-size``: re-measure the Flux.1 trace-size rows alone and write them where a
    full run puts them: their figures in results.json, their summary and note lines in
    RESULTS.md, the README paragraph (publish.py); the rest of the committed run is unchanged."""
    import json

    import publish
    import run as R

    out = flux_trace_rows(s)
    if out["not_run"] or not out["figures"]:
        raise SystemExit(f"Flux.1 trace size not measured: {out['not_run'] or out['notes']}")
    res_path = Path(__file__).resolve().parent / "results.json"
    results = json.loads(res_path.read_text())
    results["figures"].update(out["figures"])
    results.setdefault("updated", {})["flux_trace_size"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/bench_overhead.py --flux-trace-size"}
    res_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    md_path = res_path.parent / "RESULTS.md"
    names = dict(R.SUMMARY)
    summary = {f"- **{names[k]}**: ": f"- **{names[k]}**: {R.fig_md(f)}."
               for k, f in out["figures"].items()}
    notes = [f"- {n}" for n in out["notes"]]
    lines, placed = [], False
    for line in md_path.read_text().splitlines():
        head = next((h for h in summary if line.startswith(h)), None)
        if head is not None:
            lines.append(summary[head])
        elif line.startswith(("- Flux.1 test bed (", "- A default Flux.1-dev trace (1024 px")):
            if not placed:  # the old note lines, replaced in place by the new ones
                lines += notes
                placed = True
        else:
            lines.append(line)
    md_path.write_text("\n".join(lines) + "\n")
    publish.main([])
    print("\n".join([v for v in summary.values()] + notes))


def transformer_rows(s: C.Settings, ctx: dict) -> dict:
    """Rows, figures, notes and not-run reasons of the transformer part of benchmark 1."""
    rows, figs, notes, raw, not_run = [], {}, [], {}, {}
    for arch, name in (("sd3", "SD3"), ("flux", "Flux.1")):
        try:
            lp = transformer_loop(arch, s)
        except NotRun as e:
            rows.append([name, f"not run: {e}", "", "", "", "", "", ""])
            not_run[f"overhead_{arch}"] = str(e)
            continue
        except Exception as e:  # reported in its row; the SD 1.5 rows above still stand
            rows.append([name, f"FAILED: `{type(e).__name__}: {str(e)[:300]}`", "", "", "", "",
                         "", ""])
            raw[f"{arch}_error"] = traceback.format_exc()[-2000:]
            continue
        st = lp["stats"]
        rows += [[lp["label"]] + C.time_row("untraced", st["untraced"], st["untraced"]),
                 [""] + C.time_row("sdlens (default recording)", st["sdlens"], st["untraced"],
                                   TARGET, GOAL)]
        cfg = f"CFG {lp['guidance']}" if arch == "sd3" else f"guidance {lp['guidance']}, no CFG"
        figs[f"overhead_{arch}"] = C.figure(
            f"{lp['label']}, {lp['height']} px, {lp['steps']} steps, {cfg}: default recording / "
            "untraced, whole run", C.round_ratios(st["sdlens"].times, st["untraced"].times),
            TARGET, GOAL, rounds=st, height=lp["height"], steps=lp["steps"], sites=lp["sites"])
        notes.append(f"{name}: {lp['label']}; {lp['height']} px, {lp['steps']} steps, {cfg}; "
                     f"{lp['sites']} attention sites recorded; " + C.load_note(st))
        raw[arch] = {k: v.to_dict() for k, v in st.items()}
    flux = flux_trace_rows(s)
    figs.update(flux["figures"])
    notes += flux["notes"]
    raw.update(flux["raw"])
    not_run.update(flux["not_run"])
    return {"rows": rows, "figures": figs, "notes": notes, "raw": raw, "not_run": not_run}


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
    tf = transformer_rows(s, ctx)
    figs.update(tf["figures"])
    return {"tables": [C.table("1. Overhead: traced (default recording) vs untraced",
                               ["model"] + C.TIME_COLUMNS, rows, notes),
                       C.table("1b. Overhead on diffusion transformers (issue 20): traced "
                               "(default recording) vs untraced", ["model"] + C.TIME_COLUMNS,
                               tf["rows"], tf["notes"])],
            "raw": {"sd15": {k: v.to_dict() for k, v in st.items()},
                    "shipped": {k: v.to_dict() for k, v in sst.items()},
                    "sd15_run_step_medians_s": rsm, "target": TARGET, "goal": GOAL,
                    "shipped_steps": s.shipped_steps, "transformers": tf["raw"],
                    "not_run": tf["not_run"], "figures": figs}}


def run_transformers(s: C.Settings, ctx: dict) -> dict:
    """The transformer rows alone (``--transformers``)."""
    tf = transformer_rows(s, ctx)
    return {"tables": [C.table("1b. Overhead on diffusion transformers (issue 20): traced "
                               "(default recording) vs untraced", ["model"] + C.TIME_COLUMNS,
                               tf["rows"], tf["notes"])],
            "raw": {"transformers": tf["raw"], "not_run": tf["not_run"],
                    "figures": tf["figures"]}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--flux-trace-size" in argv:
        args = [a for a in argv if a != "--flux-trace-size"]
        ap = argparse.ArgumentParser(description="the Flux.1 trace-size rows alone")
        C.add_common_args(ap)
        update_flux_trace_size(C.settings_from_args(ap.parse_args(args)))
        return 0
    if "--transformers" in argv:
        return C.standalone(run_transformers, [a for a in argv if a != "--transformers"], __doc__)
    return C.standalone(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
