"""Word heatmaps from recorded cross-attention: pooling made explicit.

``word_heatmap(trace, "circle")`` (also ``trace.heatmap("circle")``) answers "where in the image
did the word *circle* attend?". The recorded maps (see ``sdlens.trace.AttentionMaps``) are
cross-attention probabilities, per step and per cross-attention site at the site's own resolution,
``(steps, batch, tokens, h, w)`` (heads averaged) or ``(steps, batch, heads, tokens, h, w)``.

Pooling ``"sdlens"`` (the default), in this order:

1. **tokens**: a word CLIP split into several sub-word tokens (``dream`` + ``beach</w>``) gets
   the *mean* of its tokens' maps (as DAAM does); a phrase query (``"red circle"``) the mean of
   all its tokens (the words are those of :mod:`sdlens.analysis.tokens`, and
   ``AttentionMaps.get(layer, token=word)`` pools the same way);
2. **heads**: mean over the chosen heads (``heads=None``: all; head-averaged recordings already
   hold this mean);
3. **steps**: mean over the chosen recorded steps (``steps=None``: all recorded), or each step on
   its own with ``per_step=True``;
4. **layers**: each chosen layer's map is upsampled *bilinearly* (``align_corners=False``) from
   its own resolution to the output size (default: the image size), then the layers are averaged
   with *equal weight per layer* (``layers=None``: every recorded layer; a 8x8 middle layer counts
   as much as a 64x64 one);
5. **normalisation** (``normalize=True``): min-max to ``[0, 1]`` (per step with ``per_step``).
   With ``normalize=False`` the values are mean attention probabilities (in ``[0, 1]``).

Pooling ``"daam"`` reproduces DAAM's aggregation (Tang et al., ACL 2023; the code of DAAM 0.2.0,
``DiffusionHeatMapHooker.compute_global_heat_map``) so results can be put next to the paper:
``layers=None`` takes the layers DAAM hooks, every recorded one but the UNet's middle block; each
(layer, head) map is *summed* over the chosen steps, upsampled *bicubically* to the latent grid
(DAAM: 64x64 for 512 px images; here the trace's latent size) and clamped at 0; the maps are
*averaged* over all (layer, head) pairs (a layer with more heads weighs more; with head-averaged
recordings every layer counts as one head, and the clamp acts on the head mean, a close
approximation: ``heads=True`` recordings reproduce DAAM's map); sub-word tokens are averaged; the
result is upsampled bicubically to the output size and min-max normalised (then clamped to
``[0, 1]``). With ``normalize=False`` at the latent size it is DAAM's ``WordHeatMap.heatmap``;
``benchmarks/bench_daam.py`` (section 3c) checks it against DAAM 0.2.0 itself.

Only the conditional (text) branch's attention is ever recorded, as DAAM keeps it too.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from sdlens.analysis.tokens import Word, available, find_word, word_texts
from sdlens.analysis.video import check_frame, is_video
from sdlens.trace.steps import select_steps

POOLINGS = ("sdlens", "daam")
# which recorded maps a heatmap pools (the Trace's fields): the image patches' attention to the
# text (the default), concept maps (``concepts=[...]`` at trace time), the text tokens'
# attention to the image patches (``record=(..., "image_to_text")``)
MAPS = ("attention", "concepts", "image_to_text", "reference_maps")
_HOW = {"attention": "record again with attention on to get heatmaps",
        "concepts": "trace with concepts=[...] (a joint-attention model) to get concept maps",
        "image_to_text": "trace with record=(..., 'image_to_text') (SD3 / SD3.5, Flux.1) to get "
                         "them",
        "reference_maps": "trace an editing model (Flux.1 Kontext, Flux.2 with image=[...]) "
                          "with record=(..., 'reference_maps') to get them"}
_REFERENCE = re.compile(r"^\s*image\s+(\d+)\s*$", re.IGNORECASE)  # "image 1": reference 0


# --------------------------------------------------------------------------- argument helpers
def _maps(trace: Any, kind: str = "attention"):
    if kind not in MAPS:
        raise ValueError(f"maps must be one of {MAPS}, got {kind!r}")
    maps = getattr(trace, kind, None)
    if maps is None:
        what = "attention maps (recorded with attention=False?)" if kind == "attention" \
            else f"{kind.replace('_', ' ')} maps"
        raise ValueError(f"this trace holds no {what}; {_HOW[kind]}")
    if not list(maps.layers):
        raise ValueError(f"this trace's {kind.replace('_', ' ')} maps hold no layers")
    return maps


def _n_steps(trace: Any, kind: str = "attention") -> int:
    ts = getattr(trace, "timesteps", None)
    if ts is not None:
        return len(ts)
    return max(_maps(trace, kind).steps) + 1


def resolve_steps(trace: Any, steps: Any, maps: str = "attention",
                  per_step: bool = False) -> list[int]:
    """Step indices (into ``trace.timesteps``) chosen by ``steps`` among the steps with maps of
    kind ``maps`` (:func:`sdlens.trace.steps.select_steps`: None = all recorded; concept maps
    whose method pools one step, the paper's SD3 recipe: that step, unless ``per_step``)."""
    m = _maps(trace, maps)
    recorded = [int(s) for s in m.steps]
    if steps is None and not per_step and getattr(m, "default_steps", None) == "last" \
            and recorded:
        return recorded[-1:]  # concept maps whose last step holds the time-averaged map
    return select_steps(steps, _n_steps(trace, maps), recorded=recorded)


def resolve_layers(trace: Any, layers: Any, maps: str = "attention") -> list[str]:
    """Layer names chosen by ``layers`` (anything ``AttentionMaps.select`` accepts)."""
    kind = maps
    maps = _maps(trace, kind)
    if layers is None:  # concept maps: the method's default blocks where it has some
        return list(getattr(maps, "default_layers", None) or maps.layers)
    names = list(maps.select(layers))
    if not names:
        raise ValueError(f"layers={layers!r} matches no recorded layer; recorded: "
                         f"{list(maps.layers)} (also 'down'/'mid'/'up' or a resolution)")
    return names


def output_size(trace: Any, size: Any = None) -> tuple[int, int]:
    """(H, W) of the output: ``size`` (int or (H, W)), else the image size of the trace."""
    if size is not None:
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            size = (int(size), int(size))
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size)):
            raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
        return int(size[0]), int(size[1])
    meta = getattr(trace, "meta", None) or {}
    if meta.get("height") and meta.get("width"):
        return int(meta["height"]), int(meta["width"])
    images = getattr(trace, "images", None)
    if images:
        w, h = images[0].size
        return h, w
    lat = trace.latents
    return int(lat.shape[-2]) * 8, int(lat.shape[-1]) * 8


def _latent_size(trace: Any) -> tuple[int, int]:
    lat = getattr(trace, "latents", None)
    if lat is not None:
        return int(lat.shape[-2]), int(lat.shape[-1])
    h, w = output_size(trace)
    return h // 8, w // 8


def _check_batch(trace: Any, batch: Any) -> int:
    n = len(trace.tokens)
    if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool):
        raise TypeError(f"batch must be an int, got {type(batch).__name__}")
    if not -n <= batch < n:
        raise ValueError(f"batch={batch} is out of range: the trace holds {n} image(s)")
    return int(batch) % n


def _token_index(maps: Any, positions: Sequence[int], what: str) -> list[int]:
    """Indices along the maps' tokens axis of ``positions`` (:meth:`AttentionMaps.token_index`),
    with ``what`` named when a position was not recorded."""
    try:
        return [i for p in positions for i in maps.token_index(int(p))]
    except IndexError as e:
        raise ValueError(f"{what}: {e}") from None


def _head_index(m: torch.Tensor, heads: Any, name: str, video: bool = False) -> Any:
    if heads is None:
        return None
    if m.ndim != 6 + video:
        raise ValueError(f"heads={heads!r} needs maps recorded with heads kept; layer {name} was "
                         f"recorded with heads averaged (record with heads=True)")
    n = m.shape[2]
    hs = [heads] if isinstance(heads, (int, np.integer)) else list(heads)
    for h in hs:
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not -n <= h < n:
            raise ValueError(f"head {h!r} is out of range: layer {name} has {n} heads (0..{n - 1})")
    return [int(h) % n for h in hs]


# --------------------------------------------------------------------------- core pooling
def _layer_maps(maps: Any, name: str, step_idx: list[int], batch: int, tok_idx: list[int],
                heads: Any) -> torch.Tensor:
    """(steps, heads', tokens', [frames,] h, w) float32 for one layer (heads' = 1 when
    averaged; frames: a video model's)."""
    m = maps[name]
    video = len(maps.resolution(name)) == 3
    hidx = _head_index(m, heads, name, video)
    m = m[:, batch]  # a view; select before copying: tokens, heads, then steps
    if m.ndim == 4 + video:  # (steps, tokens, [frames,] h, w)
        m = m.unsqueeze(1)
    elif hidx is not None:
        m = m[:, hidx]
    m = m[:, :, tok_idx]
    return m[step_idx].float()


def pooled_map(trace: Any, positions: Sequence[int], steps: Any = None, layers: Any = None,
               heads: Any = None, batch: int = 0, pooling: str = "sdlens", per_step: bool = False,
               size: Any = None, normalize: bool = True, what: str = "token",
               maps: str = "attention", frame: int | None = None) -> torch.Tensor:
    """Pool the maps of token ``positions`` (merged by their mean) as the module doc says;
    ``maps``: which recorded maps (one of :data:`MAPS`; concept maps: ``positions`` are indices
    along the concepts axis).

    Returns ``(H, W)`` float32, or ``(steps, H, W)`` with ``per_step=True``. A video trace:
    ``(frames, H, W)`` / ``(steps, frames, H, W)`` (latent frames; normalised over the whole
    clip, so frames compare), or that of one latent ``frame``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    frame = check_frame(trace, frame)
    video = is_video(trace)
    if video and pooling == "daam":
        raise ValueError("pooling='daam' is DAAM's image aggregation; video traces pool with "
                         "pooling='sdlens'")
    kind = maps
    maps = _maps(trace, kind)
    batch = _check_batch(trace, batch)
    steps_ = resolve_steps(trace, steps, kind, per_step=per_step)
    recorded = [int(s) for s in maps.steps]
    step_idx = [recorded.index(s) for s in steps_]
    names = resolve_layers(trace, layers, kind)
    tok_idx = _token_index(maps, positions, what)
    out_hw = output_size(trace, size)

    acc = None
    if pooling == "sdlens":
        for name in names:
            m = _layer_maps(maps, name, step_idx, batch, tok_idx, heads)  # (S, h', t, [F,] h, w)
            m = m.mean(dim=(1, 2))  # heads, then tokens
            if not per_step:
                m = m.mean(0, keepdim=True)
            # each frame upsampled on its own: (S, [F,] h, w) -> (S, [F,] H, W)
            up = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]), size=out_hw, mode="bilinear",
                               align_corners=False).reshape(*m.shape[:-2], *out_hw)
            acc = up if acc is None else acc + up
        acc = acc / len(names)
    else:  # daam
        grid = _latent_size(trace)
        if layers is None:  # DAAM hooks the down and up blocks only
            names = [n for n in names if maps.naming.group(n) != "mid"] or names
        entries = 0
        for name in names:
            m = _layer_maps(maps, name, step_idx, batch, tok_idx, heads)  # (S, h', t, h, w)
            if not per_step:  # DAAM sums each (layer, head) map over steps, then upsamples
                m = m.sum(0, keepdim=True)
            s, nh = m.shape[:2]
            up = F.interpolate(rearrange(m, "s nh t h w -> (s nh t) 1 h w"), size=grid,
                               mode="bicubic", align_corners=False).clamp_(min=0)
            up = rearrange(up, "(s nh t) 1 gh gw -> s nh t gh gw", s=s, nh=nh).sum(1)  # (S, t, gh, gw)
            acc = up if acc is None else acc + up
            entries += nh
        acc = acc.mean(1) / entries  # merge the word's tokens; the mean over (layer, head) maps
        acc = F.interpolate(acc[:, None], size=out_hw, mode="bicubic", align_corners=False)[:, 0]
    if normalize:
        acc = _minmax(acc, what, dims=(-3, -2, -1) if video else (-2, -1))
        if pooling == "daam":
            acc = acc.clamp_(0, 1)
    if frame is not None:
        acc = acc[:, frame]
    return acc if per_step else acc[0]


def _minmax(x: torch.Tensor, what: str, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    span = hi - lo
    if bool((span <= 1e-12).any()):
        warnings.warn(f"the map of {what} is constant (no spatial variation) at "
                      f"{int((span <= 1e-12).sum())} step(s); it normalises to all zeros",
                      RuntimeWarning, stacklevel=4)
    return torch.where(span > 1e-12, (x - lo) / span.clamp(min=1e-12), torch.zeros_like(x))


# --------------------------------------------------------------------------- public API
def word_heatmap(trace: Any, word: str, steps: Any = None, layers: Any = None, heads: Any = None,
                 batch: int = 0, occurrence: int = 0, pooling: str = "sdlens",
                 per_step: bool = False, size: Any = None, normalize: bool = True,
                 maps: str = "attention", frame: int | None = None) -> torch.Tensor:
    """Image-resolution heatmap of ``word`` in prompt ``batch`` of ``trace``.

    Args:
        word: a word of the prompt as typed (case-insensitive); a word CLIP split into sub-word
            tokens is merged (mean of its tokens); several words (``"red circle"``) are merged
            the same way. Unknown words raise ``ValueError`` listing the words available.
        steps: None (all recorded steps), an int, a slice/range or list of step indices.
        layers: None (all recorded layers) or anything ``AttentionMaps.select`` takes:
            ``'down'|'mid'|'up'``, a resolution (``16``), a module path or alias, or a list.
        heads: None (all; mean) or head indices (needs maps recorded with heads kept).
        batch: which image of the batch.
        occurrence: which occurrence of a word that appears more than once (0 = first).
        pooling: ``"sdlens"`` (default) or ``"daam"``; see the module docstring for both.
        per_step: return ``(steps, H, W)``, one map per chosen step, instead of ``(H, W)``.
        size: output (H, W) or int; default the image size.
        normalize: min-max normalise to ``[0, 1]`` (per step when ``per_step``).
        maps: which recorded maps to pool: ``"attention"`` (default: each image patch's
            attention to the word), ``"concepts"`` (the concept map of ``word``, a concept given
            at trace time, in the prompt or not: each patch's softmax over the concepts, so with
            ``normalize=False`` the concepts' heatmaps sum to 1 at every pixel; ValueError
            listing the recorded concepts for another), or ``"image_to_text"`` (the word's
            tokens' attention to each image patch). Steps, layers, pooling and normalisation
            work the same for all three. An editing model's reference maps
            (``record=(..., "reference_maps")``): ``word="image 1"`` (reference 0; ``"image
            2"``, ...) is each output patch's attention share on that reference image (the sum
            over its patches, :meth:`sdlens.trace.maps.ReferenceMaps.share`), whenever the trace
            holds reference maps.
        frame: a video trace's latent frame (None: every frame).

    Returns:
        ``torch.Tensor`` float32 ``(H, W)`` or ``(steps, H, W)``; a video trace ``(frames, H,
        W)`` or ``(steps, frames, H, W)`` (latent frames, min-max normalised over the whole
        clip: a frame the word leaves alone stays dark), or one ``frame``'s ``(H, W)`` /
        ``(steps, H, W)``.
    """
    ref = _REFERENCE.match(str(word)) if maps in ("attention", "reference_maps") else None
    if ref is not None and (maps == "reference_maps" or trace.reference_maps is not None):
        # an editing model's reference image i+1: each output patch's share on its patches
        refs = _maps(trace, "reference_maps")
        i = int(ref.group(1)) - 1
        if not 0 <= i < len(refs.grids):
            raise ValueError(f"no reference image {word!r}: the trace recorded "
                             f"{len(refs.grids)} (\"image 1\" .. \"image {len(refs.grids)}\")")
        start = sum(r * c for r, c in refs.grids[:i])
        n = refs.grids[i][0] * refs.grids[i][1]
        m = pooled_map(trace, list(range(start, start + n)), steps, layers, heads, batch,
                       pooling, per_step, size, normalize, what=f"reference {word!r}",
                       maps="reference_maps")
        return m if normalize else m * n  # the mean over its patches -> their sum (the share)
    if maps == "concepts":
        index = _maps(trace, maps).concept_index(word)
        return pooled_map(trace, [index], steps, layers, heads, batch, pooling, per_step, size,
                          normalize, what=f"concept {word!r}", maps=maps, frame=frame)
    w = find_word(trace, word, batch=_check_batch(trace, batch), occurrence=occurrence)
    return pooled_map(trace, w.positions, steps, layers, heads, batch, pooling, per_step, size,
                      normalize, what=repr(w.text), maps=maps, frame=frame)


def word_activity(trace: Any, word: str, steps: Any = None, layers: Any = None,
                  batch: int = 0, occurrence: int = 0, per_step: bool = False) -> torch.Tensor:
    """A video trace's word activity over time: the word's map mass per latent frame, the mean
    attention probability of a patch of that frame on the word's tokens (tokens merged by their
    mean, heads averaged; then the mean over the chosen steps and layers, equal weight each).

    Returns ``(frames,)`` float32, or ``(steps, frames)`` with ``per_step=True``. ValueError for
    an image trace."""
    if not is_video(trace):
        raise ValueError("word_activity is for video traces (a map mass per frame); this trace "
                         "has no frame axis")
    maps = _maps(trace, "attention")
    batch = _check_batch(trace, batch)
    w = find_word(trace, word, batch=batch, occurrence=occurrence)
    recorded = [int(s) for s in maps.steps]
    step_idx = [recorded.index(s) for s in resolve_steps(trace, steps, "attention")]
    names = resolve_layers(trace, layers, "attention")
    tok_idx = _token_index(maps, w.positions, repr(w.text))
    acc = sum(_layer_maps(maps, n, step_idx, batch, tok_idx, None).mean(dim=(1, 2, -2, -1))
              for n in names) / len(names)  # (S, F)
    return acc if per_step else acc.mean(0)


def token_heatmap(trace: Any, positions: int | Sequence[int], **kwargs: Any) -> torch.Tensor:
    """Like :func:`word_heatmap` for token positions (in the 77-token sequence; 0 is the start
    token). Several positions are merged by their mean."""
    if isinstance(positions, (int, np.integer)):
        positions = [int(positions)]
    positions = [int(p) for p in positions]
    if not positions:
        raise ValueError("positions is empty")
    return pooled_map(trace, positions, what=f"position(s) {positions}", **kwargs)


def word_heatmaps(trace: Any, words: Iterable[str] | None = None, batch: int = 0,
                  punctuation: bool = False, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Heatmaps of several words: ``{word: map}``. ``words=None``: every word of the prompt (each
    distinct word once, first occurrence; punctuation left out unless ``punctuation=True``)."""
    if words is None:
        words = word_texts(trace, batch, punctuation)
    elif isinstance(words, str):
        words = [words]
    return {w: word_heatmap(trace, w, batch=batch, **kwargs) for w in words}


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def binarize(heatmap: Any, threshold: float = 0.4) -> np.ndarray:
    """DAAM's protocol: min-max normalise to [0, 1], keep pixels ``> threshold``."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    h = _np(heatmap).astype(np.float64)
    lo, hi = h.min(), h.max()
    h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    return h > threshold


def iou(heatmap: Any, mask: Any, threshold: float = 0.4) -> float:
    """Intersection over union of a heatmap thresholded as DAAM does (normalised to [0, 1],
    ``> threshold``; the paper uses 0.4) with a boolean ``mask`` of the same (H, W)."""
    m = _np(mask).astype(bool)
    h = _np(heatmap)
    if h.shape != m.shape:
        raise ValueError(f"heatmap {h.shape} and mask {m.shape} differ in shape; compute the "
                         f"heatmap with size={m.shape}")
    b = binarize(h, threshold)
    union = np.logical_or(b, m).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(b, m).sum() / union)


@dataclass
class Commitment:
    """When did a word decide where it goes?

    ``correlation[i]``: Pearson correlation between the word's map at step ``steps[i]`` and its
    map at the last recorded step. ``step``: the first step from which the correlation stays
    ``>= threshold`` until the end (the last step always qualifies: its correlation with itself
    is 1, so a word that only settles at the end commits at the last step).
    """

    word: str
    steps: list[int]
    correlation: np.ndarray
    threshold: float
    step: int | None

    #: Draws commitments: ``hook([commitment, ...], ax=None) -> Figure``. Analysis imports no views:
    #: the front door ``sdlens`` sets it to :func:`sdlens.views.plot.commitment_curves`.
    plot_hook: ClassVar[Callable[..., Any] | None] = None

    def plot(self, ax: Any = None):
        """This word's correlation curve and commitment step (a matplotlib Figure)."""
        return type(self).plot_hook([self], ax=ax)  # off the class: the plain function


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten().double()
    b = b.flatten().double()
    a = a - a.mean()
    b = b - b.mean()
    den = float(a.norm() * b.norm())
    if den == 0:
        return 1.0 if float(a.norm()) == float(b.norm()) == 0 else 0.0
    return float((a @ b) / den)


def commitment(trace: Any, word: str, threshold: float = 0.9, **kwargs: Any) -> Commitment:
    """Per-step correlation of ``word``'s map with its final map, and the commitment step.

    Keyword arguments (``layers``, ``heads``, ``batch``, ``occurrence``, ``pooling``, ``steps``,
    ``size``) go to :func:`word_heatmap` with ``per_step=True``; maps are compared before
    normalisation (Pearson correlation ignores scale and offset).
    """
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold must be a correlation in [-1, 1], got {threshold}")
    for k in ("per_step", "normalize"):
        if k in kwargs:
            raise TypeError(f"commitment() sets {k} itself")
    maps = word_heatmap(trace, word, per_step=True, normalize=False, **kwargs)
    steps = resolve_steps(trace, kwargs.get("steps"), kwargs.get("maps", "attention"),
                          per_step=True)
    final = maps[-1]
    corr = np.array([_pearson(m, final) for m in maps])
    step = None
    above = corr >= threshold
    for i in range(len(corr)):
        if above[i:].all():
            step = steps[i]
            break
    return Commitment(word, steps, corr, threshold, step)


def commitments(trace: Any, words: Iterable[str] | None = None, threshold: float = 0.9,
                batch: int = 0, **kwargs: Any) -> list[Commitment]:
    """:func:`commitment` for several words (default: every non-punctuation word, once)."""
    if words is None:
        words = word_texts(trace, batch)
    return [commitment(trace, w, threshold, batch=batch, **kwargs) for w in words]


__all__ = ["word_heatmap", "word_heatmaps", "token_heatmap", "pooled_map", "iou", "binarize",
           "commitment", "commitments", "Commitment", "resolve_steps", "resolve_layers",
           "output_size", "POOLINGS", "MAPS", "Word", "available"]
