"""Benchmark 3: sdlens against DAAM's way of getting cross-attention heatmaps.

    python benchmarks/bench_daam.py --setup      # once: builds /tmp/daamvenv with DAAM 0.2.0
    python benchmarks/bench_daam.py [--smoke | --quick | --full]

(a) **DAAM 0.2.0 itself**, in its own venv (it pins diffusers 0.21.2 / transformers 4.30.2 and
    cannot be installed beside current diffusers): ``--setup`` creates ``/tmp/daamvenv`` (torch
    2.13.0, ``pip install --no-deps daam==0.2.0``, then its runtime requirements with the pinned
    versions) and records every failure. The run then starts that venv's Python on this same file
    (``--daam-child``), which builds the SD 1.5 architecture with random weights in diffusers
    0.21.2 and times plain generation vs ``daam.trace(pipe)`` (+ ``compute_global_heat_map`` and
    a word map), alternating, at 256 px (our settings) and at 512 px (the latent grid DAAM
    expects), and also tries DAAM's spaCy-based word parsing. What fails is reported with the
    exact error.
(b) **DAAM's method inside our venv** (current diffusers): on every ``attn2`` layer the classic
    ``AttnProcessor`` (no SDPA: ``softmax(QK^T)`` materialised for all heads) and the
    probabilities of the conditional half summed per (layer, head) over all steps, as DAAM's
    ``UNetCrossAttentionHooker`` / ``RawHeatMapCollection`` do (vectorised here; DAAM loops over
    tokens and heads in Python). Timed against untraced and sdlens in the SD 1.5 loop of
    benchmark 1 (same process, alternating).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DAAM_VENV = Path(os.environ.get("SDLENS_DAAM_VENV", "/tmp/daamvenv"))
DAAM_PY = DAAM_VENV / "bin" / "python"
SETUP_JSON_NAME = "daam_setup.json"
# DAAM 0.2.0's own run as last measured (section 3a of an earlier RESULTS.md, kept as written):
# included, marked "not re-run", where the DAAM venv is missing
EARLIER = HERE / "RESULTS-daam-0.2.0.md"


def earlier_daam() -> dict:
    """The date and DAAM 0.2.0's ratio(s) in :data:`EARLIER` (as written there)."""
    import re

    text = EARLIER.read_text()
    date = re.search(r"on (\d{4}-\d\d-\d\d \d\d:\d\d \w+)", text)
    runs = [{"size": int(m.group(1)), "steps": int(m.group(2)), "ratio": float(m.group(3)),
             "n": int(m.group(4))}
            for m in re.finditer(r"DAAM 0\.2\.0 trace, (\d+) px, (\d+) steps.*?ratio ([\d.]+)x; n=(\d+)",
                                 text)]
    return {"date": date.group(1) if date else None, "runs": runs}
# DAAM 0.2.0's requirements.txt: scikit-image, diffusers==0.21.2, spacy, gradio, ftfy,
# transformers==4.30.2, pandas, numba, nltk, inflect, joblib, accelerate==0.23.0.
# gradio is only used by its demo; huggingface_hub must predate the removal of
# `cached_download` (diffusers 0.21.2 imports it).
# torch is pinned in the same command so that the resolver keeps the CPU build installed first
# (without the pin it may pull another torch build with CUDA libraries)
DAAM_DEPS = ["torch==2.13.0", "diffusers==0.21.2", "transformers==4.30.2", "accelerate==0.23.0",
             "huggingface_hub==0.25.2", "scikit-image", "spacy", "ftfy", "pandas", "numba", "nltk",
             "inflect", "joblib", "matplotlib", "scipy", "safetensors", "numpy<2"]


# ====================================================================== (b) in our venv
def daam_method_side(pipe, kw):
    """A callable running ``pipe(**kw())`` with DAAM's method installed on every attn2 layer."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    class Store:
        def __init__(self):
            self.sums: dict[str, torch.Tensor] = {}

    class DaamMethodProcessor(AttnProcessor):
        """Classic attention (probabilities materialised), cond-half probs summed per head."""

        def __init__(self, name: str, store: Store):
            super().__init__()
            self.name, self.store = name, store

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     temb=None, *args, **kwargs):
            orig = attn.get_attention_scores
            store, name = self.store, self.name

            def scores(query, key, mask=None):
                probs = orig(query, key, mask)  # (batch * heads, HW, tokens)
                b = probs.shape[0] // attn.heads
                p = probs.detach().view(b, attn.heads, probs.shape[1], probs.shape[2])[b // 2:]
                prev = store.sums.get(name)
                store.sums[name] = p.float() if prev is None else prev + p.float()
                return probs

            attn.get_attention_scores = scores
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states,
                                        attention_mask, temb, *args, **kwargs)
            finally:
                del attn.get_attention_scores

    def fn():
        unet = pipe.unet
        saved = dict(unet.attn_processors)
        store = Store()
        procs = {k: (DaamMethodProcessor(k, store) if k.endswith("attn2.processor") else v)
                 for k, v in saved.items()}
        unet.set_attn_processor(dict(procs))
        try:
            out = pipe(**kw())
        finally:
            unet.set_attn_processor(dict(saved))
        return out, store.sums
    return fn


def part_b(s, ctx: dict) -> dict:
    import common as C
    import bench_overhead

    sd = bench_overhead.sd15_loop(s, ctx)
    st = sd["stats"]
    names = ("untraced", "sdlens", "daam-method")
    rows = [C.time_row(n, st[n], st["untraced"]) for n in names]
    rsm = sd["run_step_medians"]
    figs = {}
    for n, key in (("daam-method", "daam_method"), ("sdlens", "sdlens")):
        figs[f"{key}_sd15"] = C.figure(f"{n} / untraced, whole run (SD 1.5 loop)",
                                       C.round_ratios(st[n].times, st["untraced"].times), rounds=st)
        figs[f"{key}_sd15_per_step"] = C.figure(
            f"{n} / untraced, per denoising step (SD 1.5 loop)",
            C.round_ratios(rsm[n], rsm["untraced"]), rounds=st)
    figs["sdlens_vs_daam_method_sd15"] = C.figure(
        "sdlens / DAAM's method, whole run (SD 1.5 loop)",
        C.round_ratios(st["sdlens"].times, st["daam-method"].times), rounds=st)
    mem = []
    for n in names:
        pk = st[n].peak_rss
        mem.append(C.fmt_bytes(sorted(pk)[len(pk) // 2]) if pk else "–")
    for r, m in zip(rows, mem):
        r.append(m)
    fs = lambda k: f"{C.fmt_ratio(figs[k]['median'])}, {figs[k]['verdict']}"  # noqa: E731
    notes = [f"{sd['settings']}, same process, the three sides in rotating order after a "
             f"warm-up; {len(st['untraced'].times)} rounds; ratios are medians of per-round ratios "
             "(min–max).",
             f"Whole run: DAAM's method {fs('daam_method_sd15')}; sdlens {fs('sdlens_sd15')}; "
             f"sdlens / DAAM's method {fs('sdlens_vs_daam_method_sd15')}. (sdlens keeps SDPA for "
             "the output and recomputes only softmax(QK^T) on attn2, head-averaged on the device, "
             "per step and per layer.)",
             f"Per denoising step (each run's median step, first step left out): DAAM's method "
             f"{fs('daam_method_sd15_per_step')}; sdlens {fs('sdlens_sd15_per_step')}.",
             C.load_note(st),
             "daam-method keeps less than sdlens: one sum over steps per (layer, head), no per-step "
             "maps, no latents / noise / x0.",
             "peak RSS: median over runs of the run's RSS high-water mark above its starting RSS "
             "(VmHWM reset per run through /proc/self/clear_refs)."]
    return {"table": C.table("3b. DAAM's method (classic AttnProcessor on every attn2, probs summed "
                             "per layer and head over steps) vs untraced, in our venv",
                             C.TIME_COLUMNS + ["peak RSS above start (median)"], rows, notes),
            "raw": {"figures": figs}}


# ====================================================================== (c) DAAM's heatmaps vs ours
# DAAM 0.2.0 sets its latent grid from unet.config.sample_size: 64x64 only for SD 1.x-sized
# models at 512 px, so the check runs there
HEATMAP_SIZE = 512
HEATMAP_TARGET = 0.99  # Pearson correlation of DAAM's word map and sdlens's pooling="daam" map
HEATMAP_WORDS = ("red", "circle", "and", "blue", "square", "on", "white", "background")


TOKENIZER_DIR = REPO / "sdlens" / "models" / "shapes" / "weights" / "tokenizer"


def heatmap_model_dir(tiny: bool) -> Path:
    return HERE / "_work" / f"daam-check-sd15{'-tiny' if tiny else ''}-64x64-diffusers0.21.2"


def heatmap_model(tiny: bool, env: dict) -> Path:
    """The SD 1.5 architecture with seeded random weights at its real 64x64 latent size, built
    ONCE in the DAAM venv (:func:`daam_venv_sd15`) and saved there with ``save_pretrained``
    (safetensors), then loaded by both venvs: current diffusers / transformers read these older
    files as they read the hub's SD 1.5 (transformers 4.30 does not find its weights in a CLIP
    text encoder saved by transformers 5, whose keys lack the ``text_model.`` prefix: it would
    silently start from fresh random weights). The tokenizer is the real CLIP BPE tokenizer."""
    folder = heatmap_model_dir(tiny)
    if (folder / "model_index.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    p = subprocess.run([str(DAAM_PY), str(Path(__file__).resolve()), "--save-model", str(tmp),
                        "--tokenizer", str(TOKENIZER_DIR)] + (["--smoke"] if tiny else []),
                       capture_output=True, text=True, timeout=1200, env=env, cwd="/tmp")
    if p.returncode != 0:
        raise RuntimeError("building the weights in the DAAM venv failed: "
                           + " / ".join((p.stderr or "").strip().splitlines()[-3:]))
    tmp.rename(folder)
    return folder


def save_model_child(args) -> int:
    """Inside the DAAM venv: build :func:`daam_venv_sd15` and save it to ``args.save_model``."""
    pipe = daam_venv_sd15(args.tokenizer, args.smoke)
    pipe.save_pretrained(args.save_model, safe_serialization=True)
    return 0


def heatmap_call(prompt: str, steps: int) -> dict:
    """The one call both venvs make (same seed, size, CFG; latents out)."""
    import torch

    return dict(prompt=prompt, num_inference_steps=steps, guidance_scale=7.5, height=HEATMAP_SIZE,
                width=HEATMAP_SIZE, generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent")


def heatmap_child(args) -> int:
    """Inside the DAAM venv: load the saved model, generate under ``daam.trace``, write DAAM's
    word maps (its 64x64 ``WordHeatMap.heatmap`` and ``expand_as`` at 512 px), the final latents
    and the prompt's token ids to ``args.out`` (torch.save)."""
    import PIL.Image
    import torch
    torch.set_num_threads(args.threads)
    import daam
    import diffusers
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(args.model)
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=PNDMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad(), daam.trace(pipe) as tc:
        out = pipe(**heatmap_call(args.prompt, args.steps))
        gen_s = time.perf_counter() - t0
        hm = tc.compute_global_heat_map()
        blank = PIL.Image.new("RGB", (HEATMAP_SIZE, HEATMAP_SIZE))
        maps, expanded = {}, {}
        for w in args.words:
            wm = hm.compute_word_heat_map(w)
            maps[w] = wm.heatmap.float().clone()
            expanded[w] = wm.expand_as(blank).float().clone()
        keys = [k for k, _ in tc.all_heat_maps]
    ids = pipe.tokenizer(args.prompt, padding="max_length", max_length=77).input_ids
    torch.save({"latents": out.images.float(), "maps": maps, "expanded": expanded, "ids": ids,
                "layers": list(tc.layer_names), "factors": sorted({k[0] for k in keys}),
                "entries": len(keys), "heads": sorted({k[2] for k in keys}),
                "versions": {"daam": daam.__version__, "diffusers": diffusers.__version__,
                             "torch": str(torch.__version__)},
                "load_s": load_s, "generate_s": gen_s, "scheduler": type(pipe.scheduler).__name__},
               args.out)
    print("@@HEATMAPS@@" + str(args.out))
    return 0


def _pearson(a, b) -> float:
    import torch

    x = torch.stack([a.flatten().double(), b.flatten().double()])
    return float(torch.corrcoef(x)[0, 1])


def part_c(s, ctx: dict, work: Path) -> dict:
    """DAAM 0.2.0's word heatmaps (its venv) against ``trace.heatmap(word, pooling="daam")``
    (ours) on the same saved weights, seed, prompt and scheduler: Pearson correlation per word."""
    import torch

    import common as C

    title = (f"3c. DAAM 0.2.0's word heatmaps vs sdlens's pooling=\"daam\" (same weights, "
             f"{HEATMAP_SIZE} px)")
    cols = ["word", "Pearson r, 512 px maps (heads kept)", "r, 64x64 latent-grid maps (heads kept)",
            "max abs diff, 64x64 maps / DAAM map's range",
            "r, 512 px maps (default recording: heads averaged, float16)",
            "r, 512 px, middle block included (as sdlens's pooling=\"daam\" before this check)"]
    if not DAAM_PY.exists():
        return {"table": C.table(title, ["status"], [[
            f"NOT RUN: the DAAM venv {DAAM_VENV} is missing (`python benchmarks/bench_daam.py "
            "--setup`)"]]), "raw": {"not_run": {"daam_heatmap_corr": "the DAAM venv is missing"}}}
    steps = 2 if s.smoke else 3
    threads = s.extra.get("threads", 2)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    t0 = time.monotonic()
    folder = heatmap_model(s.smoke, env)
    build_s = time.monotonic() - t0
    out = work / "daam_heatmaps.pt"
    if out.exists():
        out.unlink()
    cmd = [str(DAAM_PY), str(Path(__file__).resolve()), "--heatmap-child", "--model", str(folder),
           "--out", str(out), "--steps", str(steps), "--threads", str(threads),
           "--prompt", s.prompt, "--words", *HEATMAP_WORDS]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd="/tmp")
    if p.returncode != 0 or not out.exists():
        tail = (p.stderr or p.stdout or "").strip().splitlines()[-3:]
        return {"table": C.table(title, ["status"], [["DAAM child FAILED: " + " / ".join(tail)]]),
                "raw": {"failed": tail}}
    theirs = torch.load(out)

    from diffusers import StableDiffusionPipeline

    from sdlens.engine.session import trace

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer(s.prompt, padding="max_length", max_length=77).input_ids
    runs = {}
    for name, opts in (("heads", dict(heads=True, attention_dtype=torch.float32)),
                       ("default", {})):
        t1 = time.monotonic()
        with trace(pipe, **opts) as tr:
            lat = pipe(**heatmap_call(s.prompt, steps)).images
        runs[name] = {"trace": tr.runs[-1], "latents": lat.float(), "s": time.monotonic() - t1}
    ours = runs["heads"]["trace"]
    every_layer = list(ours.attention.layers)
    rows, per = [], {}
    for w in HEATMAP_WORDS:
        m64, ref64 = (ours.heatmap(w, pooling="daam", size=HEATMAP_SIZE // 8, normalize=False),
                      theirs["maps"][w])
        per[w] = {
            "r_512": _pearson(ours.heatmap(w, pooling="daam"), theirs["expanded"][w]),
            "r_64": _pearson(m64, ref64),
            "diff_64": float((m64 - ref64).abs().max() / (ref64.max() - ref64.min())),
            "r_512_default": _pearson(runs["default"]["trace"].heatmap(w, pooling="daam"),
                                      theirs["expanded"][w]),
            "r_512_with_mid": _pearson(ours.heatmap(w, pooling="daam", layers=every_layer),
                                       theirs["expanded"][w]),
            # how much a random-weight map varies: its std over its mean (DAAM's 64x64 map)
            "spread": float(ref64.std() / ref64.mean())}
        p = per[w]
        rows.append([w, f"{p['r_512']:.6f}", f"{p['r_64']:.6f}", f"{p['diff_64']:.1e}",
                     f"{p['r_512_default']:.6f}", f"{p['r_512_with_mid']:.4f}"])
    worst = {k: min(v[k] for v in per.values())
             for k in ("r_512", "r_64", "r_512_default", "r_512_with_mid")}
    worst["diff_64"] = max(v["diff_64"] for v in per.values())
    rows.append(["**min over words** (diff: max)", f"**{worst['r_512']:.6f}**",
                 f"{worst['r_64']:.6f}", f"{worst['diff_64']:.1e}",
                 f"{worst['r_512_default']:.6f}", f"{worst['r_512_with_mid']:.4f}"])
    spread = statistics.median(v["spread"] for v in per.values())
    la, lb = runs["heads"]["latents"], theirs["latents"]
    lat_diff = float((la - lb).abs().max())
    lat_rel = float((la - lb).norm() / lb.norm())
    lat_same = float((runs["default"]["latents"] - la).abs().max())
    sdlens_layers = list(ours.attention.layers)
    figs = {"daam_heatmap_corr": C.value_figure(
        f"Pearson correlation of DAAM 0.2.0's word heatmaps and sdlens's pooling=\"daam\" "
        f"(SD 1.5 architecture, random weights, {HEATMAP_SIZE} px, {steps} steps; min over "
        f"{len(HEATMAP_WORDS)} words)", worst["r_512"], "r", HEATMAP_TARGET,
        f">= {HEATMAP_TARGET}", higher_is_better=True, words=len(HEATMAP_WORDS), steps=steps,
        r_64=worst["r_64"], r_default_recording=worst["r_512_default"],
        r_with_middle_block=worst["r_512_with_mid"], max_diff_64=worst["diff_64"],
        latents_max_abs_diff=lat_diff, latents_rel_diff=lat_rel)}
    notes = [
        f"Weights: the SD 1.5 architecture ({'tiny' if s.smoke else 'full size'}, seeded random "
        f"weights, PNDM) built once in the DAAM venv and saved with `save_pretrained` "
        f"(safetensors) to `benchmarks/_work/{folder.name}` ({build_s:.0f} s this run), loaded "
        f"by both: DAAM {theirs['versions']['daam']} under diffusers "
        f"{theirs['versions']['diffusers']}, sdlens under diffusers {C._version('diffusers')}. "
        "Tokenizer: the real CLIP BPE tokenizer in both; token ids of the prompt "
        + ("**equal**." if list(theirs["ids"]) == list(ids) else "**DIFFER**."),
        f"Same call: \"{s.prompt}\", {HEATMAP_SIZE} px, {steps} steps, CFG 7.5, seed 0. Final "
        f"latents DAAM run vs sdlens run: max |diff| {lat_diff:.2e}, relative L2 {lat_rel:.2e} "
        "(DAAM computes attn2 with the classic kernels, diffusers 0.21.2 vs 0.42; the two sdlens "
        f"runs differ by {lat_same:.1e}).",
        f"DAAM hooked {len(theirs['layers'])} attn2 layers (factors {theirs['factors']}, "
        f"{len(theirs['heads'])} heads each: {theirs['entries']} (layer, head) maps); sdlens "
        f"recorded {len(sdlens_layers)} and pooling=\"daam\" uses the ones DAAM uses.",
        "Columns: 512 px = DAAM's `compute_global_heat_map().compute_word_heat_map(w)"
        ".expand_as(512 px image)` vs `trace.heatmap(w, pooling=\"daam\")`; 64x64 = DAAM's "
        "`WordHeatMap.heatmap` vs `trace.heatmap(w, pooling=\"daam\", size=64, normalize=False)`; "
        "heads kept: recorded with `heads=True, attention_dtype=torch.float32`; default "
        "recording: heads averaged on the device, stored as float16 (DAAM clamps each head's "
        "upsampled map, so averaging heads first is an approximation).",
        f"Random weights make nearly flat maps: DAAM's 64x64 word maps vary by a std of "
        f"{spread:.1%} of their mean (median over words), so the check resolves small "
        "differences of method: with the UNet's middle block included (as sdlens's "
        "pooling=\"daam\" did before this check, which also clamped each step's map before "
        f"summing the steps) r drops to {worst['r_512_with_mid']:.4f}.",
        f"Target: r >= {HEATMAP_TARGET} for every word: "
        + ("**met**" if worst["r_512"] >= HEATMAP_TARGET else "**MISSED**")
        + f" (min {worst['r_512']:.6f}). Timing (not a benchmark): DAAM run "
        f"{theirs['generate_s']:.0f} s, sdlens runs {runs['heads']['s']:.0f} s / "
        f"{runs['default']['s']:.0f} s.",
    ]
    return {"table": C.table(title, cols, rows, notes),
            "raw": {"per_word": per, "worst": worst, "map_spread": spread,
                    "latents_max_abs_diff": lat_diff,
                    "latents_rel_diff": lat_rel, "daam_layers": theirs["layers"],
                    "sdlens_layers": sdlens_layers, "figures": figs}}


# ====================================================================== (a) DAAM itself
def _log(msg: str, path: Path) -> None:
    with open(path, "a") as f:
        f.write(msg + "\n")


def setup(work: Path, timeout_s: int = 900, resume: bool = False) -> dict:
    """Create the DAAM venv; returns (and writes) a status dict with every failure.
    ``resume``: keep the steps that finished (and the dry run) from the last setup, redo the rest."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "daam_setup.log"
    prev = {}
    if resume and (work / SETUP_JSON_NAME).exists():
        old = json.loads((work / SETUP_JSON_NAME).read_text())
        prev = {st["step"]: st for st in old.get("steps", [])
                if st["rc"] == 0 or "dry run" in st["step"]}
    else:
        log.write_text("")
    status = {"venv": str(DAAM_VENV), "steps": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_end = time.monotonic() + timeout_s

    def step(name, cmd):
        if name in prev:
            status["steps"].append(dict(prev[name], resumed=True))
            return prev[name]["rc"] == 0
        left = max(10, int(t_end - time.monotonic()))
        _log(f"$ {' '.join(cmd)}", log)
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            _log(p.stdout[-20000:] + p.stderr[-20000:], log)
            err = [l for l in (p.stderr or "").splitlines() if l.startswith("ERROR") or "Error" in l]
            rec = {"step": name, "rc": p.returncode, "s": round(time.monotonic() - t0, 1),
                   "errors": err[-5:]}
        except subprocess.TimeoutExpired:
            rec = {"step": name, "rc": None, "s": round(time.monotonic() - t0, 1),
                   "errors": [f"timed out after {left} s (time box)"]}
        status["steps"].append(rec)
        (work / SETUP_JSON_NAME).write_text(json.dumps(status, indent=1))
        return rec["rc"] == 0

    ok = DAAM_PY.exists() or step("create venv", [sys.executable, "-m", "venv", str(DAAM_VENV)])
    pip = [str(DAAM_PY), "-m", "pip", "install", "-q"]
    ok = ok and step("torch==2.13.0", pip + ["torch==2.13.0"])
    # What the issue expects to fail: installing DAAM with its dependencies beside current
    # diffusers (resolution only, nothing installed).
    step("daam==0.2.0 with deps next to diffusers 0.42.1 (dry run)",
         pip + ["--dry-run", "daam==0.2.0", "diffusers==0.42.1"])
    ok = ok and step("daam==0.2.0 --no-deps", pip + ["--no-deps", "daam==0.2.0"])
    ok = ok and step("DAAM runtime deps (pinned)", pip + DAAM_DEPS)
    step("import daam", [str(DAAM_PY), "-c", "import daam, diffusers, transformers; "
                         "print(daam.__version__, diffusers.__version__, transformers.__version__)"])
    # DAAM's word parsing: spacy.load('en_core_web_md'), else `python -m spacy download` (network)
    step("spaCy model en_core_web_md (load)", [str(DAAM_PY), "-c",
                                                "import spacy; spacy.load('en_core_web_md')"])
    step("spaCy model en_core_web_md (download)",
         ["timeout", "120", str(DAAM_PY), "-m", "spacy", "download", "en_core_web_md"])
    status["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    status["ok"] = bool(ok)
    (work / SETUP_JSON_NAME).write_text(json.dumps(status, indent=1))
    return status


CHILD_NOTE = "runs inside the DAAM venv: no sdlens imports"


def slow_tokenizer_folder(folder: str) -> str:
    """transformers 4.30's slow CLIPTokenizer needs vocab.json + merges.txt, and its tokenizers
    0.13 cannot parse today's tokenizer.json; both files are written from that json (same
    vocabulary and merges, so the same token ids)."""
    import tempfile

    src = Path(folder)
    if (src / "vocab.json").exists():
        return folder
    model = json.loads((src / "tokenizer.json").read_text())["model"]
    out = Path(tempfile.mkdtemp(prefix="daam-tok-"))
    (out / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    keep = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token",
                                "model_max_length") if k in cfg}
    (out / "tokenizer_config.json").write_text(json.dumps(keep))
    return str(out)


def daam_venv_sd15(tokenizer: str, tiny: bool = False):
    """Inside the DAAM venv (diffusers 0.21.2, transformers 4.30.2): the SD 1.5 architecture
    (its real UNet / VAE / CLIP-L text encoder configs and PNDM scheduler; ``tiny``: a few
    channels) with weights seeded by ``torch.manual_seed(0)``, over the real CLIP tokenizer."""
    import torch
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    ch = (32, 64, 64, 64) if tiny else (320, 640, 1280, 1280)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4,  # the real SD 1.5 config
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=ch, layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=64 if tiny else 768, norm_num_groups=32)
    hid = 64 if tiny else 768
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hid, intermediate_size=4 * hid,
        num_hidden_layers=2 if tiny else 12, num_attention_heads=2 if tiny else 12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=hid))
    vch = (32, 32, 64, 64) if tiny else (128, 256, 512, 512)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=vch, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                        norm_num_groups=32, sample_size=512)
    sched = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True)
    tok = CLIPTokenizer.from_pretrained(slow_tokenizer_folder(tokenizer))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def child(args) -> int:
    """Inside the DAAM venv: build SD 1.5 (random weights) in diffusers 0.21.2, time plain vs DAAM."""
    import statistics
    import traceback

    res: dict = {"versions": {}, "runs": [], "errors": {}}

    def err(key, e):
        tb = traceback.format_exc().strip().splitlines()
        res["errors"][key] = {"error": f"{type(e).__name__}: {e}"[:800], "where": tb[-3:-1]}

    def dump():
        print("@@DAAMJSON@@" + json.dumps(res))

    try:
        import torch
        torch.set_num_threads(args.threads)
        import diffusers
        import transformers
        res["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__}
    except Exception as e:
        err("import torch/diffusers/transformers", e)
        dump()
        return 0
    try:
        import daam
        res["versions"]["daam"] = daam.__version__
    except Exception as e:
        err("import daam", e)
        dump()
        return 0
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def build():
        return daam_venv_sd15(args.tokenizer, args.smoke)

    def call(pipe, size, steps):
        return pipe(args.prompt, num_inference_steps=steps, guidance_scale=7.5, height=size,
                    width=size, generator=torch.Generator("cpu").manual_seed(0),
                    output_type="latent")

    def plain(pipe, size, steps):
        with torch.no_grad():
            call(pipe, size, steps)

    def with_daam(pipe, size, steps, word):
        t0 = time.perf_counter()
        with torch.no_grad(), daam.trace(pipe) as tc:
            call(pipe, size, steps)
            t1 = time.perf_counter()
            hm = tc.compute_global_heat_map()
            wm = hm.compute_word_heat_map(word)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tuple(wm.heatmap.shape)

    try:
        t0 = time.perf_counter()
        pipe = build()
        build_s = time.perf_counter() - t0
        res["build_s"] = build_s
    except Exception as e:
        err("build pipeline", e)
        dump()
        return 0
    for size in args.sizes:
        steps = args.steps
        key = f"{size}px"
        run = {"size": size, "steps": steps, "build_s": build_s, "plain": [], "daam": [],
               "daam_heatmap": [], "ok": False}
        res["runs"].append(run)
        try:  # warm-up, 1 step each
            plain(pipe, size, 1)
            with_daam(pipe, size, 1, args.word)
        except Exception as e:
            err(f"{key}: DAAM trace (warm-up, 1 step)", e)
            try:
                for _ in range(max(1, args.reps)):
                    t0 = time.perf_counter()
                    plain(pipe, size, steps)
                    run["plain"].append(time.perf_counter() - t0)
            except Exception as e2:
                err(f"{key}: plain generation", e2)
            dump()
            continue
        try:
            for r in range(args.reps):
                order = ("plain", "daam") if r % 2 == 0 else ("daam", "plain")
                for side in order:
                    if side == "plain":
                        t0 = time.perf_counter()
                        plain(pipe, size, steps)
                        run["plain"].append(time.perf_counter() - t0)
                    else:
                        gen_s, heat_s, shape = with_daam(pipe, size, steps, args.word)
                        run["daam"].append(gen_s)
                        run["daam_heatmap"].append(heat_s)
                        run["heatmap_shape"] = shape
            run["ok"] = True
            # the benchmark method: the median of per-round ratios, with their min-max
            run["ratios"] = [d / p for d, p in zip(run["daam"], run["plain"])]
            run["ratio"] = statistics.median(run["ratios"])
        except Exception as e:
            err(f"{key}: DAAM timed runs", e)
        dump()
    # DAAM's syntactic word parsing (GlobalHeatMap.parsed_heat_maps) needs spaCy's
    # en_core_web_md; DAAM would shell out to `python -m spacy download` (tried in --setup).
    try:
        import spacy

        spacy.load("en_core_web_md")
        size = args.sizes[-1]
        with torch.no_grad(), daam.trace(pipe) as tc:
            call(pipe, size, 1)
            list(tc.compute_global_heat_map().parsed_heat_maps())
        res["spacy_parsing"] = "ok"
    except BaseException as e:
        err("DAAM parsed_heat_maps: spacy.load('en_core_web_md')", e)
        res["spacy_parsing"] = "failed"
    dump()
    return 0


def part_a(s, ctx: dict, work: Path) -> dict:
    """Run the child in the DAAM venv (if set up); rows for the table + exact errors."""
    import common as C

    status_path = work / SETUP_JSON_NAME
    setup_status = json.loads(status_path.read_text()) if status_path.exists() else None
    if setup_status is None:
        cand = HERE / "_work" / SETUP_JSON_NAME
        if cand.exists():
            setup_status = json.loads(cand.read_text())
    rows, notes, raw = [], [], {"setup": setup_status}
    if setup_status:
        for st in setup_status.get("steps", []):
            rows.append([f"setup: {st['step']}", "ok" if st["rc"] == 0 else f"FAILED (rc {st['rc']})",
                         f"{st['s']} s", "; ".join(st.get("errors") or [])[:600]])
    if not DAAM_PY.exists():
        rows.append(["DAAM venv", "not present: NOT RE-RUN", "", f"{DAAM_VENV} missing: run "
                     "`python benchmarks/bench_daam.py --setup` (needs network for PyPI)"])
        raw["not_rerun"] = True
        if EARLIER.exists() and not s.smoke:
            raw["earlier"] = {"source": f"benchmarks/{EARLIER.name}", **earlier_daam()}
        return {"rows": rows, "notes": notes, "raw": raw}
    if s.smoke:
        sizes, steps, reps = [64], 2, C.MIN_ROUNDS
    else:
        # quick: 256 px only (the 512 px pair alone takes ~2 minutes of a 10-minute budget)
        sizes = ([256] if s.mode == "quick" else [256, 512]) if s.device == "cpu" else [512]
        steps = 2 if s.mode == "quick" else s.steps
        reps = C.MIN_ROUNDS if s.mode == "quick" else s.reps
    env = dict(os.environ, OMP_NUM_THREADS=str(s.extra.get("threads", 2)),
               MKL_NUM_THREADS=str(s.extra.get("threads", 2)), PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    cmd = [str(DAAM_PY), str(Path(__file__).resolve()), "--daam-child", "--steps", str(steps),
           "--reps", str(reps), "--threads", str(s.extra.get("threads", 2)),
           "--tokenizer", str(TOKENIZER_DIR),
           "--prompt", s.prompt, "--word", "circle", "--sizes", *map(str, sizes)]
    if s.smoke:
        cmd.append("--smoke")
    timeout = int(min(300, max(120, s.remaining() - 120))) if s.deadline else 1800
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           cwd="/tmp")
        out = p.stdout
        tail = (p.stderr or "")[-1500:]
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        tail = f"timed out after {timeout} s"
    res = None
    for line in out.splitlines():
        if line.startswith("@@DAAMJSON@@"):
            res = json.loads(line[len("@@DAAMJSON@@"):])
    raw["child"] = res
    raw["child_s"] = time.monotonic() - t0
    if res is None:
        rows.append(["DAAM child run", "FAILED", f"{raw['child_s']:.0f} s", tail.strip()[-600:]])
        return {"rows": rows, "notes": notes, "raw": raw}
    v = res.get("versions", {})
    notes.append("DAAM venv versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    for run in res.get("runs", []):
        label = f"DAAM 0.2.0 trace, {run['size']} px, {run['steps']} steps, CFG 7.5"
        if run.get("ok"):
            import statistics
            pm, dm = statistics.median(run["plain"]), statistics.median(run["daam"])
            rows.append([label, "ok", f"plain {C.fmt_s(pm)} (min {C.fmt_s(min(run['plain']))}, max "
                         f"{C.fmt_s(max(run['plain']))}); DAAM {C.fmt_s(dm)} (min "
                         f"{C.fmt_s(min(run['daam']))}, max {C.fmt_s(max(run['daam']))}); "
                         + (f"ratio {C.fmt_ratio(run['ratio'])} (median of per-round ratios, "
                            f"{C.verdict(C.spread(run['ratios']))})" if run.get("ratios")
                            else f"ratio {dm / pm:.3f}x") + f"; n={len(run['daam'])}",
                         f"+ global heat map and word map: {C.fmt_s(statistics.median(run['daam_heatmap']))}"
                         f" (map {run.get('heatmap_shape')})"])
        else:
            pl = run.get("plain") or []
            rows.append([label, "FAILED", (f"plain generation alone {C.fmt_s(statistics_median(pl))}"
                                           if pl else ""), ""])
    raw["figures"] = {f"daam_0_2_0_{run['size']}px": C.figure(
        f"DAAM 0.2.0 / its own untraced diffusers 0.21.2, {run['size']} px, {run['steps']} steps",
        run["ratios"]) for run in res.get("runs", []) if run.get("ok") and run.get("ratios")}
    if "spacy_parsing" in res:
        rows.append(["DAAM word parsing (parsed_heat_maps, spaCy)", res["spacy_parsing"], "", ""])
    for k, e in res.get("errors", {}).items():
        rows.append([f"error: {k}", "FAILED", "", f"`{e['error']}`"])
    return {"rows": rows, "notes": notes, "raw": raw}


def statistics_median(xs):
    import statistics
    return statistics.median(xs)


def run(s, ctx: dict) -> dict:
    import common as C

    work = Path(ctx.get("work") or (HERE / "_work"))
    tables = []
    a = part_a(s, ctx, work)
    tables.append(C.table("3a. DAAM 0.2.0 itself, in its own venv (diffusers 0.21.2)",
                          ["what", "status", "time", "detail / exact error"], a["rows"],
                          a["notes"] + [
                              "Same architecture (SD 1.5 UNet/VAE/CLIP-L sizes, random weights, "
                              "PNDM), same prompt and seed; DAAM's trace sets the latent grid from "
                              "unet.config.sample_size (64 for 512 px, 96 otherwise).",
                              "Quick mode: 2 steps per run, 5 rounds per side (the full-size "
                              "UNet at 512 px is slow on this CPU); plain and DAAM alternate after "
                              "a 1-step warm-up of each. Timed: prompt encoding + denoising loop "
                              "(output_type='latent'), as in benchmark 1."]))
    if a["raw"].get("not_rerun") and EARLIER.exists() and not s.smoke:
        tables.append(f"#### 3a'. DAAM 0.2.0's last run (from `benchmarks/{EARLIER.name}`, NOT "
                      "re-run by this run: old method, one run per side)\n\n"
                      + EARLIER.read_text().split("\n", 2)[2].strip() + "\n")
    b = part_b(s, ctx)
    tables.append(b["table"])
    c = part_c(s, ctx, work)
    tables.append(c["table"])
    return {"tables": tables, "raw": {"a": a["raw"], "b": b["raw"], "c": c["raw"]}}


def run_heatmaps(s, ctx: dict) -> dict:
    """Part (c) alone (``--heatmaps``)."""
    c = part_c(s, ctx, Path(ctx.get("work") or (HERE / "_work")))
    return {"tables": [c["table"]], "raw": {"c": c["raw"]}}


def main(argv=None) -> int:
    import argparse

    if argv is None:
        argv = sys.argv[1:]
    if "--heatmap-child" in argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--heatmap-child", action="store_true")
        ap.add_argument("--model", required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("--steps", type=int, default=3)
        ap.add_argument("--threads", type=int, default=2)
        ap.add_argument("--prompt", required=True)
        ap.add_argument("--words", nargs="+", required=True)
        return heatmap_child(ap.parse_args(argv))
    if "--save-model" in argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--save-model", required=True)
        ap.add_argument("--tokenizer", required=True)
        ap.add_argument("--smoke", action="store_true")
        return save_model_child(ap.parse_args(argv))
    if "--daam-child" in argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--daam-child", action="store_true")
        ap.add_argument("--smoke", action="store_true")
        ap.add_argument("--steps", type=int, default=2)
        ap.add_argument("--reps", type=int, default=2)
        ap.add_argument("--threads", type=int, default=2)
        ap.add_argument("--tokenizer", required=True)
        ap.add_argument("--prompt", required=True)
        ap.add_argument("--word", default="circle")
        ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
        return child(ap.parse_args(argv))
    if "--setup" in argv:
        st = setup(HERE / "_work", resume="--resume" in argv)
        print(json.dumps(st, indent=1))
        return 0
    sys.path.insert(0, str(HERE))
    import common as C
    if "--heatmaps" in argv:
        argv = [a for a in argv if a != "--heatmaps"]
        return C.standalone(run_heatmaps, argv, __doc__)
    return C.standalone(run, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
