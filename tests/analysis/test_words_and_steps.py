"""One Word model and one step selector.

Every API that takes a word agrees on what each word of a prompt is: ``trace.heatmap(w)``,
``trace.attention.get(layer, token=w)``, the token view (of a trace and of a bare prompt) and
``token_effects``'s word list, for multi-token words, punctuation, textual-inversion tokens
(single- and multi-vector) and prompts longer than the 77-token limit. And every API that takes
``steps=`` / ``step=`` reads it the same way (``sdlens.trace.steps``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdlens
from sdlens.analysis import guidance, heatmaps
from sdlens.engine.text import word_positions
from sdlens.analysis.tokens import (token_view, tokenize, trace_words, word_matches,
                                    words_from_tokens)
from sdlens.experiments import steer
from sdlens.testing import random_pipeline
from sdlens.trace.steps import StepError, select_step, select_steps, step_window

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = " ".join(["red circle"] * 35 + ["zebra", "giraffe", "elephant", "tiger", "lion",
                                       "monkey", "horse"])  # 70 + 7 prompt tokens: 2 cut
PROMPTS = {
    "subword": "a dreambeach at night",
    "punctuation": "A Red, round circle!",
    "textual inversion": "a <my-token> and a <multi> circle",
    "long": LONG,
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny SD 1.5 with a one-vector and a two-vector textual-inversion token."""
    from safetensors.torch import save_file

    p = random_pipeline("sd15", seed=3)
    width = p.text_encoder.get_input_embeddings().weight.shape[1]
    folder = tmp_path_factory.mktemp("ti")
    save_file({"<my-token>": torch.randn(1, width)}, str(folder / "one.safetensors"))
    save_file({"<multi>": torch.randn(2, width)}, str(folder / "two.safetensors"))
    p.load_textual_inversion(str(folder / "one.safetensors"))
    p.load_textual_inversion(str(folder / "two.safetensors"))
    return p


@pytest.fixture(scope="module")
def traces(pipe):
    with pytest.warns(UserWarning, match="longer than 75 tokens"):
        long = sdlens.generate(pipe, LONG, seed=0, steps=2)
    out = {k: sdlens.generate(pipe, p, seed=0, steps=2) for k, p in PROMPTS.items() if k != "long"}
    out["long"] = long
    return out


EXPECTED = {  # (text, positions) of each word, as the tokenizer cut the prompt
    "subword": [("a", (1,)), ("dreambeach", (2, 3)), ("at", (4,)), ("night", (5,))],
    "punctuation": [("a", (1,)), ("red", (2,)), (",", (3,)), ("round", (4,)),
                    ("circle", (5,)), ("!", (6,))],
    "textual inversion": [("a", (1,)), ("<my-token>", (2,)), ("and", (3,)), ("a", (4,)),
                          ("<multi>", (5, 6)), ("circle", (7,))],
}


# ----------------------------------------------------------------------------- the words
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_a_prompt_and_its_trace_have_the_same_words(pipe, traces, kind):
    prompt, tr = PROMPTS[kind], traces[kind]
    before = tokenize(prompt, pipe)  # no run needed
    view = token_view(tr)
    assert view.words == before.words == trace_words(tr)
    assert view.tokens == before.tokens == tr.tokens[0]
    assert view.ids == before.ids == tr.token_ids[0]
    assert view.truncated_words == before.truncated_words == tr.truncated_words[0]
    if kind in EXPECTED:
        assert [(w.text, w.positions) for w in view.words] == EXPECTED[kind]
    # each word knows the characters it was typed as
    for w in view.words:
        assert prompt[w.span[0]: w.span[1]].lower() == w.text
    # the rows say which word each token belongs to
    for w in view.words:
        assert {r.position for r in view.rows if r.word_index == w.index} == set(w.positions)


def test_repeats_are_told_apart_by_occurrence(traces):
    words = token_view(traces["textual inversion"]).words
    a = [w for w in words if w.text == "a"]
    assert [(w.occurrence, w.positions) for w in a] == [(0, (1,)), (1, (4,))]


def test_the_long_prompt_names_the_words_the_limit_cut(pipe, traces):
    tr = traces["long"]
    view = token_view(tr)
    assert len(tr.token_ids[0]) == 77 and view.n_prompt_tokens == 75
    assert view.truncated_words == ["monkey", "horse"] == tr.truncated_words[0]
    assert [w.text for w in view.words][-5:] == ["zebra", "giraffe", "elephant", "tiger", "lion"]
    for cut in ("monkey", "horse"):
        with pytest.raises(ValueError, match="77-token limit.*75-token"):
            tr.heatmap(cut)
        with pytest.raises(ValueError, match="77-token limit"):
            word_positions(pipe, LONG, cut)
        with pytest.raises(ValueError, match="not a word"):
            tr.attention.get(tr.attention.layers[0], token=cut)


def _native(tr):
    """One layer and its own resolution: there pooling is exactly a mean over steps and tokens."""
    maps = tr.attention
    layer = maps.layers[0]
    return maps, layer, maps.resolution(layer)


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_heatmap_and_attention_get_pool_each_word_the_same(traces, kind):
    tr = traces[kind]
    maps, layer, size = _native(tr)
    recorded = maps[layer][:, 0].float()  # (steps, tokens, h, w)
    words = token_view(tr).words
    if kind == "long":
        words = words[-6:]
    for w in words:
        ref = recorded[:, list(w.positions)].mean(1)  # mean over the word's tokens
        got = maps.get(layer, token=w.text, batch=0, occurrence=w.occurrence)
        torch.testing.assert_close(got, ref)
        hm = tr.heatmap(w.text, occurrence=w.occurrence, layers=layer, size=size,
                        normalize=False)
        torch.testing.assert_close(hm, ref.mean(0), atol=1e-6, rtol=1e-5)
        assert maps.token_index(w.text, occurrence=w.occurrence) == list(w.positions)


def test_phrases_and_case_work_in_both(traces):
    tr = traces["punctuation"]
    maps, layer, size = _native(tr)
    recorded = maps[layer][:, 0].float()
    for phrase, positions in (("red circle", None), ("round circle", [4, 5]),
                              ("RED,", [2, 3]), ("circle!", [5, 6]), ("Red", [2])):
        if positions is None:
            with pytest.raises(ValueError, match="its words: 'a', 'red', 'round', 'circle'"):  # punctuation is not listed
                maps.get(layer, token=phrase)  # not consecutive words
            with pytest.raises(ValueError, match="not a word"):
                tr.heatmap(phrase)
            continue
        ref = recorded[:, positions].mean(1)
        torch.testing.assert_close(maps.get(layer, token=phrase, batch=0), ref)
        torch.testing.assert_close(tr.heatmap(phrase, layers=layer, size=size, normalize=False),
                                   ref.mean(0), atol=1e-6, rtol=1e-5)
    sub = traces["subword"]
    maps, layer, size = _native(sub)
    assert maps.token_index("dream beach") == maps.token_index("DreamBeach") == [2, 3]


def test_textual_inversion_tokens_are_words(pipe, traces):
    from sdlens.experiments import textual_inversion

    tr = traces["textual inversion"]
    assert tr.tokens[0][2] == "<my-token></w>"  # a word of its own, not merged with "and"
    assert tr.tokens[0][5:7] == ["<multi></w>", "<multi>_1</w>"]
    torch.testing.assert_close(textual_inversion.textual_inversion_heatmap(tr, "<multi>", size=8),
                               heatmaps.token_heatmap(tr, [5, 6], size=8))
    assert list(textual_inversion.textual_inversion_view(tr).inversions) == ["<my-token>", "<multi>"]
    # steering finds the same positions (in the expanded prompt the pipeline encodes)
    assert word_positions(pipe, PROMPTS["textual inversion"], "<multi>") == [5, 6]
    assert word_positions(pipe, PROMPTS["textual inversion"], "a") == [1, 4]


@pytest.mark.parametrize("kind", ["subword", "punctuation", "textual inversion"])
def test_token_effects_ablates_the_same_words(pipe, traces, kind):
    prompt = PROMPTS[kind]
    words = [w for w in token_view(traces[kind]).words if not w.is_punctuation]
    fx = steer.token_effects(pipe, prompt, mode="pad", steps=1, record=None)
    assert fx.words == [w.name for w in words]
    if kind == "textual inversion":
        assert fx.words == ["a", "<my-token>", "and", "a#2", "<multi>", "circle"]
    # the default word lists of the heatmap APIs are the same words
    assert list(heatmaps.word_heatmaps(traces[kind])) == list(dict.fromkeys(w.text for w in words))
    # "remove" takes each word's own characters out of the prompt
    fx = steer.token_effects(pipe, prompt, steps=1, record="light",
                             words=[words[1].text, words[-1].text])
    removed = {n: t.prompts[0] for n, t in fx.traces.items()}
    expected = {"subword": {"dreambeach": "a at night", "night": "a dreambeach at"},
                "punctuation": {"red": "A, round circle!", "circle": "A Red, round!"},
                "textual inversion": {"<my-token>": "a and a <multi> circle",
                                      "circle": "a <my-token> and a <multi>"}}[kind]
    assert removed == expected


def test_token_effects_of_a_long_prompt(pipe):
    with pytest.raises(ValueError, match="'horse'.*not in the prompt"):
        steer.token_effects(pipe, LONG, words=["horse"], steps=1, record=None)
    fx = steer.token_effects(pipe, LONG, words=["zebra", "lion"], steps=1, record=None,
                             mode="pad")
    assert fx.words == ["zebra", "lion"]


def test_grouping_rules_without_a_tokenizer():
    # a word cut in its middle by the limit keeps its kept tokens as a word
    words = words_from_tokens(["<|startoftext|>", "a</w>", "dream", "<|endoftext|>"])
    assert [(w.text, w.positions) for w in words] == [("a", (1,)), ("dream", (2,))]
    # SentencePiece pieces: "▁" starts a word
    sp = words_from_tokens(["\u2581a", "\u2581dream", "beach", "\u2581", ",", "</s>"])
    assert [w.text for w in sp][:2] == ["a", "dreambeach"]
    assert word_matches(words_from_tokens(["x</w>", "y</w>", "x</w>"]), "x")[1].occurrence == 1


# ----------------------------------------------------------------------------- the steps
@pytest.mark.parametrize("spec,expected", [
    (None, [0, 1, 2, 3, 4, 5]), (2, [2]), (-1, [5]), (np.int64(-6), [0]), ([0, -1], [0, 5]),
    ((3, 1), [3, 1]), (range(0, 6, 2), [0, 2, 4]), (slice(None, None, 2), [0, 2, 4]),
    (slice(-2, None), [4, 5]), (np.array([1, 2]), [1, 2]), (torch.tensor([4]), [4]),
])
def test_select_steps_forms(spec, expected):
    assert select_steps(spec, 6) == expected


def test_select_steps_with_recorded_steps():
    rec = [0, 2, 4]
    assert select_steps(None, 6, rec) == rec
    assert select_steps(slice(None, None, 2), 6, rec) == rec
    assert select_steps(-2, 6, rec) == [4]
    with pytest.raises(StepError, match=r"step 5 was not recorded; recorded steps: \[0, 2, 4\]"):
        select_steps(-1, 6, rec)


@pytest.mark.parametrize("spec,exc,match", [
    ("all", TypeError, "steps must be None .*an int .*a list/range of ints or a slice; got str"),
    (1.5, TypeError, "steps must be"), (True, TypeError, "steps must be"),
    ([0, 1.0], TypeError, "non-int 1.0"),
    (6, StepError, r"step 6 is out of range for this run of 6 steps \(0..5"),
    ([0, -7], StepError, "step -7 is out of range"),
    (slice(6, None), StepError, "selects no step"), ([], StepError, "selects no step"),
])
def test_select_steps_errors(spec, exc, match):
    with pytest.raises(exc, match=match):
        select_steps(spec, 6)


def test_step_errors_are_value_and_index_errors():
    for exc in (ValueError, IndexError):
        with pytest.raises(exc):
            select_steps(9, 3)
    assert select_step(-1, 3) == 2
    with pytest.raises(TypeError, match="step must be an int"):
        select_step([1], 3)


@pytest.mark.parametrize("spec,expected", [(None, None), ((0, 2), (0, 2)), ((1, None), (1, None)),
                                           ((0.0, 0.5), (0.0, 0.5)), ((None, 0.5), (None, 0.5))])
def test_step_window(spec, expected):
    assert step_window(spec) == expected


@pytest.mark.parametrize("bad", [5, (3, 1), (0.5, 2.0), ("a", 3), (-1, 2), (True, 2)])
def test_step_window_errors(bad):
    with pytest.raises(ValueError, match="steps"):
        step_window(bad)


def test_every_step_argument_reads_the_same(pipe):
    tr = sdlens.generate(pipe, "a red circle", seed=0, steps=4, attention_steps=[0, -1])
    n = len(tr.timesteps)
    maps = tr.attention
    assert maps.steps == [0, n - 1]
    layer = maps.layers[0]
    last = maps[layer][1]
    torch.testing.assert_close(maps.get(layer, step=-1), last)
    torch.testing.assert_close(maps.get(layer, step=n - 1), last)
    torch.testing.assert_close(tr.heatmap("red", steps=-1), tr.heatmap("red", steps=[n - 1]))
    torch.testing.assert_close(guidance.x0_at_guidance(tr, -1, 3.0),
                               guidance.x0_at_guidance(tr, n - 1, 3.0))
    for call in (lambda: maps.get(layer, step=1), lambda: tr.heatmap("red", steps=1)):
        with pytest.raises(StepError, match=rf"step 1 was not recorded; recorded steps: \[0, {n - 1}\]"):
            call()
    for call in (lambda: maps.get(layer, step=n), lambda: tr.heatmap("red", steps=n),
                 lambda: guidance.x0_at_guidance(tr, n, 3.0)):
        with pytest.raises(StepError, match=f"out of range for this run of {n} steps"):
            call()
