"""Shared helpers for the sdlens benchmarks: settings per mode, pipelines, alternating timing,
peak-memory probes, machine description and markdown tables.

Every benchmark module has ``run(settings, ctx) -> dict`` (called by ``run.py``, which shares one
process and one pipeline cache between them) and a ``main()`` for running it alone. A result dict
is ``{"tables": [table, ...], "notes": [str, ...], "raw": {...}}`` and a table is
``{"title": str, "columns": [str], "rows": [[cell]], "notes": [str]}``.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
WORK = REPO / "benchmarks" / "_work"

import torch  # noqa: E402

PROMPT = "a red circle and a blue square on a white background"


# ====================================================================== settings
@dataclass
class Settings:
    """What a benchmark run uses (see :func:`make_settings`)."""

    mode: str                      # "smoke" | "quick" | "full"
    device: str                    # "cpu" | "cuda"
    dtype: torch.dtype
    height: int                    # SD 1.5 image size in pixels
    steps: int                     # SD 1.5 denoising steps
    guidance: float
    sd15_scale: float              # 1.0 = the full 859M-parameter UNet
    shipped_steps: int
    reps: int                      # timed rounds per side (at least MIN_ROUNDS)
    shipped_reps: int
    warmup: int
    prompt: str = PROMPT
    deadline: float | None = None  # time.monotonic() by which run.py wants to be done
    extra: dict = field(default_factory=dict)

    @property
    def smoke(self) -> bool:
        return self.mode == "smoke"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def describe(self) -> str:
        size = "full-size" if self.sd15_scale >= 1 else f"channel scale {self.sd15_scale}"
        return (f"SD 1.5 architecture ({size}, random weights) at {self.height} px, {self.steps} "
                f"steps, CFG {self.guidance}, {self.device}, {self.dtype_name}")


MIN_ROUNDS = 5        # timed rounds per side, every mode (quick mode is smaller in size, not rounds)
LOADED_PER_CPU = 0.5  # a load average above this x usable CPUs (start or end of a loop) = loaded


def make_settings(mode: str = "quick", device: str | None = None) -> Settings:
    """Settings for a mode: ``smoke`` (tiny, only checks the scripts work), ``quick`` (the full
    architectures at a smaller image size / fewer steps: ~10 minutes on 2 idle CPU cores) or ``full``
    (the full CPU setting, 256 px, 10 steps, more rounds). Every mode times >= MIN_ROUNDS rounds
    per side after a warm-up."""
    if mode not in ("smoke", "quick", "full"):
        raise ValueError(f"mode must be smoke, quick or full, got {mode!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if mode == "smoke":
        return Settings(mode, device, torch.float16 if cuda else torch.float32, height=64, steps=3,
                        guidance=7.5, sd15_scale=0.05, shipped_steps=3, reps=MIN_ROUNDS,
                        shipped_reps=MIN_ROUNDS, warmup=1)
    if cuda:  # the GPU settings: fp16, 512 px, 50 steps
        return Settings(mode, device, torch.float16, height=512, steps=50, guidance=7.5,
                        sd15_scale=1.0, shipped_steps=25, reps=MIN_ROUNDS if mode == "quick" else 9,
                        shipped_reps=7 if mode == "quick" else 15, warmup=1)
    if mode == "quick":
        # the full-size UNet at 128 px, 4 steps (PNDM: 5 UNet calls): 5 rounds x 3 sides fit in
        # minutes. On a shared 2-core machine (load average 4-8) run it with --threads 1: there
        # two torch threads made a 64 px 2-step SD 1.5 run take 17-24 s instead of 4.3 s, and a
        # 25-step shipped-model run 40-60 s instead of 0.8 s (threads waiting for each other)
        return Settings(mode, device, torch.float32, height=128, steps=4, guidance=7.5,
                        sd15_scale=1.0, shipped_steps=25, reps=MIN_ROUNDS, shipped_reps=MIN_ROUNDS,
                        warmup=1)
    return Settings(mode, device, torch.float32, height=256, steps=10, guidance=7.5, sd15_scale=1.0,
                    shipped_steps=25, reps=7, shipped_reps=15, warmup=1)


def add_common_args(ap) -> None:
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that it works")
    ap.add_argument("--quick", action="store_true", help="full architectures, few repeats (default)")
    ap.add_argument("--full", action="store_true", help="more repeats")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def settings_from_args(args) -> Settings:
    mode = "smoke" if args.smoke else "full" if getattr(args, "full", False) else "quick"
    return make_settings(mode, args.device)


# ====================================================================== pipelines
_PIPES: dict[tuple, Any] = {}


def sd15_pipeline(s: Settings):
    """The SD 1.5 architecture with random weights (full size unless smoke), cached."""
    from sdlens.testing import random_pipeline

    key = ("sd15", s.sd15_scale, s.height, s.device, s.dtype)
    if key not in _PIPES:
        t0 = time.perf_counter()
        cache = sd15_cache_dir(s)
        if not s.smoke and (cache / "model_index.json").exists():
            # the same seeded random weights, saved by an earlier run (bench_memory saves them)
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(cache, dtype=s.dtype).to(s.device)
            pipe.set_progress_bar_config(disable=True)
            s.extra["sd15_source"] = f"loaded from {cache.relative_to(REPO)} (saved by an earlier run)"
        else:
            pipe = random_pipeline("sd15", scale=s.sd15_scale, sample_size=s.height // 8,
                                   device=s.device, dtype=s.dtype)
            s.extra["sd15_source"] = "built with random_pipeline('sd15', scale=%s)" % s.sd15_scale
        _PIPES[key] = pipe
        s.extra["sd15_build_s"] = time.perf_counter() - t0
    return _PIPES[key]


def sd15_cache_dir(s: Settings) -> Path:
    """Where the SD 1.5 random pipeline is saved (fp32, CPU) for reuse by later processes."""
    import diffusers

    return WORK / f"sd15-random-scale{s.sd15_scale}-{s.height}px-diffusers{diffusers.__version__}"


def shipped_pipeline(s: Settings):
    """(pipe, label): the shipped model (``sdlens.load_pipeline()``) when its weights exist,
    else a random-weight pipeline of its architecture (said in the label)."""
    key = ("shipped", s.device, s.dtype)
    if key not in _PIPES:
        from sdlens.pipeline import SHIPPED_MODEL

        if (SHIPPED_MODEL / "model_index.json").exists():
            from sdlens.pipeline import load_pipeline

            pipe = load_pipeline(device=s.device, dtype=s.dtype)
            label = "shipped shapes model (sdlens.load_pipeline())"
        else:
            from sdlens.testing import random_pipeline

            pipe = random_pipeline("shapes", device=s.device, dtype=s.dtype)
            label = "shapes architecture, random weights (shipped weights not present yet)"
        pipe.set_progress_bar_config(disable=True)
        _PIPES[key] = (pipe, label)
    return _PIPES[key]


def shipped_size(pipe) -> int:
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return int(size) * int(getattr(pipe, "vae_scale_factor", 8))


def call_kwargs(s: Settings, steps: int | None = None, height: int | None = None,
                guidance: float | None = None) -> dict:
    """The pipeline call every side makes (same seed; latents out, the VAE decode is not timed:
    sdlens does not touch it, including it would only dilute the ratios)."""
    h = height or s.height
    return dict(prompt=s.prompt, num_inference_steps=steps or s.steps,
                guidance_scale=s.guidance if guidance is None else guidance, height=h, width=h,
                generator=torch.Generator("cpu").manual_seed(0), output_type="latent")


class StepClock:
    """Wall time of every denoising step of a side's calls, stamped by a ``callback_on_step_end``
    (sdlens composes its own callback with it, so both sides are stamped at the same point).

    ``wrap(kw)`` returns a kwargs factory that starts a new run and adds the callback. ``steps``:
    the intervals between consecutive step ends of each run, over all runs (s) — the first step,
    which follows prompt encoding, is left out. A run of N steps gives N - 1 samples, so a
    per-step median stays robust when a quick benchmark can afford one run per side."""

    def __init__(self, device: str = "cpu"):
        self.runs: list[list[float]] = []
        self.device = device

    def wrap(self, kw: Callable[[], dict]) -> Callable[[], dict]:
        def make() -> dict:
            stamps: list[float] = []
            self.runs.append(stamps)

            def stamp(pipe, step, timestep, callback_kwargs):
                sync(self.device)
                stamps.append(time.perf_counter())
                return callback_kwargs
            return dict(kw(), callback_on_step_end=stamp)
        return make

    @property
    def steps(self) -> list[float]:
        return [b - a for run in self.runs for a, b in zip(run, run[1:])]

    def run_step_medians(self) -> list[float]:
        """The median step time of each run (one per timed round)."""
        return [statistics.median([b - a for a, b in zip(run, run[1:])]) for run in self.runs
                if len(run) > 1]


def untraced(pipe, kw: Callable[[], dict]) -> Callable[[], Any]:
    def fn():
        return pipe(**kw())  # the pipeline's own no_grad, as users run it
    return fn


def traced(pipe, kw: Callable[[], dict], **options) -> Callable[[], Any]:
    from sdlens.engine.session import trace

    def fn():
        with trace(pipe, **options) as tr:
            pipe(**kw())
        return tr.runs[-1]
    return fn


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ====================================================================== memory probes
def _status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def rss_bytes() -> int | None:
    return _status().get("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    return _status().get("VmHWM")


# ====================================================================== timing
@dataclass
class Stats:
    times: list[float]
    peak_rss: list[int] = field(default_factory=list)     # run peak above the RSS at its start
    cuda_peak: list[int] = field(default_factory=list)    # max_memory_allocated above the start
    result: Any = None                                    # the last run's return value (if kept)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def to_dict(self) -> dict:
        d = {"median_s": self.median, "min_s": self.min, "max_s": self.max, "n": len(self.times),
             "times_s": self.times}
        if self.peak_rss:
            d["peak_rss_above_start_bytes"] = self.peak_rss
        if self.cuda_peak:
            d["cuda_peak_above_start_bytes"] = self.cuda_peak
        return d


class Rounds(dict):
    """``alternate``'s result: side name -> :class:`Stats` (``times[r]`` is round ``r``), plus the
    load average (1/5/15 min) just before the warm-up and just after the last round."""

    load_before: tuple | None = None
    load_after: tuple | None = None
    usable_cpus: int = 1

    @property
    def loaded(self) -> bool:
        return is_loaded(self.load_before, self.usable_cpus) or is_loaded(self.load_after,
                                                                           self.usable_cpus)

    def load_dict(self) -> dict:
        return {"load_before": self.load_before, "load_after": self.load_after,
                "loaded": self.loaded, "usable_cpus": self.usable_cpus}


def alternate(sides: dict[str, Callable[[], Any]], s: Settings, reps: int, warmup: int | None = None,
              keep: tuple[str, ...] = (), log: Callable[[str], None] | None = print) -> Rounds:
    """The benchmark method. Every side runs ``warmup`` times (untimed), then ``max(reps,
    MIN_ROUNDS)`` rounds in which every side runs once; the order rotates from round to round
    (A B C, B C A, C A B, ...) so that drifts in machine speed hit every side alike, and a ratio
    can be taken within each round (:func:`round_ratios`). No early stop: a loop that does not fit
    the time budget must be made smaller, not shorter. ``reps=0``: warm-up only.
    Each run also records its peak RSS above the RSS at its start (VmHWM reset per run) and, on
    CUDA, its peak allocated memory above the start. ``keep``: sides whose last result is kept.
    The load average is recorded before the warm-up and after the last round."""
    names = list(sides)
    warmup = s.warmup if warmup is None else warmup
    out = Rounds({n: Stats([]) for n in names})
    out.usable_cpus = usable_cpus()
    out.load_before = loadavg()
    for _ in range(warmup):
        for name in names:
            sides[name]()
            sync(s.device)
            gc.collect()
    rounds = 0 if reps <= 0 else max(reps, MIN_ROUNDS)
    cuda = s.device.startswith("cuda")
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            gc.collect()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                cuda0 = torch.cuda.memory_allocated()
            have_hwm = reset_peak_rss()
            rss0 = rss_bytes()
            t0 = time.perf_counter()
            res = sides[name]()
            sync(s.device)
            dt = time.perf_counter() - t0
            st = out[name]
            st.times.append(dt)
            if have_hwm and rss0 is not None:
                st.peak_rss.append(max(0, (peak_rss_bytes() or 0) - rss0))
            if cuda:
                st.cuda_peak.append(torch.cuda.max_memory_allocated() - cuda0)
            if name in keep:
                st.result = res
            del res
            if log:
                log(f"    round {r + 1}/{rounds} {name}: {dt:.3f} s")
    out.load_after = loadavg()
    return out


# ====================================================================== ratios and verdicts
def round_ratios(side: list[float], base: list[float]) -> list[float]:
    """Per-round ratios side / baseline (the two timed in the same round)."""
    if len(side) != len(base):
        raise ValueError(f"{len(side)} side times vs {len(base)} baseline times: not paired rounds")
    return [a / b for a, b in zip(side, base)]


def spread(ratios: list[float]) -> dict:
    """{'median', 'min', 'max', 'n'} of per-round ratios."""
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "n": len(ratios)}


def within_noise(sp: dict) -> bool:
    return sp["min"] <= 1.0 <= sp["max"]


def fmt_spread(sp: dict) -> str:
    return f"{sp['min']:.3f}–{sp['max']:.3f}"


def target_status(sp: dict, target: float | None, higher_is_better: bool = False) -> str | None:
    """'meets' when the whole spread is on the right side of ``target``, 'misses' when the whole
    spread is on the wrong side, else 'undecided' (the spread straddles it)."""
    if target is None:
        return None
    good = (lambda x: x >= target) if higher_is_better else (lambda x: x <= target)
    if good(sp["min"]) and good(sp["max"]):
        return "meets"
    if not good(sp["min"]) and not good(sp["max"]):
        return "misses"
    return "undecided"


def verdict(sp: dict, target: float | None = None, goal: float | None = None,
            higher_is_better: bool = False, what: str = "slower") -> str:
    """The words for a ratio: 'within noise (x–y)' when its spread covers 1.0 (never a win or a
    loss), else 'x% slower/faster (x–y)' (``what="speedup"``: 'faster/slower (x–y)'); then where
    it stands against the target (and goal)."""
    if within_noise(sp):
        words = f"within noise ({fmt_spread(sp)})"
    else:
        m = sp["median"]
        if what == "slower":  # side time / baseline time
            words = (f"{m - 1:.1%} slower" if m > 1 else f"{1 - m:.1%} faster") + f" ({fmt_spread(sp)})"
        else:  # a speed-up: baseline time / side time
            words = ("faster" if m > 1 else "slower") + f" ({fmt_spread(sp)})"
    cmp = ">=" if higher_is_better else "<="
    for name, value in (("target", target), ("goal", goal)):
        st = target_status(sp, value, higher_is_better)
        if st == "meets":
            words += f"; meets the {name} {cmp} {value:.2f}x"
        elif st == "misses":
            words += f"; MISSES the {name} {cmp} {value:.2f}x"
        elif st == "undecided":
            words += f"; the {name} {cmp} {value:.2f}x is within the spread (not resolved)"
    return words


def figure(label: str, ratios: list[float], target: float | None = None, goal: float | None = None,
           higher_is_better: bool = False, what: str = "slower", rounds: "Rounds | None" = None,
           **extra) -> dict:
    """One published ratio, for ``results.json``: median / spread of per-round ratios, the
    verdict, its target (and goal) and their status, the loop's load."""
    sp = spread(ratios)
    d = {"label": label, "kind": "ratio", **sp, "ratios": [round(x, 4) for x in ratios],
         "within_noise": within_noise(sp), "verdict": verdict(sp, target, goal, higher_is_better, what),
         "target": target, "target_status": target_status(sp, target, higher_is_better),
         "goal": goal, "goal_status": target_status(sp, goal, higher_is_better),
         "higher_is_better": higher_is_better}
    if rounds is not None:
        d.update(rounds.load_dict())
    d.update(extra)
    return d


def value_figure(label: str, values: list[float] | float, unit: str, target: float | None = None,
                 target_text: str | None = None, higher_is_better: bool = False,
                 rounds: "Rounds | None" = None, **extra) -> dict:
    """One published absolute figure (seconds, bytes, a fraction): median / min / max of its
    values and whether the median meets ``target`` (``target_text`` says the target in words)."""
    vals = values if isinstance(values, list) else [values]
    med = statistics.median(vals)
    status = None
    if target is not None:
        ok = med >= target if higher_is_better else med <= target
        status = "meets" if ok else "misses"
    d = {"label": label, "kind": "value", "unit": unit, "median": med, "min": min(vals),
         "max": max(vals), "n": len(vals), "target": target, "target_text": target_text,
         "target_status": status}
    if rounds is not None:
        d.update(rounds.load_dict())
    d.update(extra)
    return d


def load_note(rounds: Rounds) -> str:
    """The loop's load, for a table's notes."""
    lb, la = rounds.load_before, rounds.load_after
    s = (f"Load average (1 min) {lb[0]:.2f} before this loop, {la[0]:.2f} after"
         if lb and la else "Load average not available")
    if rounds.loaded:
        s += (f": **LOADED machine** (above {LOADED_PER_CPU} x {rounds.usable_cpus} usable CPUs); "
              "other processes share the CPUs, so the spreads are wider than on an idle machine.")
    else:
        s += "."
    return s


# ====================================================================== formatting
def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}x"


def time_row(label: str, st: Stats, base: Stats | None, target: float | None = None,
             goal: float | None = None) -> list[str]:
    """[side, median, min, max, runs, ratio (median of per-round ratios, min–max), verdict]."""
    cells = [label, fmt_s(st.median), fmt_s(st.min), fmt_s(st.max), str(len(st.times))]
    if base is None or st is base:
        return cells + ["1 (baseline)", ""]
    sp = spread(round_ratios(st.times, base.times))
    return cells + [f"{fmt_ratio(sp['median'])} ({fmt_spread(sp)})", verdict(sp, target, goal)]


TIME_COLUMNS = ["side", "median", "min", "max", "runs",
                "ratio: median of per-round ratios (min–max)", "verdict"]


def table(title: str, columns: list[str], rows: list[list], notes: list[str] | None = None) -> dict:
    return {"title": title, "columns": columns, "rows": [[str(c) for c in r] for r in rows],
            "notes": list(notes or [])}


def markdown_table(t: dict | str) -> str:
    if isinstance(t, str):  # already markdown (a separately measured table, included as written)
        return t
    cols = t["columns"]
    lines = [f"#### {t['title']}", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in t["rows"]:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in r]
        cells += [""] * (len(cols) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in t.get("notes", []):
        lines.append(f"- {n}")
    if t.get("notes"):
        lines.append("")
    return "\n".join(lines)


def result_markdown(res: dict) -> str:
    parts = [markdown_table(t) for t in res.get("tables", [])]
    if res.get("notes"):
        parts.append("\n".join(f"- {n}" for n in res["notes"]) + "\n")
    return "\n".join(parts)


# ====================================================================== machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(s: Settings | None = None) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(), "memory_bytes": mem,
        "gpu": gpu or "none (CUDA not available)", "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": _version("diffusers"),
        "transformers": _version("transformers"), "safetensors": _version("safetensors"),
        "os": platform.platform(),
    }
    if s is not None:
        info.update(device=s.device, dtype=s.dtype_name, mode=s.mode)
    return info


def busy_processes(limit: int = 8) -> list[str]:
    """Other processes using the CPU now (``ps``; our own process tree left out)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,etime,args", "--sort=-pcpu"],
                             capture_output=True, text=True, timeout=10).stdout.splitlines()[1:]
    except Exception:
        return []
    mine = {os.getpid(), os.getppid()}
    rows = []
    for line in out:
        parts = line.split(None, 4)
        if len(parts) < 5:
            continue
        pid, ppid, pcpu = int(parts[0]), int(parts[1]), float(parts[2])
        if pid in mine or ppid == os.getpid() or pcpu < 5 or parts[4].startswith("ps "):
            continue
        rows.append(f"pid {pid} {pcpu:.0f}% cpu: {parts[4][:100]}")
        if len(rows) >= limit:
            break
    return rows


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def is_loaded(load, cpus: int) -> bool:
    """A load average (1 min) above LOADED_PER_CPU x usable CPUs: other work shares the machine."""
    return bool(load) and load[0] > LOADED_PER_CPU * max(1, cpus)


def loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


def standalone(run: Callable, argv=None, doc: str = "") -> int:
    """``main()`` of a benchmark module: parse the common flags, run, print markdown."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    s = settings_from_args(args)
    info = machine_info(s)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    res = run(s, {})
    print(result_markdown(res))
    return 0
