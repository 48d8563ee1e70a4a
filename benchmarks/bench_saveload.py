"""Benchmark 7: writing and opening a 1 GB trace (quick mode: 256 MB); opening must be lazy.

    python benchmarks/bench_saveload.py [--smoke | --quick | --full]

The trace is a real run: the SD 1.5 layout (channel scale 0.05, every attention layer's 8 heads
and resolutions kept) at 256 px with heads kept and all 77 token positions, for as many steps as
sdlens's size estimate needs to reach ~1 GiB (smoke: ~5 MB). Then:

- **write**: ``trace.save(path)`` (atomic temp file + rename), and the ``fsync`` after it;
- **open, cold** (the file evicted from the page cache with ``posix_fadvise(DONTNEED)``):
  ``sdlens.load(path)`` (lazy: reads the header) vs reading everything eagerly with
  ``safetensors.torch.load_file``; for the lazy side also the first tensor access
  (``trace.latents``; then the largest attention layer) and reading every tensor;
- the RSS growth of opening (lazy: should be ~0).
Sides alternate; each is repeated.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402


def evict(path: Path) -> bool:
    """Drop the file's pages from the page cache (cold read next time)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def make_trace(s: C.Settings, target_bytes: int):
    from sdlens.engine.options import RecordOptions, estimate_trace_bytes
    from sdlens.engine.session import generate
    from sdlens.testing import random_pipeline

    # 256 px: a 1 GB trace takes ~4x more steps than at 512 px but a third of the time to make
    # (self-attention over 32x32 latents is 16x cheaper than over 64x64)
    size = 64 if s.smoke else 256
    pipe = random_pipeline("sd15", scale=0.05, sample_size=size // 8)
    opts = RecordOptions(heads=True, keep_padding=True)
    per_step = sum(estimate_trace_bytes(pipe, steps=1, latent_hw=(size // 8, size // 8),
                                        n_tokens=77, options=opts).values())
    steps = max(2, min(400, round(target_bytes / per_step)))
    t0 = time.perf_counter()
    tr = generate(pipe, s.prompt, seed=0, steps=steps, options=opts, output_type="latent")
    gen_s = time.perf_counter() - t0
    del pipe
    return tr, steps, gen_s, size


def run(s: C.Settings, ctx: dict) -> dict:
    import bench_recording
    import safetensors.torch

    from sdlens.trace import load

    # quick: a quarter-GB trace (making a 1 GB one takes minutes on a shared 2-core machine)
    target = (5 << 20) if s.smoke else (256 << 20) if s.mode == "quick" else (1 << 30)
    tr, steps, gen_s, size = make_trace(s, target)
    nbytes = sum(bench_recording.trace_nbytes(tr).values())
    print(f"  save/load: trace of {C.fmt_bytes(nbytes)} ({steps} steps at {size} px) made in {gen_s:.1f} s")
    reps = C.MIN_ROUNDS if s.mode != "full" else 7
    tmpdir = Path(ctx.get("tmp") or tempfile.gettempdir())
    d = Path(tempfile.mkdtemp(prefix="sdlens-bench-saveload-", dir=tmpdir))
    path = d / "big.sdlens"
    save_t, fsync_t = [], []
    lazy = {"open": [], "first": [], "first_att": [], "all": [], "rss_open": []}
    eager, cold_ok = [], True
    try:
        for r in range(reps):
            t0 = time.perf_counter()
            tr.save(path)
            save_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            fsync_t.append(time.perf_counter() - t0)
        file_bytes = path.stat().st_size
        del tr
        gc.collect()
        load_before = C.loadavg()
        # warm-up of each side (untimed), then rounds in alternating order
        evict(path)
        load(path).latents
        evict(path)
        safetensors.torch.load_file(str(path))
        for r in range(reps):
            for side in (("lazy", "eager") if r % 2 == 0 else ("eager", "lazy")):
                cold_ok &= evict(path)
                gc.collect()
                if side == "lazy":
                    rss0 = C.rss_bytes() or 0
                    t0 = time.perf_counter()
                    t = load(path)
                    t1 = time.perf_counter()
                    lazy["rss_open"].append((C.rss_bytes() or 0) - rss0)
                    _ = t.latents
                    t2 = time.perf_counter()
                    att = t.attention
                    big = max(att.layers, key=lambda l: att.resolution(l)[0] * att.resolution(l)[1])
                    _ = att[big]
                    t3 = time.perf_counter()
                    for name in ("timesteps", "sigmas", "noise_uncond", "noise_text", "noise", "x0"):
                        getattr(t, name)
                    for l in att.layers:
                        _ = att[l]
                    t4 = time.perf_counter()
                    lazy["open"].append(t1 - t0)
                    lazy["first"].append(t2 - t1)
                    lazy["first_att"].append(t3 - t2)
                    lazy["all"].append(t4 - t0)
                    del t, att, _
                else:
                    t0 = time.perf_counter()
                    full = safetensors.torch.load_file(str(path))
                    eager.append(time.perf_counter() - t0)
                    del full
        load_after = C.loadavg()
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()

    def cell(xs):
        return f"{C.fmt_s(statistics.median(xs))} (min {C.fmt_s(min(xs))}, max {C.fmt_s(max(xs))})"

    cold = "cold (file evicted from the page cache)" if cold_ok else "page cache NOT evicted"
    rounds = C.Rounds()
    rounds.load_before, rounds.load_after, rounds.usable_cpus = load_before, load_after, C.usable_cpus()
    open_ratio = C.figure(f"lazy open / eager read of a {C.fmt_bytes(nbytes)} trace (cold)",
                          C.round_ratios(lazy["open"], eager), rounds=rounds)
    all_ratio = C.figure("lazy open + read every tensor / eager read (cold)",
                         C.round_ratios(lazy["all"], eager), rounds=rounds)
    ratio = open_ratio["median"]
    rows = [
        ["write: trace.save(path)", cell(save_t), f"{file_bytes / save_t[0] / 2**20:.0f} MiB/s (first)"],
        ["fsync after save", cell(fsync_t), ""],
        [f"open: sdlens.load(path), {cold}", cell(lazy["open"]),
         f"RSS +{C.fmt_bytes(statistics.median(lazy['rss_open']))}; {ratio:.4f}x the eager read "
         f"(median of per-round ratios): {open_ratio['verdict']}"],
        ["first tensor access: trace.latents", cell(lazy["first"]), ""],
        [f"first attention layer ({big})", cell(lazy["first_att"]), ""],
        ["open + read every tensor (lazy, one by one)", cell(lazy["all"]),
         f"{C.fmt_ratio(all_ratio['median'])} the eager read: {all_ratio['verdict']}"],
        [f"eager: safetensors.torch.load_file(path), {cold}", cell(eager), "1 (baseline)"],
    ]
    notes = [f"Trace: {C.fmt_bytes(nbytes)} of tensors ({C.fmt_bytes(file_bytes)} on disk), a real "
             f"{steps}-step run at {size} px with heads kept and all 77 tokens "
             f"(SD 1.5 layout, scale 0.05; generated in {gen_s:.0f} s, not timed here).",
             f"{reps} rounds per side after a warm-up of each, sides alternating (saves: {reps} "
             f"in a row). Disk: the filesystem of {tmpdir}.", C.load_note(rounds),
             "Open is lazy: it reads the safetensors header and the JSON metadata only; each "
             "tensor is read on first access."]
    return {"tables": [C.table(f"7. Save / load of a {C.fmt_bytes(nbytes)} trace", ["operation", "median (min, max)",
                                                                   "note"], rows, notes)],
            "raw": {"bytes": nbytes, "file_bytes": file_bytes, "steps": steps, "save_s": save_t,
                    "fsync_s": fsync_t, "lazy": lazy, "eager_s": eager, "cold": cold_ok,
                    "figures": {
                        "saveload_open_s": C.value_figure(
                            f"sdlens.load of a {C.fmt_bytes(nbytes)} trace (lazy, cold)",
                            lazy["open"], "s", rounds=rounds, bytes=nbytes),
                        "saveload_save_s": C.value_figure(
                            f"trace.save of a {C.fmt_bytes(nbytes)} trace", save_t, "s",
                            rounds=rounds, bytes=nbytes),
                        "saveload_open_vs_eager": open_ratio,
                        "saveload_all_vs_eager": all_ratio}}}


def main(argv=None) -> int:
    return C.standalone(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
