"""A CFG x seed grid, the CFG delta over the run and guidance counterfactuals, as PNGs.

    python examples/guidance_and_seeds.py [--model HUB_ID --device cuda]
"""

from _common import parse, save_fig, setup


def main(argv=None):
    args = parse("guidance_and_seeds", __doc__, argv)
    pipe, prompt, a, b, steps = setup(args)
    from sdlens import plot
    from sdlens.engine.session import generate
    from sdlens.experiments.sweep import sweep

    grid = sweep(pipe, prompt, seeds=[0, 1, 2], guidance_scales=[1, 3, 7.5, 12], steps=steps, progress=False)
    print(grid)
    save_fig(grid.plot(), args.out / "grid.png")
    cell = grid.trace(guidance=7.5, seed=1)
    save_fig(plot.step_strip(cell, n=6),
             args.out / "grid_cfg7.5_seed1_steps.png")

    trace = generate(pipe, prompt, seed=0, steps=steps, guidance_scale=7.5)
    save_fig(plot.guidance_curves(trace), args.out / "cfg_delta.png")
    save_fig(plot.guidance_strip(trace, step=steps // 4, scales=(1, 3, 7.5, 12, 20)),
             args.out / "counterfactuals.png")


if __name__ == "__main__":
    main()
