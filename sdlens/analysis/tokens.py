"""Words and tokens: how CLIP cut the prompt, and what each token did.

A *word* is what the user typed; a *token* is what CLIP's byte-level BPE made of it. APIs in
sdlens take words; token positions are available for those who need them.

How tokens are grouped into words
---------------------------------
CLIP's BPE marks the last sub-word token of every pre-token with ``</w>`` (``'dream', 'beach</w>'``
is the word "dreambeach"; ``'circle</w>', ',</w>'`` are the words "circle" and ","). A word is
therefore a maximal run of tokens that ends with a ``</w>`` token; its text is the tokens joined,
with ``</w>`` removed and the byte-level characters decoded back to UTF-8. ``<|startoftext|>`` and
``<|endoftext|>`` belong to no word. Words are lower case, as CLIP's tokenizer lower-cases.

Positions are positions in the 77-token sequence the text encoder saw: position 0 is
``<|startoftext|>``, the prompt's first token is at position 1, and at most 75 prompt tokens fit
(``MAX_PROMPT_TOKENS``); the pipeline silently drops the rest, ``Trace.truncated_words`` and
:func:`tokenize` say which words were cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SPECIAL = (BOS, EOS)
MAX_POSITIONS = 77
MAX_PROMPT_TOKENS = MAX_POSITIONS - 2  # 75
_END = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map, the alphabet of CLIP's byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


# byte-level BPE character -> the byte it stands for (CLIP / GPT-2's table, inverted)
BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def token_text(token: str) -> str:
    """The readable text of one BPE token string: ``'caf\\u00c3\\u00a9</w>'`` -> ``'café'``."""
    body = token[: -len(_END)] if token.endswith(_END) else token
    if token in SPECIAL:
        return token
    try:
        return bytes(BYTE_DECODER[c] for c in body).decode("utf-8", errors="replace")
    except KeyError:  # not a byte-level BPE string (another tokenizer): show it as it is
        return body


@dataclass(frozen=True)
class Word:
    """One word of a prompt: its text, its index among the prompt's words, its token positions
    (in the 77-token sequence), its token strings and which occurrence of the same text it is."""

    text: str
    index: int
    positions: tuple[int, ...]
    tokens: tuple[str, ...]
    occurrence: int = 0

    @property
    def is_punctuation(self) -> bool:
        return not any(ch.isalnum() for ch in self.text)


def words_from_tokens(tokens: Sequence[str]) -> list[Word]:
    """Group a tokenizer's token strings (with the special tokens) into :class:`Word` s.

    ``tokens[i]`` is taken to sit at position ``i`` of the text encoder's sequence, as
    ``Trace.tokens`` does (position 0 = ``<|startoftext|>``).
    """
    if isinstance(tokens, str):
        raise TypeError("tokens must be a list of token strings, not one string")
    words: list[Word] = []
    run: list[int] = []
    seen: dict[str, int] = {}

    def close() -> None:
        if not run:
            return
        text = _decode("".join(_strip(tokens[p]) for p in run))
        occ = seen.get(text, 0)
        seen[text] = occ + 1
        words.append(Word(text, len(words), tuple(run), tuple(tokens[p] for p in run), occ))
        run.clear()

    for pos, tok in enumerate(tokens):
        if tok in SPECIAL:
            close()
            continue
        run.append(pos)
        if tok.endswith(_END):
            close()
    close()  # a run without a final </w> (cut mid-word by truncation) still forms a word
    return _merge_vectors(words)


def _merge_vectors(words: list[Word]) -> list[Word]:
    """A multi-vector textual-inversion token ``<t>`` is expanded by diffusers into the words
    ``<t> <t>_1 <t>_2 ...``: they are one word (its heatmap covers every vector)."""
    groups: list[tuple[str, list[Word]]] = []  # (the head's text, its words)
    for w in words:
        if groups and w.text == f"{groups[-1][0]}_{len(groups[-1][1])}":
            groups[-1][1].append(w)
        else:
            groups.append((w.text, [w]))
    if len(groups) == len(words):
        return words
    out: list[Word] = []
    seen: dict[str, int] = {}
    for text, ws in groups:
        occ = seen.get(text, 0)
        seen[text] = occ + 1
        out.append(Word(text, len(out), sum((w.positions for w in ws), ()),
                        sum((w.tokens for w in ws), ()), occ))
    return out


def _strip(token: str) -> str:
    return token[: -len(_END)] if token.endswith(_END) else token


def _decode(body: str) -> str:
    try:
        return bytes(BYTE_DECODER[c] for c in body).decode("utf-8", errors="replace")
    except KeyError:
        return body


def split_words(text: str) -> list[str]:
    """Split a query the way CLIP pre-tokenises (letters, single digits, punctuation runs)."""
    import re

    try:
        import regex

        pat = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                            regex.IGNORECASE)
        return [w.lower() for w in pat.findall(text)]
    except ImportError:  # pragma: no cover - regex ships with transformers
        return [w.lower() for w in re.findall(r"[^\W\d_]+|\d|[^\s\w]+", text)]


def _trace_tokens(trace: Any, batch: int) -> list[str]:
    tokens = getattr(trace, "tokens", None)
    if tokens is None:
        raise TypeError(f"expected a Trace with .tokens, got {type(trace).__name__}")
    n = len(tokens)
    if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool):
        raise TypeError(f"batch must be an int, got {type(batch).__name__}")
    if not -n <= batch < n:
        raise ValueError(f"batch={batch} is out of range: the trace holds {n} image(s) "
                         f"(batch 0..{n - 1})")
    return list(tokens[batch])


def trace_words(trace: Any, batch: int = 0, punctuation: bool = True) -> list[Word]:
    """The words of batch item ``batch`` of a trace (from ``trace.tokens``)."""
    words = words_from_tokens(_trace_tokens(trace, batch))
    return words if punctuation else [w for w in words if not w.is_punctuation]


def find_word(trace: Any, word: str, batch: int = 0, occurrence: int = 0) -> Word:
    """The :class:`Word` of ``trace`` (batch item ``batch``) that matches ``word``.

    ``word`` is matched case-insensitively against the words CLIP made (so ``"dreambeach"``
    finds the word of tokens ``dream`` + ``beach</w>``). A query of several words
    (``"red circle"``) matches consecutive words and returns them as one merged :class:`Word`.
    ``occurrence`` picks among repeats (0 = first). Unknown words raise ``ValueError`` listing the
    words available; a word cut by the 75-token limit says so.
    """
    if not isinstance(word, str):
        raise TypeError(f"word must be a str, got {type(word).__name__}; for token positions "
                        f"use sdlens.heatmaps.token_heatmap")
    if not isinstance(occurrence, (int, np.integer)) or isinstance(occurrence, bool):
        raise TypeError(f"occurrence must be an int, got {type(occurrence).__name__}")
    words = trace_words(trace, batch)
    parts = split_words(word)
    if not parts:
        raise ValueError(f"empty word {word!r}; words in the prompt: {available(words)}")
    # a query written without the spaces CLIP would split on ("circle," -> circle ,) works too
    matches: list[list[Word]] = []
    texts = [w.text for w in words]
    joined = "".join(parts)
    for i in range(len(words)):
        # the plain case: consecutive words equal to the query's pre-tokens
        if texts[i : i + len(parts)] == parts:
            matches.append(words[i : i + len(parts)])
    if not matches:  # e.g. a query "dream beach" for the word "dreambeach"
        matches = [[w] for w in words if w.text == joined]
    if not matches:
        truncated = []
        tw = getattr(trace, "truncated_words", None)
        if tw is not None and len(tw) > batch:
            truncated = [t.lower() for t in tw[batch]]
        if word.strip().lower() in truncated or any(p in truncated for p in parts):
            raise ValueError(f"{word!r} was cut from the prompt by CLIP's {MAX_PROMPT_TOKENS}-token "
                             f"limit, so it has no attention maps; words cut: {tw[batch]}")
        raise ValueError(f"{word!r} is not a word of prompt {batch} "
                         f"({_prompt(trace, batch)!r}); words available: {available(words)}")
    if not -len(matches) <= occurrence < len(matches):
        raise ValueError(f"occurrence={occurrence} but {word!r} occurs {len(matches)} time(s) in "
                         f"the prompt (occurrence 0..{len(matches) - 1})")
    group = matches[occurrence]
    if len(group) == 1:
        return group[0]
    return Word(" ".join(w.text for w in group), group[0].index,
                tuple(p for w in group for p in w.positions),
                tuple(t for w in group for t in w.tokens), occurrence % len(matches))


def available(words: Sequence[Word]) -> str:
    out: list[str] = []
    for w in words:
        if w.text not in out:
            out.append(w.text)
    return ", ".join(repr(t) for t in out)


def _prompt(trace: Any, batch: int) -> str:
    prompts = getattr(trace, "prompts", None)
    return prompts[batch] if prompts and len(prompts) > batch else ""


# --------------------------------------------------------------------------- token view
@dataclass
class TokenRow:
    """One token: its position in the 77-token sequence, BPE string, id, readable text, the word
    it belongs to (index and text; -1 / '' for special tokens) and the attention it received."""

    position: int
    token: str
    id: int | None
    text: str
    word_index: int
    word: str
    attention: float | None = None


@dataclass
class TokenView:
    """The prompt as the tokenizer split it.

    ``rows``: one :class:`TokenRow` per token (start token, prompt tokens, end token);
    ``words``: the :class:`Word` s; ``n_prompt_tokens`` of at most ``limit`` (75);
    ``truncated_words``: what the pipeline cut. ``attention`` (when computed from a trace) is each
    token's share of the cross-attention: the attention probability it received, averaged over
    recorded steps, layers, heads and pixels (all 77 positions together sum to 1).
    """

    prompt: str
    rows: list[TokenRow]
    words: list[Word]
    n_prompt_tokens: int
    limit: int = MAX_PROMPT_TOKENS
    truncated_words: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return bool(self.truncated_words)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "n_prompt_tokens": self.n_prompt_tokens,
            "limit": self.limit,
            "truncated_words": list(self.truncated_words),
            "tokens": [vars(r).copy() for r in self.rows],
            "words": [{"text": w.text, "index": w.index, "positions": list(w.positions),
                       "tokens": list(w.tokens), "occurrence": w.occurrence} for w in self.words],
        }

    def __str__(self) -> str:
        lines = [f"prompt: {self.prompt!r}",
                 f"{self.n_prompt_tokens} of {self.limit} prompt tokens"
                 + (f"; CUT: {' '.join(self.truncated_words)}" if self.truncated else "")]
        for r in self.rows:
            att = "" if r.attention is None else f"  attention {r.attention:.4f}"
            lines.append(f"  {r.position:>2}  {r.token:<20} {'' if r.id is None else r.id:>6}  "
                         f"{r.word}{att}")
        return "\n".join(lines)


def tokenize(prompt: str, tokenizer: Any) -> TokenView:
    """How ``tokenizer`` (a ``CLIPTokenizer`` or a pipeline) cuts ``prompt``, with what the
    77-position limit removes. Needs no trace: check a prompt before running it."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not hasattr(tok, "convert_ids_to_tokens"):
        raise TypeError(f"expected a tokenizer or a pipeline with .tokenizer, got "
                        f"{type(tokenizer).__name__}")
    ids = list(tok(prompt, truncation=False, add_special_tokens=True).input_ids)
    strings = tok.convert_ids_to_tokens(ids)
    limit = getattr(tok, "model_max_length", MAX_POSITIONS)
    limit = MAX_POSITIONS if not limit or limit > 10_000 else int(limit)
    all_words = words_from_tokens(strings)
    kept_n = min(len(ids) - 2, limit - 2)
    kept_words = [w for w in all_words if max(w.positions) <= kept_n]
    cut = [w.text for w in all_words if max(w.positions) > kept_n]
    keep = list(range(kept_n + 1)) + [len(ids) - 1]
    rows = _rows([strings[i] for i in keep], [ids[i] for i in keep])
    return TokenView(prompt, rows, kept_words, kept_n, limit - 2, cut)


def _rows(strings: Sequence[str], ids: Sequence[int] | None) -> list[TokenRow]:
    words = words_from_tokens(strings)
    owner = {p: w for w in words for p in w.positions}
    rows = []
    for pos, s in enumerate(strings):
        w = owner.get(pos)
        rows.append(TokenRow(pos, s, None if ids is None else int(ids[pos]), token_text(s),
                             -1 if w is None else w.index, "" if w is None else w.text))
    return rows


def token_attention(trace: Any, batch: int = 0, layers: Any = None) -> dict[int, float]:
    """Each recorded token position's share of cross-attention over the run (see
    :class:`TokenView`): position -> mean over recorded steps, chosen layers, heads and pixels of
    the attention probability it received."""
    _trace_tokens(trace, batch)
    maps = trace.attention
    names = maps.select(layers) if layers is not None else list(maps.layers)
    if not names:
        raise ValueError(f"no recorded layer matches layers={layers!r}; recorded: {maps.layers}")
    total = None
    for name in names:
        m = maps[name].float()
        m = m[:, batch]  # (steps, [heads,] tokens, h, w)
        if m.ndim == 5:
            m = m.mean(1)
        share = m.mean(dim=(0, 2, 3))  # (tokens,)
        total = share if total is None else total + share
    total = total / len(names)
    return {int(p): float(v) for p, v in zip(maps.token_positions, total)}


def token_view(trace: Any, batch: int = 0, attention: bool = True) -> TokenView:
    """The token view of a trace's prompt ``batch``: rows of position, token, id, word and (when
    attention was recorded) each token's share of cross-attention over the run."""
    strings = _trace_tokens(trace, batch)
    ids = trace.token_ids[batch] if getattr(trace, "token_ids", None) is not None else None
    rows = _rows(strings, ids)
    if attention and getattr(trace, "attention", None) is not None:
        att = token_attention(trace, batch)
        for r in rows:
            r.attention = att.get(r.position)
    tw = getattr(trace, "truncated_words", None)
    cut = list(tw[batch]) if tw is not None and len(tw) > batch else []
    words = words_from_tokens(strings)
    n_prompt = sum(1 for s in strings if s not in SPECIAL)
    return TokenView(_prompt(trace, batch), rows, words, n_prompt, MAX_PROMPT_TOKENS, cut)


# --------------------------------------------------------------------------- embeddings
def nearest_tokens(source: Any, word: str, k: int = 10, tokenizer: Any = None,
                   encoder: int = 1) -> list[tuple[str, int, float]]:
    """The ``k`` tokens whose input embeddings are closest (cosine) to ``word``'s.

    ``source``: a pipeline (its ``text_encoder`` and ``tokenizer``; ``encoder=2`` uses SDXL's
    second encoder) or a text encoder with ``tokenizer=`` given. A word of several tokens is
    represented by the mean of its token embeddings; the word's own tokens are left out.
    Returns ``[(token_text, id, cosine), ...]`` best first.
    """
    if encoder not in (1, 2):
        raise ValueError(f"encoder must be 1 or 2, got {encoder!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    suffix = "" if encoder == 1 else "_2"
    text_encoder = getattr(source, "text_encoder" + suffix, None)
    tok = tokenizer if tokenizer is not None else getattr(source, "tokenizer" + suffix, None)
    if text_encoder is None:
        if hasattr(source, "get_input_embeddings"):
            text_encoder = source
        else:
            raise TypeError("nearest_tokens needs a pipeline with a text encoder, or a text "
                            f"encoder and tokenizer=; got {type(source).__name__}")
    if tok is None:
        raise TypeError("nearest_tokens needs a tokenizer: pass a pipeline or tokenizer=")
    table = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    ids = [i for i in tok(word, add_special_tokens=False).input_ids]
    if not ids:
        raise ValueError(f"{word!r} gives no tokens")
    query = table[ids].mean(0)
    sims = torch.nn.functional.cosine_similarity(table, query[None], dim=1)
    sims[ids] = -float("inf")
    special = [getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)]
    for s in special:
        if s is not None and 0 <= s < len(sims):
            sims[s] = -float("inf")
    top = torch.topk(sims, min(k, len(sims))).indices.tolist()
    strings = tok.convert_ids_to_tokens(top)
    return [(token_text(s), int(i), float(sims[i])) for s, i in zip(strings, top)]


# ====================================================================== words as typed (steering)
def _n_tokens(tokenizer, text: str) -> int:
    """Number of prompt tokens of ``text`` (without start / end tokens)."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def prompt_words(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """The prompt's words (split at white space, as typed) with their token positions in the
    77-token sequence (position 0 is the start token). Words cut by the 77-token limit get []."""
    words = prompt.split()
    out, start = [], 1
    for i, w in enumerate(words):
        end = 1 + _n_tokens(tokenizer, " ".join(words[: i + 1]))
        positions = [p for p in range(start, end) if p < MAX_POSITIONS - 1]
        out.append((w, positions))
        start = end
    return out


def _normal(word: str) -> str:
    return " ".join(word.lower().split())


def _strip_punct(word: str) -> str:
    return word.strip(".,;:!?\"'()[]{}")


def word_key(word: str) -> str:
    """How :func:`word_positions` compares words: lower case, white space normalised,
    surrounding punctuation stripped."""
    return _strip_punct(_normal(word))


def word_positions(tokenizer, prompt: str, word: str | int) -> list[int]:
    """Token positions of every occurrence of ``word`` (a word or several consecutive words of the
    prompt, case-insensitive, surrounding punctuation ignored) in ``prompt``; an int is taken as
    a token position. ValueError listing the prompt's words for a word that is not there."""
    if isinstance(word, (int, np.integer)):
        n = 1 + _n_tokens(tokenizer, prompt)
        if not 1 <= int(word) < min(n, MAX_POSITIONS - 1):
            raise ValueError(f"token position {word} is outside the prompt's tokens 1..{n - 1}")
        return [int(word)]
    words = prompt_words(tokenizer, prompt)
    target = [_strip_punct(w) for w in _normal(str(word)).split()]
    if not target or not all(target):
        raise ValueError(f"{word!r} is not a word")
    keys = [word_key(w) for w, _ in words]
    found: list[int] = []
    split = prompt.split()
    for i in range(len(words) - len(target) + 1):
        if keys[i: i + len(target)] == target:
            pos = [p for _, ps in words[i: i + len(target)] for p in ps]
            # leave out punctuation glued to the first / last word ("Red," -> "red")
            first, last = split[i], split[i + len(target) - 1]
            lead = len(first) - len(first.lstrip(".,;:!?\"'()[]{}"))
            trail = len(last) - len(last.rstrip(".,;:!?\"'()[]{}"))
            if lead or trail:
                before = " ".join(split[:i])
                start = 1 + _n_tokens(tokenizer, (before + " " + first[:lead]).strip())
                core = " ".join(split[i: i + len(target)])
                end = 1 + _n_tokens(tokenizer, (before + " " + core[: len(core) - trail]).strip())
                pos = [p for p in pos if start <= p < end]
            if not pos:
                raise ValueError(f"{word!r} lies beyond the 77-token limit of the text encoder: "
                                 "the pipeline cuts it off, so it cannot be reweighted")
            found += pos
    if not found:
        raise ValueError(f"{word!r} is not a word of the prompt {prompt!r}; its words: "
                         f"{', '.join(repr(w) for w, _ in words)}")
    return found
