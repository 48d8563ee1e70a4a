"""Train the shipped models from nothing: "shapes" (VAE, then text encoder + UNet) and, with
``--arch mmdit``, "shapes-mmdit" (two CLIP encoders + an SD3 transformer on the same data).

    python -m sdlens.models.shapes.train --work runs/shapes --export sdlens/models/shapes/weights
    python -m sdlens.models.shapes.train --arch mmdit --work runs/mmdit \
        --vae-from sdlens/models/shapes/weights/vae --export sdlens/models/shapes/weights_mmdit

Both share the dataset, the latent cache and the training loop (:func:`train_stage`); the
MMDiT's card gives its exact command (:func:`train_mmdit`: rectified flow, **no attention loss**,
no refine stage; phase 1 is the shipped VAE, adopted with ``--vae-from``).

``--minutes`` puts a time budget on the UNet stage (the learning rate anneals to it); the model
card gives the shipped model's exact commands. ``--device cuda`` trains on a GPU, drawing the
same batches as on the CPU. Seeded and resumable: every phase writes its checkpoint to
``--work`` and a rerun continues from the last one. Phases:

1. VAE (AutoencoderKL, 64x64x3 <-> 16x16x4): MSE + a small KL term.
2. Latent cache: N scenes are encoded once (the posterior's mean and std are kept; a sample is
   drawn each step), and the scaling factor is computed as SD's was: 1 / std of the latents.
3. Text encoder + UNet: epsilon prediction on SD's scaled-linear schedule, min-SNR-5 weighting,
   10% empty captions (for classifier-free guidance), EMA 0.999. With ``--attn-loss W > 0`` an
   extra loss teaches cross-attention where each object is (see ``attention_loss``); the model
   card says so and reports the same recipe without it.
4. Refine (``--refine-steps``, after the UNet stage's step or time budget is spent): a short stage
   at a low learning rate that adds the per-word coverage term (``--cover``) to the attention
   loss, so that shape words' maps cover their object instead of peaking at its centre.
5. Export: a diffusers folder (``StableDiffusionPipeline.save_pretrained``), fp16 safetensors,
   from the last stage's EMA weights.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlens.models.shapes import architecture
from sdlens.models.shapes.dataset import make_dataset

TOKENIZER_DIR = Path(__file__).parent / "weights" / "tokenizer"


def _log(work: Path, **row) -> None:
    print(json.dumps(row), flush=True)
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# --------------------------------------------------------------------------- phase 1: VAE
def train_vae(work: Path, steps: int, batch: int, seed: int, device: str = "cpu") -> None:
    ckpt = work / "vae.pt"
    if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= steps:
        return
    torch.manual_seed(seed)
    vae = architecture.vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    images, *_ = make_dataset(batch * 64, seed=seed + 1)
    data = _to_tensor(images)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        x = data[torch.randint(0, len(data), (batch,), generator=g)].to(device)
        post = vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=g).to(device)  # CPU draws: same on any device
        rec = vae.decode(post.mean + post.std * eps).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            psnr = 10 * math.log10(4 / mse.item())
            _log(work, phase="vae", step=step, mse=mse.item(), psnr=psnr, s=time.time() - t0)
    # CPU tensors, so that every reader (cache, export) loads it on any machine
    torch.save({"state": {k: v.cpu() for k, v in vae.state_dict().items()}, "step": steps}, ckpt)


def adopt_vae(work: Path, folder: Path, steps: int) -> None:
    """Phase 1 done by an already trained VAE: its weights (fp32) become ``work/vae.pt``."""
    from diffusers import AutoencoderKL

    if (work / "vae.pt").exists():
        return
    vae = AutoencoderKL.from_pretrained(folder, dtype=torch.float32)
    ref = architecture.vae()
    ref.load_state_dict(vae.state_dict())  # refuses a VAE of another architecture
    torch.save({"state": {k: v.float() for k, v in ref.state_dict().items()}, "step": steps},
               work / "vae.pt")
    _log(work, phase="vae", adopted=str(folder))


# --------------------------------------------------------------------------- phase 2: cache
@torch.no_grad()
def build_cache(work: Path, n: int, seed: int, device: str = "cpu") -> None:
    path = work / "cache.pt"
    if path.exists():
        return
    vae = architecture.vae()
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True, map_location="cpu")["state"])
    vae.eval().to(device)
    images, masks, captions, objects = make_dataset(n, seed=seed + 2)
    means, stds = [], []
    for i in range(0, n, 256):
        d = vae.encode(_to_tensor(images[i : i + 256]).to(device)).latent_dist
        means.append(d.mean.half().cpu())
        stds.append(d.std.half().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = 1.0 / (mean.float() + std.float() * torch.randn_like(std.float())).std().item()
    # token positions of each object's colour and shape word (every word is one CLIP token;
    # position 0 is <|startoftext|>); -1 where there is no second object
    words = [c.split() for c in captions]
    obj_tokens = torch.full((n, 2, 2), -1, dtype=torch.long)
    for i, (w, objs) in enumerate(zip(words, objects)):
        for k, o in enumerate(objs):
            for j in range(len(w) - 1):
                if w[j] == o.colour and w[j + 1] == o.shape:
                    obj_tokens[i, k] = torch.tensor([j + 1, j + 2])
    masks_t = torch.from_numpy(masks).float()  # (n, 2, 64, 64)
    pooled = {r: F.adaptive_avg_pool2d(masks_t, r).half() for r in (16, 8, 4)}
    torch.save({"mean": mean, "std": std, "captions": captions, "obj_tokens": obj_tokens,
                "masks": pooled, "scaling_factor": scaling}, path)
    _log(work, phase="cache", n=n, scaling_factor=scaling)


# --------------------------------------------------------------------------- phase 3 and 4: UNet, refine
class CaptureAttnProcessor:
    """Cross-attention computed with explicit probabilities, which it keeps (with grad)."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (b*heads, n, tokens)
        self.store.append(probs.view(b, attn.heads, n, -1).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def attention_loss(store: list, obj_tokens: torch.Tensor, masks: dict, keep: torch.Tensor):
    """Where each object's words attend, and how much of the object's attention they take.

    store: per attn2 layer (batch, r*r, tokens); obj_tokens (batch, 2, 2) token positions of
    (colour, shape) per object; masks {r: (batch, 2, r, r)} coverage; keep (batch,) captions not
    dropped. Returns (loc, use, cover), each averaged over objects and layers:
    - loc: 1 - share of each word's spatial attention mass that falls inside its object
      (TokenCompose's token loss);
    - use: inside an object, max(0, 0.5 - attention on its two words), so that the words are
      not only localised but also used (the prototype's localised-but-unused failure);
    - cover: inside an object, max(0, 0.5 - a / max(a)) for each word's map a, so that every
      word's map is flat over its object rather than a peak at its centre (``loc`` and ``use``
      alone let the shape word shrink to a few pixels while the colour word covered the object).
    """
    loc, use, cover, count = 0.0, 0.0, 0.0, 0
    for probs in store:
        r = int(math.isqrt(probs.shape[1]))
        for k in range(2):
            tok = obj_tokens[:, k]  # (batch, 2)
            valid = (tok[:, 0] >= 0) & keep
            if not valid.any():
                continue
            p, tk = probs[valid], tok[valid]
            m = masks[r][valid, k].flatten(1).float()  # (b, r*r)
            a = torch.gather(p, 2, tk[:, None, :].expand(-1, p.shape[1], -1))  # (b, r*r, 2)
            share = (a * m[..., None]).sum(1) / a.sum(1).clamp_min(1e-8)  # (b, 2)
            loc = loc + (1 - share).mean()
            inside = F.relu(0.5 - a.sum(-1))  # (b, r*r)
            use = use + ((inside * m).sum(1) / m.sum(1).clamp_min(1e-6)).mean()
            flat = F.relu(0.5 - a / a.amax(1, keepdim=True).clamp_min(1e-8))  # (b, r*r, 2)
            cover = cover + ((flat * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-6)).mean()
            count += 1
    count = max(count, 1)
    return loc / count, use / count, cover / count


def train_stage(work: Path, stage: str, modules: dict, step_loss, *, steps: int, lr: float,
                minutes: float, ckpt_every: int, seed: int, init_from: Path | None = None,
                ema: float = 0.999, warmup: int = 200, snapshot_every: int = 500,
                extra: dict | None = None, device: str = "cpu", schedule=None) -> bool:
    """The training loop every denoiser shares: AdamW, warm-up then cosine to 10% of ``lr`` (over
    ``steps`` or the ``minutes`` budget, whichever binds first), gradient clipping at 1, EMA
    weights, checkpoints to ``work/{stage}.pt`` (resumed from there), EMA snapshots.
    ``schedule(step) -> frac``: the cosine's position in [0, 1] as a function of the step alone
    (e.g. :func:`shipped_unet_schedule`), replacing the steps / time one; the budget still stops.

    ``modules``: ``{name: module}`` trained together (checkpoint keys ``name`` and ``ema_name``).
    ``step_loss(step, g)``: draws its batch from the CPU generator ``g`` (so that a run draws the
    same batches on any device) and returns ``(loss, row)``, ``row`` a dict logged every 50
    steps. ``init_from``: a finished stage's checkpoint whose weights (live and EMA, not the
    optimizer) this stage starts from. ``extra``: saved into every checkpoint (e.g. the latent
    scaling). Returns True when ``steps`` were reached, False when stopped by the time budget.
    """
    emas = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
    g = torch.Generator().manual_seed(seed)
    start = 0
    ckpt = work / f"{stage}.pt"
    resume = ckpt.exists()
    source = ckpt if resume else init_from  # this stage's checkpoint, else where it starts from
    if source is not None:
        state = torch.load(source, weights_only=False, map_location="cpu")
        for k in modules:
            modules[k].load_state_dict(state[k]); emas[k].load_state_dict(state[f"ema_{k}"])
    if resume:
        g.set_state(state["rng"]); start = state["step"]
        torch.set_rng_state(state["torch_rng"])
        elapsed_before = state.get("elapsed", 0.0)
    else:
        elapsed_before = 0.0
    if start >= steps:
        return True
    for m in list(modules.values()) + list(emas.values()):
        m.to(device)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if resume:
        opt.load_state_dict(state["opt"])
    ema_params = [p for m in emas.values() for p in m.parameters()]

    def save(step: int) -> None:
        tmp = work / f"{stage}.pt.tmp"
        weights = {k: m.state_dict() for k, m in modules.items()}
        ema_weights = {f"ema_{k}": m.state_dict() for k, m in emas.items()}
        torch.save({**weights, **ema_weights, "opt": opt.state_dict(), "rng": g.get_state(),
                    "step": step, "torch_rng": torch.get_rng_state(), **(extra or {}),
                    "elapsed": elapsed_before + time.time() - t0}, tmp)
        tmp.replace(ckpt)
        if step % snapshot_every == 0:  # EMA snapshots, to compare recipes at equal steps
            torch.save({**ema_weights, **(extra or {}), "step": step},
                       work / f"ema-{stage}-{step}.pt")

    t0 = time.time()
    for step in range(start + 1, steps + 1):
        # progress through the run: by steps, or by time when a time budget binds first, so the
        # learning rate anneals fully either way
        elapsed = elapsed_before + time.time() - t0
        if elapsed >= minutes * 60:
            save(step - 1)
            return False
        if schedule is not None:
            frac = schedule(step)
        else:
            progress = min(1.0, max(step / steps, elapsed / (minutes * 60)))
            frac = max(0.0, (progress - warmup / steps) / (1 - warmup / steps))
        for group in opt.param_groups:  # warm-up, then cosine to 10%
            group["lr"] = lr * (step / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        loss, row = step_loss(step, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 50 == 0:
            _log(work, phase=stage, step=step, **row, lr=opt.param_groups[0]["lr"], s=round(elapsed, 1))
        if step % ckpt_every == 0:
            save(step)
    save(steps)
    return True


def shipped_unet_schedule(step: int) -> float:
    """The shipped UNet stage's learning-rate schedule as a function of the step, so that a
    recipe trained on another machine (the fair ablation, issue 31) follows it step for step.

    The shipped stage was time-budgeted (``training.json``): ``--steps 20000 --minutes 72`` ended
    at step 2,250 with the cosine fully annealed, then ``--minutes 161.5`` resumed it at 72 /
    161.5 of the budget (a warm restart at lr 6.3e-4) and annealed again over 3,450 more steps.
    Time is taken as even within each run (its speed is not logged; this is the one
    approximation). Returns the cosine's position ``frac`` (warm-up as ``--steps 20000`` had it).
    """
    first, total, budget1, budget2 = 2250, 5700, 72.0, 161.5
    if step <= first:
        progress = step / first
    else:
        progress = budget1 / budget2 + (step - first) / (total - first) * (1 - budget1 / budget2)
    return max(0.0, (min(progress, 1.0) - 200 / 20000) / (1 - 200 / 20000))


SCHEDULES = {"shipped": shipped_unet_schedule}


def _caption_ids(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP token ids (n, 77) of the captions, and of the empty caption (1, 77)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return ids, empty_ids


def _draw(cache: dict, batch: int, g: torch.Generator, ids, empty_ids, shift: float = 0.0):
    """A batch from the latent cache: indices, scaled latent samples, caption-kept flags and
    token ids (10% empty captions, for classifier-free guidance)."""
    mean, std, scaling = cache["mean"], cache["std"], cache["scaling_factor"]
    idx = torch.randint(0, len(mean), (batch,), generator=g)
    x0 = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=g) - shift) * scaling
    keep = torch.rand(batch, generator=g) >= 0.1
    tok = torch.where(keep[:, None], ids[idx], empty_ids)
    return idx, x0, keep, tok


def train_unet(work: Path, steps: int, batch: int, seed: int, lr: float, attn_loss: float,
               minutes: float, ckpt_every: int, *, stage: str = "unet", init_from: Path | None = None,
               cover: float = 0.0, ema: float = 0.999, warmup: int = 200,
               snapshot_every: int = 500, device: str = "cpu", schedule=None) -> bool:
    """One training stage of text encoder + UNet (:func:`train_stage`): epsilon prediction on
    SD's scaled-linear schedule, min-SNR-5 weighting; with ``attn_loss > 0`` the attention loss,
    and ``cover`` the weight of its coverage part (added to ``attn_loss * (loc + use)``)."""
    cache = torch.load(work / "cache.pt", weights_only=False)
    ids, empty_ids = _caption_ids(cache["captions"])
    torch.manual_seed(seed)
    unet, text = architecture.unet(), architecture.text_encoder()
    alphas = architecture.scheduler().alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    store: list = []
    if attn_loss > 0:
        procs = {name: (CaptureAttnProcessor(store) if ".attn2." in name else proc)
                 for name, proc in unet.attn_processors.items()}
        unet.set_attn_processor(procs)

    def step_loss(step: int, g: torch.Generator):
        idx, x0, keep, tok = _draw(cache, batch, g, ids, empty_ids)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x0, tok, t, noise, keep = (v.to(device) for v in (x0, tok, t, noise, keep))
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        store.clear()
        pred = unet(xt, t, text(tok).last_hidden_state).sample
        weight = snr[t].clamp(max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
        diff = ((pred - noise) ** 2).mean((1, 2, 3))
        loss = (diff * weight).mean()
        row = {"mse": diff.mean().item()}
        if attn_loss > 0:
            masks = {r: m[idx].to(device) for r, m in cache["masks"].items()}
            loc, use, cov = attention_loss(store, cache["obj_tokens"][idx].to(device), masks, keep)
            loss = loss + attn_loss * (loc + use) + cover * cov
            row.update(loc=float(loc.detach()), use=float(use.detach()), cover=float(cov.detach()))
        return loss, row

    return train_stage(work, stage, {"unet": unet, "text": text}, step_loss, steps=steps, lr=lr,
                       minutes=minutes, ckpt_every=ckpt_every, seed=seed, init_from=init_from,
                       ema=ema, warmup=warmup, snapshot_every=snapshot_every,
                       extra={"scaling_factor": cache["scaling_factor"]}, device=device,
                       schedule=schedule)


def mmdit_text(encoders, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` makes of CLIP ids ``tok`` (batch, 77)
    without T5: both encoders' penultimate hidden states joined channel-wise (batch, 77, 96) and
    their projected pooled outputs joined (batch, 96)."""
    outs = [enc(tok, output_hidden_states=True) for enc in encoders]
    return (torch.cat([o.hidden_states[-2] for o in outs], -1),
            torch.cat([o.text_embeds for o in outs], -1))


# how many zero "T5" tokens a training batch carries: mostly none (sdlens's calls pass
# ``max_sequence_length=0``), now and then the pipeline's default 256, so a plain call works too
T5_ZEROS = ((0, 0.85), (256, 0.15))


def train_mmdit(work: Path, steps: int, batch: int, seed: int, lr: float, minutes: float,
                ckpt_every: int, *, device: str = "cpu") -> bool:
    """The "shapes-mmdit" model's one stage (:func:`train_stage`): two CLIP encoders + an
    ``SD3Transformer2DModel``, rectified-flow loss (``x_t = (1 - s) x0 + s e``, target velocity
    ``e - x0``, ``s`` logit-normal as in SD3's training), 10% empty captions. **No attention loss
    of any kind**: whatever its maps show was learned freely."""
    cache = torch.load(work / "cache.pt", weights_only=False)
    ids, empty_ids = _caption_ids(cache["captions"])
    torch.manual_seed(seed)
    encoders, transformer = architecture.mmdit_text_encoders(), architecture.mmdit_transformer()
    shift = float(cache["mean"].float().mean())  # SD3's VAE shift_factor, measured the same way
    lengths = torch.tensor([n for n, _ in T5_ZEROS])
    probs = torch.tensor([p for _, p in T5_ZEROS])

    def step_loss(step: int, g: torch.Generator):
        _, x0, keep, tok = _draw(cache, batch, g, ids, empty_ids, shift)
        s = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal(0, 1) noise levels
        noise = torch.randn(x0.shape, generator=g)
        n_zeros = int(lengths[torch.multinomial(probs, 1, generator=g)])
        x0, tok, s, noise = (v.to(device) for v in (x0, tok, s, noise))
        xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        emb, pooled = mmdit_text(encoders, tok)
        emb = torch.cat([emb, emb.new_zeros(batch, n_zeros, emb.shape[-1])], 1)
        pred = transformer(hidden_states=xt, encoder_hidden_states=emb, pooled_projections=pooled,
                           timestep=s * 1000).sample
        diff = ((pred - (noise - x0)) ** 2).mean((1, 2, 3))
        return diff.mean(), {"mse": diff.mean().item(), "t5_zeros": n_zeros}

    modules = {"transformer": transformer, "text": encoders[0], "text_2": encoders[1]}
    return train_stage(work, "mmdit", modules, step_loss, steps=steps, lr=lr, minutes=minutes,
                       ckpt_every=ckpt_every, seed=seed, warmup=200,
                       extra={"scaling_factor": cache["scaling_factor"], "shift_factor": shift},
                       device=device)


# --------------------------------------------------------------------------- phase 5: export
def _write_folder(pipe, out: Path) -> Path:
    """Save ``pipe`` (fp16 safetensors) as the folder ``out``, keeping the files written by
    :mod:`sdlens.models.shapes.card` (the card, its result files, the preview fit)."""
    pipe.to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # components that are None (SD3's T5, image encoder) are left out of model_index.json by
    # save_pretrained, and then a plain from_pretrained(folder) refuses the folder: list them
    index = json.loads((tmp / "model_index.json").read_text())
    for name, param in inspect.signature(type(pipe).__init__).parameters.items():
        if name != "self" and param.default in (None, inspect.Parameter.empty):
            index.setdefault(name, [None, None])
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for keep in ("README.md", "evaluation.json", "training.json", "latent_rgb.json"):
        if (out / keep).exists():
            shutil.copy(out / keep, tmp / keep)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def _trained_vae(work: Path, state: dict):
    vae = architecture.vae()
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True)["state"])
    vae.register_to_config(scaling_factor=float(state["scaling_factor"]),
                           shift_factor=state.get("shift_factor"))
    return vae


def export(work: Path, out: Path, snapshot: Path | None = None) -> Path:
    """Write the EMA weights (of the last stage's checkpoint — ``refine.pt`` when that stage ran,
    else ``unet.pt`` — or of an ``ema-*.pt`` snapshot) as a diffusers folder, fp16 safetensors."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    last = work / "refine.pt" if (work / "refine.pt").exists() else work / "unet.pt"
    state = torch.load(snapshot or last, weights_only=False, map_location="cpu")
    unet, text = architecture.unet(), architecture.text_encoder()
    unet.load_state_dict(state["ema_unet"]); text.load_state_dict(state["ema_text"])
    pipe = StableDiffusionPipeline(
        vae=_trained_vae(work, state), text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), unet=unet,
        scheduler=architecture.scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return _write_folder(pipe, out)


def export_mmdit(work: Path, out: Path, snapshot: Path | None = None) -> Path:
    """The "shapes-mmdit" folder: a ``StableDiffusion3Pipeline`` without T5, from the EMA
    weights of ``work/mmdit.pt`` (or of an ``ema-mmdit-*.pt`` snapshot)."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    state = torch.load(snapshot or work / "mmdit.pt", weights_only=False, map_location="cpu")
    encoders, transformer = architecture.mmdit_text_encoders(), architecture.mmdit_transformer()
    transformer.load_state_dict(state["ema_transformer"])
    encoders[0].load_state_dict(state["ema_text"]); encoders[1].load_state_dict(state["ema_text_2"])
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=architecture.flow_scheduler(),
        vae=_trained_vae(work, state), text_encoder=encoders[0], tokenizer=tokenizer,
        text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )
    return _write_folder(pipe, out)


def main() -> None:
    p = argparse.ArgumentParser(description="Train the shipped shapes model (resumable).")
    p.add_argument("--work", type=Path, default=Path("runs/shapes"), help="checkpoints and logs")
    p.add_argument("--arch", choices=("unet", "mmdit"), default="unet",
                   help="unet: the shipped 'shapes' model; mmdit: 'shapes-mmdit' (no attention "
                        "loss, no refine stage; --lr 5e-4 is its recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--vae-from", type=Path, default=None,
                   help="a trained shapes VAE folder (e.g. the shipped model's vae/) to use "
                        "instead of phase 1; 'shapes-mmdit' reuses the shipped VAE this way")
    p.add_argument("--cache", type=int, default=40000, help="scenes in the latent cache")
    p.add_argument("--steps", type=int, default=3600, help="UNet optimisation steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--attn-loss", type=float, default=0.1,
                   help="weight of the attention-localisation loss (0: maps learned freely)")
    p.add_argument("--minutes", type=float, default=1e9,
                   help="time budget of the UNet phase (over all resumes): the learning-rate "
                        "schedule anneals to it, and training stops there with a checkpoint")
    p.add_argument("--schedule", choices=("time", *SCHEDULES), default="time",
                   help="the UNet stage's learning rate: 'time' anneals over --steps or the "
                        "--minutes budget; 'shipped' replays the shipped model's schedule step "
                        "for step (use with --steps 5700)")
    p.add_argument("--refine-steps", type=int, default=1000,
                   help="steps of the refine stage (0: none), which starts from the UNet stage's "
                        "weights and adds the per-word coverage term to the attention loss (with "
                        "--attn-loss 0 it is the same low-lr stage without attention terms)")
    p.add_argument("--refine-lr", type=float, default=1e-4)
    p.add_argument("--cover", type=float, default=0.1,
                   help="weight of the coverage term in the refine stage")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="where the models train (cpu, cuda, ...)")
    p.add_argument("--export", type=Path, default=None, help="write the model folder here")
    args = p.parse_args()
    try:
        torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...): {e}")
    for name in ("refine_steps", "cover", "refine_lr"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}))
    if args.vae_from is not None:
        adopt_vae(args.work, args.vae_from, args.vae_steps)
    train_vae(args.work, args.vae_steps, 32, args.seed, args.device)
    build_cache(args.work, args.cache, args.seed, args.device)
    if args.arch == "mmdit":
        done = train_mmdit(args.work, args.steps, args.batch, args.seed, args.lr, args.minutes,
                           args.ckpt_every, device=args.device)
        _log(args.work, phase="mmdit-end", finished=done)
        if args.export:
            print(export_mmdit(args.work, args.export))
        return
    done = train_unet(args.work, args.steps, args.batch, args.seed, args.lr, args.attn_loss,
                      args.minutes, args.ckpt_every, device=args.device,
                      schedule=SCHEDULES.get(args.schedule))
    _log(args.work, phase="unet-end", finished=done)
    if args.refine_steps:
        # a short stage at a low learning rate: the UNet stage's recipe leaves shape words'
        # maps peaked at their objects' centres; this one flattens them over the object
        train_unet(args.work, args.refine_steps, args.batch, args.seed + 1, args.refine_lr,
                   args.attn_loss, 1e9, args.ckpt_every, stage="refine",
                   init_from=args.work / "unet.pt", cover=args.cover, ema=0.995, warmup=50,
                   snapshot_every=250, device=args.device)
        _log(args.work, phase="refine-end")
    if args.export:
        print(export(args.work, args.export))


if __name__ == "__main__":
    main()
