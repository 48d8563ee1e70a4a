"""A video trace's clip: its frames as RGB, and which latent frame each video frame comes from.

A video model's latents have ``F`` latent frames; its VAE compresses time by ``t``
(``meta["vae_scale_factor_temporal"]``, Wan: 4): latent frame 0 decodes to video frame 0 alone,
latent frame ``f >= 1`` to video frames ``1 + t (f - 1) .. t f``, so a clip has ``(F - 1) t + 1``
frames (``meta["num_frames"]``). The maps are per latent frame; :func:`latent_frame_of` maps a
video frame back to its latent frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sdlens.analysis.heatmaps import is_video, output_size
from sdlens.analysis.previews import channels_rgb


def _check(trace: Any) -> None:
    if not is_video(trace):
        raise ValueError("this is not a video trace (no meta['latent_frames'])")


def latent_frame_of(video_frame: int, temporal: int) -> int:
    """The latent frame a video frame decodes from (VAE temporal compression ``temporal``)."""
    return 0 if video_frame <= 0 else (video_frame - 1) // temporal + 1


def latent_frames_of_clip(trace: Any) -> list[int]:
    """For each frame of the decoded clip, its latent frame."""
    _check(trace)
    t = int(trace.meta.get("vae_scale_factor_temporal") or 4)
    n = (int(trace.meta["latent_frames"]) - 1) * t + 1
    return [latent_frame_of(i, t) for i in range(n)]


def decode_clip(trace: Any, kind: str = "x0", step: int = -1, batch: int = 0,
                vae: Any = None) -> np.ndarray:
    """The clip of one step's latents (``kind`` "x0" or "latents") as uint8 ``(frames, H, W,
    3)``: decoded by the VAE where one is at hand (the traced pipeline's, or ``vae=``), as the
    Wan pipelines decode (``z / latents_std + latents_mean``); else the latents' first three
    channels per latent frame, upsampled to the video size and repeated over the frames each
    latent frame stands for (a preview, no VAE needed)."""
    _check(trace)
    if kind not in ("x0", "latents"):
        raise ValueError(f"kind must be 'x0' or 'latents', got {kind!r}")
    lat = getattr(trace, kind)
    if lat is None:
        raise ValueError(f"the trace did not record {kind}")
    z = lat[step, batch].float()  # (C, F, h, w)
    pipe = trace.pipeline
    vae = getattr(vae, "vae", vae) if vae is not None else getattr(pipe, "vae", None)
    cfg = getattr(vae, "config", None)
    if vae is not None and cfg is not None and cfg.get("latents_mean") is not None:
        param = next(iter(vae.parameters()))
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        with torch.no_grad():
            x = vae.decode((z[None] * std + mean).to(param.device, param.dtype)).sample
        x = x[0].float().clamp(-1, 1).cpu().permute(1, 2, 3, 0)  # (frames, H, W, 3)
    else:
        H, W = output_size(trace)
        rgb = channels_rgb(z.transpose(0, 1))  # (F, 3, h, w)
        rgb = F.interpolate(rgb, size=(H, W), mode="nearest")
        x = rgb[latent_frames_of_clip(trace)].permute(0, 2, 3, 1)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
