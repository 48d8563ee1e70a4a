"""Benchmark the TraceViewer: build time in the kernel and frame-switch latency in a real browser.

    python benchmarks/bench_widgets.py            # 50-step trace of the shipped model
    python benchmarks/bench_widgets.py --smoke    # 10 steps, tiny random pipeline, quick

1. **build**: seconds to construct ``TraceViewer(trace)`` (encode every frame and the word
   heatmaps of the default layer choice), median of ``--builds`` runs after a warm-up, and the bytes sent.
2. **frame switch** (browser): JupyterLab on localhost, Chromium via Playwright, a notebook that
   loads the saved trace and shows its viewer. For ``--switches`` slider changes (random steps,
   each different from the last) it measures, inside the page, the time from setting the slider
   and firing its ``input`` event until every panel's new image is decoded and the next animation
   frame has been painted (``img.decode()`` + ``requestAnimationFrame``). Target: median < 50 ms.

Without the shipped weights the full run uses a random-weight pipeline of the shipped model's
architecture (same latent size, layers and tokenizer), and says so. Results are printed and
written to ``benchmarks/_work/bench_widgets.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tests/browser.py: JupyterLab + Chromium drivers

PROMPT = "a red circle and a blue square"

SWITCH_JS = """
async ([n, seed]) => {
  const slider = document.querySelector('.sdl-slider');
  const imgs = [...document.querySelectorAll('.sdl-viewer .sdl-frame')]
      .filter((i) => i.dataset.panel !== 'image');
  const max = Number(slider.max);
  let s = seed;
  const rand = () => { s = (s * 1103515245 + 12345) % 2147483648; return s / 2147483648; };
  const times = [];
  for (let k = 0; k < n; k++) {
    let target = Number(slider.value);
    while (target === Number(slider.value)) target = Math.floor(rand() * (max + 1));
    const before = imgs.map((i) => i.src);
    const t0 = performance.now();
    slider.value = String(target);
    slider.dispatchEvent(new Event('input', { bubbles: true }));
    if (imgs.some((i, j) => i.src === before[j])) throw new Error('an image did not switch');
    await Promise.all(imgs.map((i) => i.decode()));
    await new Promise((r) => requestAnimationFrame(() => r()));
    times.push(performance.now() - t0);
    await new Promise((r) => setTimeout(r, 20));
  }
  return times;
}
"""


BASELINE_HTML = """<html><body><input type=range class=sdl-slider min=0 max=%(max)d value=0>
<div class=sdl-viewer>%(imgs)s</div><script>
const n = %(max)d + 1, panels = %(panels)d, urls = [];
function frame(seed) {  // a 64x64 noise PNG, like a latent-resolution frame
  const c = document.createElement('canvas'); c.width = c.height = 64;
  const g = c.getContext('2d'), d = g.createImageData(64, 64);
  for (let i = 0; i < d.data.length; i++) d.data[i] = (i * 2654435761 + seed * 97) %% 256;
  g.putImageData(d, 0, 0);
  return new Promise((r) => c.toBlob((b) => r(URL.createObjectURL(b)), 'image/png'));
}
window.ready = (async () => {
  for (let p = 0; p < panels; p++) { urls.push([]); for (let k = 0; k < n; k++) urls[p].push(await frame(p * 1000 + k)); }
  const slider = document.querySelector('.sdl-slider'), imgs = [...document.querySelectorAll('img')];
  const show = () => imgs.forEach((im, p) => { im.src = urls[p][Number(slider.value)]; });
  slider.addEventListener('input', show); show();
})();
</script></body></html>"""


def bench_baseline(b, steps: int, panels: int, switches: int) -> float:
    """The same measurement on a bare page (no JupyterLab, no widget): the browser's floor on
    this machine right now (CPU contention shows here too)."""
    page = b.new_page()
    imgs = "".join(f"<img class=sdl-frame data-panel=p{i} width=160>" for i in range(panels))
    page.set_content(BASELINE_HTML % {"max": steps - 1, "imgs": imgs, "panels": panels})
    page.evaluate("() => window.ready")
    page.evaluate(SWITCH_JS, [5, 7])
    times = page.evaluate(SWITCH_JS, [switches, 1])
    page.close()
    return statistics.median(times)


def make_trace(steps: int, smoke: bool):
    from sdlens.pipeline import SHIPPED_MODEL, load_pipeline
    from sdlens.engine.session import generate
    from sdlens.testing import random_pipeline

    if smoke:
        pipe, model = random_pipeline("sd15", scale=0.05), "random sd15 (scale 0.05)"
    elif (SHIPPED_MODEL / "model_index.json").exists():
        pipe, model = load_pipeline(), "shipped shapes model"
    else:
        pipe, model = random_pipeline("shapes"), "random-weight shapes architecture (weights missing)"
    t0 = time.perf_counter()
    tr = generate(pipe, PROMPT, seed=0, steps=steps)
    return tr, model, time.perf_counter() - t0


def bench_build(trace, builds: int) -> dict:
    from sdlens.widgets import TraceViewer

    TraceViewer(trace)  # warm-up (imports, caches), untimed
    times, v = [], None
    for _ in range(builds):
        t0 = time.perf_counter()
        v = TraceViewer(trace)
        times.append(time.perf_counter() - t0)
    return {"build_s_median": statistics.median(times), "build_s_all": times,
            "frames": sum(len(f) for f in v.frames.values()),
            "heatmap_frames": sum(len(h["steps"]) + 1 for h in v.heat.values()),
            "bytes_sent": v.frame_bytes(), "words": v.word_keys}


def bench_browser(trace_path: Path, switches: int) -> dict:
    from browser import JupyterLab, browser, find_chromium, open_and_run, write_notebook

    if find_chromium() is None:
        return {"browser": "skipped: no Chromium (apt-get install chromium)"}
    work = Path(tempfile.mkdtemp(prefix="sdlens-bench-"))
    write_notebook(work / "bench.ipynb", [
        "from sdlens.trace import load as load_trace\nfrom sdlens.widgets import TraceViewer",
        f"trace = load_trace({str(trace_path)!r})\nviewer = TraceViewer(trace)\nviewer",
    ])
    out = {}
    with JupyterLab(work) as lab, browser() as b:
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        t0 = time.perf_counter()
        open_and_run(page, lab.url("bench.ipynb"), wait_for=".sdl-viewer .sdl-frame[data-panel='x0']")
        out["notebook_to_viewer_s"] = time.perf_counter() - t0
        page.wait_for_function("() => [...document.querySelectorAll('.sdl-frame')].every(i => i.complete)")
        page.evaluate(SWITCH_JS, [5, 7])  # warm up
        times = page.evaluate(SWITCH_JS, [switches, 1])
        times.sort()
        out.update(switch_ms_median=statistics.median(times), switch_ms_p90=times[int(0.9 * (len(times) - 1))],
                   switch_ms_max=times[-1], switches=len(times))
        # the same with a word heatmap overlaid
        page.locator(".sdl-chip").nth(2).click()
        page.wait_for_selector(".sdl-overlay[data-panel='x0-overlay']", state="visible")
        times = sorted(page.evaluate(SWITCH_JS, [switches, 2]))
        out["switch_ms_median_with_heatmap"] = statistics.median(times)
        out["baseline_bare_page_ms_median"] = bench_baseline(
            b, int(page.locator(".sdl-slider").first.get_attribute("max")) + 1,
            page.locator(".sdl-viewer .sdl-frame").count() - 1, switches)
        shots = REPO / "benchmarks" / "_work"
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "bench_widgets.png"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="10 steps, a tiny random pipeline, few repeats")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 10 with --smoke)")
    ap.add_argument("--builds", type=int, default=None, help="TraceViewer builds to time after a warm-up (default 5)")
    ap.add_argument("--switches", type=int, default=None, help="slider changes to time (default 100)")
    ap.add_argument("--no-browser", action="store_true", help="only the build time")
    args = ap.parse_args(argv)
    steps = args.steps or (10 if args.smoke else 50)
    builds = args.builds or 5
    switches = args.switches or (20 if args.smoke else 100)

    trace, model, gen_s = make_trace(steps, args.smoke)
    res = {"model": model, "steps": len(trace.timesteps), "generate_s": gen_s,
           "python": platform.python_version(), "machine": platform.machine()}
    res.update(bench_build(trace, builds))
    print(f"model: {model}; {res['steps']} steps; traced in {gen_s:.1f} s")
    print(f"TraceViewer build: {res['build_s_median']:.2f} s (median of {builds}); "
          f"{res['frames']} step frames + {res['heatmap_frames']} heatmap frames, "
          f"{res['bytes_sent'] / 1e6:.2f} MB sent once")
    if not args.no_browser:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.sdlens"
            trace.save(path)
            res.update(bench_browser(path, switches))
        if "switch_ms_median" in res:
            ok = "OK" if res["switch_ms_median"] < 50 else "OVER TARGET"
            print(f"frame switch in the browser: median {res['switch_ms_median']:.1f} ms, "
                  f"p90 {res['switch_ms_p90']:.1f} ms, max {res['switch_ms_max']:.1f} ms over "
                  f"{res['switches']} slider changes (target < 50 ms: {ok}); with a heatmap "
                  f"overlaid: median {res['switch_ms_median_with_heatmap']:.1f} ms; the same "
                  f"switch on a bare page (browser floor now): {res['baseline_bare_page_ms_median']:.1f} ms")
        else:
            print(res.get("browser"))
    out = REPO / "benchmarks" / "_work"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_widgets.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
