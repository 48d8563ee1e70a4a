"""The shipped model draws what was asked, CFG matters, and its word maps lie on their objects.

Checked against the targets on the **validation** seeds (the model card reports the test seeds,
which no test or decision looks at). The rates are printed (``pytest -s`` shows them).
"""

import json

import numpy as np
import pytest

import sdlens
from sdlens.models.shapes import evaluate as ev
from sdlens.pipeline import SHIPPED_MODEL

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "model_index.json").exists(),
                                reason="the shipped model has not been exported yet")

SEEDS = [ev.VALIDATION_SEED + i for i in range(ev.N_SEEDS)]


@pytest.fixture(scope="module")
def pipe():
    return sdlens.load_pipeline(device="cpu")


@pytest.fixture(scope="module")
def rates(pipe):
    r = ev.evaluate(pipe, ev.default_prompts(), SEEDS, 7.5, progress=False)
    print("\nshapes model, CFG 7.5:", json.dumps(r))
    return r


class _Rendered:
    """What ``judge`` reads of a trace, for scenes drawn by the generator itself: the images, and
    each word's heatmap given as its object's mask (or as noise, to check IoU can fall)."""

    def __init__(self, scenes, exact: bool = True):
        from PIL import Image

        self.images = [Image.fromarray(sc.image) for sc in scenes]
        self.scenes, self.exact = scenes, exact

    def heatmap(self, word, batch=0, occurrence=0, normalize=True, **kwargs):
        sc = self.scenes[batch]
        hits = [k for k, o in enumerate(sc.objects) if word in (o.colour, o.shape)]
        mask = sc.masks[hits[occurrence]].astype(np.float32)
        return mask if self.exact else np.random.default_rng(batch).random(mask.shape)


def test_judge_is_right_on_the_generators_own_scenes():
    # judge() as evaluate() uses it: every colour and shape right, and a word map equal to its
    # object's mask has IoU ~1 with the colour segment; a random map has a low IoU. Scenes with
    # two objects of one colour are left out, as the evaluation's prompts leave them out: the judge
    # finds an object by its colour (it would judge both by the larger one)
    from sdlens.models.shapes.dataset import random_scene

    rng = np.random.default_rng(0)
    scenes = [sc for sc in (random_scene(rng) for _ in range(80))
              if len({o.colour for o in sc.objects}) == len(sc.objects)]
    assert len(scenes) > 50
    for tr in (_Rendered(scenes), _Rendered(scenes, exact=False)):
        js = [ev.judge(tr, b, sc.caption, 0) for b, sc in enumerate(scenes)]
        assert all(all(j.colours_right) and all(j.shapes_right) for j in js)
        ious = [v for j in js for v in j.ious.values()]
        if tr.exact:
            # anti-aliased edges: on the smallest objects the colour segment misses a rim of pixels
            assert min(ious) > 0.75 and np.mean(ious) > 0.9, (min(ious), np.mean(ious))
        else:
            assert np.mean(ious) < 0.5


def test_single_objects_have_the_right_colour(rates):
    assert rates["single_colour"] >= 0.95


def test_single_objects_have_the_right_shape(rates):
    assert rates["single_shape"] >= 0.80


def test_two_object_prompts_draw_both_colours(rates):
    assert rates["double_both_colours"] >= 0.70


def test_word_heatmaps_lie_on_their_objects(rates):
    # DAAM's protocol against the generated objects; measured on the model card's seeds: mean 0.74
    assert rates["iou_mean"] >= 0.5


def test_colour_and_shape_words_both_localise(rates):
    # neither kind of word may hide behind the other in the mean: measured colour 0.64, shape 0.84
    # (before the refine stage's coverage term, shape words peaked at the centre: 0.17)
    assert rates["iou_colour_words"] >= 0.55
    assert rates["iou_shape_words"] >= 0.55


def test_cfg_makes_two_object_prompts_right(pipe, rates):
    # CFG binds the two objects of a prompt: measured on the model card's 6 seeds, both shapes
    # 0.80 at CFG 7.5 vs 0.52 at CFG 1, both colours 1.00 vs 0.94.
    doubles = [p for p in ev.default_prompts() if " and " in p]
    no_cfg = ev.evaluate(pipe, doubles, SEEDS, 1.0, progress=False)
    print("\nshapes model, CFG 1:", json.dumps(no_cfg))
    assert rates["double_both_shapes"] >= no_cfg["double_both_shapes"] + 0.05
    assert rates["double_both_colours"] >= no_cfg["double_both_colours"]
