"""A CFG x seed grid from Python and from the command line.

    python examples/sweep_cli.py                    # the shipped model (or a tiny random one)

The same from the shell (``sdlens sweep`` once the CLI registers it; ``python -m sdlens.sweep``
always works), also across processes with accelerate:

    sdlens sweep "a red circle and a blue square" --seeds 0-3 --cfg "1-13 [4]" --out grid.png \\
        --traces grid.sdlens
    accelerate launch --multi_gpu --num_processes 2 -m sdlens.sweep "a red circle" --seeds 0-7 \\
        --cfg 1,3,7.5,12 --out grid.png
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")

S = __import__("importlib").import_module("sdlens.sweep")  # noqa: E402 (sdlens.sweep: the function once exported)
from sdlens.pipeline import SHIPPED_MODEL, load_pipeline  # noqa: E402
from sdlens.steer import token_effects  # noqa: E402
from sdlens.testing import random_pipeline  # noqa: E402


def main() -> None:
    if (SHIPPED_MODEL / "model_index.json").exists():
        pipe = load_pipeline(device="cpu")
    else:
        print("the shipped model is not built yet: using a tiny random-weight pipeline")
        pipe = random_pipeline("shapes")
    prompt = "a red circle and a blue square"
    grid = S.sweep(pipe, prompt, seeds=S.parse_axis("0-3", int),
                   guidance_scales=S.parse_axis("1-13 [4]"), steps=20)
    print(grid)
    print("cell (CFG 5, seed 2):", grid.settings(grid.index(guidance=5.0, seed=2)))
    grid.plot().savefig("grid.png", dpi=100)
    grid.save("grid.sdlens")
    back = S.Grid.load("grid.sdlens")
    print("reloaded:", back, "trace of one cell:", back.traces[1, 2])
    fx = token_effects(pipe, prompt, seed=0, steps=20, record=None)
    print(fx)
    fx.plot().savefig("token_effects.png", dpi=100)
    print("wrote grid.png, grid.sdlens, token_effects.png")


if __name__ == "__main__":
    main()
