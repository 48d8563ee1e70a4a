"""Operations on traces: each returns a new :class:`~sdlens.trace.core.Trace` made by
:meth:`Trace.build` (shapes checked), leaving its input unchanged.

* :func:`replace`: a copy with some fields changed (``dataclasses.replace`` for traces)
* :func:`select_batch`: some batch items, as if they had been run alone (a sweep cell)
* :func:`slice_steps`: a range of steps (one run of a base + refiner trace)
* :func:`concat_steps`: two runs joined along the steps (base then refiner)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from sdlens.trace.compact import take
from sdlens.trace.core import Trace

_PER_ITEM = ("prompts", "negative_prompts", "token_ids", "tokens", "truncated_words")
_PER_STEP = ("timesteps", "sigmas", "noise_uncond", "noise_text", "noise", "x0")


def replace(trace: Trace, **changes) -> Trace:
    """``trace`` with the :meth:`Trace.build` fields in ``changes`` replaced."""
    fields = trace.fields()
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise TypeError(f"replace: unknown trace fields {unknown}; fields: {sorted(fields)}")
    fields.update(changes)
    return Trace.build(**fields)


_MAPS = ("attention", "concepts", "image_to_text")  # maps by site, (steps, batch, ...)


def _reference_maps(f: dict, take: Callable[[torch.Tensor], torch.Tensor],
                    steps: list[int] | None = None) -> None:
    """An editing model's reference maps travel as the extra tensors ``reference_maps/<layer>``
    (``extra_info["reference_maps"]``: :attr:`Trace.reference_maps`): each taken with
    ``take`` (steps, batch, ...); ``steps``: their recorded steps afterwards."""
    info = f["extra_info"].get("reference_maps")
    if info is None:
        return
    for layer in info["layers"]:
        key = f"reference_maps/{layer}"
        src = f["extra_tensors"][key]
        f["extra_tensors"][key] = take(src() if callable(src) else src)
    if steps is not None:
        f["extra_info"]["reference_maps"] = {**info, "steps": list(steps)}


def select_batch(trace: Trace, items: int | Sequence[int]) -> Trace:
    """Batch items ``items`` (an index or a list of them) of ``trace``, in that order: every
    per-item field and tensor taken on the batch axis, and the attention maps' tokens axis cut
    to the longest of the items' own token sequences (unless padding was kept), so a single item
    is what its run alone records. ``meta`` (seeds, scale) is the batch's: change it with
    :func:`replace`."""
    idx = [items] if isinstance(items, int) else [int(i) for i in items]
    n = trace.batch_size
    for i in idx:
        if not 0 <= i < n:
            raise IndexError(f"batch item {i} of a trace of {n}")
    f = trace.fields()
    for name in _PER_ITEM:
        f[name] = [f[name][i] for i in idx]
    if f["extra_info"].get("text_segments"):  # several text encoders (SD3): per item too
        f["extra_info"]["text_segments"] = [f["extra_info"]["text_segments"][i] for i in idx]
    for name in _PER_STEP[2:] + ("latents",):
        t = f[name]
        f[name] = None if t is None else t[:, idx]  # advanced indexing: a compact copy
    for kind in _MAPS:
        maps = f[kind]
        if maps is None:
            continue
        if kind == "concepts":  # every concept, whatever the item's prompt
            f[kind] = maps.like({l: take(maps.stored(l), lambda t: t[:, idx])
                                 for l in maps.layers})
            continue
        keep_padding = bool(f["meta"].get("options", {}).get("keep_padding", False))
        n_tok = len(maps.token_positions)
        own = n_tok if keep_padding else max(
            len(ids) if ids else n_tok for ids in f["token_ids"])
        own = min(own, n_tok)
        tok_axis = 3 if maps.heads else 2
        f[kind] = maps.like({l: take(maps.stored(l), lambda t: t.narrow(tok_axis, 0, own)[:, idx])
                             for l in maps.layers}, token_positions=maps.token_positions[:own])
    _reference_maps(f, lambda t: t[:, idx])
    images = trace.images
    f["images"] = [images[i] for i in idx] if images else []
    return Trace.build(**f)


def slice_steps(trace: Trace, start: int, stop: int) -> Trace:
    """Steps ``start .. stop-1`` of ``trace`` as a trace of their own (steps indexed from 0;
    ``latents`` runs from ``latents[start]`` to ``latents[stop]``; the attention maps of the
    recorded steps in the range, read when first used; ``meta["step_offset"]`` grows by
    ``start``). The images are kept only when the slice runs to the last step."""
    n = trace.num_steps
    start, stop, _ = slice(start, stop).indices(n)
    f = trace.fields()
    for name in _PER_STEP:
        t = f[name]
        f[name] = None if t is None else t[start:stop]
    if f["latents"] is not None:
        f["latents"] = f["latents"][start: stop + 1]
    for kind in _MAPS:
        maps = f[kind]
        if maps is None:
            continue
        keep = [k for k, s in enumerate(maps.steps) if start <= s < stop]  # steps ascend
        a, b = (keep[0], keep[-1] + 1) if keep else (0, 0)
        if (a, b) == (0, len(maps.steps)):
            sources = {l: maps.source(l) for l in maps.layers}
        else:
            sources = {l: (lambda l=l, maps=maps, a=a, b=b: take(maps.stored(l), lambda t: t[a:b]))
                       for l in maps.layers}
        f[kind] = maps.like(sources, steps=[maps.steps[k] - start for k in keep])
    refs = f["extra_info"].get("reference_maps")
    if refs is not None:
        keep = [k for k, s in enumerate(refs["steps"]) if start <= s < stop]
        a, b = (keep[0], keep[-1] + 1) if keep else (0, 0)
        _reference_maps(f, lambda t: t[a:b], [refs["steps"][k] - start for k in keep])
    f["meta"]["step_offset"] = int(f["meta"].get("step_offset", 0)) + start
    if stop < n:
        f["images"] = []
    return Trace.build(**f)


def concat_steps(first: Trace, second: Trace) -> Trace:
    """``second`` run after ``first`` as one trace: ``timesteps``, ``sigmas``, ``noise*`` and
    ``x0`` joined along the steps, ``latents`` from x_T of ``first`` to x_0 of ``second`` (its
    x_T is taken to be ``first``'s last latents); guidance counts as on (``noise_uncond``
    kept) only when both ran with it. Prompts, tokens, attention maps and meta are
    ``first``'s, the images and pipeline ``second``'s (change them with :func:`replace`)."""
    a, b = first.fields(), second.fields()
    if len(a["prompts"]) != len(b["prompts"]):
        raise ValueError(f"the first run has {len(a['prompts'])} image(s), the second "
                         f"{len(b['prompts'])}")
    la, lb = a["latents"], b["latents"]
    if la is not None and lb is not None and la.shape[1:] != lb.shape[1:]:
        raise ValueError(f"latent shapes differ: first {tuple(la.shape[1:])}, second "
                         f"{tuple(lb.shape[1:])}")
    for name in _PER_STEP:
        x, y = a[name], b[name]
        a[name] = None if x is None or y is None else torch.cat([x, y])
    a["latents"] = None if la is None or lb is None else torch.cat([la, lb[1:]])
    a["do_cfg"] = bool(a["do_cfg"] and b["do_cfg"])
    if not a["do_cfg"]:
        a["noise_uncond"] = None
    a["images"], a["pipeline"] = b["images"], b["pipeline"]
    return Trace.build(**a)
