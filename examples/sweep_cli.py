"""A CFG x seed grid and per-token effects from Python; the same grid from the command line.

    python examples/sweep_cli.py [--model HUB_ID --device cuda]

The same grid from the shell, also across processes with accelerate:

    sdlens sweep "a red circle and a blue square" --seeds 0-3 --cfg "1-13 [4]" --out grid.png \\
        --traces grid.sdlens
    accelerate launch --multi_gpu --num_processes 2 -m sdlens.experiments.sweep "a red circle" --seeds 0-7 \\
        --cfg 1,3,7.5,12 --out grid.png
"""

from _common import parse, save_fig, setup


def main(argv=None):
    args = parse("sweep_cli", __doc__, argv)
    pipe, prompt, a, b, steps = setup(args)
    import sdlens

    # 4 seeds x 4 guidance scales, batched into as few pipeline calls as memory allows
    grid = sdlens.sweep(pipe, prompt, seeds="0-3", guidance_scales="1-13 [4]", steps=steps)
    print(grid)
    print("cell (CFG 5, seed 2):", grid.settings(grid.index(guidance=5.0, seed=2)))
    save_fig(grid.plot(), args.out / "grid.png")
    grid.save(args.out / "grid.sdlens")
    back = sdlens.load(args.out / "grid.sdlens")
    print("reloaded:", back, "trace of cell (CFG 1, seed 0):", back.trace(guidance=1.0, seed=0))

    # what each prompt word does to the image: the image with that word's attention removed
    effects = sdlens.token_effects(pipe, prompt, seed=0, steps=steps, record=None)
    print(effects)
    save_fig(effects.plot(), args.out / "token_effects.png")
    print(f"wrote {args.out}/grid.png, grid.sdlens, token_effects.png")


if __name__ == "__main__":
    main()
