"""Benchmark 4: memory — peak host RSS (and CUDA peak) traced vs untraced; trace size.

    python benchmarks/bench_memory.py [--smoke | --quick | --full]

1. **Peak RSS per side, one subprocess per run**: each child loads the pipeline, resets its RSS
   high-water mark (``/proc/self/clear_refs``), runs one generation (untraced / sdlens default /
   DAAM's method) and reports ``VmHWM`` (peak during the run), the RSS after loading, and
   ``ru_maxrss`` (whole-process peak, loading included). Children of the two sides alternate.
   The SD 1.5 pipeline is saved once to ``benchmarks/_work/`` so children load it instead of
   re-initialising 859M random weights.
2. **In-process**: the same peak-above-start per run from benchmark 1's alternating loop.
3. **CUDA peak** (``torch.cuda.max_memory_allocated``) where there is a GPU.
4. **Size of a default trace for SD 1.5 at 512 px, 50 steps** from shapes with sdlens's estimate
   (``estimate_trace_bytes`` on the real SD 1.5 UNet config), checked against real runs in
   benchmark 2. Target: under 100 MB.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

TARGET_MB = 100


# ====================================================================== child
def child(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    s = C.make_settings(args.mode, args.device)
    t0 = time.perf_counter()
    if args.model == "sd15":
        if args.path:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(args.path, dtype=s.dtype).to(s.device)
            pipe.set_progress_bar_config(disable=True)
        else:
            pipe = C.sd15_pipeline(s)
        kw = lambda: C.call_kwargs(s)  # noqa: E731
    else:
        pipe, _ = C.shipped_pipeline(s)
        size = C.shipped_size(pipe)
        kw = lambda: C.call_kwargs(s, steps=s.shipped_steps, height=size)  # noqa: E731
    load_s = time.perf_counter() - t0
    if args.side == "untraced":
        fn = C.untraced(pipe, kw)
    elif args.side == "sdlens":
        fn = C.traced(pipe, kw)
    else:
        import bench_daam

        fn = bench_daam.daam_method_side(pipe, kw)
    import gc

    gc.collect()
    cuda = s.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda0 = torch.cuda.memory_allocated()
    have = C.reset_peak_rss()
    rss0 = C.rss_bytes()
    t0 = time.perf_counter()
    out = fn()
    C.sync(s.device)
    run_s = time.perf_counter() - t0
    res = {"side": args.side, "model": args.model, "load_s": load_s, "run_s": run_s,
           "rss_after_load": rss0, "vm_hwm_run": C.peak_rss_bytes() if have else None,
           "hwm_reset": have,
           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        res["cuda_peak_above_start"] = torch.cuda.max_memory_allocated() - cuda0
    if args.side == "sdlens":
        import bench_recording

        res["trace_bytes"] = sum(bench_recording.trace_nbytes(out).values())
    print("@@MEMJSON@@" + json.dumps(res))
    return 0


# ====================================================================== parent
def sd15_meta_pipe():
    """The real SD 1.5 UNet config on the meta device (no memory, no init), for the estimate."""
    import torch
    from diffusers import PNDMScheduler

    from sdlens.testing import _SD15, _unet, tokenizer

    with torch.device("meta"):
        unet = _unet(_SD15["unet"], 1.0, 768, 4, None, 64)
    return types.SimpleNamespace(unet=unet, scheduler=PNDMScheduler(skip_prk_steps=True),
                                 tokenizer=tokenizer())


def size_table(s: C.Settings, ctx: dict) -> tuple[dict, dict]:
    from sdlens.engine.options import RecordOptions, estimate_trace_bytes
    from sdlens.analysis.tokens import tokenize

    pipe = sd15_meta_pipe()
    n_tok = len(tokenize(s.prompt, pipe.tokenizer).ids)
    rows, raw = [], {}
    per_token = None
    for label, n, opts in [(f"default, this benchmark's prompt ({n_tok} tokens incl. start/end)",
                            n_tok, {}),
                           ("default, a 75-token prompt (or keep_padding=True): 77 positions", 77, {}),
                           (f"heads kept, {n_tok} tokens", n_tok, {"heads": True}),
                           (f"attention every 5th step, {n_tok} tokens", n_tok,
                            {"steps": slice(None, None, 5)}),
                           ("attention off", n_tok, {"record": ("latents", "noise", "x0")})]:
        est = estimate_trace_bytes(pipe, batch=1, steps=50, latent_hw=(64, 64), n_tokens=n,
                                   do_cfg=True, options=RecordOptions(**opts))
        tot = sum(est.values())
        raw[label] = est
        ok = "yes" if tot < TARGET_MB * 1e6 else "no"
        rows.append([label, C.fmt_bytes(est["latents"] + est["noise"] + est["x0"]),
                     C.fmt_bytes(est["attention"]), C.fmt_bytes(tot), f"{tot / 1e6:.1f} MB ({ok})"])
        if label.startswith("default, a 75"):
            per_token = est["attention"] / 77
            base = tot - est["attention"]
    max_tokens = int((TARGET_MB * 1e6 - base) // per_token) if per_token else None
    worst = ctx.get("estimate_worst_error")
    notes = ["SD 1.5 at 512 px (64x64 latents), 50 steps, CFG on, batch 1, fp16 maps; computed "
             "with sdlens.engine.options.estimate_trace_bytes on the real SD 1.5 UNet config (built on "
             "the meta device).",
             f"A default trace stays under {TARGET_MB} MB for prompts of up to {max_tokens} token "
             "positions (start + prompt tokens + end); each extra token adds "
             f"{C.fmt_bytes(per_token)}."]
    if worst is not None:
        notes.append(f"The estimate matched real traces within {worst:.1%} in benchmark 2.")
    return C.table("4c. Default trace size, SD 1.5, 512 px, 50 steps (from shapes)",
                   ["what is recorded", "latents + noise + x0", "attention", "total",
                    f"under {TARGET_MB} MB?"], rows, notes), raw


def _save_sd15(s: C.Settings) -> Path | None:
    """Save the SD 1.5 random pipeline once so that children can load it (fast)."""
    path = C.sd15_cache_dir(s)
    if (path / "model_index.json").exists():
        return path
    pipe = C.sd15_pipeline(s)
    if s.dtype != C.torch.float32 or s.device != "cpu":
        return None
    t0 = time.perf_counter()
    pipe.save_pretrained(path, safe_serialization=True)
    s.extra["sd15_save_s"] = time.perf_counter() - t0
    return path


def run_child(model: str, side: str, s: C.Settings, path: Path | None, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(s.extra.get("threads", 2)),
               MKL_NUM_THREADS=str(s.extra.get("threads", 2)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--side", side,
           "--mode", s.mode, "--threads", str(s.extra.get("threads", 2))]
    if s.device:
        cmd += ["--device", s.device]
    if path is not None:
        cmd += ["--path", str(path)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"side": side, "error": f"timed out after {timeout:.0f} s"}
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    for line in p.stdout.splitlines():
        if line.startswith("@@MEMJSON@@"):
            res = json.loads(line[len("@@MEMJSON@@"):])
            res["ru_maxrss_children_after"] = after
            res["ru_maxrss_children_before"] = before
            return res
    return {"side": side, "error": (p.stderr or p.stdout)[-800:]}


def subprocess_table(model: str, label: str, sides: list[str], reps: int, s: C.Settings,
                     path: Path | None, budget_s: float) -> tuple[dict, list]:
    results = {sd: [] for sd in sides}
    t_start = time.monotonic()
    per_child = None
    for r in range(reps):
        for side in (sides if r % 2 == 0 else list(reversed(sides))):
            if per_child and (time.monotonic() - t_start + per_child > budget_s
                              or s.remaining() < per_child + 20) and r > 0:
                break
            t0 = time.monotonic()
            res = run_child(model, side, s, path, timeout=max(60, min(600, s.remaining() - 10)))
            dt = time.monotonic() - t0
            per_child = max(per_child or 0, dt)
            print(f"    {model} {side}: {json.dumps({k: v for k, v in res.items() if k != 'error'})[:200]}"
                  + (f" ERROR {res['error'][-200:]}" if "error" in res else ""))
            results[side].append(res)
    rows = []
    base = None
    for side in sides:
        ok = [x for x in results[side] if "error" not in x]
        if not ok:
            err = results[side][0]["error"] if results[side] else "not run (time budget)"
            rows.append([label, side, "–", "–", "–", "–", "–", f"FAILED: {err[-300:]}"])
            continue
        run_peak = sorted((x["vm_hwm_run"] or 0) - x["rss_after_load"] for x in ok)
        med = run_peak[len(run_peak) // 2]
        if side == "untraced":
            base = med
        hwm = sorted(x["vm_hwm_run"] or 0 for x in ok)
        maxrss = sorted(x["ru_maxrss"] for x in ok)
        cuda = [x["cuda_peak_above_start"] for x in ok if "cuda_peak_above_start" in x]
        rows.append([label, side, C.fmt_bytes(ok[0]["rss_after_load"]),
                     C.fmt_bytes(hwm[len(hwm) // 2]),
                     C.fmt_bytes(med) + ("" if base is None or side == "untraced"
                                         else f" ({C.fmt_bytes(med - base)} vs untraced)"),
                     C.fmt_bytes(maxrss[-1]),
                     C.fmt_bytes(max(cuda)) if cuda else "not measured (no CUDA)",
                     f"{len(ok)} child run(s)"
                     + (f"; trace {C.fmt_bytes(ok[0]['trace_bytes'])}" if "trace_bytes" in ok[0] else "")])
    return rows, [results]


def run(s: C.Settings, ctx: dict) -> dict:
    tables, raw = [], {}
    cols = ["model", "side", "RSS after load", "peak RSS during the run (VmHWM)",
            "run peak above RSS after load (median)", "ru_maxrss (load + run)", "CUDA peak",
            "runs"]
    rows = []
    # shipped model: cheap, always
    pipe, label = C.shipped_pipeline(s)
    r, res = subprocess_table("shipped", label, ["untraced", "sdlens"], 2 if s.mode != "full" else 3,
                              s, None, budget_s=120)
    rows += r
    raw["shipped"] = res
    # SD 1.5: children load the saved pipeline
    sd = ctx.get("sd15_loop")
    est_child = None
    if sd is not None:
        st = sd["stats"]
        est_child = 15 + max(st["untraced"].median, st["sdlens"].median) * 1.2
    budget = 200 if s.mode == "quick" else 900
    if s.smoke:
        rows.append([f"SD 1.5 (scale {s.sd15_scale})", "–", "", "", "", "", "",
                     "smoke: not run (the shipped-model children check the code path)"])
    elif s.mode == "quick" and s.device == "cpu":
        rows.append([f"SD 1.5, {s.height} px", "–", "", "", "", "", "",
                     "quick mode on the CPU: not run (saving and loading the full-size pipeline "
                     "in every child takes minutes; `--full` runs it)"])
    elif est_child is None or s.remaining() > 2 * est_child + 120:
        try:
            path = _save_sd15(s)
        except Exception as e:  # disk full etc.
            path = None
            raw["sd15_save_error"] = str(e)
        sides = ["untraced", "sdlens"] + (["daam-method"] if s.mode == "full" else [])
        r, res = subprocess_table("sd15", f"SD 1.5 ({'full size' if s.sd15_scale >= 1 else s.sd15_scale}"
                                  f"), {s.height} px, {s.steps} steps", sides,
                                  1 if s.mode != "full" else 2, s, path, budget_s=budget)
        rows += r
        raw["sd15"] = res
    else:
        rows.append([f"SD 1.5, {s.height} px", "–", "", "", "", "", "",
                     "skipped: not enough of the --quick time budget left"])
    notes = ["One fresh Python process per run; sides alternate. 'run peak above RSS after load' "
             "is the memory a generation needs on top of the loaded pipeline; the traced side "
             "includes the Trace it returns.",
             "The VAE decode is not run (output_type='latent'), as in benchmark 1."]
    if "sd15_save_s" in s.extra:
        notes.append(f"SD 1.5 random pipeline saved once for the children in {s.extra['sd15_save_s']:.0f} s.")
    tables.append(C.table("4a. Peak host memory, one process per run", cols, rows, notes))
    # in-process from benchmark 1
    if sd is not None:
        st = sd["stats"]
        irows = []
        for n in st:
            pk = sorted(st[n].peak_rss)
            cu = st[n].cuda_peak
            irows.append([n, C.fmt_bytes(pk[len(pk) // 2]) if pk else "–",
                          C.fmt_bytes(min(pk)) if pk else "–", C.fmt_bytes(max(pk)) if pk else "–",
                          C.fmt_bytes(max(cu)) if cu else "not measured (no CUDA)"])
        tables.append(C.table(f"4b. Peak RSS above the run's start, in-process ({sd['settings']})",
                              ["side", "median", "min", "max", "CUDA peak above start"], irows,
                              ["From benchmark 1's alternating loop (VmHWM reset before each run). "
                               "Memory freed by an earlier run and kept by the allocator can hide "
                               "part of a run's peak; 4a is the cleaner measure."]))
    t, raw["size"] = size_table(s, ctx)
    tables.append(t)
    for k, v in raw["size"].items():
        if k.startswith("default, this"):
            raw["figures"] = {"default_trace_mb": C.value_figure(
                "the default trace of SD 1.5, 512 px, 50 steps, this benchmark's prompt (MB, "
                "computed from shapes)", sum(v.values()) / 1e6, "MB", 100.0, "under 100 MB")}
    return {"tables": tables, "raw": raw}


def main(argv=None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--child", action="store_true")
        ap.add_argument("--model", choices=["sd15", "shipped"], required=True)
        ap.add_argument("--side", choices=["untraced", "sdlens", "daam-method"], required=True)
        ap.add_argument("--mode", default="quick")
        ap.add_argument("--device", default=None)
        ap.add_argument("--threads", type=int, default=2)
        ap.add_argument("--path", default=None)
        return child(ap.parse_args(argv))
    return C.standalone(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
