"""Compact traces (issue 29, item 6): the error of each way of storing the maps, against float32
maps of the same run, and what each makes of a default Flux.1-dev trace.

    python benchmarks/bench_compact.py            # writes benchmarks/RESULTS-compact.md (+ .json)

For each test bed (``random_pipeline("flux")``, ``"sd3"``, ``"sd15"``) and the shipped model
(``sdlens.load_pipeline()``), one traced run with ``attention_dtype=torch.float32``; every other
storage is what the recorder would keep of the same float32 maps (``store_maps``, exactly as it
is called on them), read back as ``trace.attention`` reads it:

* ``uint4`` / ``uint8``: 4-bit / 8-bit codes with each map's peak as its scale (the default
  ``"auto"`` takes 8-bit codes while the trace fits 200 MB, 4-bit beyond: the Flux.1-dev row); ``float16``: the maps in float16 (the old default);
* ``uint8, every 2nd step`` / ``every 3rd step``: the other way to shrink (a default step
  subset): its maps are exact at the kept steps, so its error is that of the word heatmaps, which
  pool all recorded steps.

Errors: the largest absolute error of any map value; the same relative to its map's peak; the
largest absolute error of ``trace.heatmap(word)`` (min-max normalised to [0, 1], the default)
over the prompt's words. ``x0`` in float16 was considered too (its error: the largest absolute
error over the run, and relative to the largest |x0|). Sizes: ``estimate_trace_bytes`` of the
full-size Flux.1-dev transformer built on the meta device (1024 px, 28 steps, 57 blocks, no CFG,
32 text tokens as in benchmark 1b), for each storage.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROMPT = "a red circle and a blue square on a white background"
SHIPPED_PROMPT = "a red circle and a blue square"
STORAGES = ("uint4", "uint8", "float16", "uint8, every 2nd step", "uint8, every 3rd step")


def _stored(maps: torch.Tensor, storage: str) -> tuple[torch.Tensor, int]:
    """``maps`` (S, B, T, h, w) float32 as ``storage`` keeps and reads them, and the step stride."""
    from sdlens.trace.compact import decoded, store_maps

    stride = 3 if "3rd" in storage else 2 if "2nd" in storage else 1
    dtype = getattr(torch, storage.split(",")[0])
    m = maps[::stride]
    kept = store_maps(m.flatten(-2), dtype)
    return decoded(kept).float().reshape(m.shape), stride


def measure(name: str, pipe, prompt: str, steps: int) -> dict:
    import sdlens
    from sdlens.trace.ops import replace

    t0 = time.perf_counter()
    with sdlens.trace(pipe, attention_dtype=torch.float32) as tr:
        pipe(prompt, num_inference_steps=steps, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    t = tr.runs[-1]
    att = t.attention
    words = [w for w in prompt.split() if w.isalpha()]
    ref = {w: t.heatmap(w) for w in words}
    rows = {}
    for storage in STORAGES:
        maps, stride = {}, 1
        err = rel = 0.0
        for layer in att.layers:
            m = att[layer]
            maps[layer], stride = _stored(m, storage)
            r = m[::stride]
            d = (maps[layer] - r).abs()
            err = max(err, float(d.max()))
            peak = r.amax(dim=(-2, -1), keepdim=True)
            rel = max(rel, float((d / peak.clamp_min(1e-30)).max()))
        new = replace(t, attention=att.like(maps, steps=att.steps[::stride]))
        heat = max(float((new.heatmap(w) - ref[w]).abs().max()) for w in words)
        rows[storage] = {"map_abs": err, "map_rel_peak": rel, "heatmap_abs": heat}
    x0 = t.x0
    x0_err = float((x0.half().float() - x0).abs().max())
    return {"name": name, "sites": len(att.layers), "steps": len(att.steps),
            "tokens": len(att.token_positions), "words": words,
            "map_peak": max(float(att[l].max()) for l in att.layers), "rows": rows,
            "x0_fp16_abs": x0_err, "x0_abs_max": float(x0.abs().max()),
            "seconds": time.perf_counter() - t0}


def flux_dev_sizes() -> dict:
    """The default Flux.1-dev trace for each storage (MB), from the full transformer's config
    on the meta device, as benchmark 1b computes it."""
    import diffusers

    from sdlens.engine.options import RecordOptions, estimate_trace_bytes
    from sdlens.testing import random_pipeline

    pipe = random_pipeline("flux")
    cfg = pipe.transformer.config
    with torch.device("meta"):
        full = diffusers.FluxTransformer2DModel(
            guidance_embeds=True, in_channels=cfg.in_channels,
            joint_attention_dim=cfg.joint_attention_dim,
            pooled_projection_dim=cfg.pooled_projection_dim)
    pipe.register_modules(transformer=full)
    vsf = int(pipe.vae_scale_factor)
    out = {}
    for storage in STORAGES:
        dtype = getattr(torch, storage.split(",")[0])
        stride = 3 if "3rd" in storage else 2 if "2nd" in storage else 1
        est = estimate_trace_bytes(
            pipe, num_inference_steps=28, do_cfg=False, latent_hw=(1024 // vsf, 1024 // vsf),
            n_tokens=32, options=RecordOptions(attention_dtype=dtype,
                                               steps=slice(None, None, stride)))
        out[storage] = {"total_mb": sum(est.values()) / 1e6,
                        "parts_mb": {k: v / 1e6 for k, v in est.items()},
                        "storage": est.storage}
    return out


def markdown(beds: list[dict], sizes: dict) -> str:
    out = ["# Compact traces: map storage error vs float32, and the default Flux.1-dev trace", "",
           "Written by `python benchmarks/bench_compact.py` "
           f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
           "CPU). See the script's docstring for the method.", "",
           "## Default Flux.1-dev trace (1024 px, 28 steps, 57 blocks, 32 text tokens, no CFG)",
           "", "| maps stored as | total | maps | latents | noise (+ noise_text) | x0 |",
           "|---|---|---|---|---|---|"]
    for storage, v in sizes.items():
        p = v["parts_mb"]
        out.append(f"| {storage} | **{v['total_mb']:.1f} MB** | {p['attention']:.1f} MB | "
                   f"{p['latents']:.1f} MB | {p['noise']:.1f} MB | {p['x0']:.1f} MB |")
    out += ["", "(noise: `noise_text` is the same tensor as `noise` without CFG, held and written "
            "once; before this change both were stored: +29.4 MB.)", "",
            "## Error against float32 maps of the same run", ""]
    for b in beds:
        out += [f"### {b['name']}: {b['sites']} sites, {b['steps']} steps, {b['tokens']} tokens, "
                f"largest map value {b['map_peak']:.3g}; words {', '.join(b['words'])}", "",
                "| maps stored as | max abs error, maps | max error / map's peak | "
                "max abs error, heatmap(word) |", "|---|---|---|---|"]
        for storage, r in b["rows"].items():
            out.append(f"| {storage} | {r['map_abs']:.2e} | {r['map_rel_peak']:.4f} | "
                       f"{r['heatmap_abs']:.2e} |")
        out += ["", f"x0 in float16 (considered, not adopted): max abs error "
                f"{b['x0_fp16_abs']:.2e} (largest |x0| {b['x0_abs_max']:.2f}).", ""]
    return "\n".join(out)


def main() -> int:
    import sdlens
    from sdlens.testing import random_pipeline

    torch.set_num_threads(1)
    beds = []
    for arch in ("flux", "sd3", "sd15"):
        beds.append(measure(f'random_pipeline("{arch}")', random_pipeline(arch), PROMPT, 6))
        print(beds[-1]["name"], json.dumps(beds[-1]["rows"]), flush=True)
    beds.append(measure("shipped model (sdlens.load_pipeline())",
                        sdlens.load_pipeline(device="cpu"), SHIPPED_PROMPT, 25))
    print(beds[-1]["name"], json.dumps(beds[-1]["rows"]), flush=True)
    sizes = flux_dev_sizes()
    md = markdown(beds, sizes)
    (HERE / "RESULTS-compact.md").write_text(md + "\n")
    (HERE / "results-compact.json").write_text(
        json.dumps({"beds": beds, "flux_dev_sizes": sizes}, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
