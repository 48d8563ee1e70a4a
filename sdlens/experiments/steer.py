"""Intervening on tokens: reweight a word's cross-attention, or take a word away.

>>> trace = sdlens.steer.reweight(pipe, "a red circle", {"red": 2.0}, seed=0, steps=25)
>>> trace = sdlens.generate(pipe, "a red circle", reweight={"red": 2.0}, reweight_steps=(0, 10))
>>> fx = sdlens.token_effects(pipe, "a red circle and a blue square", seed=0)
>>> fx.effects                        # {'a': 0.01, 'red': 0.12, ...}: mean |pixel change|
>>> fx.maps["red"]                    # (H, W) where removing "red" changed the image
>>> fx.plot()

Reweighting is prompt-to-prompt's equalizer: the attention probabilities of the chosen tokens in
every cross-attention site are multiplied by the weight, in the text half of the
batch, at the chosen steps; rows are **not renormalised** (see :mod:`sdlens.hooks.steering`). A
weight of 1.0 is an exact no-op. The traces record the model's attention probabilities *before*
the equalizer (the steered attention is those maps times the weights at the steered steps);
``trace.meta["reweight"]`` says what was steered.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from sdlens.engine.steering import SteeringState, install

MAX_POSITIONS = 77


# ---------------------------------------------------------------------------------------------
# words and token positions

def _tokenizer(pipe):
    tok = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tok is None:
        raise TypeError(f"{type(pipe).__name__} has no tokenizer")
    return tok


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
    keys = [_strip_punct(_normal(w)) for w, _ in words]
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


def _factors(tokenizer, prompts: Sequence[str], weights: Mapping[Any, float]):
    """(items, 77) factors and the positions named."""
    if not weights:
        raise ValueError("reweight needs at least one {word: weight}")
    factors = torch.ones(len(prompts), MAX_POSITIONS)
    positions: set[int] = set()
    for i, prompt in enumerate(prompts):
        for word, w in weights.items():
            w = float(w)
            if not np.isfinite(w):
                raise ValueError(f"the weight of {word!r} is not finite: {w}")
            for p in word_positions(tokenizer, prompt, word):
                factors[i, p] = w
                positions.add(p)
    return factors, sorted(positions)


@contextlib.contextmanager
def reweighting(pipe, prompt: str | Sequence[str], weights: Mapping[Any, float], steps=None,
                num_images_per_prompt: int = 1):
    """Install the equalizer on every cross-attention site of ``pipe``'s denoiser for the calls in
    the ``with`` block (restored on exit, also on errors). Yields the :class:`SteeringState`.

    Args:
        prompt: the prompt(s) of the call (to find the words' token positions).
        weights: ``{word: weight}``; a word may be several consecutive words ("red circle") or an
            int token position. Every occurrence of the word is reweighted.
        steps: ``(start, end)`` denoising step indices (end exclusive, None for the end; the
            step axis of a Trace: one UNet call each) or fractions of the run as floats
            (``(0.0, 0.5)``: the first half); None: every step.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    factors, positions = _factors(_tokenizer(pipe), prompts, weights)
    steps = _check_steps(steps)
    state = SteeringState(factors, positions, steps, pipe=pipe)
    restore = install(pipe.unet, state)
    try:
        yield state
    finally:
        restore()


def _check_steps(steps):
    if steps is None:
        return None
    try:
        start, end = steps
    except (TypeError, ValueError):
        raise ValueError(f"steps must be (start, end), e.g. (0, 10) or (0.0, 0.5); got {steps!r}") from None
    for v in (start, end):
        if v is not None and not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"steps must be (start, end) numbers or None; got {steps!r}")
    if any(isinstance(v, (float, np.floating)) for v in (start, end)):
        start = None if start is None else float(start)
        end = None if end is None else float(end)
        if not all(v is None or 0.0 <= v <= 1.0 for v in (start, end)):
            raise ValueError(f"fractional steps must lie in [0, 1]; got {steps!r}")
    else:
        start = None if start is None else int(start)
        end = None if end is None else int(end)
        if (start is not None and start < 0) or (end is not None and end < 0):
            raise ValueError(f"step indices must be >= 0; got {steps!r}")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"steps {steps!r}: the range is empty (end <= start)")
    return (start, end)


def reweight(pipe, prompt: str | Sequence[str], weights: Mapping[Any, float],
             reweight_steps=None, baseline: bool = False, **generate_kwargs):
    """Generate ``prompt`` with the chosen words' cross-attention scaled; returns the Trace
    (``trace.meta["reweight"]`` holds the weights, step range and token positions).
    ``baseline=True`` also runs the unsteered image with the same settings and returns
    ``(steered, original)``.

    Args:
        weights: ``{"red": 2.0, "circle": 0.5}`` (see :func:`reweighting`).
        reweight_steps: ``(start, end)`` denoising-step range (indices, end exclusive; or
            fractions of the run as floats); None = every step.
        **generate_kwargs: for ``sdlens.generate``: ``seed``, ``steps`` (the number of steps),
            ``guidance_scale``, ``negative_prompt``, record options, ...
    """
    from sdlens.engine.session import generate

    n_images = int(generate_kwargs.get("num_images_per_prompt", 1) or 1)
    with reweighting(pipe, prompt, weights, reweight_steps,
                     num_images_per_prompt=n_images) as state:
        trace = generate(pipe, prompt, **generate_kwargs)
    trace._require()["meta"]["reweight"] = {
        "weights": {str(k): float(v) for k, v in weights.items()},
        "steps": list(state.steps) if state.steps else None,
        "positions": state.positions, "renormalised": False}
    if baseline:
        return trace, generate(pipe, prompt, **generate_kwargs)
    return trace


# ---------------------------------------------------------------------------------------------
# ablation

@dataclass
class TokenEffects:
    """What each word did to the image (:func:`token_effects`).

    Attributes:
        prompt, mode ("remove" | "pad"), seed, guidance_scale.
        words: the words ablated, in prompt order (a repeated word appears with "#2", "#3").
        image: the original image, float (H, W, 3) in [0, 1].
        ablated: ``{word: image}`` with that word removed / padded.
        maps: ``{word: (H, W)}`` mean over RGB of |ablated - original|.
        effects: ``{word: float}``: the mean of the map (mean absolute pixel change, 0..1).
        trace / traces: the original's and each ablated run's trace (None without recording).
    """

    prompt: str
    mode: str
    seed: int
    guidance_scale: float
    words: list[str]
    image: np.ndarray
    ablated: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    effects: dict[str, float]
    trace: Any = None
    traces: dict[str, Any] = field(default_factory=dict)

    def ranked(self) -> list[tuple[str, float]]:
        """Words by effect size, largest first."""
        return sorted(self.effects.items(), key=lambda kv: -kv[1])

    def __repr__(self) -> str:
        top = ", ".join(f"{w}={e:.3f}" for w, e in self.ranked())
        return f"TokenEffects({self.prompt!r}, mode={self.mode!r}: {top})"

    def plot(self, cell_size: float = 1.8):
        """Top row: the original and each ablated image; bottom row: the difference maps on one
        colour scale, titled with the effect sizes."""
        import matplotlib.pyplot as plt

        n = len(self.words) + 1
        fig, axs = plt.subplots(2, n, figsize=(cell_size * n, cell_size * 2 + 0.6), squeeze=False)
        vmax = max([float(m.max()) for m in self.maps.values()] + [1e-6])
        axs[0, 0].imshow(np.clip(self.image, 0, 1))
        axs[0, 0].set_title("original", fontsize=9)
        axs[1, 0].axis("off")
        im = None
        for k, w in enumerate(self.words, start=1):
            axs[0, k].imshow(np.clip(self.ablated[w], 0, 1))
            axs[0, k].set_title(f"{'without' if self.mode == 'remove' else 'padded'} {w!r}",
                                fontsize=9)
            im = axs[1, k].imshow(self.maps[w], cmap="magma", vmin=0, vmax=vmax)
            axs[1, k].set_title(f"effect {self.effects[w]:.3f}", fontsize=9)
        for ax in axs.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        if im is not None:
            fig.colorbar(im, ax=list(axs[1, 1:]), fraction=0.02, label="|change|")
        fig.suptitle(f"{self.prompt!r}: word ablation ({self.mode}), seed {self.seed}, "
                     f"CFG {self.guidance_scale:g}", fontsize=10)
        return fig


class _PadEmbeddings:
    """Forward hook on a text encoder's token-embedding module: in the call that embeds the
    prompt batch (every row equal to the prompt's ids), row ``r``'s positions ``rows[r]`` get the
    padding token's embedding."""

    def __init__(self, module, prompt_ids: torch.Tensor, pad_id: int, rows: list[list[int]]):
        self.module, self.prompt_ids, self.pad_id, self.rows = module, prompt_ids, pad_id, rows
        self.applied = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        ids = args[0] if args else None
        if ids is None or not torch.is_tensor(ids) or ids.ndim != 2 or ids.shape[0] != len(self.rows):
            return None
        ref = self.prompt_ids.to(ids.device)
        if ids.shape[1] != ref.shape[0] or not bool((ids == ref).all()):
            return None  # the negative prompt, or another call
        weight = getattr(module, "weight", None)
        pad = weight[self.pad_id] if weight is not None else module(
            torch.tensor([[self.pad_id]], device=ids.device))[0, 0]
        out = output.clone()
        for r, positions in enumerate(self.rows):
            for p in positions:
                out[r, p] = pad
        self.applied += 1
        return out

    def remove(self):
        self.handle.remove()


def _variants(prompt: str, words: list[tuple[str, list[int]]], mode: str):
    names, seen = [], {}
    for w, _ in words:
        seen[w] = seen.get(w, 0) + 1
        names.append(w if seen[w] == 1 else f"{w}#{seen[w]}")
    if mode == "remove":
        split = prompt.split()
        prompts = [" ".join(split[:i] + split[i + 1:]) for i in range(len(split))]
        return names, prompts, None
    return names, [prompt] * len(words), [ps for _, ps in words]


def token_effects(pipe, prompt: str, seed: int = 0, mode: str = "remove",
                  words: Sequence[str] | None = None, steps: int = 20,
                  guidance_scale: float = 7.5, negative_prompt: str | None = None,
                  record: Any = "light", max_batch: int | None = None,
                  **pipe_kwargs) -> TokenEffects:
    """How much each word steers the image: the prompt is run once as it is and once per word
    with that word ablated, all with the same seed, batched into one pipeline call (or calls of
    ``max_batch`` rows).

    Args:
        mode: "remove" drops the word from the prompt text (later words move up: the full
            counterfactual "the prompt without this word"); "pad" keeps the positions and gives
            the word's tokens the padding token's input embedding (the text encoder then
            contextualises the prompt without it; every other position stays where it was).
        words: the words to ablate (default: every word of the prompt, split at white space).
        steps, guidance_scale, negative_prompt, **pipe_kwargs: as for the pipeline.
        record: traces to keep, as for :func:`sdlens.sweep` ("light", "full", None).

    Returns a :class:`TokenEffects`: per word the (H, W) map of mean |RGB change| and its mean
    as the effect size.
    """
    from sdlens.experiments.sweep import Batch, Cell, _record_options, _run_batch

    if mode not in ("remove", "pad"):
        raise ValueError(f"mode must be 'remove' or 'pad', got {mode!r}")
    tokenizer = _tokenizer(pipe)
    all_words = prompt_words(tokenizer, prompt)
    if not all_words:
        raise ValueError("the prompt has no words to ablate")
    names, prompts, rows = _variants(prompt, all_words, mode)
    if words is not None:
        wanted = [_strip_punct(_normal(w)) for w in words]
        keys = [_strip_punct(_normal(n.split("#")[0])) for n in names]
        missing = [w for w, wn in zip(words, wanted) if wn not in keys]
        if missing:
            raise ValueError(f"{', '.join(map(repr, missing))} not in the prompt {prompt!r}; its "
                             f"words: {', '.join(repr(w) for w, _ in all_words)}")
        keep = [i for i, k in enumerate(keys) if k in wanted]
        names = [names[i] for i in keep]
        prompts = [prompts[i] for i in keep]
        rows = None if rows is None else [rows[i] for i in keep]
    record_opts = _record_options(record)
    g = float(guidance_scale)
    variants = list(zip(names, prompts, rows or [None] * len(names)))
    size = max_batch or (len(variants) + 1)
    chunks: list[list] = []
    items = [("__original__", prompt, [])] + variants
    for a in range(0, len(items), size):
        chunks.append(items[a: a + size])
    images, traces = {}, {}
    for chunk in chunks:
        cells = [Cell((k,), p, None, int(steps), g, int(seed)) for k, (_, p, _) in enumerate(chunk)]
        batch = Batch(cells, None, int(steps), g > 1)
        hooks = []
        try:
            if mode == "pad":
                hooks = _pad_hooks(pipe, prompt, [r or [] for _, _, r in chunk])
            imgs, trs = _run_batch(pipe, batch, negative_prompt, None, None, pipe_kwargs, record_opts)
            if mode == "pad" and not all(h.applied for h in hooks):
                raise RuntimeError("pad ablation: the prompt's embedding call was not seen")
        finally:
            for h in hooks:
                h.remove()
        for (name, _, _), img, tr in zip(chunk, imgs, trs):
            images[name], traces[name] = img, tr
    base = images.pop("__original__")
    base_trace = traces.pop("__original__")
    maps = {n: np.abs(images[n] - base).mean(axis=-1) for n in names}
    effects = {n: float(m.mean()) for n, m in maps.items()}
    return TokenEffects(prompt, mode, int(seed), g, names, base, images, maps, effects,
                        base_trace, traces if record_opts is not None else {})


def _pad_hooks(pipe, prompt: str, rows: list[list[int]]) -> list[_PadEmbeddings]:
    hooks = []
    try:
        for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tok, enc = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
            if tok is None or enc is None:
                continue
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids[0]
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            hooks.append(_PadEmbeddings(enc.get_input_embeddings(), ids, int(pad_id), rows))
    except Exception:
        for h in hooks:
            h.remove()
        raise
    if not hooks:
        raise TypeError(f"{type(pipe).__name__} has no text encoder to ablate words in")
    return hooks
