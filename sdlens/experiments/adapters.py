"""LoRA, textual inversion and the SDXL refiner: traced and compared.

Tracing works unchanged on pipelines with diffusers' loaders applied (``pipe.load_lora_weights``,
``set_adapters``, ``fuse_lora``, ``pipe.load_textual_inversion``): sdlens' recording processors
wrap whatever processor is installed, and the attention probabilities are computed through the
layer's own ``to_q`` / ``to_k`` (peft's LoRA layers included, at their current scale), so traced
images stay identical to untraced ones. This module adds what is specific to adapters:

LoRA
    >>> pipe.load_lora_weights("my_lora.safetensors", adapter_name="red")   # needs `peft`
    >>> eff = sdlens.lora_effect(pipe, "a circle", "red", scales=[0, 0.5, 1.0], seed=0)
    >>> eff.traces[2].heatmap("circle"); eff.comparisons[1.0].word_change; eff.figure

    All scales run as ONE batched pipeline call (batch item i runs adapter ``"red"`` at
    ``scales[i]``; see :func:`lora_effect` for how and how faithful, and ``batched=False`` for
    one call per scale).

Textual inversion
    >>> pipe.load_textual_inversion("learned_embeds.safetensors", token="<my-token>")
    >>> tr = sdlens.generate(pipe, "a <my-token> circle")
    >>> tr.heatmap("<my-token>")                  # the token is a word named as loaded
    >>> print(textual_inversion_view(tr))          # token table + nearest vocabulary neighbours

SDXL base + refiner
    >>> tr = trace_base_refiner(base, refiner, "a red circle", steps=25, handover=0.8, seed=0)
    >>> tr.meta["handover_step"]                   # first step run by the refiner
    >>> part(tr, "refiner").tokens                 # the refiner's steps with its own tokens

    or trace the two calls yourself and join them with :func:`combine_base_refiner`.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from sdlens.analysis.compare import Comparison, compare
from sdlens.analysis.heatmaps import word_heatmap
from sdlens.analysis.tokens import nearest_tokens, token_view, trace_words, word_matches
from sdlens.engine.batch import cell_trace
from sdlens.engine.options import RecordOptions
from sdlens.engine.session import generate, trace as _trace
from sdlens.engine.sites import Hooks
from sdlens.trace.core import Trace
from sdlens.trace.maps import AttentionMaps
from sdlens.trace.ops import concat_steps, replace, slice_steps

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


# ============================================================================ LoRA
def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is an optional extra
        return None
    return LoraLayer


def lora_adapters(pipe) -> dict[str, list[str]]:
    """The LoRA adapters loaded in ``pipe``: ``{adapter_name: [components]}`` (components among
    "unet", "text_encoder", "text_encoder_2"), in load order. {} without peft or adapters."""
    cls = _lora_layer_class()
    out: dict[str, list[str]] = {}
    if cls is None:
        return out
    for comp in _COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for m in model.modules():
            if isinstance(m, cls):
                for name in m.lora_A:
                    comps = out.setdefault(name, [])
                    if comp not in comps:
                        comps.append(comp)
    return out


def _layers(pipe, adapter: str) -> list:
    """peft LoRA layers of every component that hold ``adapter``; clear errors otherwise."""
    if not isinstance(adapter, str):
        raise TypeError(f"adapter must be the name of a loaded LoRA adapter (a str), got "
                        f"{type(adapter).__name__}; load one with "
                        "pipe.load_lora_weights(path, adapter_name=...)")
    cls = _lora_layer_class()
    if cls is None:
        raise ImportError("LoRA adapters need `peft`: pip install 'sdlens[lora]' (or pip install "
                          "peft)")
    loaded = lora_adapters(pipe)
    if not loaded:
        raise ValueError(f"unknown LoRA adapter {adapter!r}: this pipeline has no LoRA adapters "
                         "loaded (load one with pipe.load_lora_weights(path, adapter_name=...))")
    if adapter not in loaded:
        raise ValueError(f"unknown LoRA adapter {adapter!r}; loaded adapters: "
                         f"{', '.join(repr(a) for a in loaded)}")
    layers = []
    for comp in _COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        layers += [m for m in model.modules() if isinstance(m, cls) and adapter in m.lora_A]
    if any(getattr(m, "disable_adapters", False) for m in layers):
        raise ValueError(f"the LoRA layers of {adapter!r} are disabled (pipe.disable_lora()); "
                         "call pipe.enable_lora() first")
    if any(adapter in getattr(m, "merged_adapters", ()) for m in layers):
        raise ValueError(f"LoRA adapter {adapter!r} is fused into the weights (pipe.fuse_lora()); "
                         "its scale cannot be varied: call pipe.unfuse_lora() first")
    return layers


class _AdapterScale:
    """Saves and restores what varying one adapter's scale touches in its peft layers: the
    active adapters, the adapter's scaling, its parameters' ``requires_grad``."""

    def __init__(self, layers: list, adapter: str):
        self.layers, self.adapter = layers, adapter
        self.saved = []
        for m in layers:
            params = [p for d in (m.lora_A, m.lora_B) for p in d[adapter].parameters()]
            self.saved.append((list(m.active_adapters), m.scaling[adapter],
                               [(p, p.requires_grad) for p in params]))

    def activate(self) -> None:
        for m in self.layers:
            if self.adapter not in m.active_adapters:
                m.set_adapter(list(m.active_adapters) + [self.adapter])

    def set_scale(self, scale: float) -> None:
        for m in self.layers:
            m.set_scale(self.adapter, float(scale))

    def restore(self) -> None:
        for m, (active, scaling, grads) in zip(self.layers, self.saved):
            if list(m.active_adapters) != active:
                m.set_adapter(active)
            m.scaling[self.adapter] = scaling
            for p, g in grads:
                p.requires_grad_(g)


def _per_row_scales(hooks: Hooks, layers: list, adapter: str, scales: Sequence[float]) -> None:
    """For the life of ``hooks``: batch item ``i % len(scales)`` of every LoRA layer of
    ``adapter`` runs at ``scales[i]``.

    peft computes ``base(x) + lora_B(lora_A(x)) * scaling``. Here ``scaling`` is set to 1 and a
    forward hook on ``lora_B`` multiplies its output, row by row, by the scaling peft itself
    computes for each scale (``set_scale``): the same products as one call per scale. Rows are
    batch items; the UNet's batch under classifier-free guidance is ``[uncond x k, text x k]``
    and the text encoders see ``k`` prompts, so row ``r`` belongs to scale ``r % k``.
    NotImplementedError (before anything changes) for adapters that cannot be batched (DoRA).
    """
    k = len(scales)
    for m in layers:
        if adapter in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(adapter):
            raise NotImplementedError("DoRA / LoRA variants cannot be batched over scales")

    def make_hook(row):
        cache: dict = {}

        def hook(module, args, out):
            n = out.shape[0]
            if n % k:
                raise RuntimeError(f"sdlens.lora_effect: a LoRA layer saw batch {n}, not a "
                                   f"multiple of the {k} scales; run with batched=False")
            key = (n, out.dtype, out.device)
            c = cache.get(key)
            if c is None:
                c = torch.tensor(row, dtype=out.dtype, device=out.device).repeat(n // k)
                cache[key] = c
            return out * c.view(n, *([1] * (out.ndim - 1)))
        return hook

    def restore(m, scaling):
        m.scaling[adapter] = scaling

    for m in layers:
        hooks.undo(functools.partial(restore, m, m.scaling[adapter]))
        row = []
        for s in scales:
            m.set_scale(adapter, float(s))
            row.append(float(m.scaling[adapter]))
        m.scaling[adapter] = 1.0
        hooks.forward_hook(m.lora_B[adapter], make_hook(row))


@dataclass
class LoraEffect:
    """Result of :func:`lora_effect`.

    ``traces[i]``: the run at ``scales[i]`` (each a single-image Trace; ``meta["lora"]`` says
    adapter, scale and whether it ran batched); ``comparisons[s]``: :func:`sdlens.compare` of the
    reference run (scale 0 when asked for, else ``scales[0]``) with the run at scale ``s`` (x0
    distance per step, per-word map change); ``figure``: images per scale, x0 distance from the
    reference per step, and each word's map change per scale.
    """

    adapter: str
    scales: list[float]
    traces: list[Trace]
    reference: float
    comparisons: dict[float, Comparison]
    figure: Any
    batched: bool

    def __iter__(self):  # traces, figure = sdlens.lora_effect(...)
        return iter((self.traces, self.figure))

    def trace(self, scale: float) -> Trace:
        """The trace of the run at ``scale``."""
        for s, t in zip(self.scales, self.traces):
            if s == scale:
                return t
        raise KeyError(f"scale {scale} was not run; scales: {self.scales}")

    def word_change(self) -> dict[str, dict[float, float]]:
        """``{word: {scale: mean map change from the reference over the recorded steps}}``."""
        out: dict[str, dict[float, float]] = {}
        for s, c in self.comparisons.items():
            for w, v in c.word_change.items():
                out.setdefault(w, {})[s] = float(np.mean(v)) if len(v) else 0.0
        return out

    def summary(self) -> str:
        lines = [f"LoRA {self.adapter!r} at scales {self.scales} "
                 f"({'one batched call' if self.batched else 'one call per scale'}); "
                 f"reference: scale {self.reference}"]
        for s, c in self.comparisons.items():
            words = ", ".join(f"{w!r} {float(np.mean(v)):.3f}" for w, v in c.word_change.items())
            lines.append(f"  scale {s}: final x0 distance {c.x0_rms[-1]:.4f} (relative "
                         f"{c.x0_relative[-1]:.3f}); word map change: {words or '-'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def lora_effect(pipe, prompt: str, adapter: str, scales: Sequence[float] = (0, 0.5, 1.0),
                seed: int = 0, steps: int = 25, guidance_scale: float | None = None,
                negative_prompt: str | None = None, batched: bool = True,
                words: Sequence[str] | None = None, figure: bool = True,
                options: RecordOptions | None = None, **kwargs) -> LoraEffect:
    """Run ``prompt`` with LoRA ``adapter`` at each of ``scales`` (same seed) and compare.

    Only ``adapter``'s scale varies: other adapters stay as they are (active at their weights, or
    inactive); ``adapter`` is activated for the runs if it was not. Afterwards the pipeline's
    adapters are exactly as before.

    Args:
        pipe: an SD pipeline with ``adapter`` loaded (``pipe.load_lora_weights(..., adapter_name=)``).
        prompt: one prompt (str).
        adapter: the adapter's name; unknown names raise ValueError listing the loaded ones.
        scales: LoRA scales (0 = without the adapter, 1 = as trained).
        seed, steps, guidance_scale, negative_prompt: as :func:`sdlens.generate`.
        batched: run all scales as one pipeline call of ``len(scales)`` images (per-row LoRA
            scales, see below); False: one call per scale. Image i of the batched call is bit
            for bit what diffusers gives for a batch of the same size at ``scales[i]``
            (``set_adapters``), which differs from a call of one image only by the device's
            batch-size rounding (on CPU ~5e-5 on the latents of a plain SD run, more where a
            strong LoRA amplifies it). ``batched=False`` reproduces single calls exactly
            (scale 0 == the pipeline without the LoRA, bit for bit). Adapters that cannot be
            batched (DoRA) run one call per scale with a warning.
        words: words whose maps to compare (default: every word of the prompt).
        figure: build ``LoraEffect.figure`` (matplotlib).
        options, **kwargs: RecordOptions and pipeline arguments, as :func:`sdlens.generate`.

    How the batch works: peft adds ``lora_B(lora_A(x)) * scaling`` to each adapted layer; for the
    call, the adapter's ``scaling`` is set to 1 and a forward hook on ``lora_B`` multiplies each
    batch row by the scaling peft computes for that row's scale (``set_scale``).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"lora_effect takes one prompt (a str), got {type(prompt).__name__}")
    try:
        scales = [float(s) for s in scales]
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a list of numbers, got {scales!r}") from None
    if not scales:
        raise ValueError("scales is empty")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if "num_images_per_prompt" in kwargs:
        raise ValueError("lora_effect runs one image per scale; num_images_per_prompt is not "
                         "supported")
    layers = _layers(pipe, adapter)
    state = _AdapterScale(layers, adapter)
    traces: list[Trace] = []
    ran_batched = False
    try:
        state.activate()
        if batched and len(scales) > 1:
            try:
                with Hooks() as hooks:
                    _per_row_scales(hooks, layers, adapter, scales)
                    full = generate(pipe, [prompt] * len(scales), seed=[seed] * len(scales),
                                    steps=steps, guidance_scale=guidance_scale,
                                    negative_prompt=negative_prompt, options=options, **kwargs)
                ran_batched = True
            except NotImplementedError as e:
                warnings.warn(f"sdlens.lora_effect: {e}; running one call per scale",
                              stacklevel=2)
        if ran_batched:
            traces = [cell_trace(full, i, seed=seed, extra_meta={"lora": {
                "adapter": adapter, "scale": s, "batched": True}})
                for i, s in enumerate(scales)]
        else:
            for s in scales:
                state.set_scale(s)
                tr = generate(pipe, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
                              negative_prompt=negative_prompt, options=options, **kwargs)
                tr._info["meta"]["lora"] = {"adapter": adapter, "scale": s, "batched": False}
                traces.append(tr)
    finally:
        state.restore()
    ref = 0.0 if 0.0 in scales else scales[0]
    ref_trace = traces[scales.index(ref)]
    comparisons = {s: compare(ref_trace, t, words=words) for s, t in zip(scales, traces)}
    eff = LoraEffect(adapter, scales, traces, ref, comparisons, None, ran_batched)
    if figure:
        eff.figure = lora_effect_figure(eff)
    return eff


def lora_effect_figure(effect: LoraEffect):
    """Images per scale (top), x0 distance from the reference run per step, and each word's
    map change (mean over steps) against the scale."""
    from matplotlib.figure import Figure

    n = len(effect.scales)
    fig = Figure(figsize=(max(6.0, 2.0 * n), 5.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.2])
    axes = np.atleast_1d(top.subplots(1, n))
    for ax, s, t in zip(axes, effect.scales, effect.traces):
        imgs = t.images
        if imgs:
            ax.imshow(np.asarray(imgs[0].convert("RGB")))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"scale {s:g}", fontsize=9)
    a, b = bottom.subplots(1, 2)
    for s, c in effect.comparisons.items():
        if s == effect.reference:
            continue
        a.plot(c.steps, c.x0_relative, "o-", ms=3, label=f"scale {s:g}")
    a.set(xlabel="step", ylabel=f"x0 distance from scale {effect.reference:g} (relative)")
    a.set_title("how far the LoRA moves the run", fontsize=10)
    if len(effect.scales) > 1:
        a.legend(fontsize=8)
    change = effect.word_change()
    for w, per in change.items():
        xs = sorted(per)
        b.plot(xs, [per[x] for x in xs], "o-", ms=3, label=repr(w))
    b.set(xlabel="LoRA scale", ylabel="mean |map - reference map|", ylim=(0, None))
    b.set_title("how far each word's map moves", fontsize=10)
    if change:
        b.legend(fontsize=8)
    fig.suptitle(f"LoRA {effect.adapter!r}: {effect.traces[0].prompts[0]!r}", fontsize=10)
    return fig


# ============================================================================ textual inversion
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


# ============================================================================ SDXL refiner
_RUN_FIELDS = ("prompts", "negative_prompts", "token_ids", "tokens", "truncated_words",
               "guidance_scale", "do_cfg")  # Trace.build fields of each run
_PART_FIELDS = _RUN_FIELDS + ("num_steps", "attention")  # what info["parts"] keeps per run


def combine_base_refiner(base_trace: Trace, refiner_trace: Trace) -> Trace:
    """One trace of an SDXL base run (``denoising_end``) followed by a refiner run
    (``denoising_start``, ``image=`` the base's latents), as recorded by two ``sdlens.trace``
    blocks::

        with sdlens.trace(base) as tb:
            lat = base(prompt, num_inference_steps=25, denoising_end=0.8, output_type="latent",
                       generator=g).images
        with sdlens.trace(refiner) as tr:
            image = refiner(prompt, num_inference_steps=25, denoising_start=0.8, image=lat,
                            generator=g).images[0]
        whole = combine_base_refiner(tb, tr)

    The result runs over all steps (:func:`~sdlens.trace.ops.concat_steps`): ``timesteps``,
    ``sigmas``, ``latents`` (x_T of the base ... the refiner's x_0), ``noise*`` and ``x0`` are
    the two runs joined; ``meta["handover_step"]`` is the first step the refiner ran,
    ``meta["parts"]`` describes both runs. ``attention``, ``tokens`` and ``token_ids`` are the
    base's (steps 0 .. handover-1); :func:`part` gives each run as a Trace of its own, the
    refiner with its own tokens (tokenizer_2) and maps. ``images`` are the refiner's. Saves and
    loads as one file.
    """
    base_trace, refiner_trace = base_trace.runs[-1], refiner_trace.runs[-1]
    bi, ri = base_trace._require(), refiner_trace._require()
    if base_trace.batch_size != refiner_trace.batch_size:
        raise ValueError(f"the base run has {base_trace.batch_size} image(s), the refiner run "
                         f"{refiner_trace.batch_size}")
    whole = concat_steps(base_trace, refiner_trace)
    lb, lr = base_trace.latents, refiner_trace.latents
    gap = float((lb[-1] - lr[0]).abs().max()) if lb is not None and lr is not None else None
    h, n = base_trace.num_steps, whole.num_steps
    ra = refiner_trace.attention
    extra = {f"parts/refiner/attention/{layer}": ra.source(layer) for layer in ra.layers} \
        if ra is not None else {}
    bm, rm = base_trace.meta, refiner_trace.meta
    parts = [{"name": name, "start": start, "stop": stop, "meta": meta,
              **{k: info[k] for k in _PART_FIELDS}}
             for name, info, meta, start, stop in (("base", bi, bm, 0, h),
                                                   ("refiner", ri, rm, h, n))]
    meta = dict(bm)
    meta.update(handover_step=h, steps=n, unet_calls=bm.get("unet_calls", h) +
                rm.get("unet_calls", n - h), handover=rm.get("denoising_start"),
                refiner_pipeline_class=rm.get("pipeline_class"),
                refiner_family=rm.get("family"), handover_latent_gap=gap,
                parts=[{"name": p["name"], "start": p["start"], "stop": p["stop"],
                        "pipeline_class": p["meta"].get("pipeline_class")} for p in parts])
    return replace(whole, meta=meta, extra_tensors=extra,
                   extra_info={"parts": json.loads(json.dumps(parts, default=str))})


def part(trace: Trace, name: str) -> Trace:
    """One run of a combined base + refiner trace (``"base"`` or ``"refiner"``) as a Trace of its
    own: its steps (indexed from 0, :func:`~sdlens.trace.ops.slice_steps`), its prompts' tokens,
    its attention maps and meta."""
    parts = trace._require().get("parts")
    if not parts:
        raise ValueError("this trace is not a combined base + refiner trace (no parts); see "
                         "sdlens.trace_base_refiner")
    names = [p["name"] for p in parts]
    if name not in names:
        raise ValueError(f"unknown part {name!r}; parts: {names}")
    p = parts[names.index(name)]
    start, stop = int(p["start"]), int(p["stop"])
    steps = slice_steps(trace, start, stop)
    maps = steps.attention
    att = p.get("attention")
    if att is not None and name != parts[0]["name"]:  # the first part's maps are the trace's
        prefix = f"parts/{name}/attention/"
        maps = AttentionMaps({l: (lambda key: lambda: trace._tensor(key))(prefix + l)
                              for l in att["layers"]}, att["resolutions"], att["steps"],
                             att["token_positions"], att["heads"], dtype=att.get("dtype"))
    elif att is None:
        maps = None
    return replace(steps, **{k: p[k] for k in _RUN_FIELDS},
                   noise_uncond=steps.noise_uncond if p["do_cfg"] else None, attention=maps,
                   meta=dict(p["meta"], step_offset=start), extra_tensors={}, extra_info={})


def trace_base_refiner(base, refiner, prompt: str | list[str], seed: int = 0, steps: int = 25,
                       handover: float = 0.8, guidance_scale: float | None = None,
                       negative_prompt: str | list[str] | None = None,
                       options: RecordOptions | None = None, base_kwargs: dict | None = None,
                       refiner_kwargs: dict | None = None, **kwargs) -> Trace:
    """Run SDXL ``base`` for the first ``handover`` of the schedule and ``refiner`` for the rest
    (diffusers' ensemble of experts: ``denoising_end=handover`` / ``denoising_start=handover``,
    the base's latents handed over) and return ONE trace of the whole run (see
    :func:`combine_base_refiner`): ``meta["handover_step"]`` marks the refiner's first step.

    Both calls share one CPU generator seeded with ``seed`` (the base draws x_T from it, the
    refiner continues it), as ``g = torch.Generator().manual_seed(seed)`` passed to both calls
    would. ``kwargs`` go to both calls, ``base_kwargs`` / ``refiner_kwargs`` to one;
    ``options`` (and RecordOptions keyword arguments) apply to both recordings.
    """
    if not 0 < handover < 1:
        raise ValueError(f"handover must be in (0, 1) (the fraction of the schedule the base "
                         f"runs), got {handover!r}")
    if getattr(refiner, "tokenizer_2", None) is None or getattr(refiner, "text_encoder_2",
                                                                None) is None:
        raise TypeError("refiner must be an SDXL refiner (StableDiffusionXLImg2ImgPipeline with "
                        "text_encoder_2 / tokenizer_2)")
    opt_names = {f for f in RecordOptions.__dataclass_fields__}
    opt_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in opt_names}
    opts = RecordOptions.from_kwargs(options, **opt_kwargs)
    if "generator" in kwargs:
        raise ValueError("trace_base_refiner takes seed=, not generator=")
    g = torch.Generator("cpu").manual_seed(int(seed))
    common = dict(prompt=prompt, num_inference_steps=steps, generator=g, **kwargs)
    if guidance_scale is not None:
        common["guidance_scale"] = guidance_scale
    if negative_prompt is not None:
        common["negative_prompt"] = negative_prompt
    with _trace(base, opts) as tb:
        latents = base(**common, denoising_end=handover, output_type="latent",
                       **(base_kwargs or {})).images
    with _trace(refiner, opts) as tr:
        refiner(**common, image=latents, denoising_start=handover, **(refiner_kwargs or {}))
    whole = combine_base_refiner(tb, tr)
    whole._info["meta"].update(handover=float(handover), seeds=[int(seed)])
    return whole
