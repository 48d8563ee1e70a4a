"""Trace one prompt and save everything sdlens recorded as PNGs (the quickstart notebook, no widgets).

    python examples/quickstart.py                 # the shipped model, CPU
    python examples/quickstart.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda
"""

from _common import parse, save_fig, save_image, setup


def main(argv=None):
    args = parse("quickstart", __doc__, argv)
    pipe, prompt, a, b, steps = setup(args)
    from sdlens import plot
    from sdlens.engine.session import generate

    trace = generate(pipe, prompt, seed=0, steps=steps)
    print(trace)
    print("latents", tuple(trace.latents.shape), "x0", tuple(trace.x0.shape), trace.attention)
    save_image(trace.images[0], args.out / "image.png")
    save_fig(plot.step_strip(trace, n=8), args.out / "steps.png")
    save_fig(plot.heatmap_grid(trace), args.out / "heatmaps.png")
    save_fig(plot.token_view(trace), args.out / "tokens.png")
    path = trace.save(args.out / "quickstart.sdlens")
    from sdlens.trace import load as load_trace

    loaded = load_trace(path)
    assert (loaded.x0 == trace.x0).all()
    print("saved and reloaded", path)


if __name__ == "__main__":
    main()
