"""Shared by the example scripts: command line, pipeline loading, saving figures and images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse(name: str, doc: str, argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="None (default): the shipped shapes model on the CPU; or a hub id such as "
                         "stable-diffusion-v1-5/stable-diffusion-v1-5 (with --device cuda)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 30 for hub models)")
    ap.add_argument("--out", default=f"out/examples/{name}", help="folder for the PNGs")
    args = ap.parse_args(argv)
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def setup(args):
    """(pipe, prompt, thing_a, thing_b, steps) for the chosen model."""
    import sdlens

    pipe = sdlens.load_pipeline(args.model, device=args.device)
    shapes = args.model is None
    prompt = "a red circle and a blue square" if shapes else "a red apple and a blue cup on a wooden table"
    a, b = ("circle", "square") if shapes else ("apple", "cup")
    steps = args.steps or (20 if shapes else 30)
    print(sdlens.describe(pipe))
    return pipe, prompt, a, b, steps


def save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print("wrote", path)


def save_image(img, path: Path) -> None:
    img.save(path)
    print("wrote", path)
