"""A self-contained HTML report of a trace: one file, images inlined, no kernel, no network.

>>> sdlens.views.report.write_report(trace, "report.html")

A video trace (Wan): settings, each word's heatmap over the clip (an animated GIF per word),
the words' activity over the latent frames, the tokens and the scheduler.

Sections of an image trace: settings; the final image with every word's heatmap; where recorded, the concept maps
(``concepts=[...]`` at trace time: one panel per concept, then per block) and the image->text
maps; a step scrubber (slider + play button; per step the x_t and x0 previews and the chosen
word's or concept's map, all pre-rendered as PNG and switched by a few lines of JavaScript);
the step strip; the prompt's tokens with each token's share of attention and what the 75-token
limit cut; commitment curves; guidance curves and the x0 of one step at other guidance scales;
the scheduler's curves. A section that cannot be built
from this trace (e.g. no attention recorded) says why instead.

The scrubber also reads the page's address: ``report.html#step=5&word=circle`` opens at step 5
showing the map of "circle". Steps are numbered 1..N everywhere in the report, as diffusers'
progress bar counts them; every sentence that states a number reads it from the table beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from sdlens.analysis.guidance import guidance_text, prediction_label, scheduler_view
from sdlens.analysis.heatmaps import commitments, word_heatmap
from sdlens.analysis.previews import previews, resolve_decoder
from sdlens.analysis.tokens import (WORDS_UNKNOWN, encoder_name, encoders_sentence, find_word,
                                    nearest_tokens, token_view, word_texts)
from sdlens.analysis.video import is_video
from sdlens.views import plot
from sdlens.views.overlay import GREY_NOTE, blend

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1100px;color:#222;line-height:1.4;padding:0 12px}
h1{font-size:1.5em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.8em}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4} .pix{image-rendering:pixelated} .fig{max-width:100%}
.note{background:#fff6e0;border-left:4px solid #f0b400;padding:6px 10px;margin:8px 0}
.warn{background:#fde8e8;border-left:4px solid #d33;padding:6px 10px;margin:8px 0}
.scrub{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
.scrub figure{margin:0;text-align:center} .scrub figcaption{font-size:.85em;color:#555}
.controls{margin:10px 0;display:flex;gap:12px;align-items:center;flex-wrap:wrap}
#step-slider{width:420px} code{background:#f4f4f4;padding:0 3px}
"""

_JS = """
(function(){
  const F = JSON.parse(document.getElementById('frames').textContent);
  const slider = document.getElementById('step-slider');
  const label = document.getElementById('step-label');
  const wordSel = document.getElementById('word-select');
  const xt = document.getElementById('scrub-xt'), x0 = document.getElementById('scrub-x0');
  const mp = document.getElementById('scrub-map'), mpcap = document.getElementById('map-caption');
  function show(){
    const i = parseInt(slider.value);
    label.textContent = 'step ' + (i + 1) + '/' + F.t.length + '   (t = ' + F.t[i] + ')';
    if (xt && F.xt.length) xt.src = F.xt[i];
    if (x0 && F.x0.length) x0.src = F.x0[i];
    if (mp && wordSel) {
      const w = wordSel.value, m = F.maps[w];
      if (m) { mp.src = m[i]; const s = F.mapstep[w][i];
        mpcap.textContent = (w.startsWith('concept:') ? 'concept ' + JSON.stringify(w.slice(8))
          : JSON.stringify(w)) + ' at step ' + (s + 1) + (s === i ? '' : ' (nearest recorded step)'); }
    }
  }
  slider.addEventListener('input', show);
  if (wordSel) wordSel.addEventListener('change', show);
  let timer = null;
  const play = document.getElementById('play');
  play.addEventListener('click', function(){
    if (timer) { clearInterval(timer); timer = null; play.textContent = 'play'; return; }
    play.textContent = 'pause';
    timer = setInterval(function(){
      slider.value = (parseInt(slider.value) + 1) % F.t.length; show(); }, 350);
  });
  const q = new URLSearchParams(location.hash.replace(/^#/, ''));
  if (q.has('word') && wordSel && F.maps[q.get('word')]) wordSel.value = q.get('word');
  if (q.has('step')) { slider.value = parseInt(q.get('step')) - 1; slider.dispatchEvent(new Event('input')); }
  else show();
})();
"""


def _png_uri(data: bytes | Image.Image) -> str:
    if isinstance(data, Image.Image):
        buf = io.BytesIO()
        data.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fig_uri(fig: Any, dpi: int = 90) -> str:
    return _png_uri(plot.to_png(fig, dpi=dpi))


def _img_tag(uri: str, alt: str, width: int | None = None, cls: str = "fig", **attrs: str) -> str:
    w = f' width="{width}"' if width else ""
    extra = "".join(f' {k.replace("_", "-")}="{html.escape(v)}"' for k, v in attrs.items())
    return f'<img class="{cls}" src="{uri}" alt="{html.escape(alt)}"{w}{extra}>'


def overlay_image(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55,
                  cmap: str = "jet", grey: bool = True) -> Image.Image:
    """RGB ``image`` (H, W, 3) uint8, in grey unless not ``grey``, blended with ``heat`` (H, W)
    in [0, 1] through ``cmap`` (:func:`sdlens.views.overlay.blend`)."""
    return Image.fromarray(blend(image, heat, alpha, cmap, grey))


class _Doc:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def section(self, title: str, build: Callable[[], str]) -> None:
        self.add(f"<h2>{html.escape(title)}</h2>")
        try:
            self.add(build())
        except (ValueError, TypeError, FileNotFoundError) as e:
            self.add(f'<div class="note">Not available for this trace: {html.escape(str(e))}</div>')


def _settings(trace: Any, batch: int) -> str:
    meta = trace.meta or {}
    seeds = meta.get("seeds") or []
    rows = [
        ("prompt", trace.prompts[batch]),
        ("negative prompt", (trace.negative_prompts or [None] * (batch + 1))[batch]),
        ("model", meta.get("model_id") or meta.get("model")),
        ("family / task", f"{meta.get('family')} / {meta.get('task')}"),
        ("pipeline", meta.get("pipeline_class")),
        ("scheduler", f"{meta.get('scheduler_class')} (the model predicts "
                      f"{prediction_label(trace)})"),
        ("steps", len(trace.timesteps)),
        ("guidance", guidance_text(trace, explain=True)),
        ("seed", seeds[batch] if len(seeds) > batch else (seeds[0] if seeds else None)),
        ("size", f"{meta.get('width')} x {meta.get('height')} px, latents "
                 f"{tuple(trace.latents.shape[-3:]) if trace.latents is not None else '?'}"),
        ("versions", ", ".join(f"{k.replace('_version', '')} {v}" for k, v in meta.items()
                               if k.endswith("_version"))),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in rows if v is not None)
    return f"<table>{body}</table>"


def _final(trace: Any, batch: int, words: list[str], kw: dict, grey: bool) -> str:
    out = []
    images = trace.images
    if images and len(images) > batch:
        out.append(_img_tag(_png_uri(images[batch]), "final image", 256, "pix"))
    if words and trace.attention is not None:
        fig = plot.heatmap_grid(trace, words, batch=batch, grey=grey, **kw)
        out.append("<br>" + _img_tag(_fig_uri(fig), "word heatmaps"))
        out.append("<p>Pooling: " + html.escape(kw.get("pooling", "sdlens")) + " (see "
                   "<code>sdlens.analysis.heatmaps</code>: sub-word tokens averaged, bilinear "
                   "upsampling, equal weight per layer, mean over steps, min-max normalised).</p>")
    elif trace.attention is None:
        out.append('<div class="note">No attention maps were recorded: no heatmaps.</div>')
    return "\n".join(out)


def _scrubber(trace: Any, batch: int, words: list[str], decoder: str, vae: Any,
              kw: dict, display: int, grey: bool) -> str:
    n = len(trace.timesteps)
    frames: dict[str, Any] = {"t": [round(float(t), 2) for t in trace.timesteps], "xt": [],
                              "x0": [], "maps": {}, "mapstep": {}}
    notes = []
    try:
        frames["xt"] = [_png_uri(im) for im in
                        previews(trace, "latents", list(range(n)), batch, decoder, vae)]
        if trace.x0 is not None:
            frames["x0"] = [_png_uri(im) for im in
                            previews(trace, "x0", list(range(n)), batch, decoder, vae)]
    except (ValueError, TypeError) as e:
        notes.append(f"No latent previews: {e}")
    images = trace.images
    base = np.asarray(images[batch].convert("RGB")) if images and len(images) > batch else None
    size = base.shape[:2] if base is not None else None
    # the words' attention maps, then the concepts' maps (keys "concept:circle")
    words_kind = kw.get("maps", "attention")  # the maps the word heatmaps pool
    choices = [(w, w, words_kind, kw) for w in words] \
        if getattr(trace, words_kind, None) is not None else []
    if getattr(trace, "concepts", None) is not None:
        choices += [(f"concept:{c}", c, "concepts", {"pooling": kw.get("pooling", "sdlens")})
                    for c in trace.concepts.concepts]
    for key, name, kind, kind_kw in choices:
        recorded = [int(s) for s in getattr(trace, kind).steps]
        nearest = [max([s for s in recorded if s <= i] or [recorded[0]]) for i in range(n)]
        frames["mapstep"][key] = nearest
        maps = word_heatmap(trace, name, batch=batch, per_step=True, size=size, maps=kind,
                            **{k: v for k, v in kind_kw.items() if k not in ("steps", "maps")})
        pngs = {}
        for s, heat in zip(recorded, maps.numpy()):
            img = overlay_image(base, heat, grey=grey) if base is not None else Image.fromarray(
                (heat * 255).astype(np.uint8))
            pngs[s] = _png_uri(img)
        frames["maps"][key] = [pngs[nearest[i]] for i in range(n)]
    parts = ['<div class="controls"><button id="play">play</button>'
             f'<input type="range" id="step-slider" min="0" max="{n - 1}" value="{n - 1}" step="1">'
             '<span id="step-label"></span>']
    if frames["maps"]:
        opts = "".join(f'<option value="{html.escape(w)}">'
                       f'{html.escape(w.replace("concept:", "concept: ", 1))}</option>'
                       for w in frames["maps"])
        what = "word / concept" if getattr(trace, "concepts", None) is not None else "word"
        parts.append(f'<label>{what} <select id="word-select">{opts}</select></label>')
    parts.append("</div><div class=\"scrub\">")
    if frames["xt"]:
        parts.append(f'<figure><img id="scrub-xt" class="pix" width="{display}" alt="x_t">'
                     f'<figcaption>x_t (latents before the step, {_DECODERS.get(decoder, decoder)})'
                     '</figcaption></figure>')
    if frames["x0"]:
        parts.append(f'<figure><img id="scrub-x0" class="pix" width="{display}" alt="x0">'
                     f'<figcaption>x0 (predicted clean image, {_DECODERS.get(decoder, decoder)})'
                     '</figcaption></figure>')
    if frames["maps"]:
        parts.append(f'<figure><img id="scrub-map" class="pix" width="{display}" alt="word map">'
                     '<figcaption id="map-caption"></figcaption></figure>')
    parts.append("</div>")
    for note in notes:
        parts.append(f'<div class="note">{html.escape(note)}</div>')
    data = json.dumps(frames).replace("</", "<\\/")
    parts.append(f'<script type="application/json" id="frames">{data}</script>')
    parts.append(f"<script>{_JS}</script>")
    parts.append("<p>Drag the slider or press play; each step's maps are normalised on their own"
                 + (f" ({GREY_NOTE})" if grey and frames["maps"] and base is not None else "")
                 + ". Open <code>report.html#step=3&amp;word=circle</code> to start at a step.</p>")
    return "\n".join(parts)


_DECODERS = {"linear": "linear preview", "vae": "VAE decode", "tiny": "tiny VAE decode",
             "channels": "first 3 latent channels"}


def _word_name(view: Any, row: Any) -> str:
    """The word a token belongs to, named as everywhere (``Word.name``: "a", "a#2")."""
    if 0 <= row.word_index < len(view.words):
        return view.words[row.word_index].name
    return row.word


def _share_sentence(view: Any) -> str:
    """Which token takes the largest share, read from the same numbers as the table."""
    rows = [r for r in view.rows if r.attention is not None]
    if not rows:
        return ""
    total = sum(r.attention for r in rows)
    top = max(rows, key=lambda r: r.attention)
    share = top.attention / total if total > 0 else 0.0
    who = f"<code>{html.escape(top.token)}</code> (position {top.position})"
    if share > 0.5:
        return f"; {who} takes most of it: {top.attention:.4f} of {total:.4f} in this table"
    return (f"; the largest share is {who}'s {top.attention:.4f}, {share:.0%} of the {total:.4f} "
            "in this table: no token dominates")


def _tokens(trace: Any, batch: int) -> str:
    view = token_view(trace, batch)
    out = []
    if not view.words:
        out.append(f'<div class="warn">Words unknown: {html.escape(WORDS_UNKNOWN)}. The table '
                   'lists token positions.</div>')
    encoders = view.encoders()  # several text encoders (SD3): which saw which word
    if view.truncated:
        out.append(f'<div class="warn">The prompt is longer than the text encoder\'s {view.limit} '
                   f'tokens: the pipeline cut <b>{html.escape(" ".join(view.truncated_words))}</b>; '
                   'those words had no effect and have no maps.</div>')
    if encoders:
        counts = ", ".join(f"{e['name']} {e['tokens']} of {e['length']} positions"
                           for e in encoders)
        out.append(f"<p>Prompt tokens: {html.escape(counts)}. {html.escape(encoders_sentence(encoders))}"
                   ". A word's map pools its tokens of every encoder that saw it. Padding without "
                   "maps is left out of the table.</p>")
    count = "" if encoders else f"{view.n_prompt_tokens} of {view.limit} prompt tokens. "
    out.append(f"<p>{count}The share of attention "
               "is the attention probability a token received, averaged over recorded steps, "
               f"layers, heads and pixels{_share_sentence(view)}.</p>")
    padding = {id(r) for r in view.padding_rows() if r.attention is None}
    enc_head = "<th>encoder</th>" if encoders else ""
    head = (f"<tr>{enc_head}<th>position</th><th>token</th><th>id</th><th>word</th>"
            "<th>attention share</th></tr>")
    rows = "".join(
        "<tr>" + (f"<td>{html.escape(encoder_name(r.encoder))}</td>" if encoders else "")
        + f"<td>{r.position}</td><td><code>{html.escape(r.token)}</code></td>"
        f"<td>{'' if r.id is None else r.id}</td><td>{html.escape(_word_name(view, r))}</td>"
        f"<td>{'' if r.attention is None else f'{r.attention:.4f}'}</td></tr>"
        for r in view.rows if id(r) not in padding)
    out.append(f"<table>{head}{rows}</table>")
    if trace.attention is not None:
        out.append("<br>" + _img_tag(_fig_uri(plot.token_view(trace, batch)), "token view"))
    pipe = getattr(trace, "pipeline", None)
    if pipe is not None and getattr(pipe, "text_encoder", None) is not None \
            and getattr(pipe, "tokenizer", None) is not None:
        rows = []
        texts = list(dict.fromkeys(w.text for w in view.words if not w.is_punctuation))
        for text in texts[:12]:
            near = nearest_tokens(pipe, text, k=6)
            rows.append(f"<tr><td>{html.escape(text)}</td><td>"
                        + ", ".join(f"{html.escape(t)} ({c:.2f})" for t, _, c in near)
                        + "</td></tr>")
        out.append("<h3>Nearest tokens in the text encoder's embedding table</h3><p>Cosine "
                   "similarity of input embeddings: the tokens a word is close to before any "
                   "context (why \"man\" also pulls \"guy\").</p>"
                   f"<table><tr><th>word</th><th>nearest tokens (cosine)</th></tr>{''.join(rows)}"
                   "</table>")
    return "\n".join(out)


def _concepts(trace: Any, batch: int, kw: dict, grey: bool) -> str:
    """The concept maps (``trace.concepts``): pooled over the blocks, then per block."""
    cm = trace.concepts
    kw = {k: v for k, v in kw.items() if k in ("steps",)}  # layers / pooling: the word maps'
    shares = {c: float(word_heatmap(trace, c, batch=batch, maps="concepts", normalize=False,
                                    size=cm.resolution(cm.layers[0]), **kw).mean())
              for c in cm.concepts}
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{s:.3f}</td></tr>" for c, s in shares.items())
    top = max(shares, key=shares.get)
    out = [f"<p>Concepts given at trace time: {html.escape(', '.join(map(repr, cm.concepts)))} "
           f"({len(cm.layers)} block{'s' * (len(cm.layers) != 1)}, {len(cm.steps)} recorded "
           "step(s)). Each concept went through the text stream of every block beside the run, "
           "reading the image tokens but never writing to them (the image is unchanged); a "
           "pixel's value is its softmax over the concepts of the concepts' attention outputs · "
           "the image tokens' (ConceptAttention, Helbling et al. 2025), so the panels sum to 1 "
           "at every pixel. Pick a concept in the step scrubber below to see it per step.</p>",
           _img_tag(_fig_uri(plot.concept_maps(trace, batch=batch, grey=grey, **kw)), "concept maps"),
           f"<p>Mean share over the image (all blocks and recorded steps): {html.escape(top)} "
           f"takes the largest, {shares[top]:.3f}.</p>",
           f"<table><tr><th>concept</th><th>mean share</th></tr>{rows}</table>"]
    if len(cm.layers) > 1:
        out.append("<details><summary>per block</summary>" + _img_tag(_fig_uri(
            plot.concept_maps(trace, batch=batch, per_block=True, grey=grey, **kw)),
            "concept maps per block")
            + "</details>")
    return "\n".join(out)


def _image_to_text(trace: Any, batch: int, words: list[str], kw: dict, grey: bool) -> str:
    """The image->text maps (``trace.image_to_text``): each word's attention to the image."""
    kw = {k: v for k, v in kw.items() if k in ("steps", "pooling")}
    maps = trace.image_to_text
    out = ["<p>Each word's text tokens attending to the image patches (their image share of "
           "the joint softmax), the other direction of the word heatmaps above; each panel is "
           f"min-max normalised ({len(maps.layers)} block(s), {len(maps.steps)} recorded "
           "step(s)).</p>",
           _img_tag(_fig_uri(plot.image_to_text_maps(trace, words, batch=batch, grey=grey, **kw)),
                    "image to text maps")]
    return "\n".join(out)


def _commitment(trace: Any, batch: int, words: list[str], kw: dict) -> str:
    if trace.attention is None:
        raise ValueError("no attention maps were recorded")
    if len(trace.attention.steps) < 2:
        raise ValueError("attention was recorded at fewer than 2 steps")
    kw = {k: v for k, v in kw.items() if k not in ("steps",)}
    comms = commitments(trace, words, batch=batch, **kw)
    rows = "".join(f"<tr><td>{html.escape(c.word)}</td>"
                   f"<td>{'never' if c.step is None else c.step + 1}</td></tr>" for c in comms)
    fig = plot.commitment_curves(comms)
    return ("<p>Correlation of each word's step-t map with its final map; the commitment step is "
            f"the first step from which it stays above {comms[0].threshold}.</p>"
            + _img_tag(_fig_uri(fig), "commitment curves")
            + f"<table><tr><th>word</th><th>commitment step</th></tr>{rows}</table>")


def _guidance_section(trace: Any, batch: int) -> str:
    out = [_img_tag(_fig_uri(plot.guidance_curves(trace, batch)), "guidance curves")]
    n = len(trace.timesteps)
    step = n // 3
    try:
        fig = plot.guidance_strip(trace, step, batch=batch)
        out.append("<p>x0 of step " + str(step + 1) + " recomputed from the recorded predictions at other"
                   " guidance scales (no new model call; later steps would differ too).</p>")
        out.append(_img_tag(_fig_uri(fig), "x0 at other guidance scales"))
    except ValueError as e:
        out.append(f'<div class="note">{html.escape(str(e))}</div>')
    return "\n".join(out)


def _scheduler_section(trace: Any) -> str:
    v = scheduler_view(trace)
    head = "<tr><th>step</th><th>t</th><th>sigma</th><th>alpha_bar</th><th>dt</th></tr>"
    rows = "".join(f"<tr><td>{i + 1}</td><td>{t:.1f}</td><td>{s:.4f}</td><td>{a:.5f}</td>"
                   f"<td>{d:.1f}</td></tr>"
                   for i, (t, s, a, d) in enumerate(zip(v.timesteps, v.sigmas, v.alpha_bar,
                                                        v.dt)))
    return (_img_tag(_fig_uri(plot.scheduler_curves(trace)), "scheduler curves")
            + f"<details><summary>table</summary><table>{head}{rows}</table></details>")


def _clips(trace: Any, batch: int, words: list[str], vae: Any, heatmap_kwargs: dict,
           grey: bool) -> str:
    """A video trace: each word's heatmap over the clip, an animated GIF per word (the final
    x0, decoded by the VAE where one is at hand, else the latents' channel preview)."""
    out = []
    for w in words:
        buf = io.BytesIO()
        plot.save_gif(plot.heatmap_clip(trace, w, batch=batch, vae=vae, grey=grey,
                                        **heatmap_kwargs), buf)
        uri = "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        out.append(f'<figure style="display:inline-block;margin:4px">{_img_tag(uri, w, 192)}'
                   f"<figcaption>{html.escape(w)}</figcaption></figure>")
    frames = trace.meta.get("latent_frames")
    return (f"<p>{frames} latent frames ({trace.meta.get('num_frames')} video frames); each "
            "heatmap is normalised over the whole clip, so a frame the word leaves alone stays "
            f"dark{f' ({GREY_NOTE})' if grey else ''}.</p>" + "".join(out))


def build_report(trace: Any, batch: int = 0, words: Iterable[str] | None = None,
                 decoder: str = "auto", vae: Any = None, title: str | None = None,
                 display_size: int = 256, grey: bool = True, **heatmap_kwargs: Any) -> str:
    """The report's HTML as a string (see the module docstring). ``words``: the words to show
    (default every non-punctuation word); ``decoder``: latent previews ("auto": the VAE decode
    where it is cheap, else "linear"; "vae", "tiny" with ``vae=``); ``grey``: the image in grey
    under every heatmap (False: in colour; :mod:`sdlens.views.overlay`); ``heatmap_kwargs``
    (``layers``, ``pooling``...) go to the heatmaps."""
    if getattr(trace, "latents", None) is None or getattr(trace, "timesteps", None) is None:
        raise TypeError(f"expected a Trace with latents, got {type(trace).__name__}")
    if not 0 <= batch < len(trace.prompts):
        raise ValueError(f"batch={batch} is out of range: the trace holds {len(trace.prompts)} "
                         "image(s)")
    if words is None:
        words = word_texts(trace, batch)
    else:
        words = [words] if isinstance(words, str) else list(words)
        for w in words:  # unknown words are the caller's error, not a note in the report
            find_word(trace, w, batch)
    prompt = trace.prompts[batch]
    decoder = resolve_decoder(trace, decoder, vae)  # "auto": the VAE decode where it is cheap
    doc = _Doc()
    doc.add("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title or 'sdlens report: ' + str(prompt))}</title>"
            f"<style>{_CSS}</style></head><body>")
    doc.add(f"<h1>{html.escape(title or 'sdlens report')}</h1><p><b>{html.escape(str(prompt))}</b></p>")
    doc.section("Settings", lambda: _settings(trace, batch))
    if is_video(trace):  # a video model's trace: its clip per word instead of image sections
        doc.section("Each word over the clip", lambda: _clips(trace, batch, words, vae,
                                                              heatmap_kwargs, grey))
        doc.section("Words over time", lambda: _img_tag(_fig_uri(plot.word_activity(
            trace, words, batch=batch)), "word activity per latent frame"))
        doc.section("Tokens", lambda: _tokens(trace, batch))
        doc.section("Scheduler", lambda: _scheduler_section(trace))
        doc.add("<p style=\"color:#888;font-size:.8em\">Made by sdlens from a recorded video "
                "trace; this file needs no kernel and no network.</p></body></html>")
        return "\n".join(doc.parts)
    doc.section("Image and word heatmaps", lambda: _final(trace, batch, words, heatmap_kwargs,
                                                                    grey))
    if getattr(trace, "concepts", None) is not None:
        doc.section("Concept maps", lambda: _concepts(trace, batch, heatmap_kwargs, grey))
    if getattr(trace, "image_to_text", None) is not None:
        doc.section("Image→text maps", lambda: _image_to_text(trace, batch, words, heatmap_kwargs,
                                                                     grey))
    doc.section("Step by step", lambda: _scrubber(trace, batch, words, decoder, vae,
                                                  heatmap_kwargs, display_size, grey))
    doc.section("Step strip", lambda: _img_tag(_fig_uri(plot.step_strip(
        trace, batch=batch, decoder=decoder, vae=vae)), "step strip"))
    doc.section("Tokens", lambda: _tokens(trace, batch))
    doc.section("When does each word commit?",
                lambda: _commitment(trace, batch, words, heatmap_kwargs))
    doc.section("Classifier-free guidance", lambda: _guidance_section(trace, batch))
    doc.section("Scheduler", lambda: _scheduler_section(trace))
    doc.add("<p style=\"color:#888;font-size:.8em\">Made by sdlens from a recorded trace; this "
            "file needs no kernel and no network.</p></body></html>")
    return "\n".join(doc.parts)


def write_report(trace: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`build_report`'s HTML to ``path`` (UTF-8); returns the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the report's file name (report.html)")
    text = build_report(trace, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
