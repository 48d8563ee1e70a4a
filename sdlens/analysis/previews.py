"""Latent -> RGB previews of x_t and x0: linear (instant), VAE (exact), AutoencoderTiny (fast).

Linear decoder: every latent pixel (``C`` channels, as the pipeline holds latents, i.e. already
multiplied by the VAE's scaling factor) maps to RGB by ``rgb = latent @ M + b`` with a ``(C, 3)``
matrix ``M``; the output is roughly in ``[-1, 1]`` at the latent resolution (upsampled for show).

* SD 1.x / 2.x: ComfyUI's SD1.5 coefficients (no bias); SDXL: ComfyUI's SDXL coefficients and bias.
* the shipped "shapes" model: fitted by least squares on (latent, image) pairs
  (:func:`fit_linear_decoder`, deterministic: the VAE posterior's mean of a fixed, seeded set of
  scenes); the coefficients ship in ``sdlens/models/shapes/weights/latent_rgb.json`` and are
  fitted on the fly from the VAE when that file is missing.

Channels (``decoder="channels"``): the latents' first 3 channels, each frame scaled by its largest
absolute value: what a saved trace of a model without a linear table (SD3, PixArt, Sana) shows
when no VAE is at hand to fit one. ``"auto"`` picks it only then.

VAE decoding (``decoder="vae"``) uses the trace's pipeline (``trace.pipeline``) or a ``vae=`` you
pass; ``decoder="tiny"`` takes an ``AutoencoderTiny`` (TAESD) you pass. Decodes are batched and
cached per trace.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from sdlens.analysis.heatmaps import output_size
from sdlens.analysis.video import (check_frame, first_clip_frame, is_video, latent_frames_of_clip,
                                   temporal_scale)
from sdlens.analysis.guidance import schedule_form
from sdlens.engine.schedules import input_scale

SD1_MATRIX = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
              [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
SDXL_MATRIX = [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
               [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]]
SDXL_BIAS = [0.1084, -0.0175, -0.0011]
LINEAR = {
    "sd1": (SD1_MATRIX, [0.0, 0.0, 0.0]),
    "sd2": (SD1_MATRIX, [0.0, 0.0, 0.0]),
    "sdxl": (SDXL_MATRIX, SDXL_BIAS),
    "sdxl-refiner": (SDXL_MATRIX, SDXL_BIAS),
}
SHAPES_COEFFS = Path(__file__).resolve().parents[1] / "models" / "shapes" / "weights" / "latent_rgb.json"
KINDS = ("x0", "latents")
DECODERS = ("auto", "linear", "vae", "tiny", "channels")
CHEAP_VAE_PARAMS = 5_000_000  # the shipped models' VAEs (0.7M) decode in milliseconds; SD's (84M) does not

_FITTED: dict[int, dict] = {}  # id(vae) -> coefficients fitted this session (shapes fallback)
_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- linear decoder
def latent_to_rgb(latents: torch.Tensor, matrix: Any, bias: Any = None) -> torch.Tensor:
    """Apply a linear decoder: ``(..., C, h, w)`` -> ``(..., 3, h, w)`` (roughly ``[-1, 1]``)."""
    m = torch.as_tensor(matrix, dtype=torch.float32)
    if latents.shape[-3] != m.shape[0]:
        raise ValueError(f"the linear decoder has {m.shape[0]} input channels, the latents "
                         f"{latents.shape[-3]} (shape {tuple(latents.shape)})")
    out = torch.einsum("...chw,cr->...rhw", latents.float(), m)
    if bias is not None:
        out = out + torch.as_tensor(bias, dtype=torch.float32)[:, None, None]
    return out


def _deref(obj: Any) -> Any:
    if isinstance(obj, weakref.ReferenceType):
        return obj()
    return obj


def _vae_of(trace: Any, vae: Any = None) -> Any:
    if vae is not None:
        return getattr(vae, "vae", vae)  # a pipeline works too
    pipe = _deref(getattr(trace, "pipeline", None))
    return getattr(pipe, "vae", None) if pipe is not None else None


def resolve_decoder(trace: Any, decoder: str = "auto", vae: Any = None) -> str:
    """The decoder ``decoder`` stands for: "auto" is the VAE decode where a cheap VAE is at hand
    (the trace's pipeline's or ``vae=``, or the shipped model's folder for its traces) and the
    linear preview elsewhere (the latents' first channels where there is no linear decoder:
    :func:`linear_available`); other names stand for themselves."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder != "auto":
        return decoder
    v = _vae_of(trace, vae) or _folder_vae(trace)
    cheap = v is not None and hasattr(v, "parameters") and \
        sum(p.numel() for p in v.parameters()) <= CHEAP_VAE_PARAMS
    if cheap:
        return "vae"
    return "linear" if v is not None or linear_available(trace) else "channels"


def linear_available(trace: Any, vae: Any = None) -> bool:
    """Whether :func:`linear_decoder` has coefficients for the trace without fitting: a family
    with a table (SD 1.x / 2.x / XL, the shipped model), or a VAE at hand to fit one."""
    family = trace if isinstance(trace, str) else (getattr(trace, "meta", None) or {}).get("family")
    if family in LINEAR or family == "shapes" or _folder_coeffs(trace) is not None:
        return True
    return not isinstance(trace, str) and (_vae_of(trace, vae) or _folder_vae(trace)) is not None


def channels_rgb(latents: torch.Tensor) -> torch.Tensor:
    """``(..., C, h, w)`` -> ``(..., 3, h, w)`` in [-1, 1]: the first 3 channels, each frame
    scaled by its largest absolute value (the ``"channels"`` preview)."""
    x = latents.float()[..., :3, :, :]
    peak = x.abs().amax(dim=(-3, -2, -1), keepdim=True).clamp(min=1e-8)
    return x / peak


def load_linear_decoder(path: str | Path) -> dict:
    """Read coefficients written by :func:`save_linear_decoder`."""
    data = json.loads(Path(path).read_text())
    if "matrix" not in data:
        raise ValueError(f"{path} holds no 'matrix'")
    data.setdefault("bias", [0.0, 0.0, 0.0])
    return data


def save_linear_decoder(coeffs: dict, path: str | Path) -> Path:
    """Write coefficients (from :func:`fit_linear_decoder`) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coeffs, indent=1))
    return path


def linear_decoder(trace: Any, vae: Any = None) -> tuple[list, list]:
    """``(matrix (C, 3), bias (3,))`` for the trace's model family (``trace.meta['family']``);
    a family without a table (SD3) gets one fitted to the VAE at hand (``vae=`` or the live
    pipeline's), once per VAE."""
    if isinstance(trace, str):
        family = trace
    else:
        family = (getattr(trace, "meta", None) or {}).get("family")
    if family in LINEAR:
        return LINEAR[family]
    own = _folder_coeffs(trace)  # the model folder's own fit (the shipped MMDiT's)
    if own is not None:
        return own["matrix"], own["bias"]
    if family == "shapes" and SHAPES_COEFFS.exists():
        c = load_linear_decoder(SHAPES_COEFFS)
        return c["matrix"], c["bias"]
    # no table (the shapes model without its file, SD3's 16 channels): fit one to the VAE at hand
    v = _vae_of(trace, vae) if not isinstance(trace, str) else vae
    if v is None and family == "shapes":
        v = _folder_vae(trace)
    if v is not None:
        if id(v) not in _FITTED:
            _FITTED[id(v)] = fit_linear_decoder(v)
        return _FITTED[id(v)]["matrix"], _FITTED[id(v)]["bias"]
    if family == "shapes":
        raise ValueError(f"no linear decoder for the shapes model: {SHAPES_COEFFS} is missing "
                         "and no VAE is at hand to fit one (pass vae=pipe.vae, or use "
                         "decoder='vae')")
    raise ValueError(f"no linear latent->RGB decoder for model family {family!r}; known: "
                     f"{sorted(LINEAR) + ['shapes']}; use decoder='vae' or fit one with "
                     "sdlens.analysis.previews.fit_linear_decoder(vae, images)")


_FOLDER_VAES: dict[str, Any] = {}
_FOLDER_COEFFS: dict[str, dict | None] = {}


def _folder_coeffs(trace: Any) -> dict | None:
    """The coefficients in the trace's model folder (``meta['model_id']/latent_rgb.json``,
    written by :func:`save_linear_decoder`), when there is one; else None."""
    meta = {} if isinstance(trace, str) else (getattr(trace, "meta", None) or {})
    model = meta.get("model_id")
    if not model:
        return None
    path = Path(str(model)).expanduser() / "latent_rgb.json"
    key = str(path)
    if key not in _FOLDER_COEFFS:
        _FOLDER_COEFFS[key] = load_linear_decoder(path) if path.is_file() else None
    return _FOLDER_COEFFS[key]


def _folder_vae(trace: Any) -> Any:
    """The VAE of the trace's model folder (``meta['model_id']``) or of the shipped model's
    folder, when one is on disk; else None."""
    candidates = []
    meta = {} if isinstance(trace, str) else (getattr(trace, "meta", None) or {})
    if meta.get("model_id"):
        candidates.append(Path(str(meta["model_id"])).expanduser())
    if (trace if isinstance(trace, str) else meta.get("family")) == "shapes":
        candidates.append(SHAPES_COEFFS.parent)  # only the shipped model's own traces
    for folder in candidates:
        if not (folder / "vae" / "config.json").exists():
            continue
        key = str(folder.resolve())
        if key not in _FOLDER_VAES:
            from diffusers import AutoencoderKL

            _FOLDER_VAES[key] = AutoencoderKL.from_pretrained(folder / "vae",
                                                              dtype=torch.float32).eval()
        return _FOLDER_VAES[key]
    return None


def _images_tensor(images: Any) -> torch.Tensor:
    """uint8 (n, H, W, 3) / PIL list / float (n, 3, H, W) in [-1, 1] -> float (n, 3, H, W)."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (n, H, W, 3) uint8, got {images.shape}")
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensors must be (n, 3, H, W) in [-1, 1], got "
                             f"{tuple(images.shape)}")
        return images.float()
    raise TypeError(f"images must be a uint8 array, a list of PIL images or a tensor, got "
                    f"{type(images).__name__}")


@torch.no_grad()
def fit_linear_decoder(vae: Any, images: Any = None, n: int = 256, seed: int = 0,
                       scaling_factor: float | None = None, batch_size: int = 64,
                       latents: torch.Tensor | None = None) -> dict:
    """Least-squares linear latent -> RGB decoder for ``vae``.

    Pairs (latent pixel, RGB of its patch), two ways:

    * ``latents`` given — **against the decoder** (preferred: it fits what the preview replaces):
      latents as the pipeline holds them (e.g. ``trace.x0`` of a few traced runs, flattened to
      ``(n, C, h, w)``: predictions from every step, so the fit also covers early, off-manifold
      ones) and their VAE decodes, area-averaged to the latent grid;
    * else — against the encoder: each image is encoded (the posterior's *mean*, times the
      scaling factor) and the image area-averaged to the latent grid; ``images`` default: ``n``
      scenes of the shapes dataset drawn with ``seed``.

    ``[latent, 1] @ [M; b] = rgb`` is solved in float64: the same inputs give the same
    coefficients. To make one for your own model: trace a few prompts, then
    ``save_linear_decoder(fit_linear_decoder(pipe.vae, latents=x0s), path)``.

    Returns ``{"matrix": (C, 3), "bias": (3,), "rmse": ..., "n_images": ..., "seed": ...,
    "scaling_factor": ...}`` (JSON-ready; see :func:`save_linear_decoder`).
    """
    vae = getattr(vae, "vae", vae)
    if not hasattr(vae, "encode"):
        raise TypeError(f"expected a VAE (or a pipeline with .vae), got {type(vae).__name__}")
    sf = scaling_factor if scaling_factor is not None else float(
        getattr(getattr(vae, "config", None), "scaling_factor", 1.0) or 1.0)
    if latents is not None:
        lat = latents.float().cpu()  # (n, C, h, w)
        x = decode_vae(vae, lat, batch_size)  # (n, 3, H, W)
        source = "decoder"
    else:
        if images is None:
            from sdlens.models.shapes.dataset import make_dataset

            images = make_dataset(n, seed=seed)[0]
        x = _images_tensor(images)
        shift = float(getattr(getattr(vae, "config", None), "shift_factor", None) or 0.0)  # SD3
        param = next(iter(vae.parameters()), None) if hasattr(vae, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        stats = _latent_stats(vae)  # a video VAE (Qwen-Image's): one frame, z = (mu - mean) / std
        lats = []
        for i in range(0, len(x), batch_size):
            xi = x[i : i + batch_size].to(device, dtype)
            if stats is None:
                enc = vae.encode(xi)
                # AutoencoderKL: a posterior (its mean); Sana's DC-AE: the latent itself
                mean = enc.latent_dist.mean if hasattr(enc, "latent_dist") else enc.latent
                lats.append((mean.float().cpu() - shift) * sf)
            else:
                mu = vae.encode(xi[:, :, None]).latent_dist.mean[:, :, 0].float().cpu()
                lats.append((mu - stats[0]) / stats[1])
        lat = torch.cat(lats)  # (n, C, h, w)
        source = "encoder"
    target = F.adaptive_avg_pool2d(x, lat.shape[-2:])  # (n, 3, h, w)
    a = rearrange(lat, "n c h w -> (n h w) c").double()
    a = torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], 1)
    y = rearrange(target, "n c h w -> (n h w) c").double()
    sol = torch.linalg.lstsq(a, y).solution  # (C + 1, 3)
    rmse = float((a @ sol - y).pow(2).mean().sqrt())
    sol = sol.round(decimals=6)  # float noise (~1e-14) between runs must not change the file
    return {"matrix": sol[:-1].tolist(), "bias": sol[-1].tolist(), "rmse": round(rmse, 6),
            "n_images": int(len(x)), "seed": seed, "scaling_factor": sf, "fit": source}


# --------------------------------------------------------------------------- VAE decoding
@torch.no_grad()
def decode_vae(vae: Any, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Decode latents as the pipeline does (``latents / scaling_factor (+ shift)``):
    ``(n, C, h, w)`` -> ``(n, 3, H, W)`` float32 in ``[-1, 1]`` on the CPU. Works for
    ``AutoencoderKL`` and ``AutoencoderTiny`` (whose scaling factor is 1), and for a video VAE
    used on images (Qwen-Image's ``AutoencoderKLQwenImage``: ``z * latents_std + latents_mean``
    decoded as a one-frame clip, as its pipelines do)."""
    vae = getattr(vae, "vae", vae)
    if not hasattr(vae, "decode"):
        raise TypeError(f"expected a VAE with .decode, got {type(vae).__name__}")
    cfg = getattr(vae, "config", None)
    sf = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
    shift = getattr(cfg, "shift_factor", None)
    stats = _latent_stats(vae)
    param = next(iter(vae.parameters()))
    out = []
    for i in range(0, len(latents), batch_size):
        z = latents[i : i + batch_size].to(param.device, torch.float32)
        if stats is not None:
            z = z * stats[1].to(z.device) + stats[0].to(z.device)
            img = vae.decode(z[:, :, None].to(param.dtype)).sample[:, :, 0].float()
        else:
            z = z / sf
            if shift:
                z = z + shift
            img = vae.decode(z.to(param.dtype)).sample.float()
        if not torch.isfinite(img).all():
            raise FloatingPointError("the VAE decoded NaN/inf (SDXL's fp16 VAE does this): decode "
                                     "in float32 (vae.to(torch.float32)) or use the fp16-fix VAE")
        out.append(img.clamp(-1, 1).cpu())
    return torch.cat(out)


def decode_video(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """A video VAE's decode as Wan's pipelines do it (``z * latents_std + latents_mean``):
    ``(C, F, h, w)`` -> ``(frames, 3, H, W)`` float32 in ``[-1, 1]`` on the CPU."""
    vae = getattr(vae, "vae", vae)
    param = next(iter(vae.parameters()))
    mean, std = (t[None, :, None] for t in _latent_stats(vae))  # (1, C, 1, 1, 1)
    with torch.no_grad():
        x = vae.decode((latents.float()[None] * std + mean).to(param.device, param.dtype)).sample
    return x[0].float().clamp(-1, 1).cpu().transpose(0, 1)


def _latent_stats(vae: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A video VAE's per-channel ``(latents_mean, latents_std)``, each (C, 1, 1) float32 (the
    pipelines' latents are ``(mu - mean) / std``); None for an image VAE (scaling / shift; an
    ``AutoencoderKL`` with ``latents_mean`` too, whose pipelines use them otherwise). A video
    VAE (Wan's, Qwen-Image's) is told by its temporal downsampling."""
    cfg = getattr(getattr(vae, "vae", vae), "config", None)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if getattr(cfg, "temperal_downsample", None) is None or mean is None or std is None:
        return None
    return (torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))


def _video_vae(vae: Any) -> bool:
    return _latent_stats(vae) is not None


def decode_clip(trace: Any, kind: str = "x0", step: int = -1, batch: int = 0,
                vae: Any = None) -> np.ndarray:
    """A video trace's clip at one step (``kind`` "x0" or "latents") as uint8 ``(frames, H,
    W, 3)``: decoded by the video VAE where one is at hand (the traced pipeline's, or ``vae=``;
    :func:`decode_video`); else each latent frame's first three channels (the ``"channels"``
    preview), upsampled to the video size and repeated over the clip frames it stands for."""
    if not is_video(trace):
        raise ValueError("decode_clip is for video traces (this one has no frame axis)")
    x = _select(trace, kind, step, batch)  # (C, F, h, w)
    v = _vae_of(trace, vae)
    if v is not None and _video_vae(v):
        try:  # one decode per (kind, step, batch, VAE): the viewer asks for each frame
            cache = _CACHE.setdefault(trace, {})
        except TypeError:
            cache = {}
        key = ("clip", kind, int(step) % len(getattr(trace, kind)), int(batch), id(v))
        if key not in cache:
            cache[key] = decode_video(v, x)
        clip = cache[key]
    else:
        H, W = output_size(trace)
        rgb = F.interpolate(channels_rgb(x.transpose(0, 1)), size=(H, W), mode="nearest")
        clip = rgb[latent_frames_of_clip(trace)]
    return ((clip.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def to_image(rgb: torch.Tensor, size: tuple[int, int] | None = None,
             resample: int = Image.BILINEAR) -> Image.Image:
    """``(3, h, w)`` in ``[-1, 1]`` -> PIL image, resized to ``size`` = (H, W) if given."""
    arr = ((rgb.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(arr)
    if size is not None and (im.size[1], im.size[0]) != tuple(size):
        im = im.resize((size[1], size[0]), resample)
    return im


# --------------------------------------------------------------------------- previews
def _select(trace: Any, kind: str, step: int, batch: int) -> torch.Tensor:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    data = trace.x0 if kind == "x0" else trace.latents
    if data is None:
        raise ValueError(f"this trace holds no {kind} (not recorded)")
    n = data.shape[0]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if not -n <= step < n:
        what = "x0 has one entry per step" if kind == "x0" else \
            "latents has steps + 1 entries (x_T ... x_0)"
        raise ValueError(f"step {step} is out of range for {kind}: 0..{n - 1} ({what})")
    nb = data.shape[1]
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not -nb <= batch < nb:
        raise ValueError(f"batch={batch!r} is out of range: the trace holds {nb} image(s)")
    x = data[int(step) % n, int(batch) % nb].float()
    if kind == "latents":
        x = x * _input_scale(trace, int(step) % n)
    return x


def _input_scale(trace: Any, step: int) -> float:
    """Latents are shown as the model sees them (the schedule table's input scale: k-diffusion
    latents x = x0 + sigma eps are divided by sqrt(sigma^2 + 1))."""
    sig = getattr(trace, "sigmas", None)
    if sig is None or step >= len(sig):
        return 1.0
    try:
        form = schedule_form(trace)
    except ValueError:
        return 1.0
    return input_scale(form, float(sig[step]))


def _out_size(trace: Any, size: Any) -> tuple[int, int] | None:
    if size == "latent":
        return None
    return output_size(trace, size)


def previews(trace: Any, kind: str = "x0", steps: Sequence[int] | None = None, batch: int = 0,
             decoder: str = "auto", vae: Any = None, size: Any = None,
             batch_size: int = 8, frame: int | None = None) -> list[Image.Image]:
    """Previews of ``kind`` ("x0" or "latents", i.e. x_t) at several ``steps`` (default: all).

    ``decoder``: "auto" (the VAE decode where it is cheap, else linear: :func:`resolve_decoder`),
    "linear" (instant, approximate), "channels" (the first 3 latent channels), "vae" (exact;
    ``trace.pipeline``'s VAE, ``vae=``, or the shipped model's own), "tiny" (an
    ``AutoencoderTiny`` passed as ``vae=``). ``size``: (H, W) / int, default the image size;
    ``"latent"`` keeps the latent resolution (linear and channels only). VAE decodes are
    batched (``batch_size``) and cached on the trace.

    A video trace: the previews of latent frame ``frame`` (default 0), decoded "channels"
    ("auto": no published linear factors for video latents) or "vae" (the clip's first frame of
    that latent frame, from the video VAE: :func:`decode_clip`).
    """
    video = is_video(trace)
    if video:
        frame = check_frame(trace, 0 if frame is None else frame)
        decoder = "channels" if decoder == "auto" else decoder
        if decoder not in ("channels", "vae"):
            raise ValueError(f"a video trace previews with decoder 'channels' or 'vae', got "
                             f"{decoder!r}")
    elif frame is not None:
        check_frame(trace, frame)  # raises: an image trace has no frames
    decoder = resolve_decoder(trace, decoder, vae)
    data = trace.x0 if kind == "x0" else trace.latents if kind == "latents" else None
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if data is None:
        raise ValueError(f"this trace holds no {kind} (not recorded)")
    if steps is None:
        steps = list(range(data.shape[0]))
    elif isinstance(steps, (int, np.integer)):
        steps = [int(steps)]
    out_size = _out_size(trace, size)
    if video and decoder == "vae":
        first = first_clip_frame(frame, temporal_scale(trace))
        clips = [decode_clip(trace, kind, s, batch, vae)[first] for s in steps]
        return [_resized(Image.fromarray(c), out_size) for c in clips]
    lat = [_select(trace, kind, s, batch) for s in steps]
    if video:
        lat = [x[:, frame] for x in lat]  # (C, h, w) of the chosen latent frame
    if decoder == "linear":
        m, b = linear_decoder(trace, vae)
        rgb = latent_to_rgb(torch.stack(lat), m, b)
        return [to_image(r, out_size) for r in rgb]
    if decoder == "channels":
        return [to_image(r, out_size) for r in channels_rgb(torch.stack(lat))]

    v = _vae_of(trace, vae) or (_folder_vae(trace) if decoder == "vae" else None)
    if v is None:
        raise ValueError(f"decoder={decoder!r} needs a VAE: pass vae=pipe.vae"
                         + (" or an AutoencoderTiny" if decoder == "tiny" else "")
                         + ", or keep the pipeline alive (trace.pipeline)")
    is_tiny = type(v).__name__ == "AutoencoderTiny"
    if decoder == "tiny" and not is_tiny:
        raise TypeError(f"decoder='tiny' needs an AutoencoderTiny as vae=, got {type(v).__name__}"
                        " (e.g. AutoencoderTiny.from_pretrained('madebyollin/taesd'))")
    try:
        cache = _CACHE.setdefault(trace, {})
    except TypeError:  # not weak-referenceable: no cache
        cache = {}
    n = data.shape[0]
    keys = [(kind, int(s) % n, int(batch), id(v)) for s in steps]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        decoded = decode_vae(v, torch.stack([lat[i] for i in todo]), batch_size)
        for i, img in zip(todo, decoded):
            cache[keys[i]] = img
    return [to_image(cache[k], out_size) for k in keys]


def preview(trace: Any, kind: str = "x0", step: int = -1, batch: int = 0,
            decoder: str = "auto", vae: Any = None, size: Any = None,
            frame: int | None = None) -> Image.Image:
    """One preview image (see :func:`previews`); ``step=-1``: the last step."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    return previews(trace, kind, [step], batch, decoder, vae, size, frame=frame)[0]


def preview_array(trace: Any, kind: str = "x0", step: int = -1, batch: int = 0,
                  decoder: str = "auto", vae: Any = None, size: Any = None,
                  frame: int | None = None) -> np.ndarray:
    """Like :func:`preview`, as a uint8 ``(H, W, 3)`` array."""
    return np.asarray(preview(trace, kind, step, batch, decoder, vae, size, frame))


def _resized(im: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    if size is not None and (im.size[1], im.size[0]) != tuple(size):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    return im


def clear_cache(trace: Any = None) -> None:
    """Forget cached VAE decodes (of one trace, or all)."""
    if trace is None:
        _CACHE.clear()
    else:
        _CACHE.pop(trace, None)
