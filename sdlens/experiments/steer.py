"""Intervening on tokens: reweight a word's cross-attention, or take a word away.

>>> trace = sdlens.reweight(pipe, "a red circle", {"red": 2.0}, seed=0, steps=25)
>>> trace = sdlens.generate(pipe, "a red circle", reweight={"red": 2.0}, reweight_steps=(0, 10))
>>> fx = sdlens.token_effects(pipe, "a red circle and a blue square", seed=0)
>>> fx.effects                        # {'a': 0.01, 'red': 0.12, ...}: mean |pixel change|
>>> fx.maps["red"]                    # (H, W) where removing "red" changed the image
>>> fx.plot()

Reweighting is prompt-to-prompt's equalizer (:class:`sdlens.engine.sites.Reweight`, the
engine's editor that ``sdlens.generate(reweight=...)`` installs): the attention probabilities of
the chosen tokens in every cross-attention layer are multiplied by the weight, in the text half of
the batch, at the chosen steps; rows are **not renormalised**. A weight of 1.0 is an exact no-op.
On joint attention (SD3 / SD3.5, Flux.1: :class:`sdlens.engine.sites.Reweight` at the kernel) the image
queries' probabilities on the chosen text tokens are scaled the same way (the image keys' columns
and the text stream untouched; Flux: RoPE-rotated, in the double- and single-stream blocks), the
word found in CLIP's and T5's segments alike.
The traces record the model's attention probabilities *before* the equalizer (the steered
attention is those maps times the weights at the steered steps); ``trace.meta["reweight"]`` says
what was steered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from sdlens.analysis.tokens import Word, available, tokenize, tokenize_segments, word_matches
from sdlens.engine.arch import adapter_for
from sdlens.engine.batch import Batch, Cell, batch_record_options, run_batch
from sdlens.engine.session import generate
from sdlens.engine.sites import Hooks
from sdlens.engine.text import call_defaults


# ---------------------------------------------------------------------------------------------
# reweighting

def reweight(pipe, prompt: str | Sequence[str], weights: Mapping[Any, float],
             reweight_steps=None, baseline: bool = False, **generate_kwargs):
    """Generate ``prompt`` with the chosen words' cross-attention scaled; returns the Trace
    (``trace.meta["reweight"]`` holds the weights, step range and token positions).
    ``baseline=True`` also runs the unsteered image with the same settings and returns
    ``(steered, original)``.

    Args:
        weights: ``{"red": 2.0, "circle": 0.5}`` (see :func:`sdlens.engine.sites.reweighting`).
        reweight_steps: ``(start, end)`` denoising-step range (indices, end exclusive; or
            fractions of the run as floats); None = every step.
        **generate_kwargs: for ``sdlens.generate``: ``seed``, ``steps`` (the number of steps),
            ``guidance_scale``, ``negative_prompt``, record options, ...
    """
    trace = generate(pipe, prompt, reweight=weights, reweight_steps=reweight_steps,
                     **generate_kwargs)
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
    """Forward hook for a text encoder's token-embedding module: in the call that embeds the
    prompt batch (every row equal to the prompt's ids), row ``r``'s positions ``rows[r]`` get the
    padding token's embedding."""

    def __init__(self, prompt_ids: torch.Tensor, pad_id: int, rows: list[list[int]]):
        self.prompt_ids, self.pad_id, self.rows = prompt_ids, pad_id, rows
        self.applied = 0

    def __call__(self, module, args, output):
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


def _without(prompt: str, word: Word, words: Sequence[Word]) -> str:
    """``prompt`` with ``word`` taken out: its characters cut, with the space before it when it
    was glued to what follows (``"a red, circle"`` -> ``"a, circle"``); where the tokenizer's text
    normalisation hid them (no ``span``), the other words' texts joined, which CLIP tokenizes
    alike."""
    if word.span is not None:
        left, right = prompt[: word.span[0]], prompt[word.span[1]:]
        return (left.rstrip() + (" " if right[:1].isspace() else "") + right.lstrip()).strip()
    gone = set(word.positions)
    return " ".join(w.text for w in words if gone.isdisjoint(w.positions))


def _variants(prompt: str, chosen: Sequence[Word], words: Sequence[Word], mode: str):
    """Names (a repeat as ``"a#2"``), prompts and padded positions of each ablation."""
    names = [w.name for w in chosen]
    if mode == "remove":
        return names, [_without(prompt, w, words) for w in chosen], None
    return names, [prompt] * len(chosen), [list(w.positions) for w in chosen]


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
        words: the words to ablate (default: every word of the prompt but punctuation: the words
            of :func:`sdlens.analysis.tokens.tokenize`, as the heatmaps see them; a repeated word
            is ablated once per occurrence, named ``"a"``, ``"a#2"``, ...).
        steps, guidance_scale, negative_prompt, **pipe_kwargs: as for the pipeline;
            ``guidance_scale`` is the CFG scale, given as the pipeline's guidance argument
            (the backbone adapter's ``cfg_arg``: Qwen-Image's ``true_cfg_scale``, which guides
            only with a ``negative_prompt``).
        record: traces to keep, as for :func:`sdlens.sweep` ("light", "full", None).

    Returns a :class:`TokenEffects`: per word the (H, W) map of mean |RGB change| and its mean
    as the effect size.
    """
    if mode not in ("remove", "pad"):
        raise ValueError(f"mode must be 'remove' or 'pad', got {mode!r}")
    cfg_arg = adapter_for(pipe).cfg_arg
    if cfg_arg in pipe_kwargs:
        raise TypeError(f"token_effects sets {cfg_arg!r} itself: pass guidance_scale=")
    params = {**call_defaults(pipe), **pipe_kwargs}
    text, all_words = _prompt_words(pipe, prompt, params)
    if mode == "pad" and adapter_for(pipe).text_tokens(text, params) is not None:
        raise ValueError("mode='pad' cannot place the words in a text the pipeline lays out "
                         "around the prompt (Sana's complex_human_instruction: pass "
                         "complex_human_instruction=None; Qwen-Image's and Z-Image's chat "
                         "templates), use mode='remove'")
    if words is None:
        chosen = [w for w in all_words if not w.is_punctuation]
    else:
        found = {w: word_matches(all_words, w) for w in words}
        missing = [w for w, m in found.items() if not m]
        if missing:
            raise ValueError(f"{', '.join(map(repr, missing))} not in the prompt {prompt!r}; its "
                             f"words: {available(all_words)}")
        chosen = list({(w.positions, w.text): w for m in found.values() for w in m}.values())
        chosen.sort(key=lambda w: w.positions)
    if not chosen:
        raise ValueError("the prompt has no words to ablate")
    names, prompts, rows = _variants(text, chosen, all_words, mode)
    record_opts = batch_record_options(record)
    g = float(guidance_scale)
    variants = list(zip(names, prompts, rows or [None] * len(names)))
    size = max_batch or (len(variants) + 1)
    chunks: list[list] = []
    items = [("__original__", prompt, [])] + variants
    for a in range(0, len(items), size):
        chunks.append(items[a: a + size])
    images, traces = {}, {}
    adapter = adapter_for(pipe)
    guides = adapter.cfg_weight(g) is not None and not (adapter.cfg_needs_negative
                                                        and negative_prompt is None)
    for chunk in chunks:
        cells = [Cell((k,), p, None, int(steps), g, int(seed), cfg=guides)
                 for k, (_, p, _) in enumerate(chunk)]
        batch = Batch(cells, None, int(steps), guides)
        with Hooks() as hooks:
            pads = _pad_hooks(hooks, pipe, text, [r or [] for _, _, r in chunk], params) \
                if mode == "pad" else []
            imgs, trs = run_batch(pipe, batch, negative_prompt, None, None, pipe_kwargs, record_opts)
            if not all(p.applied for p in pads):
                raise RuntimeError("pad ablation: the prompt's embedding call was not seen")
        for (name, _, _), img, tr in zip(chunk, imgs, trs):
            images[name], traces[name] = img, tr
    base = images.pop("__original__")
    base_trace = traces.pop("__original__")
    maps = {n: np.abs(images[n] - base).mean(axis=-1) for n in names}
    effects = {n: float(m.mean()) for n, m in maps.items()}
    return TokenEffects(prompt, mode, int(seed), g, names, base, images, maps, effects,
                        base_trace, traces if record_opts is not None else {})


def _prompt_words(pipe, prompt: str, params: dict):
    """``(text, words)``: the prompt as the pipeline tokenizes it (a DiT's lower-casing), its
    words on the maps' text axis (several encoders, SD3: pooled over CLIP's and T5's
    segments)."""
    adapter = adapter_for(pipe)
    parts = adapter.text_parts(params)
    if parts:
        return prompt, tokenize_segments(prompt, parts).words
    text = adapter.encoded_prompt(prompt, params)
    return text, tokenize(text, pipe, limit=adapter.text_length(params)).words


def _pad_hooks(hooks: Hooks, pipe, text: str, rows: list[list[int]],
               params: dict) -> list[_PadEmbeddings]:
    """Install a :class:`_PadEmbeddings` on the token embeddings of every text encoder whose
    hidden states lie on the text axis (the backbone adapter's ``text_encoders``). ``rows`` are
    positions on the text axis; each encoder pads the positions of its own segment (SD3: CLIP's
    77, then T5's), counted from the segment's start."""
    adapter = adapter_for(pipe)
    pads = []
    convert = getattr(pipe, "maybe_convert_prompt", None)  # as the pipeline encodes it
    for enc in adapter.text_encoders(params):
        tok, first, length = enc.tokenizer, enc.start, enc.length
        t = convert(text, tok) if callable(convert) else text
        ids = tok(t, padding="max_length", max_length=length, truncation=True,
                  return_tensors="pt").input_ids[0]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        own = [[p - first for p in r if first <= p < first + length] for r in rows]
        pad = _PadEmbeddings(ids, int(pad_id), own)
        for module in adapter.token_embeddings(enc.encoder):
            hooks.forward_hook(module, pad)
        pads.append(pad)
    if not pads:
        raise TypeError(f"{type(pipe).__name__} has no text encoder to ablate words in")
    return pads
