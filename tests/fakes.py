"""Synthetic traces that follow THE TRACE CONTRACT (docs/architecture.md), with known answers.

``fake_trace()`` builds the run of "a red circle and a blue square" on a 64x64 image (16x16
latents, like the shapes model) whose cross-attention is *constructed*: the tokens 'red' and
'circle' attend a disk, 'blue' and 'square' a square (the masks come from the shapes dataset's
renderer, so they are the objects' pixels), every other token attends uniformly, and the start
token takes the rest of each pixel's probability (rows sum to 1 over the 77 positions, like a
softmax). Until ``commit_step`` the circle's words attend a *different* disk, from then on the
final one, so the commitment step is known. Noise and latents are random but the x0s and the
latents follow the recorded scheduler exactly (DDIM alpha form or Euler sigma form; computed
here from the scheduler itself, independently of sdlens's schedule table, as known answers).

The trace is a real :class:`~sdlens.trace.Trace` made by ``Trace.build`` with real
``AttentionMaps``; the known answers ride along as ``trace.masks`` (word or region -> (64, 64)
bool). Make variants with :func:`sdlens.trace.replace` (the masks stay with the original).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdlens.models.shapes.dataset import ShapeObject, render
from sdlens.trace import AttentionMaps, Trace

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "sdlens" / "models" / "shapes" / "weights" / "tokenizer"

# layer name -> (h, w) of the map, as in the shapes UNet (16x16 latents)
LAYERS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2": (16, 16),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2": (8, 8),
    "mid_block.attentions.0.transformer_blocks.0.attn2": (4, 4),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2": (8, 8),
    "up_blocks.2.attentions.0.transformer_blocks.0.attn2": (16, 16),
}

CIRCLE = ShapeObject("red", "circle", cx=20.0, cy=24.0, size=24.0)
SQUARE = ShapeObject("blue", "square", cx=45.0, cy=42.0, size=20.0)
WRONG_CIRCLE = ShapeObject("red", "circle", cx=46.0, cy=14.0, size=20.0)  # before commitment


_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import CLIPTokenizer

        _TOKENIZER = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return _TOKENIZER


def _pool(mask: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(t, hw)[0, 0]


def _scheduler(kind: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
               beta_schedule="scaled_linear", steps_offset=1, prediction_type="epsilon")
    if kind == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **cfg)
    if kind == "euler":
        return EulerDiscreteScheduler(**cfg)
    raise ValueError(kind)


def fake_trace(prompt: str = "a red circle and a blue square", steps: int = 10,
               commit_step: int = 4, cfg: float = 7.5, scheduler: str = "ddim",
               heads: dict[str, int] | None = None, head_maps: dict | None = None,
               seed: int = 0, batch: int = 1, word_regions: dict | None = None,
               strength: float = 3.0, layer_regions: dict[str, dict] | None = None,
               layers: dict[str, tuple[int, int]] | None = None) -> Trace:
    """A contract-conformant trace with constructed attention (see the module docstring).

    ``word_regions`` maps words (as CLIP spells them, without ``</w>``: 'dream', 'beach') or
    token positions (int) to ``'circle'`` or ``'square'``; default: red/circle -> circle,
    blue/square -> square. ``layer_regions[layer]`` overrides ``word_regions`` in one layer.
    ``layers``: {name: (h, w)} (default ``LAYERS``).
    ``heads``: {layer: n_heads} for every layer: heads kept (every head gets the same map unless
    ``head_maps[layer]`` = {"circle": [heads...]} restricts which heads see the object).
    """
    g = torch.Generator().manual_seed(seed)
    tok = tokenizer()
    ids = tok(prompt).input_ids
    strings = tok.convert_ids_to_tokens(ids)
    if word_regions is None:
        word_regions = {"red": "circle", "circle": "circle", "blue": "square", "square": "square"}
    final = render([CIRCLE, SQUARE])
    wrong = render([WRONG_CIRCLE]).masks[0]
    regions = {"circle": final.masks[0], "square": final.masks[1]}
    n_pos = len(ids) - 1  # positions 0..L (start + prompt tokens) are kept
    positions = list(range(n_pos))

    # per-step logits at image resolution (64x64), per position, then softmax-like normalisation
    def probs(step: int, regions_of: dict) -> torch.Tensor:
        w = torch.full((77, 64, 64), 0.05)
        w[0] = 1.0
        for pos in range(1, len(ids) - 1):
            body = strings[pos].replace("</w>", "")
            region = regions_of.get(pos, regions_of.get(body))
            if region is None:
                continue
            mask = regions[region]
            if region == "circle" and step < commit_step:
                mask = wrong
            w[pos] = 0.05 + strength * torch.from_numpy(mask.astype(np.float32))
        return w / w.sum(0, keepdim=True)

    sched = _scheduler(scheduler)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.float().clone()
    sigmas = sched.sigmas[:-1].float().clone() if scheduler == "euler" else None

    maps: dict[str, torch.Tensor] = {}
    layers = LAYERS if layers is None else layers
    default = [probs(s, word_regions) for s in range(steps)]
    for name, hw in layers.items():
        if layer_regions and name in layer_regions:
            per_step = [probs(s, {**word_regions, **layer_regions[name]}) for s in range(steps)]
        else:
            per_step = default
        pooled = torch.stack([F.adaptive_avg_pool2d(p[None], hw)[0] for p in per_step])  # (S,77,h,w)
        pooled = pooled[:, :n_pos]
        if heads and name in heads:
            nh = heads[name]
            m = pooled[:, None, None].repeat(1, batch, nh, 1, 1, 1)  # (S, B, H, T, h, w)
            if head_maps and name in head_maps:
                # heads not listed for an object do not see it: they spread that token uniformly
                for region, hs in head_maps[name].items():
                    for pos in range(1, n_pos):
                        body = strings[pos].replace("</w>", "")
                        if word_regions.get(pos, word_regions.get(body)) != region:
                            continue
                        for h in range(nh):
                            if h not in hs:
                                m[:, :, h, pos] = m[:, :, h, pos].mean(dim=(-2, -1), keepdim=True)
            maps[name] = m.half()
        else:
            maps[name] = pooled[:, None].repeat(1, batch, 1, 1, 1).half()

    shape = (batch, 4, 16, 16)
    latents = [torch.randn(shape, generator=g) * float(sched.init_noise_sigma)]
    n_unc, n_txt, n_gd, x0s = [], [], [], []
    ac = sched.alphas_cumprod
    for i, t in enumerate(sched.timesteps):
        x = latents[-1]
        eu = torch.randn(shape, generator=g)
        et = eu + 0.3 * torch.randn(shape, generator=g)
        eg = eu + cfg * (et - eu)
        if scheduler == "ddim":
            a = ac[int(t)]
            x0 = (x - (1 - a).sqrt() * eg) / a.sqrt()
            nxt = sched.step(eg, t, x).prev_sample
        else:
            x0 = x - sigmas[i] * eg
            sched.scale_model_input(x, t)
            nxt = sched.step(eg, t, x).prev_sample
        n_unc.append(eu)
        n_txt.append(et)
        n_gd.append(eg)
        x0s.append(x0)
        latents.append(nxt)

    words = [s.replace("</w>", "") for s in strings[1:-1]]
    masks = {w: regions[r] for w, r in word_regions.items() if w in words}
    masks.update({"circle-region": regions["circle"], "square-region": regions["square"],
                  "wrong-circle": wrong})
    tr = Trace.build(
        images=[Image.fromarray(final.image)] * batch,
        prompts=[prompt] * batch,
        negative_prompts=[None] * batch,
        token_ids=[list(ids)] * batch,
        tokens=[list(strings)] * batch,
        truncated_words=[[] for _ in range(batch)],
        timesteps=timesteps,
        sigmas=sigmas,
        latents=torch.stack(latents),
        noise_uncond=torch.stack(n_unc),
        noise_text=torch.stack(n_txt),
        noise=torch.stack(n_gd),
        x0=torch.stack(x0s),
        attention=AttentionMaps(maps, layers, range(steps), positions, heads=bool(heads)),
        guidance_scale=cfg,
        do_cfg=cfg > 1,
        meta={"model": "fake", "family": "shapes", "task": "txt2img",
              "pipeline_class": "StableDiffusionPipeline",
              "scheduler_class": type(sched).__name__, "scheduler_config": dict(sched.config),
              "prediction_type": "epsilon", "vae_scaling_factor": 1.0, "height": 64, "width": 64,
              "seeds": [seed], "steps": steps},
    )
    tr.masks = masks
    return tr


_FOLDER = None


def random_shapes_folder() -> Path:
    """A diffusers folder of the shapes architecture with random weights (built once per
    process, in a temporary folder): a stand-in for the shipped model in CLI tests."""
    global _FOLDER
    if _FOLDER is None:
        import tempfile

        from sdlens.testing import random_pipeline

        folder = Path(tempfile.mkdtemp(prefix="sdlens-shapes-")) / "model"
        random_pipeline("shapes").save_pretrained(folder)
        _FOLDER = folder
    return _FOLDER


def shipped_model_available() -> bool:
    from sdlens.pipeline import SHIPPED_MODEL

    return (SHIPPED_MODEL / "model_index.json").exists()
