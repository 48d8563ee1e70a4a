"""The shipped model draws what was asked, CFG matters, and its word maps lie on their objects.

Measured on seeds never used in training (see the model card for the full evaluation). The
rates are printed (``pytest -s`` or ``-ra`` shows them) and checked against the targets.
"""

import json

import numpy as np
import pytest

import sdlens
from sdlens.models.shapes import evaluate as ev
from sdlens.pipeline import SHIPPED_MODEL

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "model_index.json").exists(),
                                reason="the shipped model has not been exported yet")

SEEDS = [ev.EVAL_SEED + i for i in range(6)]  # the model card's evaluation set


@pytest.fixture(scope="module")
def pipe():
    return sdlens.load_pipeline(device="cpu")


@pytest.fixture(scope="module")
def rates(pipe):
    r = ev.evaluate(pipe, ev.default_prompts(), SEEDS, 7.5, progress=False)
    print("\nshapes model, CFG 7.5:", json.dumps(r))
    return r


def test_the_evaluation_measures_ground_truth_correctly():
    # the colour / shape judges are right on the generator's own scenes
    rng = np.random.default_rng(0)
    right = []
    for _ in range(100):
        from sdlens.models.shapes.dataset import random_scene

        scene = random_scene(rng)
        seg = ev.colour_segments(scene.image)
        for obj, mask in zip(scene.objects, scene.masks):
            right.append(ev.classify_shape(seg[obj.colour] & mask) == obj.shape)
    assert np.mean(right) == 1.0


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
