"""The shipped model's card, written from its result files (no figure is typed by hand).

    python -m sdlens.models.shapes.card            # rewrite weights/README.md and README.md's paragraph
    python -m sdlens.models.shapes.card --measure  # re-measure the test rows first (~10 min, CPU)
    python -m sdlens.models.shapes.card --fit-preview  # refit weights/latent_rgb.json (~3 min)

Inputs, next to the weights:

* ``weights/evaluation.json``: what :mod:`sdlens.models.shapes.evaluate` measured —
  ``{"test": [result per guidance scale], "earlier": [rows of earlier recipes]}``. The ``test``
  rows are re-measured with ``python -m sdlens.models.shapes.card --measure``; the ``earlier`` rows were measured by the same script on the validation seeds while
  those checkpoints existed (they are not shipped, so these rows cannot be re-run).
* ``weights/training.json``: the facts of the training run, from its logs (steps, minutes,
  losses, learning-rate schedule, data sizes).

Outputs: the model card ``weights/README.md`` and the paragraph of the repository's README.md
between ``<!-- shapes-model:begin -->`` and ``<!-- shapes-model:end -->``. ``tests/models``
checks that both equal what this module writes from the result files.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdlens.models.shapes import evaluate as ev

WEIGHTS = Path(__file__).parent / "weights"
EVALUATION = WEIGHTS / "evaluation.json"
TRAINING = WEIGHTS / "training.json"
README = Path(__file__).resolve().parents[3] / "README.md"  # present in a source checkout only
BEGIN, END = "<!-- shapes-model:begin -->", "<!-- shapes-model:end -->"


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
    return {"text_encoder_params": params("text_encoder"), "vae_params": params("vae"),
            "scaling_factor": float(vae["scaling_factor"])}


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
            f"{free['iou_shape_words']:.2f}) — they do not localise"
            + (f"; with the loss, the {snap['train_steps']}-step snapshot reached "
               f"{snap['iou_mean']:.2f}" if snap is not None else "")
            + f". These rows were evaluated on {free['images']} images and trained far less than "
            "the shipped model: compare them with each other, and read the shipped rows as the "
            "model you get.\n")
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
"""


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


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with what lies between the markers replaced by ``body``."""
    a, b = text.index(begin) + len(begin), text.index(end)
    return text[:a] + "\n" + body.strip("\n") + "\n" + text[b:]


def write(folder: Path = WEIGHTS, readme: Path | None = README) -> None:
    evaluation, train = load_results(folder)
    (folder / "README.md").write_text(model_card(evaluation, train))
    if readme is not None and readme.exists():
        readme.write_text(replace_between(readme.read_text(), BEGIN, END,
                                          readme_paragraph(evaluation, train)))


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


PREVIEW_SEEDS = (0, 1)  # training seeds: the preview fit looks at neither split


def fit_preview(folder: Path = WEIGHTS) -> dict:
    """Fit the linear latent -> RGB preview of the model in ``folder`` against its VAE decoder
    (:func:`sdlens.analysis.previews.fit_linear_decoder` with ``latents=``): the x0 predictions
    of every step of the evaluation's 36 prompts at ``PREVIEW_SEEDS`` (25 DDIM steps, CFG 7.5),
    and write ``latent_rgb.json``."""
    import torch
    from einops import rearrange

    from sdlens.analysis.previews import fit_linear_decoder, save_linear_decoder
    from sdlens.engine.session import generate
    from sdlens.pipeline import load_pipeline

    pipe = load_pipeline(folder, device="cpu")
    x0 = [rearrange(generate(pipe, ev.default_prompts(), seed=s, steps=25, guidance_scale=7.5).x0,
                    "steps b c h w -> (steps b) c h w") for s in PREVIEW_SEEDS]
    coeffs = fit_linear_decoder(pipe.vae, latents=torch.cat(x0), seed=PREVIEW_SEEDS[0])
    coeffs["fit_on"] = (f"x0 of every step, {len(ev.default_prompts())} prompts x seeds "
                        f"{list(PREVIEW_SEEDS)}, 25 DDIM steps, CFG 7.5")
    save_linear_decoder(coeffs, folder / "latent_rgb.json")
    return coeffs


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true", help="re-measure the test rows first")
    ap.add_argument("--fit-preview", action="store_true", help="refit the linear preview first")
    args = ap.parse_args()
    if args.fit_preview:
        fit_preview()
    if args.measure:
        measure()
    write()
