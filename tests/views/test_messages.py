"""The messages a user reads for their own bad input: a NaN guidance scale, a word of an empty
prompt, a word missing from a long prompt (its words listed, not the prompt, not punctuation);
the token counts of one- and several-encoder models on one footing. Tiny random-weight pipelines."""

from __future__ import annotations

import pytest

import sdlens
from sdlens.analysis.guidance import check_guidance_scale
from sdlens.analysis.heatmaps import word_heatmap
from sdlens.testing import random_pipeline
from sdlens.views.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_guidance_scale_must_be_a_finite_number(capsys):
    assert check_guidance_scale(None) is None and check_guidance_scale(3) == 3.0
    for bad in (float("nan"), float("inf"), "lots"):
        with pytest.raises(ValueError, match="guidance_scale must be a"):
            check_guidance_scale(bad)
    with pytest.raises(SystemExit):
        main(["trace", "a red circle", "--cfg", "nan", "--out", "x.sdlens", "-q"])
    assert "guidance_scale must be a finite number" in capsys.readouterr().err


def test_word_errors_name_the_problem_briefly():
    pipe = random_pipeline("sd15", scale=0.05)
    empty = sdlens.generate(pipe, "", seed=0, steps=1)
    with pytest.raises(ValueError, match="is empty: it has no words to map") as e:
        word_heatmap(empty, "circle")
    assert "prompt_embeds" not in str(e.value)
    long = ("a red circle, a blue square, a green triangle, a yellow star, a purple moon, "
            "an orange heart, all on a white background, centred, high contrast, flat colours")
    tr = sdlens.generate(pipe, long, seed=0, steps=1)
    with pytest.raises(ValueError) as e:
        word_heatmap(tr, "zebra")
    msg = str(e.value)
    assert "'circle'" in msg and "','" not in msg, msg
    assert long not in msg and len(msg) < len(long) + 200, msg
