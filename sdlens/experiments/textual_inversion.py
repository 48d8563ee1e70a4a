"""Textual inversion: the learned tokens as words, their heatmaps and nearest vocabulary.

    >>> pipe.load_textual_inversion("learned_embeds.safetensors", token="<my-token>")
    >>> tr = sdlens.generate(pipe, "a <my-token> circle")
    >>> tr.heatmap("<my-token>")                  # the token is a word named as loaded
    >>> print(textual_inversion_view(tr))          # token table + nearest vocabulary neighbours
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sdlens.analysis.heatmaps import word_heatmap
from sdlens.analysis.tokens import nearest_tokens, token_view, trace_words, word_matches
from sdlens.trace.core import Trace


def _tokenizers(pipe) -> list[tuple[int, Any, Any]]:
    out = []
    for enc, suffix in ((1, ""), (2, "_2")):
        tok = getattr(pipe, "tokenizer" + suffix, None)
        te = getattr(pipe, "text_encoder" + suffix, None)
        if tok is not None and te is not None:
            out.append((enc, tok, te))
    return out


def textual_inversion_tokens(pipe) -> dict[str, list[str]]:
    """Textual-inversion tokens loaded in ``pipe``: ``{name: [vector tokens]}`` (a multi-vector
    embedding ``<t>`` is loaded by diffusers as tokens ``<t>``, ``<t>_1``, ...)."""
    names: dict[str, list[str]] = {}
    for _, tok, _ in _tokenizers(pipe):
        added = [t for t, _ in sorted(tok.get_added_vocab().items(), key=lambda kv: kv[1])
                 if t not in set(tok.all_special_tokens)]
        for t in added:
            base, _, idx = t.rpartition("_")
            if base and idx.isdigit() and base in added:
                names.setdefault(base, [base])
                if t not in names[base]:
                    names[base].append(t)
            elif t not in names:
                names[t] = [t]
    return names


@dataclass
class TextualInversion:
    """One textual-inversion token: its name, vector tokens and ids (per text encoder), the
    embedding norms, and each vector's nearest vocabulary neighbours ``[(text, id, cosine)]``
    (from :func:`sdlens.analysis.tokens.nearest_tokens`, other added tokens left out)."""

    name: str
    tokens: list[str]
    ids: dict[int, list[int]]
    norms: dict[int, list[float]]
    neighbours: dict[int, list[list[tuple[str, int, float]]]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.name}: {len(self.tokens)} vector(s)"]
        for enc, per in self.neighbours.items():
            for tok, norm, nb in zip(self.tokens, self.norms[enc], per):
                near = ", ".join(f"{t!r} {c:.2f}" for t, _, c in nb)
                lines.append(f"  encoder {enc} {tok} (norm {norm:.3f}) nearest: {near}")
        return "\n".join(lines)


def textual_inversion(pipe, name: str, k: int = 8) -> TextualInversion:
    """The textual-inversion token ``name`` of ``pipe`` and its embedding's ``k`` nearest
    vocabulary neighbours per vector and text encoder. Unknown names raise ValueError listing
    the loaded ones."""
    loaded = textual_inversion_tokens(pipe)
    if name not in loaded:
        raise ValueError(f"unknown textual-inversion token {name!r}; loaded: "
                         f"{', '.join(repr(n) for n in loaded) or 'none'} (load one with "
                         "pipe.load_textual_inversion(path, token=...))")
    vectors = loaded[name]
    ids, norms, neighbours = {}, {}, {}
    for enc, tok, te in _tokenizers(pipe):
        vids = tok.convert_tokens_to_ids(vectors)
        if any(i is None or i == tok.unk_token_id for i in vids):
            continue  # not loaded into this encoder
        table = te.get_input_embeddings().weight.detach()
        ids[enc] = [int(i) for i in vids]
        norms[enc] = [float(table[i].float().norm()) for i in vids]
        n_added = len(tok) - tok.vocab_size
        per = []
        for v in vectors:
            near = nearest_tokens(pipe, v, k=k + max(0, n_added), encoder=enc)
            per.append([n for n in near if n[1] < tok.vocab_size][:k])
        neighbours[enc] = per
    return TextualInversion(name, list(vectors), ids, norms, neighbours)


def textual_inversion_heatmap(trace: Trace, name: str, batch: int = 0, occurrence: int = 0,
                              **kwargs) -> torch.Tensor:
    """Heatmap of a textual-inversion token over all its vectors (``<t>``, ``<t>_1``, ...: one
    word, see :mod:`sdlens.analysis.tokens`), the same as ``trace.heatmap(name)``. ``kwargs`` go
    to :func:`sdlens.analysis.heatmaps.word_heatmap` (steps, layers, size, ...)."""
    return word_heatmap(trace, name, batch=batch, occurrence=occurrence, **kwargs)


@dataclass
class TextualInversionView:
    """The token view of a trace's prompt (:func:`sdlens.analysis.tokens.token_view`) and, for each
    textual-inversion token in it, its :class:`TextualInversion` (nearest neighbours)."""

    tokens: Any
    inversions: dict[str, TextualInversion]

    def to_dict(self) -> dict:
        d = self.tokens.to_dict()
        d["textual_inversions"] = {
            n: {"tokens": ti.tokens, "ids": {str(k): v for k, v in ti.ids.items()},
                "neighbours": {str(k): [[list(x) for x in nb] for nb in v]
                               for k, v in ti.neighbours.items()}}
            for n, ti in self.inversions.items()}
        return d

    def __str__(self) -> str:
        return "\n".join([str(self.tokens)] + [str(ti) for ti in self.inversions.values()])


def textual_inversion_view(trace: Trace, batch: int = 0, pipe=None, k: int = 8
                           ) -> TextualInversionView:
    """Token view of ``trace`` (batch item ``batch``) with the nearest vocabulary neighbours of
    every textual-inversion token in the prompt. ``pipe``: the pipeline (default: the traced one,
    while it is alive); needed for the embeddings."""
    pipe = pipe if pipe is not None else trace.pipeline
    if pipe is None:
        raise ValueError("textual_inversion_view needs the pipeline (pipe=) for the embeddings; "
                         "a loaded trace does not hold it")
    loaded = textual_inversion_tokens(pipe)
    words = trace_words(trace, batch)
    found = {n: textual_inversion(pipe, n, k=k) for n in loaded if word_matches(words, n)}
    return TextualInversionView(token_view(trace, batch), found)
