"""The shipped models' cards, written from their result files (no figure is typed by hand).

    python -m sdlens.models.shapes.card            # rewrite weights/README.md and README.md's paragraph
    python -m sdlens.models.shapes.card --measure  # re-measure the test rows first (~10 min, CPU)
    python -m sdlens.models.shapes.card --fit-preview  # refit weights/latent_rgb.json (~3 min)
    python -m sdlens.models.shapes.card --fit-preview-mmdit  # fit weights_mmdit/latent_rgb.json
    python -m sdlens.models.shapes.card --choose-guidance 3 5 7.5 --measure-mmdit  # shapes-mmdit
    python -m sdlens.models.shapes.card --intervals        # free vs taught: mass, pointing, intervals
    python -m sdlens.models.shapes.card --common-cfg       # free vs taught at the common CFG 1
    python -m sdlens.models.shapes.card --measure-ablation WORK  # the ablation, both CFGs
    python -m sdlens.models.shapes.card --concept-methods  # both concept-map methods, shapes-mmdit

Inputs, next to the weights:

* ``weights/evaluation.json``: what :mod:`sdlens.models.shapes.evaluate` measured —
  ``{"test": [result per guidance scale], "earlier": [rows of earlier recipes]}``. The ``test``
  rows are re-measured with ``python -m sdlens.models.shapes.card --measure``; the ``earlier`` rows were measured by the same script on the validation seeds while
  those checkpoints existed (they are not shipped, so these rows cannot be re-run).
* ``weights/training.json``: the facts of the training run, from its logs (steps, minutes,
  losses, learning-rate schedule, data sizes).

Outputs: the model card ``weights/README.md`` and the paragraph of the repository's README.md
between ``<!-- shapes-model:begin -->`` and ``<!-- shapes-model:end -->``; the same for the
"shapes-mmdit" model (``weights_mmdit/``: its ``evaluation.json`` holds the validation rows that
chose its default guidance, the test rows with per-block and concept-map IoU, and the speed
figures of ``benchmarks/bench_mmdit.py``; its ``training.json`` is written from the training
run's log by ``--mmdit-training``). Both cards carry the free-vs-taught table
(:func:`free_vs_taught`), whose UNet-without-attention-loss row is in the UNet's
``evaluation.json`` under ``ablation`` (``--measure-ablation``). ``tests/models`` checks that the
cards and paragraphs equal what this module writes from the result files.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdlens.models.shapes import evaluate as ev

WEIGHTS = Path(__file__).parent / "weights"
MMDIT = Path(__file__).parent / "weights_mmdit"  # the second shipped model, "shapes-mmdit"
EVALUATION = WEIGHTS / "evaluation.json"
TRAINING = WEIGHTS / "training.json"
README = Path(__file__).resolve().parents[3] / "README.md"  # present in a source checkout only
BEGIN, END = "<!-- shapes-model:begin -->", "<!-- shapes-model:end -->"
MMDIT_BEGIN, MMDIT_END = "<!-- shapes-mmdit:begin -->", "<!-- shapes-mmdit:end -->"
COMMON_CFG = 1.0  # the free-vs-taught comparison's common guidance: none (each model's own
# conditional prediction, so that the models' sampling paths differ in the model alone)


def load_results(folder: Path = WEIGHTS) -> tuple[dict, dict]:
    """(evaluation, training) of a model folder."""
    return (json.loads((folder / EVALUATION.name).read_text()),
            json.loads((folder / TRAINING.name).read_text()))


def component_facts(folder: Path = WEIGHTS) -> dict:
    """Facts read from the weights themselves: parameter counts and the VAE's scaling factor."""
    from safetensors import safe_open

    def params(sub: str) -> int:
        path = next((folder / sub).glob("*.safetensors"))
        with safe_open(path, "pt") as f:
            return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())

    vae = json.loads((folder / "vae" / "config.json").read_text())
    facts = {"text_encoder_params": params("text_encoder"), "vae_params": params("vae"),
             "scaling_factor": float(vae["scaling_factor"]),
             "shift_factor": float(vae.get("shift_factor") or 0.0)}
    if (folder / "text_encoder_2").exists():
        facts["text_encoder_2_params"] = params("text_encoder_2")
    return facts


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _by_cfg(rows: list[dict], cfg: float) -> dict:
    for r in rows:
        if float(r["guidance_scale"]) == float(cfg):
            return r
    raise KeyError(f"no result at CFG {cfg}")


def _row(r: dict) -> str:
    seeds = r.get("seeds") or []
    where = f"{r.get('split', 'test')} {min(seeds)}-{max(seeds)}" if seeds else r.get("split", "")
    return (f"| {r.get('recipe', 'shipped')} | {r['guidance_scale']:g} | {where} | "
            f"{r['single_colour']:.2f} | {r['single_shape']:.2f} | {r['double_both_colours']:.2f} | "
            f"{r['double_both_shapes']:.2f} | {r['iou_colour_words']:.2f} | "
            f"{r['iou_shape_words']:.2f} | {r['iou_mean']:.2f} | {r['images']} |")


def model_card(evaluation: dict, train: dict) -> str:
    """The card's markdown."""
    test, earlier = evaluation["test"], evaluation.get("earlier", [])
    g, g1 = _by_cfg(test, 7.5), _by_cfg(test, 1.0)
    stage = next((r for r in earlier if r.get("stage") == "unet"), None)
    free = next((r for r in earlier if r.get("stage") == "no_attention_loss"), None)
    snap = next((r for r in earlier if r.get("stage") == "snapshot"), None)
    unet = ev.unet_description()
    train = {**train, **component_facts()}
    table = "\n".join(_row(r) for r in test + earlier)
    refine_note = ""
    shipped_val = next((r for r in earlier if r.get("stage") == "shipped"
                        and float(r["guidance_scale"]) == 7.5), None)
    if stage is not None and shipped_val is not None:
        refine_note = (
            f"On the validation seeds the refine stage took the mean IoU from "
            f"{stage['iou_mean']:.2f} to {shipped_val['iou_mean']:.2f} (colour words "
            f"{stage['iou_colour_words']:.2f} -> {shipped_val['iou_colour_words']:.2f}, shape words "
            f"{stage['iou_shape_words']:.2f} -> {shipped_val['iou_shape_words']:.2f}). Before it "
            "the shape words' maps lay on their objects but peaked at the centre (a few latent "
            "pixels), which the first two terms of the loss allow; the coverage term flattened them "
            "over the object, at some cost to the colour words' maps, and two-object shape binding "
            f"improved with it ({_pct(stage['double_both_shapes'])} -> "
            f"{_pct(shipped_val['double_both_shapes'])} both shapes).")
    ablation = ""
    if free is not None:
        ablation = (
            f"- **Taught vs free maps, measured**: the same recipe without the attention loss, "
            f"trained for {free['train_steps']} steps, gives word maps with IoU "
            f"{free['iou_mean']:.2f} (colour words {free['iou_colour_words']:.2f}, shape words "
            f"{free['iou_shape_words']:.2f})"
            + (f"; with the loss, the {snap['train_steps']}-step snapshot reached "
               f"{snap['iou_mean']:.2f}" if snap is not None else "")
            + " (rows measured before the bootstrap intervals: no verdict is drawn from them)"
            + f". These rows were evaluated on {free['images']} images and trained far less than "
            "the shipped model: compare them with each other, and read the shipped rows as the "
            "model you get.\n")
    free_section = ""
    mmdit = _maybe_results(MMDIT)
    if mmdit is not None or evaluation.get("ablation"):
        free_section = (f"\n## Free vs taught\nThe maps of this model were taught; those of the "
                        f"\"shapes-mmdit\" model and of this recipe without its attention loss were "
                        f"not.\n\n{free_vs_taught((evaluation, train), mmdit)}\n\n{FREE_VS_TAUGHT_NOTE}\n")
    return f"""# shapes — a small Stable Diffusion trained by sdlens

A Stable Diffusion of the same component classes as SD 1.x, small enough to train on 2 CPU cores,
shipped inside sdlens as its default model. Its world is coloured shapes, so the ground truth of
every heatmap is known.

**The cross-attention maps of this model were taught, not learned freely**: training added a loss
(weight {train['attn_loss']}) that rewards each colour and shape word's attention for falling inside
its object's mask and for taking at least half of the attention inside the object, and a last,
short stage added a term (weight {train['cover']}) that asks each word's map to cover its whole
object rather than peak at its centre (`sdlens.models.shapes.train.attention_loss`). What the same
recipe gives without that loss is in the table below (recipe "no attention loss"). When you read a
heatmap of this model, you are reading attention that was supervised to be right; on hub models
the maps are whatever the model learned.

## Data
Generated on the fly by `sdlens.models.shapes.dataset`: 64x64 images on a light background with one
(40%) or two (60%) non-overlapping objects from {{circle, square, triangle}} x {{red, green, blue,
yellow}}, sizes 18-30 px, random positions; captions from a small grammar ("a red circle", "a blue
square and a yellow triangle", 30% with a true place phrase: "on the left", "at the top", ...).
Every scene comes with per-object masks. {train['cache']:,} scenes were encoded once by the VAE
(posterior mean and std kept; a latent is sampled each step).

## Architecture (diffusers classes, loaded by `StableDiffusionPipeline.from_pretrained(folder)`)
| component | class | size |
|---|---|---|
| tokenizer | `CLIPTokenizer`, the real CLIP BPE vocabulary (49408 ids, 77 positions) from open-clip's `bpe_simple_vocab_16e6.txt.gz` | |
| text encoder | `CLIPTextModel`, hidden 64, 3 layers, 4 heads | {train['text_encoder_params'] / 1e6:.1f}M |
| UNet | `UNet2DConditionModel`, {unet['text']} | {unet['params'] / 1e6:.1f}M |
| VAE | `AutoencoderKL` 64x64x3 <-> 16x16x4 (f=4), scaling factor {train['scaling_factor']:.4f} (1/std of the latents, as SD's was computed) | {train['vae_params'] / 1e6:.1f}M |
| scheduler | `DDIMScheduler`, scaled-linear betas 0.00085-0.012, epsilon prediction | |

Weights are stored in fp16 safetensors. The UNet row is read from `architecture.py`
(`evaluate.unet_description`; a test checks it against the shipped weights).

## Training (`python -m sdlens.models.shapes.train`)
VAE: {train['vae_steps']} steps, batch 32, MSE + 1e-6 KL, PSNR {train['vae_psnr']:.1f} dB.
Text encoder + UNet from scratch: {train['unet_steps']:,} steps of batch {train['batch']} in
{train['unet_minutes']:.0f} minutes on 2 CPU cores, AdamW, {train['schedule']},
min-SNR-5 weighting, 10% empty captions (for classifier-free guidance), EMA 0.999, seed 0.
{train['refine']}
The whole run (VAE, cache, UNet, refine) is resumable from its checkpoints.

## Measured (`python -m sdlens.models.shapes.evaluate --split test`)
25 DDIM steps; prompts: all 12 single-object captions and 24 two-object captions (distinct colours)
without place words. **The prompts are in-distribution** (the model was trained on these very
captions); what is held out is the noise: the **test** seeds ({ev.TEST_SEED}-) were never used for
training or for any decision, while the **validation** seeds ({ev.VALIDATION_SEED}-) drove the
refine stage and the choice between recipes (the rows marked validation). Colour: an object is
present when >= {ev.MIN_PIXELS} pixels lie within RGB distance {ev.COLOUR_TOL} of its colour.
Shape: the fill ratio of that colour's largest blob in its bounding box (square 1, circle 0.785,
triangle 0.5). Heatmap IoU: each word's map (sdlens pooling: all layers, all steps), normalised to
[0, 1] and thresholded at 0.4 (DAAM's protocol), against the **colour segment of the generated
object** (the ground truth is what the model drew, found by colour, not the training masks).

| recipe | CFG | seeds | single: colour | single: shape | two: both colours | two: both shapes | IoU colour words | IoU shape words | IoU mean | images |
|---|---|---|---|---|---|---|---|---|---|---|
{table}

## What these numbers say
- **The model draws what it is asked.** Single objects: the asked colour {_pct(g['single_colour'])}
  and the asked shape {_pct(g['single_shape'])} of the time at CFG 7.5 ({g['images']} images on the
  test seeds); two objects: both colours {_pct(g['double_both_colours'])}, both shapes
  {_pct(g['double_both_shapes'])} (shape binding in two-object scenes is the weakest part: the
  model sometimes swaps the two shapes between the colours).
- **Heatmaps lie on their objects**: mean word-heatmap IoU {g['iou_mean']:.2f} (colour words
  {g['iou_colour_words']:.2f}, shape words {g['iou_shape_words']:.2f}). {refine_note}
- **CFG matters** where the prompt is hard: at CFG 1 (no guidance) the same seeds give both colours
  of two objects {_pct(g1['double_both_colours'])} and both shapes {_pct(g1['double_both_shapes'])},
  against {_pct(g['double_both_colours'])} and {_pct(g['double_both_shapes'])} at CFG 7.5; single
  objects: colour {_pct(g1['single_colour'])}, shape {_pct(g1['single_shape'])} at CFG 1.
{ablation}- **Reproducing it**: {train['reproduce']}
{free_section}"""


def readme_paragraph(evaluation: dict, train: dict) -> str:
    """The repository README's paragraph on the shipped model (between the markers)."""
    g, g1 = _by_cfg(evaluation["test"], 7.5), _by_cfg(evaluation["test"], 1.0)
    return f"""`sdlens/models/shapes/weights` is a small Stable Diffusion (the same component classes: CLIP
tokenizer with the real vocabulary, `CLIPTextModel`, `UNet2DConditionModel`, `AutoencoderKL`,
DDIM) trained by sdlens's own script on coloured circles, squares and triangles, so that
"the map for 'circle' lies on the circle" is a measurable fact. Its model card
([`sdlens/models/shapes/weights/README.md`](sdlens/models/shapes/weights/README.md)) gives the
data, architecture, training time, measured accuracy and heatmap IoU — and says plainly that its
cross-attention was taught to localise by an extra loss, with the IoU of the same recipe without
it. Measured on held-out test seeds at CFG 7.5 ({g['images']} images; the prompts are training
captions): the asked colour {_pct(g['single_colour'])} and the asked shape
{_pct(g['single_shape'])} (single objects), both colours {_pct(g['double_both_colours'])} and both
shapes {_pct(g['double_both_shapes'])} (two objects); colour and shape words' heatmaps overlap
their objects' colour segments with mean IoU {g['iou_mean']:.2f} (DAAM's protocol; colour words
{g['iou_colour_words']:.2f}, shape words {g['iou_shape_words']:.2f}). Without guidance (CFG 1)
two-object prompts get both shapes right {_pct(g1['double_both_shapes'])} of the time. It trained
for {train['unet_steps']:,} steps plus a {train['refine_steps']:,}-step refine stage
({train['total_minutes']:.0f} minutes on 2 CPU cores); `python -m sdlens.models.shapes.train
--export DIR` retrains or resumes it. These figures are written by `python -m
sdlens.models.shapes.card` from the model's result files."""


# --------------------------------------------------------------------------- free vs taught
MEASURE_NAMES = {"iou": "IoU@0.4", "mass": "mass in object", "pointing": "pointing hits"}


def interval(row: dict, measure: str = "iou", kind: str = "default") -> dict | None:
    """``{"mean", "low", "high"}`` of a result row's ``measure`` for map ``kind`` (the
    bootstrap 95% interval of :func:`sdlens.models.shapes.evaluate.interval_rows`); None for a
    row measured before intervals were."""
    return ((row.get("intervals") or {}).get(kind) or {}).get(measure)


def verdict(a_name: str, a: dict | None, b_name: str, b: dict | None,
            measure: str = "iou") -> str:
    """One sentence comparing two models on ``measure`` from their intervals: which is higher
    when the bootstrap 95% intervals do not overlap, else "inconclusive"; "inconclusive" too
    when either has no interval."""
    text = _verdict(a_name, a, b_name, b, MEASURE_NAMES.get(measure, measure))
    return text[0].upper() + text[1:]


def _verdict(a_name: str, a: dict | None, b_name: str, b: dict | None, label: str) -> str:
    if a is None or b is None:
        missing = " and ".join(n for n, x in ((a_name, a), (b_name, b)) if x is None)
        return (f"{a_name} vs {b_name}, {label}: inconclusive (no interval measured for "
                f"{missing}: its row predates the bootstrap measures).")
    fa, fb = (f"{x['mean']:.2f} [{x['low']:.2f}, {x['high']:.2f}]" for x in (a, b))
    if a["low"] > b["high"]:
        return f"{a_name} scores higher than {b_name} on {label}: {fa} vs {fb} (95% intervals)."
    if b["low"] > a["high"]:
        return f"{b_name} scores higher than {a_name} on {label}: {fb} vs {fa} (95% intervals)."
    return (f"{a_name} vs {b_name}, {label}: inconclusive, the 95% intervals overlap ({fa} vs "
            f"{fb}).")


def _ci(x: dict | None) -> str:
    return "n/a" if x is None else f"{x['mean']:.2f} [{x['low']:.2f}, {x['high']:.2f}]"


def taught_row(ev_u: dict, cfg: float = 7.5) -> dict | None:
    """The taught UNet's row for the comparison at ``cfg``: on the MMDiT's test seeds and image
    count (``free_vs_taught``, :func:`measure_intervals` / :func:`measure_common_cfg`) where
    measured; else, at its default CFG 7.5, its card's row; else None (not measured)."""
    for r in ev_u.get("free_vs_taught") or []:
        if float(r["guidance_scale"]) == float(cfg):
            return r
    return _by_cfg(ev_u["test"], 7.5) if float(cfg) == 7.5 else None


def _at(rows: list[dict], cfg: float) -> dict | None:
    return next((r for r in rows if float(r["guidance_scale"]) == float(cfg)), None)


def best_block(ev_m: dict) -> str | None:
    """The MMDiT block whose raw maps score the highest mean IoU on the VALIDATION seeds
    (``validation_blocks``); None before those were measured."""
    blocks = {k: v["mean"] for k, v in
              ((ev_m.get("validation_blocks") or {}).get("iou_by_map") or {}).items()
              if k.startswith("block.")}
    return max(blocks, key=blocks.get) if blocks else None


def stopped_at(row: dict) -> str:
    """A sentence on where an ablation run cut short was measured (its ``stopped`` record)."""
    stop = row.get("stopped")
    if not stop:
        return ""
    where = ("the UNet stage, before the refine stage" if stop["stage"] == "unet"
             else "the refine stage")
    schedule = ("the shipped model's learning-rate schedule, replayed step for step"
                if stop.get("schedule") == "shipped" else f"the {stop.get('schedule')} schedule")
    return (f" It was measured at its last checkpoint, step {row['train_steps']:,}, in {where}, "
            f"on {schedule} (learning rate {stop['lr']:.1e} there).")


def cache_words(ablation: list[dict], train: dict) -> str:
    """The ablation's latent cache beside the shipped model's (``training.json``'s ``cache``)."""
    n = min(a["cache"] for a in ablation)
    return (f"a cache of as many scenes ({n:,})" if n == train.get("cache")
            else f"a cache of {n:,} scenes (the shipped model's: {train.get('cache', 'unknown')})")


def free_vs_taught_verdicts(unet: tuple[dict, dict], mmdit: tuple[dict, dict] | None) -> str:
    """The free-vs-taught verdict sentences, generated from the result files (:func:`verdict`):
    each free model against the taught UNet at each one's default CFG, then at ``COMMON_CFG``
    where both were measured there."""
    out = []
    for label, cfg_m, cfg_u in (("at each model's default CFG", None, 7.5),
                                (f"at the common CFG {COMMON_CFG:g}", COMMON_CFG, COMMON_CFG)):
        ev_u = unet[0]
        taught = taught_row(ev_u, cfg_u)
        free = []
        if mmdit is not None:
            r = _at(mmdit[0]["test"], mmdit[0]["default_guidance"] if cfg_m is None else cfg_m)
            if r is not None:
                free.append(("shapes-mmdit (free)", r))
        free += [("the UNet recipe without the attention loss", a)
                 for a in ev_u.get("ablation", []) if float(a["guidance_scale"]) == float(cfg_u)]
        if taught is None or not free:
            continue
        lines = [verdict(name, interval(r, m), "the taught UNet", interval(taught, m), m)
                 for name, r in free for m in ("iou", "mass", "pointing")]
        out.append(f"Verdicts {label}, written from the numbers (bootstrap 95% intervals over "
                   "images):\n\n" + "\n".join(f"- {line}" for line in lines))
    return "\n\n".join(out)


def _maybe_results(folder: Path) -> tuple[dict, dict] | None:
    """(evaluation, training) of a model folder once its test rows are measured, else None."""
    if not (folder / EVALUATION.name).exists() or not (folder / TRAINING.name).exists():
        return None
    results = load_results(folder)
    return results if results[0].get("test") else None


def _iou(r: dict, kind: str) -> float | None:
    return (r.get("iou_by_map") or {}).get(kind, {}).get("mean")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def free_vs_taught(unet: tuple[dict, dict], mmdit: tuple[dict, dict] | None) -> str:
    """The table both cards carry: each recipe's accuracy and map measures on the same test
    seeds, at its default guidance and at ``COMMON_CFG``, with its attention supervision and
    training steps."""
    rows = []
    ev_u, tr_u = unet
    for common in (False, True):
        if mmdit is not None:
            ev_m, tr_m = mmdit
            r = _at(ev_m["test"], COMMON_CFG if common else ev_m["default_guidance"])
            if r is not None:
                best = best_block(ev_m)
                test_blocks = r.get("iou_by_map") or {}
                raw = _ci(interval(r)) if interval(r) else f"{r['iou_mean']:.2f}"
                if best and best in test_blocks:
                    raw += (f" (best block on validation, {best}: {test_blocks[best]['mean']:.2f} "
                            "on test)")
                concept = interval(r, kind="concept")
                rows.append(("shapes-mmdit (SD3 MMDiT)", "**none**", f"{tr_m['steps']:,}", r, raw,
                             _ci(concept) if concept else _fmt(_iou(r, "concept"))))
        r = taught_row(ev_u, COMMON_CFG if common else 7.5)
        if r is not None:
            rows.append(("shapes (UNet), shipped", "attention loss (taught)",
                         f"{tr_u['unet_steps']:,} + {tr_u['refine_steps']:,} refine", r,
                         _ci(interval(r)) if interval(r) else f"{r['iou_mean']:.2f}",
                         "n/a (no joint attention)"))
        for a in ev_u.get("ablation", []):
            if float(a["guidance_scale"]) != float(COMMON_CFG if common else 7.5):
                continue
            rows.append((f"UNet recipe without the attention loss ({a['cache']:,}-scene cache)",
                         "**none**", f"{a['train_steps']:,}", a,
                         _ci(interval(a)) if interval(a) else f"{a['iou_mean']:.2f}",
                         "n/a (no joint attention)"))
    head = ("| model | attention supervision | training steps | CFG | test seeds | test images | "
            "single: colour | single: shape | two: both colours | two: both shapes | "
            "IoU@0.4 raw maps | mass in object, raw maps | pointing, raw maps | "
            "IoU@0.4 concept maps |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def seeds(r: dict) -> str:
        s_ = r.get("seeds") or []
        return f"{min(s_)}-{max(s_)}" if s_ else "n/a"

    body = "\n".join(
        f"| {name} | {sup} | {steps} | {r['guidance_scale']:g} | {seeds(r)} | {r['images']} | "
        f"{r['single_colour']:.2f} | {r['single_shape']:.2f} | {r['double_both_colours']:.2f} | "
        f"{r['double_both_shapes']:.2f} | {raw} | {_ci(interval(r, 'mass'))} | "
        f"{_ci(interval(r, 'pointing'))} | {concept} |"
        for name, sup, steps, r, raw, concept in rows)
    notes = []
    shipped = tr_u["unet_steps"] + tr_u["refine_steps"]
    ablation = ev_u.get("ablation", [])
    if not ablation:
        notes.append("The UNet recipe without the attention loss is not measured yet.")
    elif min(a["train_steps"] for a in ablation) < shipped:
        a = min(ablation, key=lambda a: a["train_steps"])
        notes.append(
            f"The UNet recipe without the attention loss trained {a['train_steps']:,} steps, not "
            f"the shipped model's {shipped:,}: the fair ablation (as many steps, the same cache "
            "and schedule: `train.py --attn-loss 0 --steps 5700 --schedule shipped`) had not "
            "reached them when these rows were measured (CPU only, no GPU lent)."
            + stopped_at(a))
    else:
        notes.append(
            f"The UNet recipe without the attention loss: the shipped recipe with "
            f"`--attn-loss 0`, trained as many steps ({shipped:,}, the refine stage included, "
            "without its attention terms) on the same schedule (`python -m "
            "sdlens.models.shapes.train --vae-from sdlens/models/shapes/weights/vae "
            "--attn-loss 0 --steps 5700 --schedule shipped`: the shipped learning rates replayed "
            f"step for step) and {cache_words(ablation, tr_u)}, with the shipped VAE; measured "
            "by `python -m sdlens.models.shapes.card "
            "--measure-ablation WORK`.")
    missing = [name for name, r in (("the taught UNet", taught_row(ev_u, COMMON_CFG)),
                                     ("the UNet without the attention loss",
                                      _at(ablation, COMMON_CFG)),
                                     ("shapes-mmdit", _at(mmdit[0]["test"], COMMON_CFG)
                                      if mmdit is not None else {}))
               if r is None]
    if missing:
        notes.append(f"Not measured at the common CFG {COMMON_CFG:g} on these seeds: "
                     f"{', '.join(missing)}.")
    note = "".join(f"\n\n{n}" for n in notes)
    return head + "\n" + body + note + "\n\n" + free_vs_taught_verdicts(unet, mmdit)


FREE_VS_TAUGHT_NOTE = (
    f"All rows: the test seeds (2000-), 25 steps, each model at its default CFG (the MMDiT's "
    f"chosen on validation seeds, the UNet's 7.5) and at the common CFG {COMMON_CFG:g} (no "
    "guidance), the evaluation prompts of "
    "`sdlens.models.shapes.evaluate`; IoU is DAAM's protocol (map normalised to [0, 1], threshold "
    "0.4) against the colour segment of the generated object, averaged over colour and shape words. "
    "Mass in object: the share of the unnormalised map inside the object's largest blob; "
    "pointing: the share of maps whose maximum lies in it; intervals: bootstrap 95% over images "
    "(an image's value the mean over its words). "
    "Raw maps: the attention of each image position to the word's tokens, pooled over every site "
    "and step (for the MMDiT: the text columns of its joint attention). Concept maps: "
    "ConceptAttention's method (Helbling et al., 2025) as its code computes it (sdlens's default, "
    "`concept_method=\"conceptattention\"`), the concepts being the 4 colour and 3 shape "
    "words and \"background\", whatever the prompt. Written by `python -m sdlens.models.shapes.card`.")


def mmdit_description() -> dict:
    """The shipped MMDiT's transformer in words, and its parameter count, from ``architecture``."""
    from sdlens.models.shapes.architecture import LATENT_SIZE, MMDIT_CONFIG, mmdit_transformer

    cfg = MMDIT_CONFIG
    grid = LATENT_SIZE // cfg["patch_size"]
    text = (f"{cfg['num_layers']} joint-attention blocks, width "
            f"{cfg['num_attention_heads'] * cfg['attention_head_dim']} ({cfg['num_attention_heads']} "
            f"heads of {cfg['attention_head_dim']}), patch {cfg['patch_size']}: {grid}x{grid} image "
            f"tokens, text width {cfg['joint_attention_dim']}")
    return {"text": text, "params": sum(p.numel() for p in mmdit_transformer().parameters())}


def mmdit_card(evaluation: dict, train: dict, unet: tuple[dict, dict]) -> str:
    """The "shapes-mmdit" card's markdown."""
    from sdlens.models.shapes.architecture import MMDIT_CALL_DEFAULTS, MMDIT_TEXT_HIDDEN

    rec = recommended_from(evaluation)  # what write() puts in the folder's recommended.json
    g0 = rec["guidance_scale"]
    g, g1 = _by_cfg(evaluation["test"], g0), _by_cfg(evaluation["test"], 1.0)
    desc = mmdit_description()
    facts = component_facts(MMDIT)
    blocks = sorted((k for k in (g.get("iou_by_map") or {}) if k.startswith("block.")),
                    key=lambda k: int(k.split(".")[1]))
    chosen = best_block(evaluation)
    block_rows = "\n".join(f"| {k}{' (best on validation)' if k == chosen else ''} | "
                            f"{g['iou_by_map'][k]['colour']:.2f} | "
                            f"{g['iou_by_map'][k]['shape']:.2f} | {g['iou_by_map'][k]['mean']:.2f} |"
                            for k in blocks + (["concept"] if "concept" in g.get("iou_by_map", {}) else []))
    val = "\n".join(_row({**r, "recipe": r.get("recipe", "shapes-mmdit")})
                     for r in evaluation.get("validation", []))
    test = "\n".join(_row({**r, "recipe": "shapes-mmdit"}) for r in evaluation["test"])
    if evaluation.get("plain_call"):
        test += "\n" + _row(evaluation["plain_call"])
    call = ", ".join(f"{k}={v!r}" for k, v in MMDIT_CALL_DEFAULTS.items())
    concept = _iou(g, "concept")
    best = best_block(evaluation)  # chosen on the validation seeds, its test IoU reported
    goal_maps = {"raw maps, all blocks": g["iou_mean"], "concept maps": concept,
                 **({f"raw maps, {best} (best on validation)": g["iou_by_map"][best]["mean"]}
                    if best in (g.get("iou_by_map") or {}) else {})}
    goal_name = max((k for k, v in goal_maps.items() if v is not None), key=goal_maps.get)
    goal = goal_maps[goal_name]
    reached = ("reached" if goal >= 0.5 else "**not reached**")
    methods = concept_methods_section(MMDIT)
    tried = ""
    if evaluation.get("validation_readouts"):
        ro = evaluation["validation_readouts"]
        best_ro = max(ro["iou_by_map"], key=lambda k: ro["iou_by_map"][k]["mean"])
        tried = (f"  Tried in search of a readout that localises, on the validation seeds "
                 f"({ro['images']} images, CFG {ro['guidance_scale']:g}; "
                 f"`python -m sdlens.models.shapes.card --try-readouts`; its concept maps "
                 f"are sdlens's variant, measured before the paper's method became the "
                 f"default): "
                 + ", ".join(f"{k} {v['mean']:.2f}" for k, v in ro["iou_by_map"].items())
                 + f". The best, {best_ro}, reaches {ro['iou_by_map'][best_ro]['mean']:.2f}: no "
                 "way of reading these maps that we tried reaches IoU 0.5. How that compares "
                 "with the taught UNet: the verdicts under the free-vs-taught table.\n")
    speed = ""
    if evaluation.get("speed"):
        gen, ov = evaluation["speed"]["generation"], evaluation["speed"]["overhead"]
        ovc = evaluation["speed"]["overhead_concepts"]
        speed = (f"- Speed (`benchmarks/bench_mmdit.py`, {gen['n']} rounds after a warm-up, load "
                 f"{gen['load_before'][0]:.1f} before / {gen['load_after'][0]:.1f} after on "
                 f"{gen['usable_cpus']} CPUs): {gen['label']}: median {gen['median']:.2f} s "
                 f"(min {gen['min']:.2f}, max {gen['max']:.2f}; target 2 s: "
                 f"{gen['target_status']}); recording overhead {ov['median']:.3f}x, "
                 f"{ov['verdict']}; with concept maps {ovc['median']:.3f}x, {ovc['verdict']}.\n")
    plain = evaluation.get("plain_call")
    if plain:
        plain_text = (f"A plain `pipe(prompt)` runs at the pipeline's own CFG "
                      f"{plain['guidance_scale']:g} with {plain['max_sequence_length']} zero T5 "
                      "positions; measured the same way on the test seeds "
                      "(`python -m sdlens.models.shapes.card --measure-plain-call`), it draws the "
                      f"asked shape {plain['single_shape']:.2f} of the time for single objects "
                      f"(recommended settings: {g['single_shape']:.2f}) and both shapes "
                      f"{plain['double_both_shapes']:.2f} (recommended: "
                      f"{g['double_both_shapes']:.2f}); its row is the last of the table below.")
    else:
        plain_text = ("A plain `pipe(prompt)` runs at the pipeline's own CFG 7 with 256 zero T5 "
                      "positions: it was not measured with the evaluation below (the figures are "
                      "for the recommended settings; `python -m sdlens.models.shapes.card "
                      "--measure-plain-call` measures it).")
    return f"""# shapes-mmdit — a small Stable Diffusion 3 trained by sdlens, attention learned freely

**No attention supervision of any kind was used to train this model**: its only loss is the
rectified-flow loss on the images (no attention loss, no mask, no refine stage). Whatever its
attention maps and concept maps show was learned freely. It is the second model shipped in
sdlens, beside the UNet model "shapes" (whose cross-attention *was* taught); the two together
compare, with ground truth, maps learned freely and maps taught (the verdicts, written from the
numbers with their intervals, are under the free-vs-taught table).

```python
pipe = sdlens.load_pipeline("shapes-mmdit")            # StableDiffusion3Pipeline, CPU
trace = sdlens.generate(pipe, "a red circle", guidance_scale={g0:g}, {call})
image = pipe("a red circle", **sdlens.recommended_settings(pipe)).images[0]  # untraced, same settings
```

The recommended settings are in this folder's `recommended.json`
({", ".join(f"`{k}={v!r}`" for k, v in rec.items())}); Studio, sweeps and the CLI use them by default.
{plain_text}

It has no T5: the pipeline appends `max_sequence_length` zero tokens to the text (256 unless told).
The model was trained mostly without them (`{call}`, which sdlens's own calls on it pass, and which
costs nothing) and on 256 of them in {train['t5_zero_share']:.0%} of its batches, so that a plain
`pipe(prompt)` stays within what it was trained on (its figures below are for `{call}`). A plain `StableDiffusion3Pipeline.from_pretrained(folder,
text_encoder_3=None, tokenizer_3=None)` loads it (diffusers asks for absent components by name).

## Data
The same generator, captions and latent cache code as the "shapes" model
(`sdlens.models.shapes.dataset`, `train.build_cache`): 64x64 scenes of one or two coloured circles,
squares and triangles, {train['cache']:,} scenes encoded once by the shapes VAE.

## Architecture (diffusers classes)
| component | class | size |
|---|---|---|
| tokenizers | `CLIPTokenizer` (the real CLIP vocabulary), the same in both CLIP slots | |
| text encoders | two `CLIPTextModelWithProjection`, hidden {MMDIT_TEXT_HIDDEN[0]} and {MMDIT_TEXT_HIDDEN[1]}, 3 layers; no T5 | {(facts['text_encoder_params'] + facts['text_encoder_2_params']) / 1e6:.1f}M |
| transformer | `SD3Transformer2DModel`, {desc['text']} | {desc['params'] / 1e6:.1f}M |
| VAE | the "shapes" model's `AutoencoderKL` (f=4, 4 channels), scaling factor {facts['scaling_factor']:.4f}, shift factor {facts['shift_factor']:.4f} (measured on this model's latent cache, as SD3's were) | {facts['vae_params'] / 1e6:.1f}M |
| scheduler | `FlowMatchEulerDiscreteScheduler`, shift 1 | |

Weights are fp16 safetensors. The transformer row is read from `architecture.py`.

## Training (`python -m sdlens.models.shapes.train --arch mmdit`)
{train['steps']:,} steps of batch {train['batch']} in {train['minutes']:.0f} minutes, one torch
thread on a 2-core CPU shared with other jobs ({train['seconds_per_step']:.2f} s per step), AdamW, lr {train['lr']:g}
with 200 warm-up steps and a cosine decay to 10% over a {train['budget_minutes']:g}-minute budget,
EMA 0.999, seed 0; rectified flow (`x_t = (1 - s) x0 + s e`, target `e - x0`, `s` logit-normal),
10% empty captions; final training MSE {train['final_mse']:.3f} (mean of the last 500 steps).
No GPU was lent to this task; the CPU reproduces it with `{train['reproduce']}` (the learning rate
follows elapsed time, so the step count depends on the machine).

## Measured (`python -m sdlens.models.shapes.card --measure-mmdit`)
{g['steps']} steps; the prompts, seeds and judge of the "shapes" model's card: the prompts are
in-distribution, the **test** seeds ({ev.TEST_SEED}-) were never used for a decision, the default
guidance {g0:g} was chosen on the **validation** seeds ({ev.VALIDATION_SEED}-, rows below).

| recipe | CFG | seeds | single: colour | single: shape | two: both colours | two: both shapes | IoU colour words | IoU shape words | IoU mean | images |
|---|---|---|---|---|---|---|---|---|---|---|
{test}
{val}

Per block (test seeds, CFG {g0:g}), raw joint-attention maps and concept maps:

| map | IoU colour words | IoU shape words | IoU mean |
|---|---|---|---|
{block_rows}

- Single objects: the asked colour {_pct(g['single_colour'])} (target 95%), the asked shape
  {_pct(g['single_shape'])} (target 80%); two objects: both colours {_pct(g['double_both_colours'])}
  (target 70%), both shapes {_pct(g['double_both_shapes'])}.
- Without guidance (CFG 1): single colour {_pct(g1['single_colour'])}, shape
  {_pct(g1['single_shape'])}, both colours {_pct(g1['double_both_colours'])}, both shapes
  {_pct(g1['double_both_shapes'])}.
- Maps learned freely: of the map types chosen without looking at the test seeds, the best
  ({goal_name}) reaches IoU {goal:.2f} on them (goal 0.5: {reached}).
{tried}{speed}{methods}
## Free vs taught
{free_vs_taught(unet, (evaluation, train))}

{FREE_VS_TAUGHT_NOTE}
"""


def recommended_from(evaluation: dict) -> dict:
    """The MMDiT's recommended call settings, from its measured results: the default guidance
    its validation rows chose, the call defaults it was trained for, its evaluation's 25 steps."""
    from sdlens.models.shapes.architecture import MMDIT_CALL_DEFAULTS

    return {"guidance_scale": evaluation["default_guidance"], **MMDIT_CALL_DEFAULTS,
            "num_inference_steps": 25}


def concept_methods_section(folder: Path = MMDIT) -> str:
    """The card's comparison of the two concept-map methods (``concept_methods.json``,
    :func:`measure_concept_methods`); empty before it is measured."""
    path = folder / CONCEPT_METHODS_FILE
    if not path.exists():
        return ""
    cm = json.loads(path.read_text())
    rows = []
    for split in ("validation", "test"):
        for method, r in (cm.get(split) or {}).items():
            iv = r["intervals"]
            span = (f"{min(r['seeds'])}-{max(r['seeds'])}" if len(r["seeds"]) > 1
                    else str(r["seeds"][0]))
            rows.append(f"| {method} | {split} | {span} | "
                        f"{r['images']} | {_ci(iv['iou'])} | {_ci(iv['mass'])} | "
                        f"{_ci(iv['pointing'])} |")
    said = []
    for split in ("validation", "test"):
        both = cm.get(split) or {}
        if len(both) == 2:
            said += [f"- {split.capitalize()} seeds: " + verdict(
                '"conceptattention"', both["conceptattention"]["intervals"][m], '"sdlens"',
                both["sdlens"]["intervals"][m], m) for m in MEASURES_ORDER]
    return (f"\n### Concept maps: the paper's method and sdlens's variant "
            f"(`python -m sdlens.models.shapes.card --concept-methods`)\n"
            f"CFG {cm['guidance_scale']:g}, concepts {', '.join(cm['concepts'])}, default heatmap "
            "arguments; \"conceptattention\" is the default (ConceptAttention's code's choices, "
            "`sdlens.engine.joint`), \"sdlens\" the named variant. Intervals: bootstrap 95% over "
            "images.\n\n| method | seeds | seed range | images | IoU@0.4 | mass in object | "
            "pointing |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            + "\n".join(said) + "\n")


MEASURES_ORDER = ("iou", "mass", "pointing")


def mmdit_paragraph(evaluation: dict, train: dict) -> str:
    """The repository README's paragraph on the MMDiT model (between its markers)."""
    rec = recommended_from(evaluation)
    g = _by_cfg(evaluation["test"], rec["guidance_scale"])
    concept = _iou(g, "concept")
    call = ", ".join(f"{k}={v!r}" for k, v in rec.items())
    return f"""`sdlens.load_pipeline("shapes-mmdit")` is a small Stable Diffusion 3 (`SD3Transformer2DModel`,
two small CLIP encoders, no T5, flow matching) trained on the same shapes world **with no
attention supervision of any kind**. On held-out test seeds at CFG {g['guidance_scale']:g}
({g['images']} images): the asked colour {_pct(g['single_colour'])} and shape
{_pct(g['single_shape'])} (single objects), both colours {_pct(g['double_both_colours'])} and both
shapes {_pct(g['double_both_shapes'])} (two objects). Free vs taught: its raw joint-attention word
maps overlap their objects with IoU {g['iou_mean']:.2f} and its concept maps with IoU
{_fmt(concept)}, against {taught_row(load_results()[0])['iou_mean']:.2f} for the UNet
model whose maps were taught. {verdict("shapes-mmdit", interval(g), "the taught UNet",
interval(taught_row(load_results()[0])))} Trained for {train['steps']:,} steps ({train['minutes']:.0f} minutes
on 2 CPU cores); its card ([`sdlens/models/shapes/weights_mmdit/README.md`](sdlens/models/shapes/weights_mmdit/README.md))
has the per-block figures and the full free-vs-taught table. The card's figures are for its
recommended settings (its folder's `recommended.json`, which Studio, sweeps and the CLI use by default):
`pipe(prompt, **sdlens.recommended_settings(pipe))`, i.e. `pipe(prompt, {call})`; a plain
`pipe(prompt)` runs at the pipeline's own CFG 7 with 256 zero T5 positions instead."""


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with what lies between the markers replaced by ``body``."""
    a, b = text.index(begin) + len(begin), text.index(end)
    return text[:a] + "\n" + body.strip("\n") + "\n" + text[b:]


def write(folder: Path = WEIGHTS, readme: Path | None = README) -> None:
    """Write both shipped models' cards and the README's paragraphs on them."""
    evaluation, train = load_results(folder)
    (folder / "README.md").write_text(model_card(evaluation, train))
    mmdit = _maybe_results(MMDIT)
    if mmdit is not None:
        from sdlens.pipeline import RECOMMENDED

        (MMDIT / RECOMMENDED).write_text(json.dumps(recommended_from(mmdit[0]), indent=1) + "\n")
        (MMDIT / "README.md").write_text(mmdit_card(*mmdit, (evaluation, train)))
    if readme is not None and readme.exists():
        text = replace_between(readme.read_text(), BEGIN, END, readme_paragraph(evaluation, train))
        if mmdit is not None:
            text = replace_between(text, MMDIT_BEGIN, MMDIT_END, mmdit_paragraph(*mmdit))
        readme.write_text(text)


def measure(folder: Path = WEIGHTS, seeds: int = ev.N_SEEDS) -> list[dict]:
    """Evaluate the model in ``folder`` on the test seeds at CFG 7.5 and 1 and record the rows in
    its ``evaluation.json``."""
    import time

    from sdlens.pipeline import load_pipeline

    pipe = load_pipeline(folder, device="cpu")
    rows = []
    for g in (7.5, 1.0):
        t0 = time.time()
        r = ev.evaluate(pipe, ev.default_prompts(), list(range(ev.TEST_SEED, ev.TEST_SEED + seeds)), g)
        rows.append({**r, "recipe": "shipped", "split": "test", "seconds": round(time.time() - t0, 1)})
    evaluation = json.loads((folder / EVALUATION.name).read_text())
    evaluation["test"] = rows
    (folder / EVALUATION.name).write_text(json.dumps(evaluation, indent=1) + "\n")
    return rows


MMDIT_SEEDS = 3  # x 36 prompts = 108 images per guidance scale (the UNet card: 6 seeds)
MMDIT_CONCEPTS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "background"]


def mmdit_maps() -> dict[str, dict]:
    """The map kinds the MMDiT is scored on besides the pooled raw maps: each block, and the
    concept maps (see ``FREE_VS_TAUGHT_NOTE``)."""
    from sdlens.models.shapes.architecture import MMDIT_CONFIG

    maps = {f"block.{i}": {"layers": f"block.{i}"} for i in range(MMDIT_CONFIG["num_layers"])}
    maps["concept"] = {"maps": "concepts"}
    return maps


def measure_mmdit(folder: Path = MMDIT, split: str = "test", guidance: tuple = (),
                  seeds: int = MMDIT_SEEDS, maps: bool = True) -> list[dict]:
    """Evaluate the MMDiT in ``folder`` on a seed split at the given guidance scales (default:
    its default guidance and 1) and record the rows in its ``evaluation.json`` under the split's
    name. ``maps``: also score every block's maps and the concept maps (:func:`mmdit_maps`) at
    the default guidance (the other rows score the pooled raw maps only)."""
    import time

    from sdlens.models.shapes.architecture import MMDIT_CALL_DEFAULTS
    from sdlens.pipeline import load_pipeline

    path = folder / EVALUATION.name
    evaluation = json.loads(path.read_text()) if path.exists() else {}
    guidance = guidance or (evaluation["default_guidance"], 1.0)
    pipe = load_pipeline(folder, device="cpu")
    first = ev.SPLITS[split]
    rows = []
    for g in guidance:
        t0 = time.time()
        full = maps and g == evaluation.get("default_guidance")
        call = {**MMDIT_CALL_DEFAULTS, **({"concepts": MMDIT_CONCEPTS} if full else {})}
        r = ev.evaluate(pipe, ev.default_prompts(), list(range(first, first + seeds)), g,
                        call=call, maps=mmdit_maps() if full else None)
        rows.append({**r, "recipe": "shapes-mmdit", "split": split,
                     "seconds": round(time.time() - t0, 1)})
    evaluation[split] = rows
    path.write_text(json.dumps(evaluation, indent=1) + "\n")
    return rows


def measure_mmdit_plain(folder: Path = MMDIT, seeds: int = MMDIT_SEEDS) -> dict:
    """Evaluate the plain call on the test seeds, as a new user makes it: ``pipe(prompt)`` with
    the pipeline's own defaults (its ``guidance_scale`` and ``max_sequence_length``, i.e. 256
    zero T5 positions; nothing of ``recommended.json``); the row goes to ``evaluation.json``
    under ``plain_call`` and the card reports it beside the recommended settings' row."""
    import inspect
    import time

    from sdlens.pipeline import load_pipeline

    pipe = load_pipeline(folder, device="cpu")
    params = inspect.signature(type(pipe).__call__).parameters
    g = float(params["guidance_scale"].default)
    t0 = time.time()
    r = ev.evaluate(pipe, ev.default_prompts(), list(range(ev.TEST_SEED, ev.TEST_SEED + seeds)), g,
                    call={}, progress=False)
    row = {**r, "recipe": "shapes-mmdit, plain pipe(prompt)", "split": "test",
           "max_sequence_length": int(params["max_sequence_length"].default),
           "seconds": round(time.time() - t0, 1)}
    path = folder / EVALUATION.name
    evaluation = json.loads(path.read_text())
    evaluation["plain_call"] = row
    path.write_text(json.dumps(evaluation, indent=1) + "\n")
    return row


def training_facts(work: Path, budget_minutes: float, lr: float, batch: int) -> dict:
    """The MMDiT run's facts, read from its log (``work/log.jsonl``) and checkpoint."""
    import torch

    from sdlens.models.shapes.train import T5_ZEROS

    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r.get("phase") == "mmdit" and "step" in r]
    cache = next(r for r in log if r.get("phase") == "cache")
    state = torch.load(work / "mmdit.pt", weights_only=False, map_location="cpu")
    last = steps[-10:]  # 10 log rows = the last 500 steps
    return {
        "steps": int(state["step"]), "batch": batch, "lr": lr, "budget_minutes": budget_minutes,
        "minutes": round(state["elapsed"] / 60, 1),
        "seconds_per_step": round(state["elapsed"] / max(1, state["step"]), 2),
        "final_mse": sum(r["mse"] for r in last) / len(last), "cache": cache["n"],
        "t5_zero_share": dict(T5_ZEROS)[256],
        "reproduce": (f"python -m sdlens.models.shapes.train --arch mmdit --vae-from "
                      f"sdlens/models/shapes/weights/vae --cache {cache['n']} --steps 12000 "
                      f"--minutes {budget_minutes:g} --lr {lr:g} --batch {batch} --threads 1 "
                      f"--export sdlens/models/shapes/weights_mmdit"),
        "_source": f"written by sdlens.models.shapes.card.training_facts from {work}/log.jsonl",
    }


def readout_maps() -> dict[str, dict]:
    """Other ways of reading the MMDiT's maps, tried on the validation seeds in search of one
    that localises: concept maps per block and of the last blocks, raw and concept maps over
    early / middle / late steps, DAAM's pooling of the raw maps."""
    from sdlens.models.shapes.architecture import MMDIT_CONFIG

    n = MMDIT_CONFIG["num_layers"]
    maps = {f"concept, block.{b}": {"maps": "concepts", "layers": f"block.{b}"} for b in range(n)}
    maps["concept, last 3 blocks"] = {"maps": "concepts",
                                      "layers": [f"block.{b}" for b in range(n - 3, n)]}
    for name, steps in (("steps 1-8", slice(0, 8)), ("steps 9-17", slice(8, 17)),
                        ("steps 18-25", slice(17, 25))):
        maps[f"raw, {name}"] = {"steps": steps}
        maps[f"concept, {name}"] = {"maps": "concepts", "steps": steps}
    maps["raw, DAAM pooling"] = {"pooling": "daam"}
    return maps


def try_readouts(folder: Path = MMDIT, seeds: int = 1) -> dict:
    """Score :func:`readout_maps` on the validation seeds at the default guidance and record the
    IoUs in ``evaluation.json`` under ``validation_readouts``."""
    from sdlens.models.shapes.architecture import MMDIT_CALL_DEFAULTS
    from sdlens.pipeline import load_pipeline

    path = folder / EVALUATION.name
    evaluation = json.loads(path.read_text())
    g = evaluation["default_guidance"]
    r = ev.evaluate(load_pipeline(folder, device="cpu"), ev.default_prompts(),
                    list(range(ev.VALIDATION_SEED, ev.VALIDATION_SEED + seeds)), g,
                    call={**MMDIT_CALL_DEFAULTS, "concepts": MMDIT_CONCEPTS}, maps=readout_maps())
    out = {"guidance_scale": g, "seeds": r["seeds"], "images": r["images"],
           "iou_by_map": r["iou_by_map"]}
    evaluation["validation_readouts"] = out
    path.write_text(json.dumps(evaluation, indent=1) + "\n")
    return out


def choose_guidance(candidates: tuple, folder: Path = MMDIT, seeds: int = 1) -> float:
    """Measure the MMDiT on the validation seeds at each candidate guidance scale and make the
    best (mean of the four accuracy rates; the lower scale on a tie) its default guidance."""
    rows = measure_mmdit(folder, "validation", tuple(candidates), seeds, maps=False)
    score = lambda r: (r["single_colour"] + r["single_shape"] + r["double_both_colours"]  # noqa: E731
                       + r["double_both_shapes"]) / 4
    best = max(rows, key=lambda r: (round(score(r), 6), -r["guidance_scale"]))
    path = folder / EVALUATION.name
    evaluation = json.loads(path.read_text())
    evaluation["default_guidance"] = best["guidance_scale"]
    path.write_text(json.dumps(evaluation, indent=1) + "\n")
    return best["guidance_scale"]


def measure_ablation(work: Path, seeds: int | None = None, folder: Path = WEIGHTS) -> list[dict]:
    """Evaluate the UNet recipe trained without the attention loss (the EMA weights of the last
    stage in ``work``: ``refine.pt`` when it ran, else ``unet.pt``) on the MMDiT's test seeds and
    image count (``MMDIT_SEEDS``), at the UNet's CFG 7.5 and at ``COMMON_CFG``, with the
    bootstrap intervals, and record the rows in the shipped model's ``evaluation.json`` under
    ``ablation`` (steps counted over both stages)."""
    import tempfile
    import time

    import torch

    from sdlens.models.shapes.train import export
    from sdlens.pipeline import load_pipeline

    seeds = MMDIT_SEEDS if seeds is None else seeds
    steps = sum(int(torch.load(work / f"{stage}.pt", weights_only=False, map_location="cpu")["step"])
                for stage in ("unet", "refine") if (work / f"{stage}.pt").exists())
    cache = len(torch.load(work / "cache.pt", weights_only=False)["captions"])
    # where the run stopped: its last logged stage and learning rate (a run cut short is
    # measured at its last checkpoint, and the card says where on the schedule that was)
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()
           if line.strip()] if (work / "log.jsonl").exists() else []
    logged = [e for e in log if e.get("phase") in ("unet", "refine") and "lr" in e]
    args = json.loads((work / "args.json").read_text()) if (work / "args.json").exists() else {}
    stopped = {"stage": logged[-1]["phase"], "lr": float(logged[-1]["lr"]),
               "schedule": args.get("schedule", "time")} if logged else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pipe = load_pipeline(export(work, Path(tmp) / "model"), device="cpu")
        for cfg in (7.5, COMMON_CFG):
            t0 = time.time()
            r = ev.evaluate(pipe, ev.default_prompts(),
                            list(range(ev.TEST_SEED, ev.TEST_SEED + seeds)), cfg, progress=False)
            rows.append({**r, "recipe": f"no attention loss, {steps} steps", "split": "test",
                         "stage": "no_attention_loss", "train_steps": steps, "cache": cache,
                         "stopped": stopped,
                         "seconds": round(time.time() - t0, 1)})
    path = folder / EVALUATION.name
    evaluation = json.loads(path.read_text())
    evaluation["ablation"] = rows
    path.write_text(json.dumps(evaluation, indent=1) + "\n")
    return rows


def measure_common_cfg(seeds: int | None = None) -> dict:
    """The shipped MMDiT and the taught UNet at ``COMMON_CFG`` on the same test seeds and image
    count (``MMDIT_SEEDS``), with the bootstrap intervals: the MMDiT's ``COMMON_CFG`` test row
    (its maps and concept maps as in :func:`measure_intervals`), the UNet's ``free_vs_taught`` row
    at that CFG."""
    import time

    from sdlens.models.shapes.architecture import MMDIT_CALL_DEFAULTS
    from sdlens.pipeline import load_pipeline

    seeds = MMDIT_SEEDS if seeds is None else seeds
    prompts, test_seeds = ev.default_prompts(), list(range(ev.TEST_SEED, ev.TEST_SEED + seeds))
    path_m = MMDIT / EVALUATION.name
    evm = json.loads(path_m.read_text())
    mmdit = load_pipeline(MMDIT, device="cpu")
    t0 = time.time()
    r = ev.evaluate(mmdit, prompts, test_seeds, COMMON_CFG,
                    call={**MMDIT_CALL_DEFAULTS, "concepts": MMDIT_CONCEPTS}, maps=mmdit_maps(),
                    progress=False)
    row = {**r, "recipe": "shapes-mmdit", "split": "test", "seconds": round(time.time() - t0, 1)}
    evm["test"] = [x for x in evm["test"] if float(x["guidance_scale"]) != COMMON_CFG] + [row]
    path_m.write_text(json.dumps(evm, indent=1) + "\n")
    del mmdit
    unet = load_pipeline(WEIGHTS, device="cpu")
    t0 = time.time()
    u = ev.evaluate(unet, prompts, test_seeds, COMMON_CFG, progress=False)
    path_u = WEIGHTS / EVALUATION.name
    evu = json.loads(path_u.read_text())
    evu["free_vs_taught"] = [x for x in evu.get("free_vs_taught", [])
                             if float(x["guidance_scale"]) != COMMON_CFG] + [
        {**u, "recipe": "shapes (UNet), shipped", "split": "test",
         "seconds": round(time.time() - t0, 1)}]
    path_u.write_text(json.dumps(evu, indent=1) + "\n")
    return {"mmdit": row, "unet": u}


PREVIEW_SEEDS = (0, 1)  # training seeds: the preview fit looks at neither split


def fit_preview(folder: Path = WEIGHTS, guidance: float = 7.5, seeds: tuple = PREVIEW_SEEDS,
                every: int = 1) -> dict:
    """Fit the linear latent -> RGB preview of the model in ``folder`` against its VAE decoder
    (:func:`sdlens.analysis.previews.fit_linear_decoder` with ``latents=``): the x0 predictions
    of every step of the evaluation's 36 prompts (every ``every``-th) at ``seeds`` (25 steps of
    the model's scheduler, CFG ``guidance``), and write ``latent_rgb.json`` (the previews read a
    model folder's own file)."""
    import torch
    from einops import rearrange

    from sdlens.analysis.previews import fit_linear_decoder, save_linear_decoder
    from sdlens.engine.session import generate
    from sdlens.pipeline import load_pipeline

    pipe = load_pipeline(folder, device="cpu")
    prompts = ev.default_prompts()[::every]
    x0 = [rearrange(generate(pipe, prompts, seed=s, steps=25, guidance_scale=guidance,
                             record=("x0",)).x0,
                    "steps b c h w -> (steps b) c h w") for s in seeds]
    coeffs = fit_linear_decoder(pipe.vae, latents=torch.cat(x0), seed=seeds[0])
    sched = type(pipe.scheduler).__name__.replace("Scheduler", "")
    coeffs["fit_on"] = (f"x0 of every step, {len(prompts)} prompts x seeds {list(seeds)}, "
                        f"25 {sched} steps, CFG {guidance:g}")
    save_linear_decoder(coeffs, folder / "latent_rgb.json")
    return coeffs



CONCEPT_METHODS_FILE = "concept_methods.json"


def measure_concept_methods(folder: Path = MMDIT, validation_seeds: int = 1,
                            test_seeds: int = 2) -> dict:
    """Both ways of computing concept maps (``concept_method``: "conceptattention", the paper's
    code's choices and sdlens's default, and "sdlens") on the MMDiT at its default guidance,
    default heatmap arguments: IoU@0.4, mass in object and pointing with bootstrap 95%
    intervals, on ``validation_seeds`` validation seeds (the seeds a choice may look at) and
    ``test_seeds`` test seeds (reported only). Written to ``concept_methods.json``."""
    import time

    from sdlens.models.shapes.architecture import MMDIT_CALL_DEFAULTS
    from sdlens.pipeline import load_pipeline

    g = json.loads((folder / EVALUATION.name).read_text())["default_guidance"]
    pipe = load_pipeline(folder, device="cpu")
    out = {"guidance_scale": g, "concepts": MMDIT_CONCEPTS,
           "_source": "written by sdlens.models.shapes.card.measure_concept_methods"}
    for split, n in (("validation", validation_seeds), ("test", test_seeds)):
        first = ev.SPLITS[split]
        for method in ("conceptattention", "sdlens"):
            t0 = time.time()
            r = ev.evaluate(pipe, ev.default_prompts(), list(range(first, first + n)), g,
                            call={**MMDIT_CALL_DEFAULTS, "concepts": MMDIT_CONCEPTS,
                                  "concept_method": method},
                            maps={"concept": {"maps": "concepts"}}, progress=False)
            out.setdefault(split, {})[method] = {
                "seeds": r["seeds"], "images": r["images"],
                "intervals": r["intervals"]["concept"], "raw": r["intervals"]["default"],
                "seconds": round(time.time() - t0, 1)}
            (folder / CONCEPT_METHODS_FILE).write_text(json.dumps(out, indent=1) + "\n")
    return out


def measure_intervals(validation_seeds: int = 1, seeds: int = MMDIT_SEEDS) -> dict:
    """Re-measure what the free-vs-taught table and its verdicts read, with the threshold-free
    measures and their bootstrap intervals (:func:`sdlens.models.shapes.evaluate.interval_rows`):

    * the MMDiT's per-block maps on ``validation_seeds`` validation seeds at its default guidance
      (``validation_blocks`` in its ``evaluation.json``: the best block is chosen there);
    * the MMDiT's test row at its default guidance (``seeds`` test seeds; the CFG 1 row kept);
    * the taught UNet on the same test seeds and image count at its CFG 7.5 (``free_vs_taught``
      in its ``evaluation.json``; its card's 6-seed rows kept).
    """
    import time

    from sdlens.models.shapes.architecture import MMDIT_CALL_DEFAULTS
    from sdlens.pipeline import load_pipeline

    prompts = ev.default_prompts()
    path_m = MMDIT / EVALUATION.name
    evm = json.loads(path_m.read_text())
    g = evm["default_guidance"]
    mmdit = load_pipeline(MMDIT, device="cpu")
    call = {**MMDIT_CALL_DEFAULTS, "concepts": MMDIT_CONCEPTS}
    t0 = time.time()
    v = ev.evaluate(mmdit, prompts, list(range(ev.VALIDATION_SEED,
                                               ev.VALIDATION_SEED + validation_seeds)), g,
                    call=call, maps=mmdit_maps(), progress=False)
    evm["validation_blocks"] = {k: v[k] for k in ("guidance_scale", "seeds", "images",
                                                  "iou_by_map", "intervals")}
    evm["validation_blocks"]["seconds"] = round(time.time() - t0, 1)
    path_m.write_text(json.dumps(evm, indent=1) + "\n")
    t0 = time.time()
    test_seeds = list(range(ev.TEST_SEED, ev.TEST_SEED + seeds))
    r = ev.evaluate(mmdit, prompts, test_seeds, g, call=call, maps=mmdit_maps(), progress=False)
    row = {**r, "recipe": "shapes-mmdit", "split": "test", "seconds": round(time.time() - t0, 1)}
    evm["test"] = [row] + [x for x in evm["test"] if float(x["guidance_scale"]) != float(g)]
    path_m.write_text(json.dumps(evm, indent=1) + "\n")
    del mmdit
    t0 = time.time()
    unet = load_pipeline(WEIGHTS, device="cpu")
    u = ev.evaluate(unet, prompts, test_seeds, 7.5, progress=False)
    path_u = WEIGHTS / EVALUATION.name
    evu = json.loads(path_u.read_text())
    evu["free_vs_taught"] = [{**u, "recipe": "shapes (UNet), shipped", "split": "test",
                              "seconds": round(time.time() - t0, 1)}] + [
        x for x in evu.get("free_vs_taught", []) if float(x["guidance_scale"]) != 7.5]
    path_u.write_text(json.dumps(evu, indent=1) + "\n")
    return {"validation_blocks": evm["validation_blocks"], "mmdit": row, "unet": u}

if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true", help="re-measure the test rows first")
    ap.add_argument("--fit-preview", action="store_true", help="refit the linear preview first")
    ap.add_argument("--fit-preview-mmdit", action="store_true",
                    help="fit the MMDiT's linear preview (weights_mmdit/latent_rgb.json)")
    ap.add_argument("--mmdit-training", type=Path, metavar="WORK",
                    help="write the MMDiT's training.json from its training folder's log")
    ap.add_argument("--budget", type=float, default=95, help="the MMDiT run's --minutes")
    ap.add_argument("--choose-guidance", type=float, nargs="+", metavar="CFG",
                    help="measure the MMDiT on the validation seeds at these scales and make "
                         "the best its default guidance")
    ap.add_argument("--measure-mmdit", action="store_true",
                    help="re-measure the MMDiT's test rows (default guidance and CFG 1)")
    ap.add_argument("--measure-plain-call", action="store_true",
                    help="measure the MMDiT's plain pipe(prompt) call on the test seeds")
    ap.add_argument("--try-readouts", action="store_true",
                    help="score other readouts of the MMDiT's maps on the validation seeds")
    ap.add_argument("--measure-ablation", type=Path, metavar="WORK",
                    help="evaluate the UNet recipe trained without attention loss in WORK")
    ap.add_argument("--concept-methods", action="store_true",
                    help="measure both concept-map methods on the MMDiT (concept_methods.json)")
    ap.add_argument("--common-cfg", action="store_true",
                    help=f"measure the MMDiT and the taught UNet at the common CFG {COMMON_CFG:g}")
    ap.add_argument("--intervals", action="store_true",
                    help="re-measure the free-vs-taught rows with mass / pointing and intervals")
    args = ap.parse_args()
    if args.concept_methods:
        measure_concept_methods()
    if args.intervals:
        measure_intervals()
    if args.common_cfg:
        measure_common_cfg()
    if args.fit_preview:
        fit_preview()
    if args.fit_preview_mmdit:
        fit_preview(MMDIT, guidance=3.0, seeds=(0,), every=3)
    if args.measure:
        measure()
    if args.mmdit_training:
        (MMDIT / TRAINING.name).write_text(json.dumps(
            training_facts(args.mmdit_training, args.budget, 5e-4, 32), indent=1) + "\n")
    if args.choose_guidance:
        choose_guidance(tuple(args.choose_guidance))
    if args.measure_mmdit:
        measure_mmdit()
    if args.measure_plain_call:
        measure_mmdit_plain()
    if args.try_readouts:
        try_readouts()
    if args.measure_ablation:
        measure_ablation(args.measure_ablation)
    write()

