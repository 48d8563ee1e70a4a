"""Recording overhead at real sequence lengths (issue 29, item 5): 1024-px token counts.

    python benchmarks/bench_1024.py --label before           # ~20-25 min on a loaded 2-core CPU
    python benchmarks/bench_1024.py --label after            # the same on another checkout
    python benchmarks/bench_1024.py --label x --only flux-narrow --profile
    python benchmarks/bench_1024.py --smoke --out-dir /tmp/b # tiny sizes: checks the script works

One command for any checkout: it measures the code it is run from (its git commit is recorded),
writes ``benchmarks/results/1024-<label>.json`` (every figure, the machine, its load, the
commit) and rewrites ``benchmarks/RESULTS-1024.md`` from every ``1024-*.json`` there (so a
"before" and an "after" file give one side-by-side table). ``tests/test_benchmarks.py`` checks
that the committed markdown is what :func:`render` writes from the committed JSON files.

Rows (traced with sdlens's default recording vs untraced, same seed and call; the whole pipeline
call with ``output_type="latent"``: prompt encoding + the denoising loop, no VAE decode):

- **sd3**: the SD3-medium transformer at full width (24 heads x 64, from
  ``random_pipeline("sd3", scale=1)``'s config) with ``SD3_BLOCKS`` joint blocks (the last one
  context-pre-only, as the real 24th), on the shrunk test bed's CLIP-L / CLIP-G / 2-layer T5 and
  VAE (the transformer's text projection takes their widths); 1024 px: 64 x 64 = 4096 image
  tokens + 77 CLIP + 256 T5 positions = 333 text tokens; CFG (batch 2); ``FULL_STEPS`` step(s).
- **flux**: the Flux.1-dev transformer at full width (24 heads x 128, from
  ``random_pipeline("flux", scale=1)``'s config) with ``FLUX_BLOCKS`` double + single blocks, on
  the shrunk test bed's text encoders and VAE; 1024 px: 4096 image tokens + 512 T5 positions;
  guidance 3.5 (distilled, no CFG); ``FULL_STEPS`` step(s).
- **flux-narrow**: ``random_pipeline("flux", scale=0.1, sample_size=128)`` (2 double + 4 single
  blocks of 2 heads x 16) at its 1024 px default: 4096 image tokens + 512 T5; 2 steps. Attention
  dominates its run: the worst case for a recorder that recomputes attention scores.
- **mmdit**: the shipped SD3 model ``sdlens.load_pipeline("shapes-mmdit")``, its own call
  (``bench_mmdit.call_kwargs``: 64 px, 25 steps, CFG).

Method (``common.alternate``): a warm-up run of every side (full-width rows: at 512 px, the same
code paths at a quarter of the tokens; CPU allocations this large are fresh ``mmap`` pages on
every run anyway), then ``MIN_ROUNDS`` rounds in rotating order; the ratio is the median of the
per-round ratios (traced / untraced of the same round) with its min-max spread, "within noise"
when the spread covers 1.0; a target is hit only when the whole spread is at or below it.
Threads: ``--threads`` (default 1: on the shared 2-core machine two torch threads wait for each
other). ``--profile``: one traced narrow-Flux run under cProfile and ``torch.profiler``; their top
entries go into the JSON and the markdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common as C  # noqa: E402

RESULTS_DIR = HERE / "results"
MARKDOWN = HERE / "RESULTS-1024.md"
PREFIX = "1024-"
ROWS = ("mmdit", "flux-narrow", "sd3", "flux")  # cheapest first: an interrupted run keeps numbers
SD3_BLOCKS = 2              # of SD3-medium's 24 joint blocks
FLUX_BLOCKS = (1, 1)        # of Flux.1-dev's 19 double + 38 single blocks
FULL_STEPS = 1              # denoising steps of the full-width rows
NARROW_STEPS = 2
HEIGHT = 1024
WARM_HEIGHT = 512           # the full-width rows' warm-up size
SD3_GUIDANCE = 7.0          # the SD3 pipeline's default (CFG: batch 2)
FLUX_GUIDANCE = 3.5         # Flux.1-dev's default (a distilled guidance embedding, no CFG)
# the targets: traced / untraced, the whole spread at or below
TARGETS = {"sd3": 1.05, "flux": 1.05, "flux-narrow": 1.25, "mmdit": 1.15}
PROMPT = "a red circle and a blue square on a white background"


# ====================================================================== pipelines
def full_width(arch: str, blocks, smoke: bool):
    """(pipe, description, tokens): the shrunk test bed of ``arch`` with its transformer replaced
    by one of the real model's width and ``blocks`` blocks (the real config, read from
    ``random_pipeline(arch, scale=1)`` built on the meta device: no memory, no time)."""
    import diffusers

    from sdlens.testing import random_pipeline

    pipe = random_pipeline(arch)
    small = pipe.transformer.config
    if smoke:  # the test bed's own width: only checks the code path
        cfg = dict(small)
    else:
        with torch.device("meta"):
            kw = {"t5": False} if arch == "sd3" else {}
            cfg = dict(random_pipeline(arch, scale=1.0, device="meta", **kw).transformer.config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    # the test bed's text encoders feed it: their widths for the text / pooled projections
    cfg.update(joint_attention_dim=small.joint_attention_dim,
               pooled_projection_dim=small.pooled_projection_dim)
    if arch == "sd3":
        cfg["num_layers"] = blocks
        cls = diffusers.SD3Transformer2DModel
    else:
        cfg["num_layers"], cfg["num_single_layers"] = blocks
        cls = diffusers.FluxTransformer2DModel
    torch.manual_seed(0)
    model = cls(**cfg).eval()
    pipe.register_modules(transformer=model)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    heads, dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    if arch == "sd3":
        what = (f"SD3-medium transformer at full width ({heads} heads x {dim}), {blocks} of 24 "
                f"joint blocks ({n:.2f}B parameters); the test bed's CLIP-L / CLIP-G / 2-layer T5")
    else:
        what = (f"Flux.1-dev transformer at full width ({heads} heads x {dim}), {blocks[0]} of 19 "
                f"double + {blocks[1]} of 38 single blocks ({n:.2f}B parameters); the test bed's "
                "CLIP-L / 2-layer T5")
    return pipe, what


def row_setup(row: str, smoke: bool) -> dict:
    """Everything a row needs: pipe, description, call kwargs factories (timed and warm-up)."""
    from sdlens.testing import random_pipeline

    def flow_call(height, steps, guidance):
        return lambda: dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance,
                            height=height, width=height, output_type="latent",
                            generator=torch.Generator("cpu").manual_seed(0))

    height, warm_height = (64, 32) if smoke else (HEIGHT, WARM_HEIGHT)
    if row == "sd3":
        pipe, what = full_width("sd3", SD3_BLOCKS, smoke)
        steps, text = FULL_STEPS, "77 CLIP + 256 T5 = 333 text tokens"
        kw, warm = (flow_call(height, steps, SD3_GUIDANCE),
                    flow_call(warm_height, 1, SD3_GUIDANCE))
        call = f"{height} px, {steps} step(s), CFG {SD3_GUIDANCE} (batch 2)"
    elif row == "flux":
        pipe, what = full_width("flux", FLUX_BLOCKS, smoke)
        steps, text = FULL_STEPS, "512 T5 text tokens"
        kw, warm = (flow_call(height, steps, FLUX_GUIDANCE),
                    flow_call(warm_height, 1, FLUX_GUIDANCE))
        call = f"{height} px, {steps} step(s), guidance {FLUX_GUIDANCE} (distilled, no CFG)"
    elif row == "flux-narrow":
        latent = 8 if smoke else HEIGHT // 8
        pipe = random_pipeline("flux", scale=0.1, sample_size=latent)
        what = f'random_pipeline("flux", scale=0.1, sample_size={latent}) (2 heads x 16)'
        steps, text = NARROW_STEPS, "512 T5 text tokens"
        height = latent * int(pipe.vae_scale_factor)
        kw = warm = flow_call(height, steps, FLUX_GUIDANCE)
        call = f"{height} px, {steps} steps, guidance {FLUX_GUIDANCE} (no CFG)"
    elif row == "mmdit":
        import bench_mmdit

        from sdlens import load_pipeline

        pipe = load_pipeline("shapes-mmdit", device="cpu")
        steps = 2 if smoke else 25
        kw = warm = bench_mmdit.call_kwargs(steps=steps)
        what, text = 'the shipped MMDiT, sdlens.load_pipeline("shapes-mmdit")', "its own text"
        height = None
        call = f"its own call (64 px, {steps} steps, CFG {kw()['guidance_scale']:g})"
    else:
        raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    pipe.set_progress_bar_config(disable=True)
    return {"pipe": pipe, "what": what, "call": call, "kw": kw, "warm": warm, "steps": steps,
            "height": height, "text": text}


def image_tokens(pipe, height: int | None) -> int | None:
    """Image tokens of the transformer's joint sequence at ``height`` px."""
    if height is None:
        return None
    t = pipe.transformer.config
    patch = getattr(t, "patch_size", 1)
    # Flux packs 2 x 2 latent pixels into one token (patch_size 1 on the packed latents)
    patch = 2 if type(pipe.transformer).__name__.startswith("Flux") else patch
    side = height // int(pipe.vae_scale_factor) // patch
    return side * side


# ====================================================================== measuring
def traced(pipe, kw):
    import sdlens

    def fn():
        with sdlens.trace(pipe) as tr:
            pipe(**kw())
        return tr.runs[-1]
    return fn


def sites(trace) -> int | None:
    try:
        return len(trace.attention.layers)
    except Exception:  # the Trace API of another checkout: the count is only informative
        return None


def cpu_timed(fn, times: list[float]):
    """``fn`` that also appends the CPU time this process spent in it to ``times``: with one
    torch thread, its work, whatever the waits for a CPU that other processes hold."""
    def run():
        t = time.process_time()
        try:
            return fn()
        finally:
            times.append(time.process_time() - t)
    return run


def measure(row: str, s: C.Settings, smoke: bool) -> dict:
    t0 = time.monotonic()
    st = row_setup(row, smoke)
    pipe, build_s = st["pipe"], time.monotonic() - t0
    print(f"== {row}: {st['what']}; {st['call']} (built in {build_s:.0f} s)", flush=True)
    cpu: dict[str, list[float]] = {"untraced": [], "traced": []}
    try:
        C.alternate({"untraced": C.untraced(pipe, st["warm"]), "traced": traced(pipe, st["warm"])},
                    s, reps=0, warmup=1, log=None)
        stats = C.alternate({"untraced": cpu_timed(C.untraced(pipe, st["kw"]), cpu["untraced"]),
                             "traced": cpu_timed(traced(pipe, st["kw"]), cpu["traced"])},
                            s, reps=C.MIN_ROUNDS, warmup=0, keep=("traced",))
        n_sites = sites(stats["traced"].result)
        stats["traced"].result = None
        tokens = image_tokens(pipe, st["height"])
    finally:
        del pipe, st["pipe"]
        gc.collect()
    target = TARGETS[row]
    fig = C.figure(f"{row}: traced (default recording) / untraced, wall time",
                   C.round_ratios(stats["traced"].times, stats["untraced"].times), target,
                   rounds=stats)
    cpu_fig = C.figure(f"{row}: traced / untraced, CPU time of the process",
                       C.round_ratios(cpu["traced"], cpu["untraced"]), target)
    fig.update(what=st["what"], call=st["call"], steps=st["steps"], height=st["height"],
               image_tokens=tokens, text_tokens=st["text"], sites=n_sites, build_s=build_s,
               untraced_s=stats["untraced"].to_dict(), traced_s=stats["traced"].to_dict(),
               cpu=dict(cpu_fig, untraced_s=cpu["untraced"], traced_s=cpu["traced"]),
               loop_s=time.monotonic() - t0)
    print(f"   {row}: {fig['median']:.3f}x ({fig['verdict']}); CPU time {cpu_fig['median']:.3f}x "
          f"({cpu_fig['verdict']})", flush=True)
    return fig


def profile_narrow_flux(smoke: bool, top: int = 18) -> dict:
    """One traced narrow-Flux run under cProfile and one under torch.profiler (after a warm-up):
    their top entries, as text lines."""
    import cProfile
    import io
    import pstats

    st = row_setup("flux-narrow", smoke)
    pipe = st["pipe"]
    run = traced(pipe, st["kw"])
    run()  # warm-up
    t = time.perf_counter()
    C.untraced(pipe, st["kw"])()
    untraced_s = time.perf_counter() - t
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    run()
    prof.disable()
    cprofile_s = time.perf_counter() - t
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    by_self = _pstats_lines(buf.getvalue())
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(r"sdlens|diffusers", top)
    by_cum = _pstats_lines(buf.getvalue())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as tp:
        run()
    ops = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                  max_name_column_width=40)
    shapes = tp.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=30,
        max_shapes_column_width=60)
    del pipe, st["pipe"], run
    gc.collect()
    return {"what": st["what"], "call": st["call"], "untraced_s": untraced_s,
            "traced_under_cprofile_s": cprofile_s, "cprofile_tottime": by_self,
            "cprofile_cumulative": by_cum, "torch_ops": ops.strip().splitlines(),
            "torch_ops_by_shape": shapes.strip().splitlines()}


def _pstats_lines(text: str) -> list[str]:
    """The table of a pstats printout (header and rows), file paths cut to the package."""
    import re

    lines = text.strip().splitlines()
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    return [re.sub(r"\S*/(site-packages|%s)/" % re.escape(C.REPO.name), "", l).rstrip()
            for l in lines[start:]]


# ====================================================================== the record
def git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=C.REPO, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except Exception:
        return ""


def checkout() -> dict:
    """The measured code: the commit, its subject, the last commit that changed sdlens/, and
    whether sdlens/ differs from the commit."""
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "sdlens_commit": git("log", "-1", "--format=%H", "--", "sdlens"),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "sdlens_modified": bool(git("status", "--porcelain", "--", "sdlens"))}


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


def load_records(directory: Path = RESULTS_DIR) -> list[dict]:
    """Every finished record in ``directory``, oldest first."""
    recs = [json.loads(p.read_text()) for p in sorted(directory.glob(PREFIX + "*.json"))]
    return sorted(recs, key=lambda r: r.get("date", ""))


# ====================================================================== markdown
def _hit(f: dict) -> str:
    return {"meets": "hit", "misses": "**MISS**"}.get(
        f.get("target_status"), "not resolved (the target is inside the spread)")


def _x(v: float) -> str:
    return f"{v:.3f}x"


def record_md(r: dict) -> str:
    m, co = r["machine"], r["checkout"]
    out = [f"## {r['label']}: commit `{co['commit'][:12]}` ({r['date']})", "",
           f"`{r['generated_by']}`: commit {co['commit']} ({co['subject']!r}, branch "
           f"{co['branch']}; sdlens/ last changed in `{co.get('sdlens_commit', '?')[:12]}`"
           f"{'; sdlens/ MODIFIED from it' if co['sdlens_modified'] else ''}); "
           f"mode {r['mode']}; {r['minutes']:.1f} min" + (", **PARTIAL**" if r.get("partial") else "")
           + ".", "",
           f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, **{m['torch_threads']} torch "
           f"thread(s)**, {m['device']} {m['dtype']}; torch {m['torch']}, diffusers "
           f"{m['diffusers']}. Load average (1/5/15 min) at the start "
           f"{_load(r['load_start'])}, at the end {_load(r['load_end'])}"
           + (" (**LOADED machine**: other work shares the CPUs)" if r["loaded"] else "") + ".",
           "",
           "| row | model | call | tokens (image + text) | untraced s | traced s | ratio (min–max) "
           "| verdict | target | hit? | CPU-time ratio (min–max), hit? | load 1-min before / after |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in ROWS:
        f = r["rows"].get(key)
        if f is None:
            continue
        if "error" in f:
            out.append(f"| {key} | FAILED: `{f['error']}` | | | | | | | | | | |")
            continue
        tok = (f"{f['image_tokens']} + {f['text_tokens']}" if f.get("image_tokens")
               else f["text_tokens"])
        u, t = f["untraced_s"], f["traced_s"]
        out.append(
            f"| {key} | {f['what']} | {f['call']} | {tok} | {u['median_s']:.2f} "
            f"({u['min_s']:.2f}–{u['max_s']:.2f}) | {t['median_s']:.2f} ({t['min_s']:.2f}–"
            f"{t['max_s']:.2f}) | **{_x(f['median'])}** ({f['min']:.3f}–{f['max']:.3f}) | "
            f"{f['verdict']} | <= {f['target']:.2f}x | {_hit(f)} | {_cpu(f)} | "
            f"{_load1(f.get('load_before'))} / {_load1(f.get('load_after'))} |")
    out += ["", f"Each row: {C.MIN_ROUNDS}+ rounds in rotating order after a warm-up of each side; "
            "the ratio is the median of the per-round ratios (traced / untraced of one round) with "
            "their min–max; times are median (min–max) seconds of the whole pipeline call "
            "(prompt encoding + denoising, `output_type=\"latent\"`: no VAE decode). "
            "\"within noise\" when the spread covers 1.0; a target is hit only when the whole "
            "spread is at or below it. The CPU-time ratio is the same rounds' ratio of the "
            "process's CPU time (`time.process_time()`): with one torch thread it counts the work "
            "and leaves out the waits for a CPU that other processes hold, so on a loaded machine "
            "it is the steadier of the two (the wall-time ratio is the benchmark's figure)."]
    p = r.get("profile")
    if p:
        out += ["", f"### {r['label']}: where the traced time goes, narrow Flux", "",
                f"{p['what']}, {p['call']}: untraced {p['untraced_s']:.2f} s; one traced run "
                f"under cProfile {p['traced_under_cprofile_s']:.2f} s.", "",
                "cProfile, by own time:", "", "```", *p["cprofile_tottime"], "```", "",
                "cProfile, by cumulative time (sdlens / diffusers functions):", "", "```",
                *p["cprofile_cumulative"], "```", "",
                "torch.profiler, operators by self CPU time:", "", "```", *p["torch_ops"], "```",
                "", "torch.profiler, operators and their input shapes by self CPU time:", "",
                "```", *p.get("torch_ops_by_shape", []), "```"]
    return "\n".join(out) + "\n"


def _cpu(f: dict) -> str:
    c = f.get("cpu")
    return "–" if not c else f"{_x(c['median'])} ({c['min']:.3f}–{c['max']:.3f}), {_hit(c)}"


def _load(v) -> str:
    return "–" if not v else " / ".join(f"{x:.2f}" for x in v)


def _load1(v) -> str:
    return "–" if not v else f"{v[0]:.2f}"


def comparison_md(recs: list[dict]) -> str:
    """Side by side: one column per record, the ratio of every row."""
    if len(recs) < 2:
        return ""
    head = "| row | target | " + " | ".join(f"{r['label']} (`{r['checkout']['commit'][:8]}`)"
                                            for r in recs) + " |"
    out = ["## Side by side: traced / untraced, median (min–max)", "", head,
           "|---|---|" + "---|" * len(recs)]
    for key in ROWS:
        cells = []
        for r in recs:
            f = r["rows"].get(key)
            cells.append("–" if f is None or "error" in f else
                         f"{_x(f['median'])} ({f['min']:.3f}–{f['max']:.3f}), {_hit(f)}")
        if any(c != "–" for c in cells):
            out.append(f"| {key} | <= {TARGETS[key]:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def render(recs: list[dict]) -> str:
    """RESULTS-1024.md from the records (written by this script, never by hand)."""
    parts = ["# Recording overhead at 1024-px token counts (issue 29)", "",
             "Generated by `benchmarks/bench_1024.py` from `benchmarks/results/1024-*.json`; do "
             "not edit. See the script's docstring for the rows and the method.", ""]
    comp = comparison_md(recs)
    if comp:
        parts.append(comp)
    parts += [record_md(r) for r in recs]
    return "\n".join(parts)


def publish(directory: Path, markdown: Path) -> None:
    markdown.write_text(render(load_records(directory)))


# ====================================================================== main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default=None, help="the record's name: 1024-<label>.json")
    ap.add_argument("--only", nargs="+", choices=ROWS, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--profile", action="store_true", help="profile a traced narrow-Flux run")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script works")
    ap.add_argument("--out-dir", default=None, help="where the JSON and markdown go "
                    "(default: benchmarks/results/ and benchmarks/RESULTS-1024.md)")
    ap.add_argument("--publish", action="store_true", help="only rewrite the markdown")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir).resolve() if args.out_dir else RESULTS_DIR
    markdown = out_dir / "RESULTS-1024.md" if args.out_dir else MARKDOWN
    if args.publish:
        publish(out_dir, markdown)
        return 0
    label = args.label or ("smoke" if args.smoke else None)
    if not label:
        ap.error("--label is required (e.g. before / after)")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    s = C.make_settings("smoke" if args.smoke else "quick", "cpu")
    info = C.machine_info(s)
    t0 = time.monotonic()
    record = {"label": label, "checkout": checkout(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "generated_by": "python benchmarks/bench_1024.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "mode": s.mode, "machine": {k: info.get(k) for k in (
                  "cpu", "usable_cpus", "torch_threads", "python", "torch", "diffusers",
                  "transformers", "device", "dtype")},
              "load_start": C.loadavg(), "busy_start": C.busy_processes(), "rows": {},
              "targets": TARGETS, "min_rounds": C.MIN_ROUNDS}
    path = out_dir / f"{PREFIX}{label}.json"
    rows = args.only or list(ROWS)
    failed = False
    for i, row in enumerate(rows):
        try:
            record["rows"][row] = measure(row, s, args.smoke)
        except Exception as e:  # reported in its row; the others still run
            failed = True
            traceback.print_exc()
            record["rows"][row] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        last = i == len(rows) - 1 and not args.profile
        finish(record, path, markdown, t0, partial=not last)
    if args.profile:
        try:
            record["profile"] = profile_narrow_flux(args.smoke)
        except Exception as e:
            failed = True
            traceback.print_exc()
            record["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finish(record, path, markdown, t0, partial=False)
    print(f"wrote {path} and {markdown} ({(time.monotonic() - t0) / 60:.1f} min)")
    return 1 if failed else 0


def finish(record: dict, path: Path, markdown: Path, t0: float, partial: bool) -> None:
    cpus = record["machine"]["usable_cpus"] or 1
    record.update(partial=partial, minutes=(time.monotonic() - t0) / 60, load_end=C.loadavg(),
                  busy_end=C.busy_processes())
    record["loaded"] = (C.is_loaded(record["load_start"], cpus) or C.is_loaded(record["load_end"], cpus)
                        or any(f.get("loaded") for f in record["rows"].values()))
    write(path, record)
    publish(path.parent, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
