"""Benchmark 2: recording variants — time and trace bytes, against sdlens's own size estimate.

    python benchmarks/bench_recording.py [--smoke | --quick | --full]

Variants (``RecordOptions``): default (head-averaged maps of every attn2 layer at every step,
latents, noise, x0), heads kept, attention at every 5th step only, attention off; plus untraced.
All sides alternate in one process after a warm-up.

Bytes: the tensors the Trace holds (latents, the three noise tensors, x0, attention maps), the
saved file's size, and ``sdlens.engine.options.estimate_trace_bytes`` computed *before* the run from
the pipeline and the options (with the prompt's token count; the estimate stored in
``trace.meta['estimated_bytes']`` is shown too). Target: estimate within 10%.

Timing runs on the shipped model (cheap, so the variants can alternate many times); bytes are
checked on the shipped model, a small SD 1.5-layout pipeline and (quick mode: the default
variant, from benchmark 1's runs; full mode: every variant) the full-size SD 1.5 architecture.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

VARIANTS = {
    "default": {},
    "heads kept": {"heads": True},
    "attention every 5th step": {"steps": slice(None, None, 5)},
    "attention off": {"record": ("latents", "noise", "x0")},
}


def trace_nbytes(tr) -> dict[str, int]:
    """Host bytes the trace holds, as stored (maps as codes, a shared tensor once)."""
    held = tr.nbytes()
    return {k: held[k] for k in ("latents", "noise", "x0", "attention")}


def n_prompt_tokens(pipe, prompt: str) -> int:
    from sdlens.analysis.tokens import tokenize

    return len(tokenize(prompt, pipe.tokenizer).ids)


def estimate(pipe, s: C.Settings, steps: int, height: int, options: dict, n_tokens: int) -> int:
    from sdlens.engine.options import RecordOptions, estimate_trace_bytes

    vsf = int(getattr(pipe, "vae_scale_factor", 8))
    est = estimate_trace_bytes(pipe, batch=1, num_inference_steps=steps,
                               latent_hw=(height // vsf, height // vsf),
                               n_tokens=n_tokens, do_cfg=s.guidance > 1,
                               options=RecordOptions(**options))
    return sum(est.values())


def file_size(tr) -> int:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.sdlens"
        tr.save(p)
        return p.stat().st_size


def bytes_row(model: str, variant: str, pipe, s, steps, height, options, tr) -> list:
    n_tok = n_prompt_tokens(pipe, s.prompt)
    est = estimate(pipe, s, steps, height, options, n_tok)
    est77 = estimate(pipe, s, steps, height, options, 77)
    if tr is None:
        return [model, variant, "not run", "–", "–", C.fmt_bytes(est), "–", C.fmt_bytes(est77),
                "–"], None
    actual = sum(trace_nbytes(tr).values())
    meta_est = sum((tr.meta.get("estimated_bytes") or {}).values())
    err = est / actual - 1 if actual else 0.0
    err_meta = meta_est / actual - 1 if actual else 0.0
    ok = lambda e: "yes" if abs(e) <= 0.10 else "NO"  # noqa: E731
    return [model, variant, C.fmt_bytes(actual), C.fmt_bytes(meta_est),
            f"{err_meta:+.1%} ({ok(err_meta)})", C.fmt_bytes(est), f"{err:+.1%} ({ok(err)})",
            C.fmt_bytes(est77), C.fmt_bytes(file_size(tr))], (err_meta, err)


BYTES_COLUMNS = ["model", "variant", "trace tensors (actual)",
                 "sdlens's estimate (trace.meta, made before the first step)",
                 "its error (within 10%?)", "estimate_trace_bytes(num_inference_steps=) "
                 "called before the run", "its error (within 10%?)", "estimate, 77 tokens",
                 "saved file"]


def run(s: C.Settings, ctx: dict) -> dict:
    from sdlens.testing import random_pipeline

    tables, raw = [], {"errors": {}}
    # ---------------------------------------------------------------- timing: shipped model
    pipe, label = C.shipped_pipeline(s)
    size = C.shipped_size(pipe)
    # quick mode on the CPU: 10 steps (5 sides x 6 runs of 25 steps would take the budget)
    steps = 10 if s.mode == "quick" and s.device == "cpu" else s.shipped_steps
    kw = lambda: C.call_kwargs(s, steps=steps, height=size)  # noqa: E731
    sides = {"untraced": C.untraced(pipe, kw)}
    sides.update({v: C.traced(pipe, kw, **o) for v, o in VARIANTS.items()})
    print(f"  recording variants on {label}, {size} px, {steps} steps")
    st = C.alternate(sides, s, reps=s.shipped_reps, warmup=max(1, s.warmup), keep=tuple(VARIANTS))
    rows = [C.time_row(n, st[n], st["untraced"]) for n in sides]
    tables.append(C.table(f"2a. Recording variants: time ({label}, {size} px, "
                          f"{steps} steps, CFG {s.guidance})", C.TIME_COLUMNS, rows,
                          ["All five sides in rotating order after a warm-up of each; "
                           f"{len(st['untraced'].times)} rounds; ratios are medians of per-round "
                           "ratios (min–max). Timed: prompt encoding + denoising loop (+ building "
                           "the Trace).", C.load_note(st)]))
    raw["time_shipped"] = {k: v.to_dict() for k, v in st.items()}
    raw["figures"] = {f"recording_shipped_{v.replace(' ', '_')}": C.figure(
        f"{v} / untraced ({label}, {steps} steps)",
        C.round_ratios(st[v].times, st["untraced"].times), rounds=st) for v in VARIANTS}
    # ---------------------------------------------------------------- bytes
    brows, errs = [], []
    for v, o in VARIANTS.items():
        row, e = bytes_row(label, v, pipe, s, steps, size, o, st[v].result)
        brows.append(row)
        errs.append(e)
    small = random_pipeline("sd15", scale=0.05, sample_size=8)
    for v, o in VARIANTS.items():
        tr = C.traced(small, lambda: C.call_kwargs(s, steps=10, height=64), **o)()
        row, e = bytes_row("SD 1.5 layout, scale 0.05 (64 px, 10 steps)", v, small, s, 10, 64, o, tr)
        brows.append(row)
        errs.append(e)
    del small
    # full-size SD 1.5: the default variant from benchmark 1's runs; others in full mode
    sd = ctx.get("sd15_loop")
    sd_label = f"SD 1.5 ({'full size' if s.sd15_scale >= 1 else f'scale {s.sd15_scale}'}), " \
               f"{s.height} px, {s.steps} steps"
    if sd is not None or s.mode == "full":
        pipe15 = C.sd15_pipeline(s)
        kw15 = lambda: C.call_kwargs(s)  # noqa: E731
        results = {}
        if s.mode == "full":
            sides15 = {"untraced": C.untraced(pipe15, kw15)}
            sides15.update({v: C.traced(pipe15, kw15, **o) for v, o in VARIANTS.items()})
            st15 = C.alternate(sides15, s, reps=s.reps, warmup=0, keep=tuple(VARIANTS))
            tables.append(C.table(f"2b. Recording variants: time ({sd_label})", C.TIME_COLUMNS,
                                  [C.time_row(n, st15[n], st15["untraced"]) for n in sides15]))
            raw["time_sd15"] = {k: v.to_dict() for k, v in st15.items()}
            results = {v: st15[v].result for v in VARIANTS}
        else:
            results = {"default": sd["stats"]["sdlens"].result}
        for v, o in VARIANTS.items():
            row, e = bytes_row(sd_label, v, pipe15, s, s.steps, s.height, o, results.get(v))
            brows.append(row)
            errs.append(e)
    checked = [e[0] for e in errs if e is not None]
    worst = max(abs(e) for e in checked) if checked else None
    pre = [e[1] for e in errs if e is not None]
    worst_pre = max(abs(e) for e in pre) if pre else None
    tables.append(C.table("2c. Trace bytes vs sdlens's estimate (computed before the run)",
                          BYTES_COLUMNS, brows,
                          [f"Worst error of sdlens's estimate over {len(checked)} real runs: "
                           f"{worst:.1%} (target within 10%); of the standalone call with "
                           f"num_inference_steps=: {worst_pre:.1%}." if worst is not None
                           else "no runs checked",
                           "PNDM (SD 1.5's scheduler, skip_prk_steps) takes num_inference_steps + 1 "
                           "scheduler steps; estimate_trace_bytes(num_inference_steps=) counts "
                           "them from the scheduler (sdlens.engine.options.scheduler_steps).",
                           "'estimate before the run' = sdlens.engine.options.estimate_trace_bytes(pipe,"
                           " num_inference_steps=, latent_hw=, n_tokens=<the prompt's tokens incl. start/end>, "
                           "options=) summed; '77 tokens' is its worst case (keep_padding / "
                           "prompt not known yet).",
                           "'not run': estimate only (quick mode runs only the default variant "
                           "on the full-size model)."]))
    raw["worst_estimate_error"] = worst
    if worst is not None:
        raw["figures"]["estimate_error"] = C.value_figure(
            f"worst error of sdlens's trace-size estimate over {len(checked)} real traces",
            worst, "fraction", 0.10, "within 10%")
    raw["worst_standalone_estimate_error"] = worst_pre
    return {"tables": tables, "raw": raw}


def main(argv=None) -> int:
    return C.standalone(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
