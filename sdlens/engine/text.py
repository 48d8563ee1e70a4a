"""The text axis of a pipeline call: the token ids and strings at the positions the denoiser's
cross-attention sees, laid out as the pipeline lays out its text (through the backbone adapter:
its text preprocessing, text length and layout, :mod:`sdlens.engine.arch`). The session records
``Trace.tokens`` with it and steering finds a word's positions with it, so both agree with the
maps' text axis.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import numpy as np

from sdlens.analysis.tokens import (SPECIAL, no_word_error, token_strings, tokenize,
                                    tokenize_segments, tokenizer_of, word_matches,
                                    words_from_tokens)
from sdlens.engine.arch import BackboneAdapter, adapter_for


class TextAxis(NamedTuple):
    ids: list[int]
    tokens: list[str]
    truncated_words: list[str]
    limit: int | None  # prompt tokens that fit (None: not known, an adapter's own layout)


def call_defaults(pipe) -> dict:
    """The default arguments of ``pipe``'s ``__call__`` (of its own class while it is traced)."""
    cls = next((c for c in type(pipe).__mro__ if "_sdlens_traced" not in vars(c)), type(pipe))
    try:
        sig = inspect.signature(cls.__call__)
    except (TypeError, ValueError):
        return {}
    return {k: v.default for k, v in sig.parameters.items() if v.default is not v.empty}


def text_axis(pipe, prompt: str, params: dict | None = None,
              adapter: BackboneAdapter | None = None) -> TextAxis:
    """The text axis of ``prompt`` in a call of ``pipe`` with ``params`` (its arguments; the
    call's defaults fill the rest)."""
    adapter = adapter or adapter_for(pipe)
    params = {**call_defaults(pipe), **(params or {})}
    text = adapter.encoded_prompt(prompt, params)
    laid_out = adapter.text_tokens(text, params)
    if laid_out is not None:
        return TextAxis(list(laid_out), token_strings(tokenizer_of(pipe), laid_out), [], None)
    view = tokenize(text, pipe, limit=adapter.text_length(params))
    return TextAxis(view.ids, view.tokens, view.truncated_words, view.limit)


def word_positions(pipe, prompt: str, word: Any, params: dict | None = None) -> list[int]:
    """Positions on the text axis of every occurrence of ``word`` (a word of the prompt, several
    consecutive words, or an int position of a prompt token) in ``prompt``; ValueError listing
    the prompt's words for a word that is not there."""
    adapter = adapter_for(pipe)
    parts = adapter.text_parts({**call_defaults(pipe), **(params or {})})
    if parts is not None:  # several text encoders (SD3): a word's positions in every segment
        view = tokenize_segments(prompt, parts)
        tokens, words, cut = view.tokens, view.words, view.truncated_words
    else:
        axis = text_axis(pipe, prompt, params, adapter)
        tokens, cut = axis.tokens, axis.truncated_words
        words = words_from_tokens(axis.tokens, prompt)
    if isinstance(word, (int, np.integer)) and not isinstance(word, bool):
        inside = [p for p, t in enumerate(tokens) if t not in SPECIAL]
        if int(word) not in inside:
            span = f"{inside[0]}..{inside[-1]}" if inside else "(none)"
            raise ValueError(f"token position {word} is outside the prompt's tokens {span}")
        return [int(word)]
    matches = word_matches(words, str(word))
    if not matches:
        raise no_word_error(words, str(word), cut, f"the prompt {prompt!r}",
                            empty_prompt=isinstance(prompt, str) and not prompt.strip())
    return [p for w in matches for p in w.positions]
