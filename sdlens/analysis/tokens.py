"""Words and tokens: the one model of what a prompt's *words* are, and what each token did.

A *word* is what the user typed; a *token* is what the tokenizer made of it. Every sdlens API that
takes words (heatmaps, ``AttentionMaps.get(token=...)``, steering, token effects, the token view,
report and CLI) uses the words this module builds, and they are built from the tokenizer's own
token strings (never by splitting the prompt at spaces).

How tokens are grouped into words
---------------------------------
* CLIP's byte-level BPE marks the last sub-word token of every pre-token with ``</w>``
  (``'dream', 'beach</w>'`` is the word "dreambeach"; ``'circle</w>', ',</w>'`` are the words
  "circle" and ","). A word is a run of tokens up to a ``</w>`` token; its text is the tokens
  joined, ``</w>`` removed, the byte-level characters decoded back to UTF-8. Punctuation is a word
  of its own, as CLIP splits it; CLIP lower-cases, so words are lower case.
* SentencePiece marks the *first* piece of a word with ``▁`` (``'▁red'``): such a token starts a
  new word (for the T5 / Gemma text encoders).
* Byte-level BPE without end marks (GPT-2 style: Qwen's, Mistral's Tekken, as the 2026 LLM text
  encoders use them) marks a piece that follows a space with ``Ġ`` (the byte table's space,
  ``'Ġred'``): such a token starts a new word, and so does a change between punctuation and
  letters / digits (``'cat', ','`` are the words "cat" and ","; the digits of a number stay one
  word). Its text is decoded, the leading space dropped.
* An added token (textual inversion's ``<my-token>``) is a word of its own: :func:`tokenize`
  marks it as a word end (``'<my-token></w>'``, as ``Trace.tokens`` stores it). A multi-vector
  textual-inversion token ``<t>``, which the pipeline expands into ``<t> <t>_1 <t>_2``, is one word
  over all its vectors.
* ``<|startoftext|>`` and ``<|endoftext|>`` belong to no word, nor do SentencePiece's specials
  (T5's ``</s>`` end token, Gemma's ``<bos>``, ``<pad>``); a piece without ``▁`` continues the
  word before it. A word that appears more than once
  is told apart by its ``occurrence`` (0 = first).

Several text encoders (SD3: CLIP then T5)
-----------------------------------------
A backbone whose text sequence joins several encoders' tokens (SD3: CLIP's 77 positions, then
T5's ``max_sequence_length``) has *segments*: ``[{"encoder": "clip", "start": 0, "length": 77,
"tokens": n}, {"encoder": "t5", "start": 77, "length": 256, "tokens": m}]`` (``tokens``: the
segment's own tokens, padding excluded; positions ``start .. start+tokens-1``). Words are found
in each segment by the rules above and then **pooled**: a word of the CLIP segment and the word
of the T5 segment with the same text and occurrence are ONE :class:`Word` over the positions of
both (``trace.heatmap("red")`` is the mean of the maps of CLIP's ``red</w>`` and T5's ``▁red``),
and :attr:`Word.encoders` says which encoders saw it. A word that only one encoder carries (past
CLIP's 77 tokens, or split differently by the two tokenizers) is a word of that encoder alone,
listed after the CLIP words. :func:`tokenize_segments` builds the token list of such a text
sequence.

Positions are positions in the 77-token sequence the text encoder saw: position 0 is
``<|startoftext|>``, the prompt's first token is at position 1, and at most 75 prompt tokens fit
(``MAX_PROMPT_TOKENS``); the pipeline drops the rest. (T5, as PixArt uses it: no start token,
the prompt from position 0, ``</s>`` after it, 300 positions; Gemma, as Sana uses it: ``<bos>``
then the prompt, no end token.) The words with a token beyond the limit are
``truncated_words`` (:func:`tokenize`, ``Trace.truncated_words``); the tokens of a word cut in its
middle that did fit still form a (partial) word.

Image-prompt tokens (IP-Adapter): after the text tokens, ``Trace.tokens`` lists the image-prompt
tokens the denoiser attended to, ``<image prompt a:k>`` (token ``k`` of IP-Adapter ``a``; with
several reference images for one adapter their tokens follow each other). They sit at positions
``IMAGE_PROMPT_POSITION + j`` (j counting all image-prompt tokens: past any text encoder's
sequence), and each adapter's tokens are one word, ``"image prompt"`` (a second adapter's is
``"image prompt#2"``).

Words unknown: a call made with ``prompt_embeds`` and no tokenizer-made tokens has no words
(``Trace.tokens`` is empty for it); its maps keep every position, read by position.

Pooling: a word of several tokens (or a phrase of several words) stands for the *mean* of its
tokens' maps, everywhere (``AttentionMaps.get``, the heatmaps), as DAAM does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# SentencePiece tokenizers' specials: T5 ends with "</s>" and pads with "<pad>"; Gemma starts
# with "<bos>" and pads with "<pad>"; Llama-style "<s>"; unknown pieces "<unk>"
SENTENCEPIECE_SPECIAL = ("</s>", "<s>", "<pad>", "<bos>", "<eos>", "<unk>")
SPECIAL = (BOS, EOS) + SENTENCEPIECE_SPECIAL  # tokens that belong to no word
MAX_POSITIONS = 77
MAX_PROMPT_TOKENS = MAX_POSITIONS - 2  # 75
END_MARK = "</w>"  # CLIP BPE: the last piece of a word
START_MARK = "\u2581"  # SentencePiece ("▁"): the first piece of a word
SPACE_MARK = "\u0120"  # byte-level BPE ("Ġ", the byte table's space): a piece after a space
IMAGE_PROMPT_POSITION = 1000  # position of the first image-prompt token (IP-Adapter)
IMAGE_PROMPT_WORD = "image prompt"
_IMAGE_TOKEN = re.compile(r"^<image prompt (\d+):(\d+)>$")
WORDS_UNKNOWN = ("the prompt was given as embeddings (prompt_embeds), so its words are unknown; "
                 "read its maps by token position (e.g. maps.get(layer, token=3), "
                 "sdlens.analysis.heatmaps.token_heatmap), or pass the tokens: "
                 "sdlens.trace(pipe, tokens=[...]) / generate(..., tokens=[...])")


def image_prompt_tokens(counts: Sequence[int]) -> list[str]:
    """The token strings of the image-prompt tokens, ``counts[a]`` tokens for IP-Adapter ``a``."""
    return [f"<image prompt {a}:{k}>" for a, n in enumerate(counts) for k in range(n)]


def is_image_prompt_token(token: str) -> bool:
    return bool(_IMAGE_TOKEN.match(token))


def token_positions(tokens: Sequence[str]) -> list[int]:
    """The position of each token string of ``Trace.tokens``: its index for text tokens,
    ``IMAGE_PROMPT_POSITION + j`` for the j-th image-prompt token."""
    out, j = [], 0
    for i, tok in enumerate(tokens):
        if is_image_prompt_token(tok):
            out.append(IMAGE_PROMPT_POSITION + j)
            j += 1
        else:
            out.append(i)
    return out


def check_user_tokens(tokens: Any, n_prompts: int, length: int) -> list[list[str]]:
    """The user's token strings for ``prompt_embeds`` (one list for every prompt, or one per
    prompt) as one list per prompt, checked against the embeddings' ``length`` positions. Plain
    words (no token carries ``</w>`` or ``▁``) are made one word each."""
    if isinstance(tokens, str) or not isinstance(tokens, (list, tuple)) or not tokens:
        raise TypeError("tokens must be a non-empty list of token strings (or one list per "
                        f"prompt), got {tokens!r}")
    per = [list(tokens)] * n_prompts if all(isinstance(t, str) for t in tokens) else \
        [list(t) for t in tokens]
    if len(per) != n_prompts:
        raise ValueError(f"tokens has {len(per)} lists but prompt_embeds holds {n_prompts} prompts")
    out = []
    for toks in per:
        if not all(isinstance(t, str) for t in toks):
            raise TypeError(f"tokens must be strings, got {toks!r}")
        if len(toks) > length:
            raise ValueError(f"{len(toks)} tokens given but prompt_embeds has {length} positions")
        if not any(t.endswith(END_MARK) or t.startswith(START_MARK) for t in toks):
            toks = [t if t in SPECIAL else t + END_MARK for t in toks]
        out.append(toks)
    return out


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


def _body(token: str) -> str:
    """A token string without its word marks."""
    if token.endswith(END_MARK):
        token = token[: -len(END_MARK)]
    return token[len(START_MARK):] if token.startswith(START_MARK) else token


def _punctuation(token: str) -> bool:
    """Whether a token's text has no letter or digit."""
    return not any(ch.isalnum() for ch in token_text(token))


def _decode(body: str) -> str:
    try:
        return bytes(BYTE_DECODER[c] for c in body).decode("utf-8", errors="replace")
    except KeyError:  # not a byte-level BPE string (an added token, another tokenizer): as it is
        return body


def token_text(token: str) -> str:
    """The readable text of one token string: ``'caf\\u00c3\\u00a9</w>'`` -> ``'café'``."""
    return token if token in SPECIAL else _decode(_body(token))


@dataclass(frozen=True)
class Word:
    """One word of a prompt.

    ``text``: lower-case text as the tokenizer saw it; ``index``: its index among the prompt's
    words; ``positions``: its token positions (in the 77-token sequence); ``tokens``: its token
    strings; ``occurrence``: which occurrence of the same text it is (0 = first); ``span``:
    ``(start, end)`` characters of the prompt it was typed as (None where unknown).
    """

    text: str
    index: int
    positions: tuple[int, ...]
    tokens: tuple[str, ...]
    occurrence: int = 0
    span: tuple[int, int] | None = None
    encoders: tuple[str, ...] = ()  # which text encoders carry it (several-encoder models only)

    @property
    def is_punctuation(self) -> bool:
        return not any(ch.isalnum() for ch in self.text)

    @property
    def name(self) -> str:
        """The text, and for a repeat which one: ``"a"``, ``"a#2"``, ..."""
        return self.text if self.occurrence == 0 else f"{self.text}#{self.occurrence + 1}"


def words_from_tokens(tokens: Sequence[str], prompt: str | None = None,
                      segments: Sequence[dict] | None = None) -> list[Word]:
    """Group a tokenizer's token strings (with the special tokens) into :class:`Word` s (the
    rules are in the module docstring). ``tokens[i]`` sits at position ``i`` of the text
    encoder's sequence, as in ``Trace.tokens``. ``prompt``: the text they came from, to find
    each word's ``span``. ``segments``: the text sequence's encoder segments (module docstring;
    None: one encoder), whose words are found apart and pooled.
    """
    if isinstance(tokens, str):
        raise TypeError("tokens must be a list of token strings, not one string")
    if segments:
        return _segment_words(tokens, prompt, segments)
    runs: list[list[int]] = []
    run: list[int] = []
    images: dict[str, list[int]] = {}  # IP-Adapter -> its image-prompt tokens' indices
    byte_level = any(t.startswith(SPACE_MARK) for t in tokens)  # GPT-2 style: no end marks
    for pos, tok in enumerate(tokens):
        m = _IMAGE_TOKEN.match(tok)
        if m:
            images.setdefault(m.group(1), []).append(pos)
            continue
        starts = tok.startswith(START_MARK) or (byte_level and (
            tok.startswith(SPACE_MARK) or (run and _punctuation(tok)
                                           != _punctuation(tokens[run[-1]]))))
        if tok in SPECIAL or starts:
            if run:
                runs.append(run)
            run = []
            if tok in SPECIAL:
                continue
        run.append(pos)
        if tok.endswith(END_MARK):
            runs.append(run)
            run = []
    if run:  # a run without an end mark (SentencePiece, or cut mid-word by the limit)
        runs.append(run)
    groups = [(_decode("".join(_body(tokens[p]) for p in r)), r) for r in runs]
    if byte_level:  # the space a word's first piece carries is no part of the word
        groups = [(text.strip(), r) for text, r in groups]
    groups = _merge_vectors(groups)
    spans = _spans([t for t, _ in groups], prompt)
    words: list[Word] = []
    seen: dict[str, int] = {}
    for (text, run), span in zip(groups, spans):
        occ = seen.get(text, 0)
        seen[text] = occ + 1
        words.append(Word(text, len(words), tuple(run), tuple(tokens[p] for p in run), occ, span))
    where = token_positions(tokens) if images else []
    for occ, idx in enumerate(images.values()):
        words.append(Word(IMAGE_PROMPT_WORD, len(words), tuple(where[i] for i in idx),
                          tuple(tokens[i] for i in idx), occ, None))
    return words


def _segment_words(tokens: Sequence[str], prompt: str | None, segments: Sequence[dict]
                   ) -> list[Word]:
    """Words of each encoder segment, pooled by (text, occurrence) across segments (module
    docstring); positions are positions in the whole text sequence."""
    merged: dict[tuple[str, int], dict] = {}
    for seg in segments:
        start, n = int(seg["start"]), int(seg.get("tokens", 0))
        if n <= 0:
            continue
        # the segment's tokens alone, at their own positions (SPECIAL padding in front)
        part = ["<pad>"] * start + list(tokens[start: start + n])
        for w in words_from_tokens(part, prompt):
            entry = merged.setdefault((w.text, w.occurrence), {
                "positions": [], "tokens": [], "span": w.span, "encoders": []})
            entry["positions"].extend(w.positions)
            entry["tokens"].extend(w.tokens)
            entry["encoders"].append(str(seg["encoder"]))
            entry["span"] = entry["span"] or w.span
    return [Word(text, i, tuple(e["positions"]), tuple(e["tokens"]), occ, e["span"],
                 tuple(e["encoders"])) for i, ((text, occ), e) in enumerate(merged.items())]


def _merge_vectors(groups: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    """A multi-vector textual-inversion token ``<t>`` is expanded by diffusers into the words
    ``<t> <t>_1 <t>_2 ...``: they are one word (its maps cover every vector)."""
    out: list[tuple[str, list[int]]] = []
    n_vectors = 0
    for text, run in groups:
        if out and text == f"{out[-1][0]}_{n_vectors}":
            out[-1][1].extend(run)
            n_vectors += 1
        else:
            out.append((text, list(run)))
            n_vectors = 1
    return out


def _spans(texts: Sequence[str], prompt: str | None) -> list[tuple[int, int] | None]:
    """Where each word's text lies in ``prompt``, found in order (case-insensitive); None where
    the tokenizer's text normalisation makes it unfindable."""
    if not prompt:
        return [None] * len(texts)
    low = prompt.lower()
    if len(low) != len(prompt):  # a character whose lower case is longer: offsets would shift
        return [None] * len(texts)
    out: list[tuple[int, int] | None] = []
    at = 0
    for text in texts:
        i = low.find(text.lower(), at) if text else -1
        if i < 0:
            out.append(None)
            continue
        out.append((i, i + len(text)))
        at = i + len(text)
    return out


def split_words(text: str) -> list[str]:
    """Split a query the way CLIP pre-tokenises (letters, single digits, punctuation runs)."""
    try:
        import regex

        pat = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                            regex.IGNORECASE)
        return [w.lower() for w in pat.findall(text)]
    except ImportError:  # pragma: no cover - regex ships with transformers
        return [w.lower() for w in re.findall(r"[^\W\d_]+|\d|[^\s\w]+", text)]


# --------------------------------------------------------------------------- finding words
def _consumed(texts: Sequence[str], i: int, parts: Sequence[str]) -> int:
    """How many words from ``texts[i]`` on the query ``parts`` spell out exactly (0: no match).
    A word may take several parts (``"dream beach"`` or ``"<my-token>"`` -> one word)."""
    k, j = 0, i
    while k < len(parts):
        if j >= len(texts) or not texts[j]:
            return 0
        acc = ""
        while k < len(parts) and len(acc) < len(texts[j]):
            acc += parts[k]
            k += 1
        if acc != texts[j]:
            return 0
        j += 1
    return j - i


def _merged(group: Sequence[Word], occurrence: int) -> Word:
    if len(group) == 1:
        return group[0]
    a, b = group[0].span, group[-1].span
    return Word(" ".join(w.text for w in group), group[0].index,
                tuple(p for w in group for p in w.positions),
                tuple(t for w in group for t in w.tokens), occurrence,
                (a[0], b[1]) if a and b else None,
                tuple(dict.fromkeys(e for w in group for e in w.encoders)))


def word_matches(words: Sequence[Word], query: str) -> list[Word]:
    """Every occurrence of ``query`` among ``words``, in prompt order: a word as typed
    (case-insensitive; ``"dreambeach"``, ``"<my-token>"``, ``","``) or several consecutive words
    (``"red circle"``, returned merged into one :class:`Word` over all their tokens)."""
    if not isinstance(query, str):
        raise TypeError(f"a word must be a str, got {type(query).__name__}")
    parts = split_words(query) or ([query.strip().lower()] if query.strip() else [])
    if not parts:
        raise ValueError(f"empty word {query!r}; words in the prompt: {available(words)}")
    if query.strip().lower() == IMAGE_PROMPT_WORD:  # the image prompt is one word of two parts
        return [w for w in words if w.text == IMAGE_PROMPT_WORD]
    texts = [w.text.lower() for w in words]
    found: list[Word] = []
    for i in range(len(words)):
        n = _consumed(texts, i, parts)
        if n:
            found.append(_merged(words[i: i + n], len(found)))
    return found


def _short(where: str, limit: int = 60) -> str:
    """``where`` for a message: a long quoted prompt cut to its start (the user has it)."""
    return where if len(where) <= limit else where[:limit - 1].rstrip() + "…"


def no_word_error(words: Sequence[Word], query: str, truncated: Sequence[str] = (),
                  where: str = "the prompt", empty_prompt: bool = False) -> ValueError:
    """The error for a query that names no word: it was cut by the length limit, the prompt is
    empty (``empty_prompt``), or here are the words there are (punctuation left out)."""
    where = _short(where)
    cut = [t.lower() for t in truncated]
    if cut and (query.strip().lower() in cut or any(p in cut for p in split_words(query))):
        return ValueError(f"{query!r} lies beyond the text encoder's {MAX_POSITIONS}-token limit "
                          f"({MAX_PROMPT_TOKENS}-token prompts): the pipeline cut it, so it has no "
                          f"token positions (no attention maps, nothing to steer); words cut: "
                          f"{list(truncated)}")
    if empty_prompt:
        return ValueError(f"{query!r}: {where} is empty: it has no words to map")
    if not words:
        return ValueError(f"{query!r}: no words for {where}: {WORDS_UNKNOWN}")
    return ValueError(f"{query!r} is not a word of {where}; its words: {available(words)}")


def match_word(words: Sequence[Word], query: str, occurrence: int = 0,
               truncated: Sequence[str] = (), where: str = "the prompt",
               empty_prompt: bool = False) -> Word:
    """The :class:`Word` that ``query`` names (see :func:`word_matches`); ``occurrence`` picks
    among repeats (0 = first, negative from the end). ValueError for a word that is not there
    (listing the words, or saying the length limit cut it: ``truncated``)."""
    if not isinstance(occurrence, (int, np.integer)) or isinstance(occurrence, bool):
        raise TypeError(f"occurrence must be an int, got {type(occurrence).__name__}")
    matches = word_matches(words, query)
    if not matches:
        raise no_word_error(words, query, truncated, where, empty_prompt)
    if not -len(matches) <= occurrence < len(matches):
        raise ValueError(f"occurrence={occurrence} but {query!r} occurs {len(matches)} time(s) "
                         f"in {where} (occurrence 0..{len(matches) - 1})")
    return matches[int(occurrence)]


def available(words: Sequence[Word]) -> str:
    """The distinct word texts, quoted, for messages (punctuation left out)."""
    return ", ".join(repr(t) for t in dict.fromkeys(w.text for w in words
                                                     if not w.is_punctuation))


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


def _prompt(trace: Any, batch: int) -> str:
    prompts = getattr(trace, "prompts", None)
    return (prompts[batch] or "") if prompts and len(prompts) > batch else ""


def _truncated(trace: Any, batch: int) -> list[str]:
    tw = getattr(trace, "truncated_words", None)
    return list(tw[batch]) if tw is not None and len(tw) > batch else []


def trace_words(trace: Any, batch: int = 0, punctuation: bool = True) -> list[Word]:
    """The words of batch item ``batch`` of a trace (from ``trace.tokens``; a trace of several
    text encoders: pooled over its ``text_segments``)."""
    segments = getattr(trace, "text_segments", None)
    segments = segments[batch] if segments else None
    words = words_from_tokens(_trace_tokens(trace, batch), _prompt(trace, batch), segments)
    return words if punctuation else [w for w in words if not w.is_punctuation]


def word_texts(trace: Any, batch: int = 0, punctuation: bool = False) -> list[str]:
    """Each distinct word of a trace's prompt once, in prompt order (punctuation left out unless
    ``punctuation=True``): the default word list of the heatmap, plot and report APIs."""
    return list(dict.fromkeys(w.text for w in trace_words(trace, batch, punctuation)))


def find_word(trace: Any, word: str, batch: int = 0, occurrence: int = 0) -> Word:
    """The :class:`Word` of ``trace`` (batch item ``batch``) that ``word`` names (see
    :func:`word_matches`: ``"dreambeach"`` finds the word of tokens ``dream`` + ``beach</w>``;
    ``"red circle"`` two words merged). ``occurrence`` picks among repeats (0 = first). Unknown
    words raise ``ValueError`` listing the words available; a word cut by the length limit says so.
    """
    if not isinstance(word, str):
        raise TypeError(f"word must be a str, got {type(word).__name__}; for token positions "
                        f"use sdlens.analysis.heatmaps.token_heatmap")
    prompts = getattr(trace, "prompts", None) or []
    empty = batch < len(prompts) and prompts[batch] is not None and not str(prompts[batch]).strip()
    return match_word(trace_words(trace, batch), word, occurrence, _truncated(trace, batch),
                      f"prompt {batch} ({_prompt(trace, batch)!r})", empty)


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
    encoder: str = ""  # which text encoder's segment it sits in (several encoders: SD3)


#: How the views name a text encoder of a segment (``Trace.text_segments``' "encoder").
ENCODER_NAMES = {"clip": "CLIP", "t5": "T5", "gemma": "Gemma", "mistral3": "Mistral-3",
                 "qwen3": "Qwen3", "template": "chat template"}


#: Special tokens a text encoder's segment spends (CLIP: start and end; T5: end).
SEGMENT_SPECIALS = {"clip": 2, "t5": 1}


def encoder_name(encoder: str) -> str:
    """A segment's encoder as the views name it: "clip" -> "CLIP", "t5" -> "T5"."""
    return ENCODER_NAMES.get(encoder, encoder)


@dataclass
class TokenView:
    """The prompt as the tokenizer split it.

    ``rows``: one :class:`TokenRow` per token the text encoder sees (start token, prompt tokens,
    end token); ``words``: the :class:`Word` s; ``n_prompt_tokens`` of at most ``limit`` (75);
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
    segments: list[dict] = field(default_factory=list)  # several text encoders: module docstring

    @property
    def truncated(self) -> bool:
        return bool(self.truncated_words)

    @property
    def ids(self) -> list[int | None]:
        """The token ids, position by position (as ``Trace.token_ids``)."""
        return [r.id for r in self.rows]

    @property
    def tokens(self) -> list[str]:
        """The token strings, position by position (as ``Trace.tokens``)."""
        return [r.token for r in self.rows]

    def encoders(self) -> list[dict]:
        """Which encoder saw which words (several text encoders: SD3's CLIP and T5), one dict
        per segment: ``encoder`` ("clip"), ``name`` ("CLIP"), ``start``, ``length`` (positions),
        ``tokens`` (the prompt's tokens in it, specials and padding left out), ``words`` (the
        words it carries, ``Word.name``) and ``only`` (the words no other encoder carries, e.g.
        past CLIP's 77 tokens). [] for one text encoder."""
        out = []
        for seg in self.segments:
            enc = str(seg["encoder"])
            n = sum(1 for r in self.rows if r.encoder == enc and r.token not in SPECIAL
                    and r.position < int(seg["start"]) + int(seg["tokens"]))
            words = [w for w in self.words if enc in w.encoders and not w.is_punctuation]
            length = int(seg["length"])
            out.append({"encoder": enc, "name": encoder_name(enc), "start": int(seg["start"]),
                        "length": length, "tokens": n,
                        # the prompt tokens it holds (start / end tokens left out), as the
                        # one-encoder count's "of 75"
                        "limit": max(0, length - SEGMENT_SPECIALS.get(enc, 0)),
                        "words": [w.name for w in words],
                        "only": [w.name for w in words if len(w.encoders) == 1]})
        return out

    def padding_rows(self) -> list[TokenRow]:
        """The rows of a segment's padding (several encoders: CLIP's 77 positions past the
        prompt), which have no maps unless the trace kept padding (the views leave them out
        where they have none)."""
        ends = {str(s["encoder"]): int(s["start"]) + int(s["tokens"]) for s in self.segments}
        return [r for r in self.rows if r.encoder in ends and r.position >= ends[r.encoder]]

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "n_prompt_tokens": self.n_prompt_tokens,
            "limit": self.limit,
            "truncated_words": list(self.truncated_words),
            "segments": [dict(seg) for seg in self.segments],
            "tokens": [vars(r).copy() for r in self.rows],
            "words": [{"text": w.text, "index": w.index, "positions": list(w.positions),
                       "tokens": list(w.tokens), "occurrence": w.occurrence,
                       "span": None if w.span is None else list(w.span)} for w in self.words],
        }

    def __str__(self) -> str:
        if not self.words:
            lines = ["words unknown: " + WORDS_UNKNOWN]
            lines += [f"  {r.position:>2}  {r.token}" + ("" if r.attention is None else
                      f"  attention {r.attention:.4f}") for r in self.rows]
            return "\n".join(lines)
        lines = [f"prompt: {self.prompt!r}",
                 f"{self.n_prompt_tokens} of {self.limit} prompt tokens"
                 + (f"; CUT: {' '.join(self.truncated_words)}" if self.truncated else "")]
        for r in self.rows:
            att = "" if r.attention is None else f"  attention {r.attention:.4f}"
            enc = f"{r.encoder:<5} " if r.encoder else ""
            lines.append(f"  {enc}{r.position:>2}  {r.token:<20} "
                         f"{'' if r.id is None else r.id:>6}  {r.word}{att}")
        return "\n".join(lines)


def encoders_sentence(encoders: list[dict]) -> str:
    """Which encoder saw which words, in one sentence (:meth:`TokenView.encoders`' list): "CLIP
    and T5 saw every word", else the words only one encoder saw ("T5 alone: beyond", a word
    past CLIP's 77 tokens)."""
    if not encoders:
        return ""
    names = " and ".join(e["name"] for e in encoders)
    if not any(e["only"] for e in encoders):
        return f"{names} saw every word"
    seeing = [e for e in encoders if e["words"]]
    if len(seeing) == 1:  # e.g. SD3 without its T5 encoder
        blind = " and ".join(e["name"] for e in encoders if not e["words"])
        return f"only {seeing[0]['name']} saw the words" + (f" ({blind}: none)" if blind else "")
    alone = "; ".join(f"{e['name']} alone: {' '.join(e['only'])}" for e in encoders if e["only"])
    return f"{names} saw the other words; {alone}"


def tokenizer_of(source: Any) -> Any:
    """The tokenizer of ``source``: a tokenizer itself, or a pipeline's ``tokenizer`` (its
    ``tokenizer_2`` when it has no first one, as the SDXL refiner)."""
    if hasattr(source, "convert_ids_to_tokens"):
        return source
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(source, name, None)
        if tok is not None:
            return tok
    raise TypeError(f"expected a tokenizer or a pipeline with .tokenizer, got "
                    f"{type(source).__name__}")


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """``convert_ids_to_tokens``, with added non-special tokens (textual inversion's
    ``<my-token>``; the tokenizer always splits them out whole) marked as word ends
    (``<my-token></w>``) so that each is a word of its own instead of merging with the next."""
    toks = list(tokenizer.convert_ids_to_tokens(list(ids)))
    try:
        added = set(tokenizer.get_added_vocab()) - set(tokenizer.all_special_tokens)
    except (AttributeError, TypeError):
        return toks
    return [t + END_MARK if t in added and not t.endswith(END_MARK) else t for t in toks]


def tokenize(prompt: str, tokenizer: Any, limit: int | None = None) -> TokenView:
    """How ``tokenizer`` (a tokenizer, or a pipeline: its tokenizer, and multi-vector
    textual-inversion tokens expanded as the pipeline expands them) cuts ``prompt``, keeping what
    the pipeline keeps (``truncation=True, max_length=limit``; ``limit`` defaults to the
    tokenizer's ``model_max_length``, 77 for CLIP) and naming the words the limit cuts. A start
    token (CLIP's, Gemma's ``<bos>``) and an end token (CLIP's, T5's ``</s>``) are kept where the
    tokenizer adds them. Needs no trace: check a prompt before running it. ``Trace.tokens`` /
    ``token_ids`` / ``truncated_words`` are recorded with it."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    tok = tokenizer_of(tokenizer)
    convert = getattr(tokenizer, "maybe_convert_prompt", None) if tok is not tokenizer else None
    text = convert(prompt, tok) if callable(convert) else prompt
    ids = list(tok(text, truncation=False, add_special_tokens=True).input_ids)
    strings = token_strings(tok, ids)
    if limit is None:
        limit = getattr(tok, "model_max_length", MAX_POSITIONS)
        limit = MAX_POSITIONS if not limit or limit > 10_000 else int(limit)
    lead = int(bool(ids) and ids[0] == getattr(tok, "bos_token_id", None))
    tail = int(len(ids) > lead and ids[-1] == getattr(tok, "eos_token_id", None))
    kept_n = min(len(ids) - lead - tail, limit - lead - tail)
    cut = [w.text for w in words_from_tokens(strings) if max(w.positions) >= lead + kept_n]
    keep = list(range(lead + kept_n)) + ([len(ids) - 1] if tail else [])
    strings, ids = [strings[i] for i in keep], [ids[i] for i in keep]
    words = words_from_tokens(strings, prompt)
    return TokenView(prompt, _rows(strings, ids, words), words, kept_n, limit - lead - tail, cut)


def tokenize_segments(prompt: str, parts: Sequence[tuple[str, Any, int]]) -> TokenView:
    """:func:`tokenize` for a text sequence joined from several encoders' tokens (SD3: CLIP's 77
    positions, then T5's). ``parts``: ``(encoder name, tokenizer or None, length)`` in sequence
    order; a segment without a tokenizer (SD3 with ``text_encoder_3=None``: zeros) holds no
    tokens. Each segment keeps what its pipeline keeps (``truncation=True, max_length=length``);
    the positions between a segment's last token and the next segment are its padding (the
    tokenizer's pad token). ``truncated_words``: words that no segment carries."""
    strings: list[str] = []
    ids: list[int] = []
    segments: list[dict] = []
    cut: list[str] | None = None
    start = 0
    for encoder, tok, length in parts:
        length = max(0, int(length))  # a segment the pipeline's max length leaves no position
        seg = {"encoder": encoder, "start": start, "length": length, "tokens": 0}
        segments.append(seg)
        if tok is not None:
            if getattr(tokenizer_of(tok), "bos_token", None) == BOS:  # CLIP: as tokenize() does
                view = tokenize(prompt, tok)
                seg_ids, seg_strings, seg_cut = view.ids, view.tokens, view.truncated_words
            else:
                tk = tokenizer_of(tok)
                full = list(tk(prompt, truncation=False).input_ids)
                # (a tokenizer cannot be asked for max_length=0: nothing of the prompt is kept)
                seg_ids = list(tk(prompt, truncation=True, max_length=length).input_ids) \
                    if length else []
                seg_strings = token_strings(tk, seg_ids)
                kept = {(w.text, w.occurrence) for w in words_from_tokens(seg_strings)}
                seg_cut = [w.text for w in words_from_tokens(token_strings(tk, full))
                           if (w.text, w.occurrence) not in kept]
            seg_ids, seg_strings = list(seg_ids)[: int(length)], list(seg_strings)[: int(length)]
            seg["tokens"] = len(seg_ids)
            strings += seg_strings
            ids += [int(i) for i in seg_ids]
            carried = {w.text for w in words_from_tokens(seg_strings)}
            cut = list(seg_cut) if cut is None else [w for w in cut if w not in carried]
            pad = tokenizer_of(tok)
            pad_id = getattr(pad, "pad_token_id", None)
            pad_str = getattr(pad, "pad_token", None) or "<pad>"
        else:
            pad_id, pad_str = 0, "<pad>"
        start += int(length)
        if len(segments) < len(parts):  # pad up to the next segment
            n_pad = start - len(strings)
            strings += [pad_str if pad_str in SPECIAL else "<pad>"] * n_pad
            ids += [int(pad_id or 0)] * n_pad
    last = max((s["start"] + s["tokens"] for s in segments if s["tokens"]), default=0)
    strings, ids = strings[:last], ids[:last]
    words = words_from_tokens(strings, prompt, segments)
    n_prompt = sum(1 for t in strings if t not in SPECIAL)
    return TokenView(prompt, _rows(strings, ids, words, segments), words, n_prompt,
                     sum(int(s["length"]) for s in segments), list(cut or []), segments)


def _rows(strings: Sequence[str], ids: Sequence[int] | None, words: Sequence[Word],
          segments: Sequence[dict] | None = None) -> list[TokenRow]:
    owner = {p: w for w in words for p in w.positions}
    encoder = {p: str(seg["encoder"]) for seg in segments or ()
               for p in range(int(seg["start"]), int(seg["start"]) + int(seg["length"]))}
    rows = []
    for i, (pos, s) in enumerate(zip(token_positions(strings), strings)):
        w = owner.get(pos)
        rows.append(TokenRow(pos, s, None if ids is None or i >= len(ids) else int(ids[i]),
                             token_text(s), -1 if w is None else w.index,
                             "" if w is None else w.text, encoder=encoder.get(pos, "")))
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
    words = trace_words(trace, batch)
    segments = getattr(trace, "text_segments", None)
    segments = segments[batch] if segments else None
    rows = _rows(strings, ids, words, segments)
    maps = getattr(trace, "attention", None)
    if not strings and maps is not None:  # words unknown (prompt_embeds): one row per position
        rows = [TokenRow(p, f"<position {p}>", None, f"#{p}", -1, "") for p in maps.token_positions]
    if attention and maps is not None:
        att = token_attention(trace, batch)
        for r in rows:
            r.attention = att.get(r.position)
    n_prompt = sum(1 for s in strings if s not in SPECIAL and not is_image_prompt_token(s))
    if segments:  # several encoders (SD3): their lengths
        limit = sum(int(seg["length"]) for seg in segments)
    else:  # the text encoder's limit (meta["text_length"]: 300 for PixArt / Sana; 77 where
        # absent) less the start / end tokens it adds
        meta = getattr(trace, "meta", None) or {}
        length = int(meta.get("text_length") or MAX_POSITIONS)
        text = [s for s in strings if not is_image_prompt_token(s)]
        limit = length - sum(1 for s in (text[:1] + text[-1:] if len(text) > 1 else text)
                             if s in SPECIAL)
    return TokenView(_prompt(trace, batch), rows, words, n_prompt, limit,
                     _truncated(trace, batch), list(segments or []))


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
