"""Measure what the shapes model draws and where its words attend.

    python -m sdlens.models.shapes.evaluate [--model FOLDER] [--seeds 8] [--json out.json]

For each prompt and seed the image is generated with sdlens (25 DDIM steps, CFG 7.5 unless told
otherwise) and judged without a classifier:

- colour: pixels within ``COLOUR_TOL`` of a palette colour are that colour's segment; an object
  is present when its segment has at least ``MIN_PIXELS`` pixels;
- shape: the fill ratio of the segment's largest connected blob in its bounding box (square 1.0,
  circle pi/4 = 0.785, triangle 0.5), thresholds half-way between;
- heatmaps: each colour and shape word's map (``trace.heatmap``, sdlens pooling: all layers and
  steps), normalised to [0, 1] and thresholded at 0.4 (DAAM's protocol), against the object's
  colour segment in the generated image: IoU.

Prompts are the grammar's captions without place words; the seeds (from 1000) were never used in
training or tuning.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np

from .dataset import COLOURS, SHAPES

COLOUR_TOL = 80  # max Euclidean RGB distance to a palette colour
MIN_PIXELS = 30  # of 64 x 64
FILL_THRESHOLDS = ((0.5 + np.pi / 4) / 2, (np.pi / 4 + 1.0) / 2)  # triangle | circle | square
EVAL_SEED = 1000


def colour_segments(image: np.ndarray) -> dict[str, np.ndarray]:
    """Per palette colour, the boolean mask (H, W) of pixels nearest to it within the tolerance."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    palette = np.array(list(COLOURS.values()), dtype=np.float32)  # (4, 3)
    dist = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, 4)
    nearest = dist.argmin(-1)
    close = dist.min(-1) < COLOUR_TOL
    return {name: (nearest == i) & close for i, name in enumerate(COLOURS)}


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def classify_shape(mask: np.ndarray) -> str | None:
    """circle / square / triangle from the fill ratio of the largest blob's bounding box."""
    blob = largest_blob(mask)
    if blob.sum() < MIN_PIXELS:
        return None
    ys, xs = np.nonzero(blob)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = blob.sum() / box
    lo, hi = FILL_THRESHOLDS
    return "triangle" if fill < lo else "circle" if fill < hi else "square"


@dataclass
class Judgement:
    prompt: str
    seed: int
    colours_right: list[bool]  # per object in the prompt
    shapes_right: list[bool]
    ious: dict[str, float]  # word -> IoU of its heatmap with its object's segment


def parse_prompt(prompt: str) -> list[tuple[str, str]]:
    objects = []
    for phrase in prompt.split(" and "):
        words = phrase.split()
        objects.append((words[1], words[2]))
    return objects


def judge(trace, batch: int, prompt: str, seed: int, threshold: float = 0.4) -> Judgement:
    from ...heatmaps import iou

    image = np.asarray(trace.images[batch].convert("RGB"))
    segments = colour_segments(image)
    colours_right, shapes_right, ious = [], [], {}
    objects = parse_prompt(prompt)
    for k, (colour, shape) in enumerate(objects):
        seg = segments[colour]
        present = seg.sum() >= MIN_PIXELS
        colours_right.append(bool(present))
        shapes_right.append(bool(present and classify_shape(seg) == shape))
        if present:
            blob = largest_blob(seg)
            for word in (colour, shape):
                # a word used for both objects ("a red circle and a red square"): nth occurrence
                occurrence = sum(1 for c, s in objects[:k] if word in (c, s))
                hm = trace.heatmap(word, batch=batch, occurrence=occurrence)
                ious[f"{word}#{k}"] = float(iou(np.asarray(hm), blob, threshold))
    return Judgement(prompt, seed, colours_right, shapes_right, ious)


def evaluate(pipe, prompts: list[str], seeds: list[int], guidance_scale: float = 7.5,
             steps: int = 25, progress: bool = True) -> dict:
    """Generate every (prompt, seed) with sdlens and return the rates (see module docstring)."""
    import sdlens
    from tqdm.auto import tqdm

    judgements = []
    for seed in tqdm(seeds, disable=not progress, desc=f"cfg {guidance_scale}"):
        trace = sdlens.generate(pipe, prompts, seed=seed, steps=steps,
                                guidance_scale=guidance_scale)
        judgements += [judge(trace, b, p, seed) for b, p in enumerate(prompts)]
    single = [j for j in judgements if len(j.colours_right) == 1]
    double = [j for j in judgements if len(j.colours_right) == 2]
    colour_ious = [v for j in judgements for k, v in j.ious.items() if k.split("#")[0] in COLOURS]
    shape_ious = [v for j in judgements for k, v in j.ious.items() if k.split("#")[0] in SHAPES]
    rate = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {
        "guidance_scale": guidance_scale, "steps": steps, "seeds": seeds,
        "images": len(judgements),
        "single_colour": rate([j.colours_right[0] for j in single]),
        "single_shape": rate([j.shapes_right[0] for j in single]),
        "double_both_colours": rate([all(j.colours_right) for j in double]),
        "double_both_shapes": rate([all(j.shapes_right) for j in double]),
        "iou_colour_words": rate(colour_ious),
        "iou_shape_words": rate(shape_ious),
        "iou_mean": rate(colour_ious + shape_ious),
    }


def default_prompts(n_double: int = 24, seed: int = 0) -> list[str]:
    """The 12 single-object captions and ``n_double`` two-object captions (distinct colours)."""
    from .dataset import all_prompts

    singles = all_prompts(two_objects=False)
    doubles = [p for p in all_prompts() if " and " in p
               and len({o[0] for o in parse_prompt(p)}) == 2]
    rng = np.random.default_rng(seed)
    return singles + [doubles[i] for i in rng.choice(len(doubles), n_double, replace=False)]


def main() -> None:
    import sdlens

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--cfg", type=float, nargs="+", default=[7.5, 1.0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    pipe = sdlens.load_pipeline(args.model, device="cpu")
    prompts = default_prompts()
    results = []
    for g in args.cfg:
        t0 = time.time()
        r = evaluate(pipe, prompts, list(range(EVAL_SEED, EVAL_SEED + args.seeds)), g)
        r["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(r))
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
