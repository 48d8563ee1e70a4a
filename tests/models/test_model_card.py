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
