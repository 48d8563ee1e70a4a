"""The frame axis of a video trace: which trace is one, its latent frames, and which latent
frame each frame of the decoded clip comes from.

A video model's latents have ``F`` latent frames (``meta["latent_frames"]``); its VAE compresses
time by ``t`` (``meta["vae_scale_factor_temporal"]``, Wan: 4): latent frame 0 decodes to clip
frame 0 alone, latent frame ``f >= 1`` to clip frames ``1 + t (f - 1) .. t f``, so a clip has
``(F - 1) t + 1`` frames (``meta["num_frames"]``). The maps are per latent frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_video(trace: Any) -> bool:
    """Whether ``trace`` is a video model's (latents and maps with a frame axis)."""
    return (getattr(trace, "meta", None) or {}).get("latent_frames") is not None


def temporal_scale(trace: Any) -> int:
    """The VAE's temporal compression of a video trace (Wan: 4)."""
    return int(trace.meta.get("vae_scale_factor_temporal") or 4)


def check_frame(trace: Any, frame: Any) -> int | None:
    """``frame`` (a latent frame, negative from the end) as an index; None passes; ValueError
    for an image trace or a frame out of range."""
    if frame is None:
        return None
    if not is_video(trace):
        raise ValueError("frame= is for video traces (this trace has no frame axis)")
    n = int(trace.meta["latent_frames"])
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not -n <= frame < n:
        raise ValueError(f"frame={frame!r} is out of range: the trace has {n} latent frames "
                         f"(0..{n - 1}; each stands for {temporal_scale(trace)} clip frames, "
                         "the first for one)")
    return int(frame) % n


def latent_frame_of(clip_frame: int, temporal: int) -> int:
    """The latent frame a clip frame decodes from (VAE temporal compression ``temporal``)."""
    return 0 if clip_frame <= 0 else (clip_frame - 1) // temporal + 1


def first_clip_frame(latent_frame: int, temporal: int) -> int:
    """The first clip frame a latent frame decodes to."""
    return 0 if latent_frame <= 0 else 1 + temporal * (latent_frame - 1)


def latent_frames_of_clip(trace: Any) -> list[int]:
    """For each frame of the decoded clip, its latent frame."""
    if not is_video(trace):
        raise ValueError("this is not a video trace (no meta['latent_frames'])")
    t = temporal_scale(trace)
    n = (int(trace.meta["latent_frames"]) - 1) * t + 1
    return [latent_frame_of(i, t) for i in range(n)]
