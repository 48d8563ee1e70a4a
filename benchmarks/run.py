"""Run every sdlens benchmark and rewrite ``benchmarks/RESULTS.md``.

    python benchmarks/run.py --quick            # full architectures, smaller sizes: ~10 min, 2 CPU cores
    python benchmarks/run.py --full             # full sizes, more rounds (long on a CPU)
    python benchmarks/run.py --quick --smoke    # tiny sizes: only checks that the scripts work
    python benchmarks/run.py --smoke --out /tmp/R.md   # write elsewhere (tests do this)

Benchmarks (one module each; see their docstrings):
1. ``bench_overhead``  traced (default recording) vs untraced: full-size SD 1.5, shipped model
2. ``bench_recording`` recording variants: time and bytes vs sdlens's estimate
3. ``bench_daam``      DAAM 0.2.0 in its own venv; DAAM's method in ours
4. ``bench_memory``    peak RSS (CUDA peak) traced vs untraced; SD 1.5 512 px / 50 steps trace size
5. ``bench_grid``      4 seeds x 4 CFG batched vs 16 sequential calls (sweeps; subprocess)
6. ``bench_widgets``   TraceViewer build time, browser frame-switch latency (widgets; subprocess)
7. ``bench_saveload``  write / lazy open of a ~1 GB trace (quick: 256 MB)

Everything runs on the CPU unless CUDA is available (then fp16, 512 px, 50 steps). Our own
benchmarks share one process (and one SD 1.5 pipeline); each compares its sides in that process
with ``common.alternate``: a warm-up per side, then >= 5 rounds in rotating order; every ratio is
the median of per-round ratios with their min-max, "within noise" where that spread covers 1.0.

Writes RESULTS.md, ``benchmarks/results.json`` (every published figure; committed) and, from the
latter, README.md's benchmark paragraph (``publish.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common as C  # noqa: E402

# cheap and required first; the SD 1.5 memory children (optional under --quick's budget) last
ORDER = ["overhead", "recording", "saveload", "grid", "daam", "widgets", "memory"]
TITLES = {
    "overhead": "1. Overhead: traced vs untraced",
    "recording": "2. Recording variants: time and bytes vs the estimate",
    "daam": "3. Against DAAM",
    "memory": "4. Memory",
    "grid": "5. Grids: 4 seeds x 4 CFG, batched vs sequential (bench_grid.py)",
    "widgets": "6. Widgets: TraceViewer build and browser frame switch (bench_widgets.py)",
    "saveload": "7. Save / load of a large trace (1 GB; quick: 256 MB)",
}
SECTION_ORDER = ["overhead", "recording", "daam", "memory", "grid", "widgets", "saveload"]


# ====================================================================== external scripts
def _external(script: str, args: list[str], s: C.Settings, timeout: float) -> dict:
    path = HERE / script
    if not path.exists():
        return {"error": f"{script} is missing (owned by another engineer); not run"}
    env = dict(os.environ, OMP_NUM_THREADS=str(s.extra.get("threads", 2)),
               MKL_NUM_THREADS=str(s.extra.get("threads", 2)))
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, str(path)] + args, capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=str(HERE.parent))
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timed out after {timeout:.0f} s", None
    return {"stdout": out, "stderr": err, "rc": rc, "s": time.monotonic() - t0,
            "cmd": " ".join(["python", f"benchmarks/{script}"] + args)}


def run_grid(s: C.Settings, ctx: dict) -> dict:
    json_path = HERE / "_work" / "bench_grid.json"
    # quick: the shipped model at 5 steps (a warm-up + 3 rounds each way fit in ~1 minute)
    args = ["--smoke"] if s.smoke else ["--only", "shapes", "--steps", "5"]
    if s.mode == "full":
        args = []
    if s.device.startswith("cuda"):  # a GPU runs the full-size SD 1.5 grid in seconds
        args = ["--device", "cuda"] + (["--smoke"] if s.smoke else [])
    args += ["--json", str(json_path)]
    if json_path.exists():
        json_path.unlink()
    timeout = 180 if s.smoke else max(150, min(300, s.remaining() - 200))
    r = _external("bench_grid.py", args, s, timeout)
    if "error" in r:
        return {"tables": [C.table(TITLES["grid"], ["status"], [[r["error"]]])], "raw": r}
    lines = [l for l in r["stdout"].splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")] if lines else ["output"]
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
    cmd = r["cmd"].replace(str(json_path), "benchmarks/_work/bench_grid.json")
    notes = [f"`{cmd}` (subprocess, {r['s']:.0f} s, exit {r['rc']}); rows as the script prints "
             "them. Method: a warm-up of both ways, then 3 rounds in alternating order; the "
             "speed-up is the median of per-round ratios (min–max); the two ways' images are "
             "compared in every round against the stated tolerance."]
    raw_rows = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    for g in raw_rows:
        lb, la = g.get("load_before"), g.get("load_after")
        if lb and la:
            loaded = C.is_loaded(lb, C.usable_cpus()) or C.is_loaded(la, C.usable_cpus())
            notes.append(f"{g['name']}: load average (1 min) {lb[0]:.2f} before, {la[0]:.2f} after"
                         + (" — **LOADED machine**." if loaded else "."))
    if s.mode == "quick":
        notes.append("Quick mode runs the shipped model only, at 5 steps (`--only shapes --steps "
                     "5`; `--full`: 20 steps and the full-size SD 1.5 grid, whose 16 runs each "
                     "way take longer than the whole quick run); the earlier SD 1.5 measurement "
                     "is included below as written.")
    if r["rc"] != 0 or not rows:
        tail = (r["stderr"] or r["stdout"] or "").strip().splitlines()[-3:]
        notes.append("FAILED: " + " / ".join(tail))
        if not rows:
            header, rows = ["status"], [["FAILED: " + " / ".join(tail)]]
    tables = [C.table(TITLES["grid"], header, rows, notes)]
    sd15 = HERE / "RESULTS-grid-sd15.md"
    if s.mode == "quick" and sd15.exists():  # measured separately; shown as it was written
        tables.append("#### 5b. Full-size SD 1.5 (from `benchmarks/RESULTS-grid-sd15.md`, NOT re-"
                      "measured by this run; earlier run, old method: 1 repeat, no warm-up)\n\n"
                      + sd15.read_text().split("\n", 2)[2].strip() + "\n\n"
                      "- On a CPU the UNet's cost grows with the batch, so batching saves the "
                      "per-call work (prompt encoding, Python per step) and gains some matrix-"
                      "multiply efficiency; both ways spend nearly all their time in UNet steps. "
                      "On a GPU, where a batch of 24 costs little more than a batch of 2, the "
                      "gain is larger (section 8c).\n")
    figs = {}
    for g in raw_rows:
        key = "grid_" + ("shipped" if "shape" in g["name"] else "sd15")
        rounds = C.Rounds()
        rounds.load_before, rounds.load_after = g.get("load_before"), g.get("load_after")
        rounds.usable_cpus = C.usable_cpus()
        figs[key] = C.figure(f"{g['name']}, {g['size']} px, {g['steps']} steps: 4 seeds x 4 CFG, "
                             "16 sequential calls / batched", g["ratios"], what="speedup",
                             rounds=rounds, images_equal=g["equal"], max_abs_diff=g["max_abs_diff"],
                             tolerance=g["tolerance"], steps=g["steps"], size=g["size"])
    return {"tables": tables,
            "raw": {k: v for k, v in r.items() if k != "stdout"} | {"stdout": r["stdout"][-4000:],
                                                                     "rows": raw_rows,
                                                                     "figures": figs}}


def run_widgets(s: C.Settings, ctx: dict) -> dict:
    args = ["--smoke", "--no-browser"] if s.smoke else (["--switches", "50", "--builds", "5"]
                                                         if s.mode == "quick" else ["--builds", "7"])
    timeout = 120 if s.smoke else max(100, min(180, s.remaining() - 60))
    json_path = HERE / "_work" / "bench_widgets.json"
    t_start = time.time()
    r = _external("bench_widgets.py", args, s, timeout)
    if "error" in r:
        return {"tables": [C.table(TITLES["widgets"], ["status"], [[r["error"]]])], "raw": r}
    res = None
    if json_path.exists() and json_path.stat().st_mtime >= t_start - 1:
        res = json.loads(json_path.read_text())
    notes = [f"`{r['cmd']}` (subprocess, {r['s']:.0f} s, exit {r['rc']})."]
    if res is None:
        tail = (r["stderr"] or r["stdout"] or "").strip().splitlines()[-3:]
        return {"tables": [C.table(TITLES["widgets"], ["status"], [["FAILED: " + " / ".join(tail)]],
                                   notes)], "raw": {"stderr": r["stderr"][-3000:]}}
    labels = {
        "model": "model", "steps": "steps in the trace",
        "build_s_median": "TraceViewer(trace) build, median", "frames": "step frames",
        "heatmap_frames": "heatmap frames", "bytes_sent": "bytes sent to the browser (once)",
        "notebook_to_viewer_s": "notebook open -> viewer shown",
        "switch_ms_median": "frame switch in the browser, median (target < 50 ms)",
        "switch_ms_p90": "frame switch, p90", "switch_ms_max": "frame switch, max",
        "switches": "slider changes timed",
        "switch_ms_median_with_heatmap": "frame switch with a word heatmap overlaid, median",
        "browser": "browser",
    }
    rows = []
    for k, label in labels.items():
        if k not in res:
            continue
        v = res[k]
        if k == "build_s_median":
            allv = res.get("build_s_all") or []
            v = f"{C.fmt_s(v)}" + (f" (min {C.fmt_s(min(allv))}, max {C.fmt_s(max(allv))}, n={len(allv)})"
                                   if allv else "")
        elif k.endswith("_ms_median") or k.endswith("_ms_p90") or k.endswith("_ms_max") \
                or k == "switch_ms_median_with_heatmap":
            v = f"{v:.1f} ms"
        elif k.endswith("_s"):
            v = C.fmt_s(v)
        elif k == "bytes_sent":
            v = C.fmt_bytes(v)
        rows.append([label, v])
    if s.smoke:
        notes.append("Smoke: no browser (--no-browser).")
    if r["rc"] != 0:
        notes.append("exit status non-zero: " + " / ".join((r["stderr"] or "").strip().splitlines()[-2:]))
    if "switch_ms_median" in res:
        res["figures"] = {"frame_switch_ms": C.value_figure(
            "frame switch in the browser, 50-step trace (median over slider changes)",
            res["switch_ms_median"], "ms", 50.0, "under 50 ms", n_switches=res.get("switches"))}
    return {"tables": [C.table(TITLES["widgets"], ["measure", "value"], rows, notes)], "raw": res}


# ====================================================================== driver
def _bench(name: str):
    import importlib

    if name == "grid":
        return run_grid
    if name == "widgets":
        return run_widgets
    mod = importlib.import_module(f"bench_{name}")
    return mod.run


def header_md(s: C.Settings, info: dict, start: dict, end: dict, total_s: float, argv: list[str]) -> str:
    gpu = info["gpu"]
    lines = [
        "# sdlens benchmark results",
        "",
        f"Generated by `python benchmarks/run.py {' '.join(argv)}` on {start['date']} "
        f"({total_s / 60:.1f} min). Mode: **{s.mode}**.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['usable_cpus']} usable) |",
        f"| torch threads | {s.extra.get('threads')} |",
        f"| memory | {C.fmt_bytes(info['memory_bytes'])} |",
        f"| GPU | {gpu}{'' if torch_cuda() else ': CUDA columns are not measured'} |",
        f"| device / dtype | {s.device} / {s.dtype_name} |",
        f"| python / torch / diffusers / transformers | {info['python']} / {info['torch']} / "
        f"{info['diffusers']} / {info['transformers']} |",
        f"| OS | {info['os']} |",
        f"| load average (1/5/15 min) before | {fmt_load(start['load'])} |",
        f"| load average after | {fmt_load(end['load'])} |",
        "",
    ]
    cpus = info["usable_cpus"] or 1
    if run_loaded(start, end, cpus):
        lb, la = (f"{x['load'][0]:.2f}" if x.get("load") else "–" for x in (start, end))
        lines.append(f"**LOADED MACHINE**: the load average (1 min) was {lb} "
                     f"at the start and {la} at the end, above "
                     f"{C.LOADED_PER_CPU} x {cpus} usable CPUs. Other work shared the CPUs: every "
                     "spread below is wider than on an idle machine, and a ratio whose spread covers "
                     "1.0 says \"within noise\". Each loop's own load is in its notes.")
        lines.append("")
    others = sorted(set(start["busy"]) | set(end["busy"]))
    if others or (start["load"] and start["load"][0] > cpus * C.LOADED_PER_CPU):
        lines.append("**Other processes shared the machine** during this run (their CPU use slows "
                     "both sides of every comparison alike, but widens the spread). Seen at the "
                     "start / end:")
        lines.append("")
        lines += [f"- {p}" for p in others] or ["- (none caught by ps, but the load average was high)"]
        lines.append("")
    else:
        lines.append("No other busy processes were seen at the start or the end of the run.")
        lines.append("")
    return "\n".join(lines)


def run_loaded(start: dict, end: dict, cpus: int) -> bool:
    return C.is_loaded(start.get("load"), cpus) or C.is_loaded(end.get("load"), cpus)


def torch_cuda() -> bool:
    return C.torch.cuda.is_available()


def fmt_load(l) -> str:
    return "–" if not l else " / ".join(f"{x:.2f}" for x in l)


def all_figures(results: dict) -> dict:
    """Every published figure of this run: ``{key: figure}`` from the benchmarks' raw results
    (see ``common.figure`` / ``common.value_figure``)."""
    out = {}
    for name in ORDER:
        raw = (results.get(name) or {}).get("raw") or {}
        out.update(raw.get("figures") or {})
        for part in ("a", "b", "c"):
            out.update(((raw.get(part) or {}) if isinstance(raw.get(part), dict) else {}).get("figures") or {})
    return out


def all_not_run(results: dict) -> dict:
    """``{figure key: why}`` for the figures a benchmark could not measure here."""
    out = {}
    for name in ORDER:
        raw = (results.get(name) or {}).get("raw") or {}
        out.update(raw.get("not_run") or {})
        for part in ("a", "b", "c"):
            sub = raw.get(part)
            if isinstance(sub, dict) and isinstance(sub.get("not_run"), dict):
                out.update(sub["not_run"])
    return out


def fig_md(f: dict) -> str:
    """A figure in words: the median (bold) and its verdict / target status."""
    if f["kind"] == "ratio":
        text = f"**{f['median']:.3f}x** ({f['verdict']}; {f['n']} rounds"
    else:
        text = f"**{fmt_value(f['median'], f['unit'])}** ("
        if f["n"] > 1:
            text += (f"min {fmt_value(f['min'], f['unit'])}, max {fmt_value(f['max'], f['unit'])}, "
                     f"n={f['n']}; ")
        if f.get("target_text"):
            text += f"target {f['target_text']}: {'met' if f['target_status'] == 'meets' else 'MISSED'}; "
        text = text.rstrip("; ")
    if f.get("loaded"):
        text += "; loaded machine"
    return text + ")"


def fmt_value(v: float, unit: str) -> str:
    if unit == "s":
        return C.fmt_s(v)
    if unit == "ms":
        return f"{v:.1f} ms"
    if unit == "fraction":
        return f"{v:.1%}"
    if unit == "MB":
        return f"{v:.1f} MB"
    if unit == "r":
        return f"r = {v:.4f}"
    return f"{v:g} {unit}"


SUMMARY = [  # (figure key, how the summary names it)
    ("overhead_sd15", "Overhead, SD 1.5 (default recording / untraced, whole run)"),
    ("overhead_sd15_per_step", "Overhead, SD 1.5, per denoising step"),
    ("overhead_shipped", "Overhead, shipped model"),
    ("overhead_sd3", "Overhead, SD3 (full-size SD3-medium transformer)"),
    ("overhead_flux", "Overhead, Flux.1 (full-width transformer, fewer blocks)"),
    ("flux_trace_mb", "Default Flux.1-dev trace, 1024 px 28 steps (estimated)"),
    ("flux_estimate_error", "Trace-size estimate on Flux.1 test-bed traces, worst error"),
    ("generation_shipped", "Shipped model, 25-step generation (untraced, the run's threads)"),
    ("generation_shipped_1thread", "Shipped model, 25-step generation (untraced, one thread)"),
    ("daam_method_sd15", "DAAM's method / untraced (SD 1.5 loop, whole run)"),
    ("daam_method_sd15_per_step", "DAAM's method / untraced, per step"),
    ("sdlens_vs_daam_method_sd15", "sdlens / DAAM's method (whole run)"),
    ("daam_heatmap_corr", "DAAM 0.2.0's word heatmaps vs sdlens's pooling=\"daam\", Pearson r "
                          "(min over words)"),
    ("estimate_error", "Trace-size estimate, worst error"),
    ("default_trace_mb", "Default trace, SD 1.5 512 px 50 steps"),
    ("grid_shipped", "Grid 4 x 4, shipped model: speed-up batched vs 16 calls"),
    ("grid_sd15", "Grid 4 x 4, SD 1.5: speed-up batched vs 16 calls"),
    ("frame_switch_ms", "Browser frame switch"),
    ("saveload_open_s", "Large trace: lazy open"),
    ("saveload_save_s", "Large trace: save"),
]


def summary_md(results: dict, s: C.Settings) -> str:
    out = ["## Summary", "",
           "Ratios: median of the per-round ratios (side / baseline timed in the same round), "
           "with their min–max; \"within noise\" where that spread covers 1.0. Targets are met "
           "only when the whole spread is on the right side.", ""]
    figs = all_figures(results)
    for key, name in SUMMARY:
        if key in figs:
            out.append(f"- **{name}**: {fig_md(figs[key])}.")
    for key, f in figs.items():
        if key.startswith("daam_0_2_0_"):
            out.append(f"- **{f['label']}**: {fig_md(f)}.")
    daam_a = ((results.get("daam", {}).get("raw") or {}).get("a") or {})
    if daam_a.get("not_rerun"):
        e = daam_a.get("earlier") or {}
        runs = "; ".join(f"{r['ratio']:.3f}x at {r['size']} px, {r['steps']} steps, n={r['n']}"
                         for r in e.get("runs", []))
        out.append("- **DAAM 0.2.0 itself**: NOT re-run (its venv is missing here)"
                   + (f"; its last run ({e.get('date')}, old method, one run per side): {runs}"
                      if runs else "") + ".")
    for key, why in all_not_run(results).items():
        out.append(f"- **{key}**: not run: {why}.")
    failed = [n for n, v in results.items() if v.get("failed")]
    if failed:
        out.append(f"- **Failed benchmarks**: {', '.join(failed)} (tracebacks in their sections).")
    out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(ap)
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"), help="where to write the markdown")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    ap.add_argument("--only", nargs="+", choices=ORDER, default=None)
    ap.add_argument("--skip", nargs="+", choices=ORDER, default=[])
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which optional parts are skipped (default: quick 660)")
    args = ap.parse_args(argv)
    s = C.settings_from_args(args)
    # smoke only checks the scripts: one thread (as the test suite runs), no OpenMP barriers
    # stalled by other processes; quick/full: every usable core
    threads = args.threads or (1 if s.smoke else len(os.sched_getaffinity(0)))
    C.torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    s.extra["threads"] = threads
    budget = args.budget if args.budget is not None else (660 if s.mode == "quick" else None)
    t0 = time.monotonic()
    if budget:
        s.deadline = t0 + budget  # only optional parts (SD 1.5 memory children) are skipped by it
    out_path = Path(args.out).resolve()
    names = [n for n in (args.only or ORDER) if n not in args.skip]
    info = C.machine_info(s)
    start = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "load": C.loadavg(), "busy": C.busy_processes()}
    print(f"sdlens benchmarks, mode {s.mode}, {threads} threads, device {s.device}; load {start['load']}")
    ctx: dict = {"work": str(HERE / "_work"), "tmp": tempfile.gettempdir()}
    results: dict = {}
    for name in names:
        t = time.monotonic()
        print(f"== {name} (elapsed {t - t0:.0f} s)", flush=True)
        try:
            res = _bench(name)(s, ctx)
            if name == "recording":
                ctx["estimate_worst_error"] = (res.get("raw") or {}).get("worst_estimate_error")
        except Exception as e:  # report, keep going
            tb = traceback.format_exc()
            print(tb)
            res = {"failed": True, "tables": [C.table(TITLES[name] + " — FAILED", ["error"],
                                                       [[f"`{type(e).__name__}: {str(e)[:500]}`"]],
                                                       [" / ".join(tb.strip().splitlines()[-4:])])]}
        res["seconds"] = time.monotonic() - t
        results[name] = res
        print(C.result_markdown(res), flush=True)
        if name != names[-1]:  # a partial file, so that an interrupted run still leaves numbers
            write_md(out_path, s, info, start, results, names, argv, t0, partial=True)
    total = write_md(out_path, s, info, start, results, names, argv, t0, partial=False)
    print(f"wrote {out_path} ({total:.0f} s)")
    return 1 if any(v.get("failed") for v in results.values()) else 0


GPU_FILES = {"run": "RESULTS-cuda.md", "memory": "RESULTS-cuda-memory.md", "grid": "RESULTS-grid-cuda.md"}


def _md_section(text: str, heading: str) -> str:
    """The lines of ``text`` from the line starting with ``heading`` to the next heading of the
    same or a higher level (exclusive)."""
    lines = text.splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    start = next((i for i, l in enumerate(lines) if l.startswith(heading)), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")
                and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    return "\n".join(lines[start + 1:end]).strip()


def gpu_section_md() -> str:
    """A CPU run's RESULTS.md quotes the last GPU measurements (a GPU is lent to some sessions
    only; ``run.py --quick --out benchmarks/RESULTS-cuda.md`` on a CUDA machine writes them)."""
    texts = {k: (HERE / f).read_text() for k, f in GPU_FILES.items() if (HERE / f).exists()}
    if "run" not in texts:
        return "## 8. On a GPU\n\nNot measured yet (no `benchmarks/RESULTS-cuda.md`).\n"
    out = ["## 8. On a GPU (quoted from the files below, NOT re-measured by this run)\n",
           "Earlier GPU run, **old method** (few runs per side, ratio of medians, no per-round "
           "spread): read these as indications, not as resolved ratios.\n"]
    for key, name in GPU_FILES.items():
        if key in texts:
            first = next((l for l in texts[key].splitlines() if l.startswith(("Generated by", "`python"))), "")
            out.append(f"- [`benchmarks/{name}`]({name}): {first}")
    gpu = next((l for l in texts["run"].splitlines() if l.startswith("| GPU |")), "")
    out.append(f"- Machine: {gpu.strip('| ').replace(' | ', ': ')}.\n")
    out.append("#### 8a. Summary of the GPU run (SD 1.5 full size, float16, 512 px, 50 steps)\n")
    out.append(_md_section(texts["run"], "## Summary"))
    grid_of_run = _md_section(texts["run"], "## 5.")
    if grid_of_run and "float16" not in grid_of_run:
        out.append("- That run's grid (its section 5) ran on the machine's CPU cores (`bench_grid.py` "
                   "had no `--device` then); 8c is the grid on the GPU.")
    out.append("- Where DAAM's method runs below the untraced time: for 77 keys the classic "
               "softmax(QK^T)V kernels can be faster than the SDPA kernel the pipeline uses. sdlens "
               "keeps the pipeline's own attention kernels (a traced image equals the untraced one "
               "exactly) and adds the probabilities' recomputation on top.")
    out.append("- `tests/engine/test_cuda.py` checks the GPU path (traced = untraced in fp32 and fp16, "
               "CUDA vs CPU heatmaps, no device sync inside an attention layer, sweeps, steering); "
               "it is skipped where there is no CUDA.\n")
    if "memory" in texts:
        out.append("#### 8b. Memory on the GPU, one process per run\n")
        out.append(_md_section(texts["memory"], "#### 4a.") + "\n")
    if "grid" in texts:
        out.append("#### 8c. Grids on the GPU: 4 seeds x 4 CFG, batched vs sequential\n")
        body = texts["grid"].split("\n", 2)[2].strip()
        out.append("\n".join(l for l in body.splitlines() if not l.startswith("`python")).strip())
        out.append("\n- On a GPU a batched cell differs from its single run by kernel rounding that "
                   "depends on the batch size (cuDNN picks other algorithms, TF32 convolutions; "
                   "last column, in the [0, 1] pixel range); on the CPU it is ~1e-5.")
    return "\n".join(out) + "\n"


def write_md(out_path: Path, s, info, start, results, names, argv, t0, partial: bool) -> float:
    total = time.monotonic() - t0
    end = {"load": C.loadavg(), "busy": C.busy_processes()}
    parts = [header_md(s, info, start, end, total, argv)]
    if partial:
        parts.append(f"**PARTIAL: the run was still going** (done: {', '.join(results)}; "
                     f"to do: {', '.join(n for n in names if n not in results)}).\n")
    parts.append(summary_md(results, s))
    for name in SECTION_ORDER:
        if name not in results:
            continue
        res = results[name]
        parts.append(f"## {TITLES[name]}\n\n_{res['seconds']:.0f} s_\n")
        parts.append(C.result_markdown(res))
    if not partial and not s.device.startswith("cuda"):  # quoted once, in the finished file
        parts.append(gpu_section_md())
    skipped = [n for n in ORDER if n not in names]
    if skipped:
        parts.append("Not run this time: " + ", ".join(skipped) + "\n")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(parts))
    committed = out_path == HERE / "RESULTS.md"
    # everything, for digging (ignored by git) ...
    C.write_json(HERE / "_work" / "results.json" if committed else out_path.with_suffix(".json"),
                 {"machine": info, "start": start, "end": end, "total_s": total,
                  "results": {k: v.get("raw") for k, v in results.items()}})
    # ... and the small file every published figure comes from (committed next to RESULTS.md)
    summary = summary_json(s, info, start, end, total, results, argv, partial)
    summary_path = HERE / "results.json" if committed else out_path.with_suffix(".results.json")
    summary_path.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    if committed and not partial:
        import publish

        publish.update_readme(summary)
    return total


def _round(x):
    """Floats to 4 significant digits (a small, stable committed file)."""
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


def summary_json(s, info, start, end, total, results, argv, partial) -> dict:
    """What ``benchmarks/results.json`` holds: the run, the machine, its load, every published
    figure (median, spread, verdict, target), and what was quoted rather than re-run."""
    cpus = info["usable_cpus"] or 1
    figs = all_figures(results)
    daam_a = ((results.get("daam", {}).get("raw") or {}).get("a") or {})
    not_rerun = {}
    if daam_a.get("not_rerun") and daam_a.get("earlier"):
        not_rerun["daam_0_2_0"] = dict(daam_a["earlier"], why="the DAAM venv is missing here",
                                       method="old method: one run per side, no spread")
    grid15 = HERE / "RESULTS-grid-sd15.md"
    if "grid_sd15" not in figs and grid15.exists():
        not_rerun["grid_sd15"] = dict(grid_file_quote(grid15.read_text()),
                                      source="benchmarks/RESULTS-grid-sd15.md",
                                      method="old method: 1 repeat, no warm-up")
    return _round({
        "generated_by": "python benchmarks/run.py " + " ".join(argv),
        "date": start["date"], "minutes": total / 60, "mode": s.mode, "partial": partial,
        "machine": {k: info.get(k) for k in ("cpu", "usable_cpus", "gpu", "python", "torch",
                                             "diffusers", "transformers")}
        | {"torch_threads": s.extra.get("threads"), "device": s.device, "dtype": s.dtype_name},
        "settings": {"sd15": s.describe(), "sd15_height": s.height, "sd15_steps": s.steps,
                     "shipped_steps": s.shipped_steps, "min_rounds": C.MIN_ROUNDS},
        "load_start": start["load"], "load_end": end["load"],
        "loaded": run_loaded(start, end, cpus) or any(f.get("loaded") for f in figs.values()),
        "loaded_threshold": C.LOADED_PER_CPU * cpus,
        "figures": figs, "not_rerun": not_rerun, "not_run": all_not_run(results),
        "gpu": gpu_quotes(),
        "failed": [n for n, v in results.items() if v.get("failed")],
    })


def grid_file_quote(text: str) -> dict:
    """Date and rows (name, size, steps, speed-up as written) of a bench_grid.py markdown file."""
    import re

    date = re.search(r"on (\d{4}-\d\d-\d\d \d\d:\d\d \w+)", text)
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 7 and cells[1].endswith("px"):
            sp = re.match(r"([\d.]+)x", cells[6])
            rows.append({"name": cells[0], "size": cells[1], "steps": cells[2],
                         "speedup": float(sp.group(1)) if sp else None})
    rep = re.search(r"(\d+) repeat", text)
    return {"date": date.group(1) if date else None, "rows": rows,
            "repeats": int(rep.group(1)) if rep else None}


def gpu_quotes() -> dict | None:
    """The last GPU run's figures, read from the markdown it wrote (RESULTS-cuda*.md): quoted as
    they are, with source and date (an earlier run, measured with the old method)."""
    import re

    texts = {k: (HERE / f).read_text() for k, f in GPU_FILES.items() if (HERE / f).exists()}
    if "run" not in texts:
        return None
    run = texts["run"]

    def num(pattern, text=run, n=1):
        m = re.search(pattern, text, re.S)
        return None if m is None else [float(m.group(i)) for i in range(1, n + 1)]

    date = re.search(r"on (\d{4}-\d\d-\d\d \d\d:\d\d \w+)", run)
    gpu = re.search(r"\| GPU \| ([^|]+?) \|", run)
    q = {"source": f"benchmarks/{GPU_FILES['run']}", "date": date.group(1) if date else None,
         "gpu": gpu.group(1).strip() if gpu else None,
         "method": "earlier GPU run, old method (few runs per side, ratio of medians, no spread)"}
    v = num(r"SD 1\.5 512 px 50 steps: \*\*([\d.]+)x\*\* per denoising step, ([\d.]+)x per whole "
            r"run \((\d+) run", n=3)
    if v:
        q.update(overhead_sd15_per_step=v[0], overhead_sd15=v[1], runs_per_side=int(v[2]))
    v = num(r"shipped model: \*\*([\d.]+)x\*\*")
    if v:
        q["overhead_shipped"] = v[0]
    v = num(r"DAAM's method\*\*.*?\*\*([\d.]+)x\*\* untraced per step vs sdlens \*\*([\d.]+)x\*\*"
            r" \(same loop; whole runs ([\d.]+)x vs ([\d.]+)x\)", n=4)
    if v:
        q.update(daam_method_per_step=v[0], daam_method=v[2])
    v = re.search(r"25-step generation\*\*.*?\*\*([\d.]+ m?s)\*\*", run)
    if v:
        q["generation_shipped"] = v.group(1)
    if "memory" in texts:
        peaks = {}
        for line in texts["memory"].splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if line.startswith("| SD 1.5") and len(cells) >= 7 and cells[6].endswith("MiB"):
                peaks[cells[1]] = float(cells[6].split()[0])
        if "untraced" in peaks and "sdlens" in peaks:
            q["cuda_peak_rise_mib"] = peaks["sdlens"] - peaks["untraced"]
            q["memory_source"] = f"benchmarks/{GPU_FILES['memory']}"
    if "grid" in texts:
        q["grid"] = dict(grid_file_quote(texts["grid"]), source=f"benchmarks/{GPU_FILES['grid']}")
    return q


if __name__ == "__main__":
    raise SystemExit(main())
