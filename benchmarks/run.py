"""Run every sdlens benchmark and rewrite ``benchmarks/RESULTS.md``.

    python benchmarks/run.py --quick            # full architectures, few repeats: < 10 min, 2 CPU cores
    python benchmarks/run.py --full             # more repeats (long on a CPU)
    python benchmarks/run.py --quick --smoke    # tiny sizes: only checks that the scripts work
    python benchmarks/run.py --smoke --out /tmp/R.md   # write elsewhere (tests do this)

Benchmarks (one module each; see their docstrings):
1. ``bench_overhead``  traced (default recording) vs untraced: full-size SD 1.5, shipped model
2. ``bench_recording`` recording variants: time and bytes vs sdlens's estimate
3. ``bench_daam``      DAAM 0.2.0 in its own venv; DAAM's method in ours
4. ``bench_memory``    peak RSS (CUDA peak) traced vs untraced; SD 1.5 512 px / 50 steps trace size
5. ``bench_grid``      4 seeds x 4 CFG batched vs 16 sequential calls (sweeps; subprocess)
6. ``bench_widgets``   TraceViewer build time, browser frame-switch latency (widgets; subprocess)
7. ``bench_saveload``  write / lazy open of a ~1 GB trace

Everything runs on the CPU unless CUDA is available (then fp16, 512 px, 50 steps). Our own
benchmarks share one process (and one SD 1.5 pipeline); each compares its sides alternating in
that process after a warm-up.
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
    "saveload": "7. Save / load of a 1 GB trace",
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
    args = ["--smoke"] if s.smoke else ["--only", "shapes"] + (["--repeats", "1"] if s.mode == "quick" else [])
    if s.mode == "full":
        args = []
    if s.device.startswith("cuda"):  # a GPU runs the full-size SD 1.5 grid in seconds
        args = ["--device", "cuda"] + (["--smoke"] if s.smoke else ["--repeats", "2"])
    timeout = 120 if s.smoke else max(120, min(150, s.remaining() - 200))
    r = _external("bench_grid.py", args, s, timeout)
    if "error" in r:
        return {"tables": [C.table(TITLES["grid"], ["status"], [[r["error"]]])], "raw": r}
    lines = [l for l in r["stdout"].splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")] if lines else ["output"]
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
    notes = [f"`{r['cmd']}` (subprocess, {r['s']:.0f} s, exit {r['rc']}); rows as the script prints them."]
    if s.mode == "quick":
        notes.append("Quick mode runs the shipped model only (`--only shapes`): the full-size SD 1.5 "
                     "grid (16 runs each way) takes longer than the whole 10-minute budget; "
                     "`run.py --full` runs it, and its separate measurement is included below.")
    if r["rc"] != 0 or not rows:
        tail = (r["stderr"] or r["stdout"] or "").strip().splitlines()[-3:]
        notes.append("FAILED: " + " / ".join(tail))
        if not rows:
            header, rows = ["status"], [["FAILED: " + " / ".join(tail)]]
    tables = [C.table(TITLES["grid"], header, rows, notes)]
    sd15 = HERE / "RESULTS-grid-sd15.md"
    if s.mode == "quick" and sd15.exists():  # measured separately; shown as it was written
        tables.append("#### 5b. Full-size SD 1.5 (from `benchmarks/RESULTS-grid-sd15.md`, not re-measured "
                      "by this run)\n\n" + sd15.read_text().split("\n", 2)[2].strip() + "\n\n"
                      "- On a CPU the UNet's cost grows with the batch, so batching saves the "
                      "per-call work (prompt encoding, Python per step) and gains some matrix-"
                      "multiply efficiency; both ways spend nearly all their time in UNet steps, so "
                      "the ratio should hold at 20 steps (not measured). On a GPU, where a batch of "
                      "24 costs little more than a batch of 2, the gain is expected to be larger.\n")
    return {"tables": tables,
            "raw": {k: v for k, v in r.items() if k != "stdout"} | {"stdout": r["stdout"][-4000:]}}


def run_widgets(s: C.Settings, ctx: dict) -> dict:
    args = ["--smoke", "--no-browser"] if s.smoke else (["--switches", "50", "--builds", "2"]
                                                         if s.mode == "quick" else [])
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
    others = sorted(set(start["busy"]) | set(end["busy"]))
    if others or (start["load"] and start["load"][0] > (info["usable_cpus"] or 1) * 0.5):
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


def torch_cuda() -> bool:
    return C.torch.cuda.is_available()


def fmt_load(l) -> str:
    return "–" if not l else " / ".join(f"{x:.2f}" for x in l)


def summary_md(results: dict, s: C.Settings) -> str:
    out = ["## Summary", ""]
    r = results.get("overhead", {}).get("raw") or {}
    if "ratio_sd15" in r:
        n = len((r.get("sd15", {}).get("untraced") or {}).get("times_s", []))
        out.append(f"- **Overhead** (default recording / untraced, median): SD 1.5 {s.height} px "
                   f"{s.steps} steps: **{r['ratio_sd15_per_step']:.3f}x** per denoising step, "
                   f"{r['ratio_sd15']:.3f}x per whole run ({n} run(s) per side); shipped model: "
                   f"**{r['ratio_shipped']:.3f}x** (target <= {r['target']:.2f}x on the CPU).")
    g = r.get("shipped_generation_s") or {}
    if g:
        out.append(f"- **Shipped model, {r['shipped_steps']}-step generation** (CFG 7.5, prompt + "
                   f"denoising loop, untraced, median): **{C.fmt_s(g['untraced'])}** with torch's "
                   "default threads" + (f", **{C.fmt_s(g['untraced, 1 thread'])}** with one thread"
                                         if 'untraced, 1 thread' in g else "")
                   + (" (target: well under 1 s on the CPU)." if r["shipped_steps"] == 25 else "."))
    d = (results.get("daam", {}).get("raw") or {}).get("b") or {}
    if "ratio_daam_method" in d:
        out.append(f"- **DAAM's method** (classic attention on every attn2, summed): "
                   f"**{d['ratio_daam_method_per_step']:.3f}x** untraced per step vs sdlens "
                   f"**{d['ratio_sdlens_per_step']:.3f}x** (same loop; whole runs "
                   f"{d['ratio_daam_method']:.3f}x vs {d['ratio_sdlens']:.3f}x).")
    a = ((results.get("daam", {}).get("raw") or {}).get("a") or {}).get("child") or {}
    for run in a.get("runs", []):
        if run.get("ok"):
            out.append(f"- **DAAM 0.2.0 itself** at {run['size']} px, {run['steps']} steps: "
                       f"{run['ratio']:.3f}x its own untraced diffusers 0.21.2.")
    if a.get("errors"):
        out.append(f"- DAAM 0.2.0 failures: {len(a['errors'])} (see 3a for the exact errors).")
    rec = results.get("recording", {}).get("raw") or {}
    if rec.get("worst_estimate_error") is not None:
        out.append(f"- **Size estimate**: worst error {rec['worst_estimate_error']:.1%} against real "
                   "traces (target within 10%).")
    mem = (results.get("memory", {}).get("raw") or {}).get("size") or {}
    for k, v in mem.items():
        if k.startswith("default, this"):
            out.append(f"- **Default trace, SD 1.5 512 px 50 steps**: {sum(v.values()) / 1e6:.1f} MB "
                       f"({k}) (target < 100 MB).")
    sl = results.get("saveload", {}).get("raw") or {}
    if "save_s" in sl:
        import statistics
        out.append(f"- **1 GB trace**: save {statistics.median(sl['save_s']):.2f} s, open "
                   f"{statistics.median(sl['lazy']['open']) * 1e3:.1f} ms (lazy), read all "
                   f"{statistics.median(sl['lazy']['all']):.2f} s.")
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
                    help="seconds the whole run may take (default: quick 560, smoke/full none)")
    args = ap.parse_args(argv)
    s = C.settings_from_args(args)
    # smoke only checks the scripts: one thread (as the test suite runs), no OpenMP barriers
    # stalled by other processes; quick/full: every usable core
    threads = args.threads or (1 if s.smoke else len(os.sched_getaffinity(0)))
    C.torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    s.extra["threads"] = threads
    budget = args.budget if args.budget is not None else (560 if s.mode == "quick" else None)
    t0 = time.monotonic()
    if budget:
        s.deadline = t0 + budget
    if s.mode == "quick":
        s.extra["sd15_loop_budget_s"] = 200
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
    out = ["## 8. On a GPU (quoted from the files below, not re-measured by this run)\n"]
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
    C.write_json(out_path.with_suffix(".json") if out_path.parent != HERE else
                 HERE / "_work" / "results.json",
                 {"machine": info, "start": start, "end": end, "total_s": total,
                  "results": {k: v.get("raw") for k, v in results.items()}})
    return total


if __name__ == "__main__":
    raise SystemExit(main())
