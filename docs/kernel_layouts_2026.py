"""Probe the attention-kernel calls of the 2026 families' test beds and write the shapes section
of ``docs/kernel-layouts-2026.md`` (between its ``probe:begin`` / ``probe:end`` markers).

Run from the repository root: ``python docs/kernel_layouts_2026.py``. For every bed
(``sdlens.testing.pipeline_2026``, random weights, CPU fp32, 2 steps of 32 px unless said) it
wraps ``dispatch_attention_fn`` in each transformer module's namespace and, inside the
transformer's forward, watches ``F.scaled_dot_product_attention`` with a ``TorchFunctionMode``;
the attention module whose processor made the call is named by forward pre-hooks. It records one
row per (site kind, call kind): the module path of the first such site, how many sites of the
kind, q / k / v / mask as the kernel got them, and the transformer's text-bearing arguments; and
for every call how far the kernel's output is from an explicit float64 attention that reads the
mask as SDPA does (bool: -inf where False; float: added to the logits).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sdlens.testing import call_kwargs_2026, random_pipeline, reference_image

DOC = Path(__file__).with_name("kernel-layouts-2026.md")
MODULES = ("transformer_flux", "transformer_flux2", "transformer_qwenimage", "transformer_z_image")

RUNS = [  # (label, arch, random_pipeline keywords, call keywords)
    ("flux2 (dev)", "flux2", {}, {}),
    ("flux2 + 1 reference image (64 px)", "flux2", {}, {"image": [reference_image(64)]}),
    ("flux2-klein 4b (distilled)", "flux2-klein", {}, {}),
    ("flux2-klein base-4b, CFG 4", "flux2-klein", {"variant": "base-4b"},
     {"guidance_scale": 4.0}),
    ("flux2-klein + 1 reference image (64 px)", "flux2-klein", {},
     {"image": [reference_image(64)]}),
    ("qwen-image, true CFG 4", "qwen-image", {},
     {"true_cfg_scale": 4.0, "negative_prompt": "low quality"}),
    ("qwen-image, batch of 2 prompts of different lengths", "qwen-image", {},
     {"prompt": ["a red cat", "a small green house on the beach at night"]}),
    ("qwen-image-edit (ref. resized to 1024 px), true CFG 4", "qwen-image-edit", {},
     {"true_cfg_scale": 4.0, "negative_prompt": "low quality"}),
    ("QwenImageEditPlusPipeline on the same components, 1 image", "qwen-image-edit",
     {"_class": "QwenImageEditPlusPipeline"}, {"image": [reference_image(32)]}),
    ("z-image, CFG 4", "z-image", {}, {"guidance_scale": 4.0}),
    ("z-image, CFG 4, 40-word negative prompt", "z-image", {},
     {"guidance_scale": 4.0, "negative_prompt": " ".join(["blurry"] * 40)}),
    ("z-image, no CFG", "z-image", {}, {"guidance_scale": 0.0}),
    ("chroma, CFG 4", "chroma", {}, {"guidance_scale": 4.0}),
    ("flux-kontext + 32 px reference", "flux-kontext", {}, {}),
]


def describe(x) -> str:
    if x is None:
        return "None"
    if isinstance(x, torch.Tensor):
        out = f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
        if x.dtype == torch.bool:
            out += f" ({int(x.sum())}/{x.numel()} True)"
        elif x.is_floating_point() and x.numel() and x.dim() >= 2:
            values = x.unique()
            if values.numel() <= 3:
                out += " values " + "/".join(f"{v:g}" for v in values.tolist())
        return out
    if isinstance(x, (list, tuple)):
        if x and all(isinstance(t, torch.Tensor) for t in x):
            return f"list of {len(x)}: " + ", ".join(describe(t) for t in x[:2])
        return repr(x)[:80]
    return repr(x)[:80]


def explicit_error(query, key, value, mask, out) -> float:
    """Max |kernel output - an explicit float64 softmax attention| with the mask read as SDPA
    reads it: bool -> -inf where False, float -> added to the logits; (B, L, H, D) layout."""
    q, k, v = (x.double().transpose(1, 2) for x in (query, key, value))  # (B, H, L, D)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        mask = mask[:, None, None, :] if mask.dim() == 2 else mask
        logits = (logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else logits + mask.double())
    ref = (logits.softmax(-1) @ v).transpose(1, 2)
    err = (out.double() - ref).abs()
    return float(err[~err.isnan()].max())  # (rows with every key dropped are NaN: not compared)


class Probe:
    def __init__(self, pipe):
        self.pipe, self.stack, self.calls, self.forwards, self.inside = pipe, [], [], [], False
        self.undo = []
        transformer = pipe.transformer
        self.kind_counts = Counter()
        for name, module in transformer.named_modules():
            if hasattr(module, "processor"):
                self.kind_counts[re.sub(r"\.\d+\.", ".N.", name)] += 1
                self.undo.append(module.register_forward_pre_hook(
                    lambda m, a, n=name: self.stack.append(n)))
                self.undo.append(module.register_forward_hook(self.leave))
        self.undo.append(transformer.register_forward_pre_hook(self.on_forward, with_kwargs=True))
        self.undo.append(transformer.register_forward_hook(self.off_forward))
        self.in_transformer = False
        import importlib

        self.patched = []
        for mod_name in MODULES:
            mod = importlib.import_module(f"diffusers.models.transformers.{mod_name}")
            original = mod.dispatch_attention_fn
            self.patched.append((mod, original))

            def wrapped(query, key, value, *args, _original=original, **kwargs):
                site = self.stack[-1] if self.stack else "?"
                call = dict(site=site, q=describe(query), k=describe(key), v=describe(value),
                            mask=describe(kwargs.get("attn_mask")),
                            extra={k: v for k, v in kwargs.items()
                                   if k in ("is_causal", "scale", "enable_gqa") and v},
                            processor=type(self.processor_of(site)).__name__, sdpa=[])
                self.calls.append(call)
                self.inside = True
                try:
                    out = _original(query, key, value, *args, **kwargs)
                finally:
                    self.inside = False
                mask = kwargs.get("attn_mask")
                call["explicit"] = explicit_error(query, key, value, mask, out)
                if mask is not None and mask.is_floating_point():  # were it a keep / drop mask?
                    call["as_bool"] = explicit_error(query, key, value, mask > 0, out)
                return out

            mod.dispatch_attention_fn = wrapped

    def leave(self, *args):
        self.stack.pop()  # (returns None: the module's output stands)

    def processor_of(self, site):
        try:
            return self.pipe.transformer.get_submodule(site).processor
        except AttributeError:
            return None

    def off_forward(self, *args):
        self.in_transformer = False

    def on_forward(self, module, args, kwargs):
        self.in_transformer = True
        seen = {k: describe(v) for k, v in list(kwargs.items())
                if k not in ("joint_attention_kwargs", "attention_kwargs", "return_dict")}
        ids = kwargs.get("img_ids")
        if isinstance(ids, torch.Tensor):  # the first id coordinate tells noise from reference
            first = (ids[0] if ids.dim() == 3 else ids)[:, 0].tolist()
            runs = [[first[0], 0]]
            for value in first:
                if value == runs[-1][0]:
                    runs[-1][1] += 1
                else:
                    runs.append([value, 1])
            seen["img_ids"] += " (first coordinate: " + ", ".join(
                f"{v:g} x{n}" for v, n in runs) + ")"
        self.forwards.append(seen | {f"arg{i}": describe(a) for i, a in enumerate(args)})

    def close(self):
        for handle in self.undo:
            handle.remove()
        for mod, original in self.patched:
            mod.dispatch_attention_fn = original


class SDPAWatch(TorchFunctionMode):
    def __init__(self, probe):
        super().__init__()
        self.probe, self.outside = probe, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = kwargs.get("query", args[0] if args else None)
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            desc = (f"q {describe(query)}, mask {describe(mask)}"
                    + (", is_causal" if kwargs.get("is_causal") else ""))
            if self.probe.inside and self.probe.calls:
                self.probe.calls[-1]["sdpa"].append(desc)
            elif self.probe.in_transformer:
                self.outside += 1
        return func(*args, **kwargs)


def probe(label, arch, build, call):
    build = dict(build)
    cls = build.pop("_class", None)
    pipe = random_pipeline(arch, seed=0, **build)
    if cls:
        pipe = getattr(__import__("diffusers"), cls)(**pipe.components)
        pipe.set_progress_bar_config(disable=True)
    seen = {}

    def on_step(p, i, t, kw):
        seen.setdefault("latents", describe(kw["latents"]))
        return {}

    p = Probe(pipe)
    watch = SDPAWatch(p)
    kw = call_kwargs_2026(arch, callback_on_step_end=on_step, **call)
    with watch:
        pipe(**kw)
    p.close()
    steps = kw["num_inference_steps"]
    rows, first = [], {}
    for call_ in p.calls:
        kind = re.sub(r"\.\d+\.", ".N.", call_["site"])
        sig = (kind, call_["q"], call_["k"], call_["mask"])
        if sig not in first:
            first[sig] = call_
    for (kind, *_), c in first.items():
        rows.append(f"| `{c['site']}` ({p.kind_counts[kind]} sites) | {c['processor']} | "
                    f"q {c['q']}; k {c['k']}; v {c['v']} | {c['mask']} | "
                    f"{'; '.join(dict.fromkeys(c['sdpa'])) or '-'} | {c['explicit']:.1e} |")
    n_sites = sum(p.kind_counts.values())
    lines = [f"### {label}", "",
             f"`{type(pipe).__name__}`, `{type(pipe.transformer).__name__}`; "
             f"{len(p.forwards)} transformer calls in {steps} steps, {len(p.calls)} kernel calls "
             f"({n_sites} attention modules); SDPA calls outside dispatch in the transformer: "
             f"{watch.outside}; `_callback_tensor_inputs` = {pipe._callback_tensor_inputs}; "
             f"`latents` at the step-end callback: {seen.get('latents')}.", "",
             "Transformer call arguments (first call): "
             + "; ".join(f"`{k}` {v}" for k, v in p.forwards[0].items()), ""]
    if len(p.forwards) > 1 and p.forwards[1] != p.forwards[0]:
        diff = {k: v for k, v in p.forwards[1].items() if p.forwards[0].get(k) != v}
        lines += ["Second call differs in: " + "; ".join(f"`{k}` {v}" for k, v in diff.items()),
                  ""]
    worst = max(c["explicit"] for c in p.calls)
    lines += ["| site (first of its kind) | processor | at `dispatch_attention_fn` (B, L, H, D) "
              "| attn_mask | inside: `F.scaled_dot_product_attention` (B, H, L, D) "
              "| vs explicit fp64 |",
              "|---|---|---|---|---|---|", *rows, "",
              f"Largest |kernel output - explicit float64 softmax(q k^T / sqrt(D) + mask) v| over "
              f"all {len(p.calls)} calls: {worst:.1e}."
              + (f" Were the float mask read as keep (1) / drop (0), the smallest error would be "
                 f"{min(c['as_bool'] for c in p.calls if 'as_bool' in c):.1e}: it is additive."
                 if any("as_bool" in c for c in p.calls) else ""), ""]
    return lines


def main():
    torch.set_num_threads(1)
    out = ["<!-- probe:begin (written by docs/kernel_layouts_2026.py; do not edit) -->", "",
           "## Measured", "",
           f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, CPU "
           "fp32, tiny beds (2 heads x 16; text encoders 32 wide), 2 steps, 32 px unless said, "
           "prompt \"a red cat on the beach\".", ""]
    only = set(sys.argv[1:])
    for label, arch, build, call in RUNS:
        if only and arch not in only:
            continue
        out += probe(label, arch, build, call)
    out.append("<!-- probe:end -->")
    text = DOC.read_text() if DOC.exists() else ""
    begin, end = text.find("<!-- probe:begin"), text.find("<!-- probe:end -->")
    block = "\n".join(out)
    if begin >= 0 and end >= 0:
        text = text[:begin] + block + text[end + len("<!-- probe:end -->"):]
    else:
        text = text + "\n" + block + "\n"
    DOC.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
