"""``TokenView(trace)``: the prompt as the tokenizer(s) split it, with each token's attention share.

Each token is a chip (special tokens greyed, words cut by the length limit struck through);
a bar under it shows its share of the cross-attention the *prompt's* tokens received (the start
token takes most of every row's probability, so it is left out of the bars; its raw share is in
the hover text). Hovering shows position, id, token string and word, and sets ``hovered``.

With several text encoders (SD3: CLIP then T5) the chips come in one group per encoder, headed
by its name, and the footer says which encoder saw which word (a word past CLIP's 77 tokens is
seen by T5 alone); each segment's padding is left out where it has no maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anywidget
import traitlets

from sdlens.analysis.tokens import BOS, SPECIAL, encoder_name, encoders_sentence, token_view

_STATIC = Path(__file__).parent / "static"


class TokenView(anywidget.AnyWidget):
    """Tokens of prompt ``batch`` of ``trace`` with their attention share.

    Attributes (synced): ``rows`` (one dict per token: position, token, id, text, word,
    attention, share, special, cut, encoder: "CLIP" / "T5" with several text encoders, else ""),
    ``hovered`` (the position under the mouse, -1 none).
    """

    _esm = _STATIC / "token_view.js"
    _css = _STATIC / "sdlens.css"

    title = traitlets.Unicode("").tag(sync=True)
    footer = traitlets.Unicode("").tag(sync=True)
    rows = traitlets.List(traitlets.Dict()).tag(sync=True)
    hovered = traitlets.Int(-1).tag(sync=True)
    batch = traitlets.Int(0).tag(sync=True)

    def __init__(self, trace: Any, batch: int = 0, **kwargs: Any):
        prompts = getattr(trace, "prompts", None)
        if prompts is None or getattr(trace, "tokens", None) is None:
            raise TypeError(f"TokenView needs a Trace, got {type(trace).__name__}")
        if not isinstance(batch, int) or not 0 <= batch < len(prompts):
            raise ValueError(f"batch={batch!r} is out of range: the trace holds {len(prompts)} prompt(s)")
        super().__init__(**kwargs)
        self.trace = trace
        self._fill(batch)
        self.observe(lambda ch: self._fill(ch["new"]), names="batch")

    def _fill(self, batch: int) -> None:
        view = token_view(self.trace, batch)
        self.view = view
        padding = {id(r) for r in view.padding_rows() if r.attention is None}  # no maps kept
        shown = [r for r in view.rows if id(r) not in padding]
        prompt_total = sum(r.attention or 0.0 for r in shown if r.token not in SPECIAL)
        rows = []
        for r in shown:
            special = r.token in SPECIAL
            share = None
            if r.attention is not None and not special and prompt_total > 0:
                share = r.attention / prompt_total
            rows.append({"position": r.position, "token": r.token, "id": r.id, "text": r.text,
                         "word": r.word, "attention": r.attention, "share": share,
                         "special": special, "cut": False,
                         "encoder": encoder_name(r.encoder) if r.encoder else ""})
        for k, word in enumerate(view.truncated_words):
            rows.append({"position": -1 - k, "token": word, "id": None, "text": word, "word": word,
                         "attention": None, "share": None, "special": False, "cut": True,
                         "encoder": ""})
        encoders = view.encoders()
        with self.hold_trait_notifications():
            self.rows = rows
            if encoders:  # SD3: each encoder's own count and length
                counts = " · ".join(f"{e['name']} {e['tokens']} of {e['limit']}" for e in encoders)
                self.title = f"{view.prompt!r}: prompt tokens {counts}"
            else:
                self.title = f"{view.prompt!r}: {view.n_prompt_tokens} of {view.limit} prompt tokens"
            notes = [encoders_sentence(encoders)] if encoders else []
            if padding:
                notes.append(f"padding left out ({len(padding)} positions)")
            if view.truncated:
                length = int((getattr(self.trace, "meta", None) or {}).get("text_length") or 77)
                notes.append(f"cut by the {length}-token limit: {' '.join(view.truncated_words)}")
            if any(r["attention"] is not None for r in rows):
                start = next((r["attention"] for r in rows if r["token"] == BOS), None)
                notes.append("bars: share of the prompt tokens' attention (mean over recorded steps, "
                             "layers, heads, pixels)"
                             + (f"; the start token took {100 * start:.1f}% of all" if start is not None else ""))
            else:
                notes.append("no attention recorded: ids only")
            self.footer = " · ".join(notes)

    def shares(self) -> dict[str, float]:
        """``{word-token text: share}`` of the prompt tokens (what the bars show)."""
        return {f"{r['position']}:{r['text']}": r["share"] for r in self.rows if r["share"] is not None}

    def hover_text(self, position: int | None = None) -> str:
        """The text the view shows for the hovered token (or ``position``)."""
        pos = self.hovered if position is None else position
        for r in self.rows:
            if r["position"] == pos:
                return (f"position {r['position']} · id {r['id']} · token {r['token']!r}"
                        + (f" · word {r['word']!r}" if r["word"] else "")
                        + (f" · seen by {r['encoder']}" if r["encoder"] else ""))
        return ""

