"""Write README.md's benchmark paragraph from ``benchmarks/results.json`` (the one source of every
published benchmark figure).

    python benchmarks/publish.py            # rewrite the text between the README's markers
    python benchmarks/publish.py --check    # exit 1 when the README differs from the results file

``run.py`` writes ``benchmarks/results.json`` next to ``RESULTS.md`` (every figure with its median,
spread, verdict and target) and then calls :func:`update_readme`; ``tests/test_benchmarks.py``
fails when the README's paragraph is not what :func:`paragraph` makes of the committed file.
Nothing here is typed by hand: hits and misses, with their targets, both come from the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
RESULTS = HERE / "results.json"
BEGIN = "<!-- benchmarks:begin -->"
END = "<!-- benchmarks:end -->"


def _x(v: float) -> str:
    return f"{v:.3f}x"


def _ratio(f: dict) -> str:
    """A ratio figure in words: the median and its verdict (which carries the spread and, when it
    covers 1.0, says "within noise"; and where it stands against its target and goal)."""
    return f"**{_x(f['median'])}** ({f['verdict']})"


def _value(f: dict) -> str:
    unit = f["unit"]
    v = f["median"]
    text = {"s": f"{v:.2f} s" if v >= 1 else f"{v * 1e3:.1f} ms", "ms": f"{v:.1f} ms",
            "fraction": f"{v:.1%}", "MB": f"{v:.1f} MB"}.get(unit, f"{v:g} {unit}")
    if f.get("target_text"):
        met = "met" if f["target_status"] == "meets" else "**MISSED**"
        text += f" (target {f['target_text']}: {met})"
    return text


def paragraph(r: dict) -> str:
    """The README's benchmark text (markdown) for a results file's content ``r``."""
    F = r["figures"]
    m = r["machine"]
    st = r["settings"]
    lines = []
    load = r.get("load_start"), r.get("load_end")
    loaded = ""
    if r.get("loaded"):
        loaded = (f" **on a loaded machine** (load average {load[0][0]:.2f} at the start, "
                  f"{load[1][0]:.2f} at the end, above {r['loaded_threshold']:g}: other work "
                  "shared the CPUs, so the spreads are wide)") if load[0] and load[1] else \
            " **on a loaded machine**"
    fewer = {k: v["n"] for k, v in r["figures"].items()
             if isinstance(v, dict) and isinstance(v.get("n"), int) and v.get("kind") == "ratio"
             and v["n"] < st["min_rounds"]}  # the grid benchmark runs at least 3
    except_ = ("; fewer for " + ", ".join(f"`{k}` ({n} rounds)" for k, n in sorted(fewer.items()))
               if fewer else "")
    lines.append(
        f"`python benchmarks/run.py --quick` runs every benchmark (a warm-up per side, then at "
        f"least {st['min_rounds']} rounds in rotating order{except_}) and rewrites "
        "[`benchmarks/RESULTS.md`](benchmarks/RESULTS.md) and "
        "[`benchmarks/results.json`](benchmarks/results.json); `benchmarks/publish.py` writes "
        "this paragraph from the latter. A ratio is the median of the per-round ratios (side / "
        "baseline in the same round) with their min–max; where that spread covers 1.0 it is "
        "\"within noise\", neither a win nor a loss; a target is met only when the whole spread "
        f"meets it. Last run: {r['date']}, `{r['generated_by']}` ({r['mode']} mode, "
        f"{r['minutes']:.1f} min), {m['cpu']} with {m['usable_cpus']} usable CPUs, "
        f"{m['device']} / {m['dtype']}{loaded}:")
    lines.append("")
    sd = F.get("overhead_sd15")
    if sd:
        lines.append(f"- **Overhead**, {st['sd15']}, default recording / untraced: "
                     f"{_ratio(sd)} per run"
                     + (f"; per denoising step {_ratio(F['overhead_sd15_per_step'])}"
                        if "overhead_sd15_per_step" in F else "") + ".")
    if "daam_method_sd15" in F:
        lines.append(f"- **DAAM's method** (classic attention on every attn2, summed) in the same "
                     f"loop: {_ratio(F['daam_method_sd15'])} untraced"
                     + (f"; sdlens / DAAM's method {_ratio(F['sdlens_vs_daam_method_sd15'])}"
                        if "sdlens_vs_daam_method_sd15" in F else "") + ".")
    if "daam_heatmap_corr" in F:
        f = F["daam_heatmap_corr"]
        lines.append(f"- **`pooling=\"daam\"` against DAAM 0.2.0 itself** (the same saved "
                     f"**random-weight** SD 1.5 pipeline in both venvs: near-flat maps, so this "
                     f"checks the method, not what maps mean; 512 px, {f['steps']} steps): Pearson correlation of "
                     f"the word heatmaps, min over {f['words']} words, **{f['median']:.4f}** "
                     f"(target >= {f['target']:g}: "
                     + ("met" if f["target_status"] == "meets" else "**MISSED**") + ").")
    for key in sorted(k for k in F if k.startswith("daam_0_2_0_")):
        lines.append(f"- **DAAM 0.2.0 itself** ({F[key]['label']}): {_ratio(F[key])}.")
    nr = (r.get("not_rerun") or {}).get("daam_0_2_0")
    if nr and nr.get("runs"):
        runs = "; ".join(f"{x['ratio']:.3f}x at {x['size']} px, {x['steps']} steps, "
                         f"{x['n']} run per side" for x in nr["runs"])
        lines.append(f"- **DAAM 0.2.0 itself** (its own venv): not re-run ({nr['why']}); its last "
                     f"run, {nr['date']}, {nr['method']}: {runs}.")
    if "overhead_shipped" in F:
        lines.append(f"- **Shipped model** ({st['shipped_steps']} steps): recording overhead "
                     f"{_ratio(F['overhead_shipped'])}.")
    for key, name in (("overhead_sd3", "SD3"), ("overhead_flux", "Flux.1")):
        if key in F:
            lines.append(f"- **Overhead on {name}** ({F[key]['label'].rsplit(': ', 1)[0]}): "
                         f"{_ratio(F[key])}.")
    if "flux_trace_mb" in F:
        lines.append(f"- **A default Flux.1-dev trace** (1024 px, 28 steps, estimated: the full "
                     f"transformer does not fit the machine): {_value(F['flux_trace_mb'])}; the "
                     f"estimate's worst error on real test-bed traces "
                     f"{_value(F['flux_estimate_error'])}.")
    for key, why in (r.get("not_run") or {}).items():
        lines.append(f"- Not run here: `{key}` ({why}).")
    gens = [k for k in ("generation_shipped", "generation_shipped_1thread") if k in F]
    if gens:
        lines.append(f"- **The shipped model's {st['shipped_steps']}-step generation** (untraced, "
                     "median): " + ", ".join(f"{_value(F[k])} with "
                                             f"{F[k]['label'].rsplit(', ', 1)[-1].rstrip(')')}"
                                             for k in gens) + ".")
    if "estimate_error" in F:
        lines.append(f"- **Trace-size estimate**, worst error against real traces: "
                     f"{_value(F['estimate_error'])}.")
    if "default_trace_mb" in F:
        lines.append(f"- **A default SD 1.5 trace** (512 px, 50 steps): "
                     f"{_value(F['default_trace_mb'])}.")
    for key in ("grid_shipped", "grid_sd15"):
        if key in F:
            g = F[key]
            eq = "equal" if g["images_equal"] else "**NOT equal**"
            lines.append(f"- **A 4 x 4 seed x CFG grid**, {g['label'].split(',')[0]} ({g['size']} px, "
                         f"{g['steps']} steps): speed-up of one batched sweep over 16 sequential "
                         f"calls {_ratio(g)}; the two ways' images "
                         f"{eq} within {g['tolerance']:.1e} (max difference {g['max_abs_diff']:.1e}).")
    g15 = (r.get("not_rerun") or {}).get("grid_sd15")
    if g15 and g15.get("rows"):
        row = g15["rows"][0]
        lines.append(f"- Full-size SD 1.5 grid ({row['size']}, {row['steps']} steps, CPU): "
                     f"{row['speedup']:.2f}x, not re-run (earlier run {g15['date']}, "
                     f"{g15['method']}; `{g15['source']}`).")
    if "frame_switch_ms" in F:
        lines.append(f"- **Browser frame switch** on a 50-step trace: {_value(F['frame_switch_ms'])}.")
    if "saveload_open_s" in F:
        size = F["saveload_open_s"].get("bytes")
        size = f"{size / 2**20:.0f} MiB" if size else "large"
        lines.append(f"- **A {size} trace** opens lazily in {_value(F['saveload_open_s'])}"
                     + (f" (lazy open / eager read {_ratio(F['saveload_open_vs_eager'])})"
                        if "saveload_open_vs_eager" in F else "") + ".")
    if r.get("failed"):
        lines.append(f"- **Failed in this run**: {', '.join(r['failed'])}.")
    g = r.get("gpu")
    if g:
        parts = []
        if "overhead_sd15_per_step" in g:
            parts.append(f"tracing full-size SD 1.5 (float16, 512 px, 50 steps) cost "
                         f"{_x(g['overhead_sd15_per_step'])} per denoising step, "
                         f"{_x(g['overhead_sd15'])} the whole run ({g['runs_per_side']} runs per "
                         "side)")
        if "daam_method_per_step" in g:
            parts.append(f"DAAM's method {_x(g['daam_method_per_step'])} per step, "
                         f"{_x(g['daam_method'])} the whole run (cheaper than sdlens there)")
        if "overhead_shipped" in g:
            parts.append(f"the shipped model's recording {_x(g['overhead_shipped'])} (above the "
                         "CPU target of 1.10x)")
        if "generation_shipped" in g:
            parts.append(f"its 25-step generation {g['generation_shipped']}")
        if "cuda_peak_rise_mib" in g:
            parts.append(f"the CUDA peak memory rose by {g['cuda_peak_rise_mib']:g} MiB "
                         f"(`{g['memory_source']}`)")
        grid = g.get("grid")
        if grid and grid.get("rows"):
            parts.append("a 4 x 4 grid ran " + " and ".join(
                f"{x['speedup']:.2f}x faster batched ({x['name']})" for x in grid["rows"])
                + f" ({grid['repeats']} repeats, `{grid['source']}`)")
        lines.append(f"- **Earlier GPU run, old method** ({g['gpu']}, {g['date']}, "
                     f"[`{g['source']}`]({g['source']}); not re-measured, no per-round spread): "
                     + "; ".join(parts) + ".")
    lines.append("")
    lines.append("`tests/engine/test_cuda.py` checks on a GPU that a traced image equals the untraced "
                 "one in fp32 and fp16 (it is skipped where there is no CUDA).")
    return "\n".join(lines)


def render(readme_text: str, r: dict) -> str:
    """``readme_text`` with the text between the markers replaced by :func:`paragraph`."""
    if BEGIN not in readme_text or END not in readme_text:
        raise ValueError(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = readme_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{paragraph(r)}\n{END}{tail}"


def load_results(path: Path = RESULTS) -> dict:
    return json.loads(path.read_text())


def update_readme(r: dict | None = None, readme: Path = README) -> bool:
    """Rewrite the README's benchmark paragraph; True when it changed."""
    r = load_results() if r is None else r
    old = readme.read_text()
    new = render(old, r)
    if new != old:
        readme.write_text(new)
    return new != old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md is out of date")
    args = ap.parse_args(argv)
    r = load_results()
    if args.check:
        same = README.read_text() == render(README.read_text(), r)
        print("README.md matches benchmarks/results.json" if same else
              "README.md differs from benchmarks/results.json: run python benchmarks/publish.py")
        return 0 if same else 1
    print("README.md " + ("updated" if update_readme(r) else "already up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
