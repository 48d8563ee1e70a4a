"""The shipped model's card and the README's paragraph on it are what `sdlens.models.shapes.card`
writes from the model's result files: no figure is typed by hand (issue 23)."""

from __future__ import annotations

from sdlens.models.shapes import card
from sdlens.models.shapes import evaluate as ev


def test_the_card_is_written_from_the_result_files():
    evaluation, train = card.load_results()
    written = (card.WEIGHTS / "README.md").read_text()
    assert written == card.model_card(evaluation, train), \
        "the model card differs from its result files: run `python -m sdlens.models.shapes.card`"


def test_the_card_reports_test_seeds_and_says_what_is_validation():
    evaluation, _ = card.load_results()
    assert {r["guidance_scale"] for r in evaluation["test"]} == {7.5, 1.0}
    for r in evaluation["test"]:
        assert r["split"] == "test" and min(r["seeds"]) >= ev.TEST_SEED and r["images"] == 216
    for r in evaluation["earlier"]:
        assert r["split"] == "validation" and max(r["seeds"]) < ev.TEST_SEED
    text = (card.WEIGHTS / "README.md").read_text()
    assert "taught, not learned freely" in text and "in-distribution" in text
    assert ev.unet_description()["text"] in text  # the architecture row comes from the code


def test_the_readme_paragraph_is_written_from_the_result_files():
    if not card.README.exists():  # an installed package has no repository README
        return
    evaluation, train = card.load_results()
    readme = card.README.read_text()
    a, b = readme.index(card.BEGIN) + len(card.BEGIN), readme.index(card.END)
    assert readme[a:b].strip() == card.readme_paragraph(evaluation, train).strip(), \
        "README's shipped-model paragraph differs: run `python -m sdlens.models.shapes.card`"


def test_verdicts_follow_the_numbers():
    """A comparison sentence is written from the intervals: it names the higher model only when
    the 95% intervals do not overlap, says "inconclusive" otherwise, and changes with them."""
    a = {"mean": 0.40, "low": 0.35, "high": 0.45}
    b = {"mean": 0.20, "low": 0.15, "high": 0.25}
    higher = card.verdict("free", a, "taught", b)
    assert "Free scores higher than taught" in higher and "0.40 [0.35, 0.45]" in higher
    flipped = card.verdict("free", b, "taught", a)
    assert "Taught scores higher than free" in flipped
    close = card.verdict("free", {"mean": 0.30, "low": 0.22, "high": 0.38}, "taught", b)
    assert "inconclusive" in close and "overlap" in close and "higher" not in close
    assert "inconclusive" in card.verdict("free", None, "taught", b)
    # the card's own verdicts move with its result rows
    unet, mmdit = card.load_results(), card.load_results(card.MMDIT)
    g = mmdit[0]["default_guidance"]
    row = dict(card._by_cfg(mmdit[0]["test"], g))
    taught = dict(card.taught_row(unet[0]))

    def with_iou(r, iv):
        return {**r, "intervals": {"default": {m: iv for m in ("iou", "mass", "pointing")}}}

    def verdicts(free_iv, taught_iv):
        ev_m = {**mmdit[0], "test": [with_iou(row, free_iv)]}
        ev_u = {**unet[0], "free_vs_taught": [with_iou(taught, taught_iv)], "ablation": []}
        return card.free_vs_taught_verdicts((ev_u, unet[1]), (ev_m, mmdit[1]))

    assert "Shapes-mmdit (free) scores higher than the taught UNet on IoU@0.4" in verdicts(a, b)
    assert "The taught UNet scores higher than shapes-mmdit (free)" in verdicts(b, a)
    assert "inconclusive, the 95% intervals overlap" in verdicts(a, a)

    # ... and at the common CFG, from the rows measured there
    common = card.COMMON_CFG
    row_c = dict(card._by_cfg(mmdit[0]["test"], common))
    taught_c = dict(card.taught_row(unet[0], common))

    def common_verdicts(free_iv, taught_iv):
        ev_m = {**mmdit[0], "test": [with_iou(row, a), with_iou(row_c, free_iv)]}
        ev_u = {**unet[0], "ablation": [],
                "free_vs_taught": [with_iou(taught, a), with_iou(taught_c, taught_iv)]}
        text = card.free_vs_taught_verdicts((ev_u, unet[1]), (ev_m, mmdit[1]))
        return text[text.index(f"at the common CFG {common:g}"):]

    assert "The taught UNet scores higher than shapes-mmdit (free) on IoU@0.4" in \
        common_verdicts(b, a)
    assert "Shapes-mmdit (free) scores higher" in common_verdicts(a, b)
    assert "inconclusive" in common_verdicts(a, a)


def test_threshold_free_measures_and_their_intervals():
    import numpy as np

    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    inside = np.zeros((8, 8))
    inside[3, 3], inside[0, 0] = 3.0, 1.0
    assert ev.mass_and_pointing(inside, mask) == (0.75, 1.0)
    outside = inside.copy()
    outside[0, 0] = 5.0
    assert ev.mass_and_pointing(outside, mask) == (0.375, 0.0)
    mean, low, high = ev.bootstrap_ci([0.2, 0.4, 0.6, 0.8] * 10)
    assert abs(mean - 0.5) < 1e-9 and low < mean < high and high - low < 0.2
    assert ev.bootstrap_ci([0.5] * 5) == (0.5, 0.5, 0.5)
    wide = ev.bootstrap_ci([0.0, 1.0] * 3)
    assert wide[2] - wide[1] > high - low  # fewer, more spread values: a wider interval


def test_a_cut_short_ablation_says_where_it_was_measured():
    """The fair ablation measured before the shipped model's step count: the table's note says
    so, with the step, the stage and the learning rate where its last checkpoint was taken."""
    unet, mmdit = card.load_results(), card.load_results(card.MMDIT)
    shipped = unet[1]["unet_steps"] + unet[1]["refine_steps"]
    row = {**unet[0]["ablation"][0], "train_steps": 3100,
           "stopped": {"stage": "unet", "lr": 6.1e-4, "schedule": "shipped"}}
    table = card.free_vs_taught(({**unet[0], "ablation": [row]}, unet[1]), mmdit)
    assert f"trained 3,100 steps, not the shipped model's {shipped:,}" in table
    assert ("measured at its last checkpoint, step 3,100, in the UNet stage, before the refine "
            "stage, on the shipped model's learning-rate schedule, replayed step for step "
            "(learning rate 6.1e-04 there)") in table
    done = {**row, "train_steps": shipped, "stopped": {**row["stopped"], "stage": "refine"}}
    assert "last checkpoint" not in card.free_vs_taught(({**unet[0], "ablation": [done]}, unet[1]),
                                                        mmdit)


def test_a_full_ablation_names_its_recipe_and_cache():
    unet, mmdit = card.load_results(), card.load_results(card.MMDIT)
    shipped = unet[1]["unet_steps"] + unet[1]["refine_steps"]
    row = {**unet[0]["ablation"][0], "train_steps": shipped}
    table = card.free_vs_taught(({**unet[0], "ablation": [row]}, unet[1]), mmdit)
    assert "--attn-loss 0 --steps 5700 --schedule shipped" in table
    assert f"a cache of as many scenes ({unet[1]['cache']:,})" in table
    small = {**row, "cache": 20000}
    table = card.free_vs_taught(({**unet[0], "ablation": [small]}, unet[1]), mmdit)
    assert f"a cache of 20,000 scenes (the shipped model's: {unet[1]['cache']})" in table
