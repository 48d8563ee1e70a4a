"""SD3 traced like the UNet models: the step strip (x_t, x0, the velocity), word maps per block,
the CLIP / T5 tokens and a CFG x seed grid, as PNGs.

    python examples/diffusion_transformers.py [--model SD3_FOLDER_OR_HUB_ID --device cuda]

Without --model it runs a random-weight SD3 test bed (the real architecture, shrunk; its images
are noise and its maps show no objects) until a shipped transformer model exists.
"""

from _common import parse, save_fig


def main(argv=None):
    args = parse("diffusion_transformers", __doc__, argv)
    import sdlens
    from matplotlib.figure import Figure

    from sdlens import plot

    if args.model is None:  # the test bed; later: sdlens.load_pipeline("shapes-mmdit")
        from sdlens.testing import random_pipeline

        pipe = random_pipeline("sd3", seed=0)
    else:
        pipe = sdlens.load_pipeline(args.model, device=args.device)
    print(sdlens.describe(pipe))
    prompt, words, steps = "a red circle and a blue square", ["circle", "square"], args.steps or 4

    trace = sdlens.generate(pipe, prompt, seed=0, steps=steps, guidance_scale=5.0)
    save_fig(plot.step_strip(trace, n=min(steps, 6)), args.out / "steps.png")
    blocks = trace.attention.layers
    fig = Figure(figsize=(2.4 * len(words), 2.4 * len(blocks)), layout="constrained")
    axes = fig.subplots(len(blocks), len(words), squeeze=False)
    for i, block in enumerate(blocks):
        for j, word in enumerate(words):
            plot.overlay(trace, word, ax=axes[i, j], layers=block, colorbar=False,
                         title=f"{word!r} · {trace.attention.alias(block)}")
    save_fig(fig, args.out / "maps_per_block.png")
    save_fig(plot.token_view(trace), args.out / "tokens.png")

    grid = sdlens.sweep(pipe, prompt, seeds=[0, 1], guidance_scales=[1, 3, 5], steps=steps,
                        progress=False)
    save_fig(grid.plot(), args.out / "grid.png")


if __name__ == "__main__":
    main()
