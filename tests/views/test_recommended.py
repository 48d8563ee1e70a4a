"""The shipped MMDiT's recommended settings come from one file in its folder, the one its card
is written from; Studio and the CLI take them by default (what the caller gives wins)."""

from __future__ import annotations

import json

import pytest

import sdlens
from sdlens.models.shapes.card import MMDIT, recommended_from
from sdlens.pipeline import RECOMMENDED, recommended_settings


def test_the_mmdit_folder_recommends_the_cards_settings():
    rec = recommended_settings("shapes-mmdit")
    evaluation = json.loads((MMDIT / "evaluation.json").read_text())
    assert rec == recommended_from(evaluation) == json.loads((MMDIT / RECOMMENDED).read_text())
    assert rec["guidance_scale"] == evaluation["default_guidance"] == 3
    assert rec["max_sequence_length"] == 0
    card = (MMDIT / "README.md").read_text()
    assert "pipe(\"a red circle\", **sdlens.recommended_settings(pipe))" in card
    assert recommended_settings("shapes") == {} and sdlens.recommended_settings is recommended_settings


@pytest.mark.usefixtures("one_thread")
def test_studio_takes_the_recommended_settings():
    from sdlens.views.widgets import Studio

    pipe = sdlens.load_pipeline("shapes-mmdit")
    s = Studio(pipe)
    assert s.guidance_scale.value == 3 and s.steps.value == 25
    assert s.pipe_kwargs == {"max_sequence_length": 0}
    mine = Studio(pipe, guidance_scale=5, steps=4, pipe_kwargs={"max_sequence_length": 8})
    assert mine.guidance_scale.value == 5 and mine.pipe_kwargs == {"max_sequence_length": 8}


@pytest.mark.usefixtures("one_thread")
def test_sweeps_take_the_recommended_settings():
    pipe = sdlens.load_pipeline("shapes-mmdit")
    grid = sdlens.sweep(pipe, "a red circle", steps=1, record=None, progress=False)
    assert grid.fixed["guidance"] == 3.0 and grid.meta["pipe_kwargs"] == {"max_sequence_length": 0}
    mine = sdlens.sweep(pipe, "a red circle", guidance_scales=[5], steps=1, record=None,
                        progress=False, max_sequence_length=4)
    assert mine.fixed["guidance"] == 5.0 and mine.meta["pipe_kwargs"] == {"max_sequence_length": 4}


def test_generate_takes_the_recommended_settings_and_refuses_nan():
    import math

    import pytest

    import sdlens

    pipe = sdlens.load_pipeline("shapes-mmdit")
    with pytest.raises(ValueError, match="finite"):
        sdlens.generate(pipe, "a red circle", guidance_scale=float("nan"), steps=1)
    tr = sdlens.generate(pipe, "a red circle", steps=1)
    rec = sdlens.recommended_settings(pipe)
    assert tr.guidance_scale == rec["guidance_scale"] and not math.isnan(tr.guidance_scale)
    # the T5 segment the card's call uses (max_sequence_length=0): CLIP's 77 positions only
    assert sum(seg["length"] for seg in tr.text_segments[0]) == 77 + rec["max_sequence_length"]
    assert sdlens.generate(pipe, "a red circle", steps=1, guidance_scale=5).guidance_scale == 5
