"""The Word model's image-prompt tokens (IP-Adapter) and user-given tokens (prompt_embeds)."""

from __future__ import annotations

import pytest

from sdlens.analysis.tokens import (IMAGE_PROMPT_POSITION, check_user_tokens, image_prompt_tokens,
                                    token_positions, word_matches, words_from_tokens)

TEXT = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]


def test_image_prompt_tokens_are_one_word_per_adapter_past_the_text():
    toks = TEXT + image_prompt_tokens([2, 3])
    assert toks[5:7] == ["<image prompt 0:0>", "<image prompt 0:1>"]
    assert token_positions(toks) == [0, 1, 2, 3, 4] + [IMAGE_PROMPT_POSITION + j for j in range(5)]
    words = words_from_tokens(toks)
    assert [w.name for w in words] == ["a", "red", "circle", "image prompt", "image prompt#2"]
    assert words[3].positions == (1000, 1001) and words[4].positions == (1002, 1003, 1004)
    assert [w.positions for w in word_matches(words, "Image Prompt")] == [(1000, 1001), (1002, 1003, 1004)]
    assert [w.text for w in word_matches(words, "red circle")] == ["red circle"]


def test_user_tokens_checked_and_made_words():
    assert check_user_tokens(["<|startoftext|>", "a", "cat"], 2, 77) == \
        [["<|startoftext|>", "a</w>", "cat</w>"]] * 2
    assert check_user_tokens([["x</w>"], ["dream", "beach</w>"]], 2, 77) == [["x</w>"], ["dream", "beach</w>"]]
    with pytest.raises(ValueError, match="positions"):
        check_user_tokens(["a"] * 5, 1, 4)
    with pytest.raises(ValueError, match="prompts"):
        check_user_tokens([["a"], ["b"]], 3, 77)
    with pytest.raises(TypeError):
        check_user_tokens("a red circle", 1, 77)
