"""x_t vs x0 over the steps, the scheduler's curves, and three samplers compared.

    python examples/denoising.py [--model HUB_ID --device cuda]
"""

from _common import parse, save_fig, setup


def main(argv=None):
    args = parse("denoising", __doc__, argv)
    pipe, prompt, a, b, steps = setup(args)
    import matplotlib.pyplot as plt

    from sdlens import plot
    from sdlens.analysis.compare import compare
    from sdlens.pipeline import make_scheduler
    from sdlens.engine.session import generate

    trace = generate(pipe, prompt, seed=0, steps=steps)
    save_fig(plot.step_strip(trace, n=8), args.out / "x_t_vs_x0.png")
    save_fig(plot.scheduler_curves(trace), args.out / "scheduler.png")

    original, traces = pipe.scheduler, {}
    try:
        for name in ["ddim", "euler", "dpm++"]:
            pipe.scheduler = make_scheduler(name, original.config)
            traces[name] = generate(pipe, prompt, seed=0, steps=steps)
    finally:
        pipe.scheduler = original
    fig, axs = plt.subplots(1, len(traces), figsize=(2.4 * len(traces), 2.6))
    for ax, (name, t) in zip(axs, traces.items()):
        ax.imshow(t.images[0])
        ax.set_title(name)
        ax.axis("off")
    save_fig(fig, args.out / "samplers.png")
    for name, t in traces.items():
        save_fig(plot.step_strip(t, n=6), args.out / f"steps_{name.replace('+', 'p')}.png")
    print(compare(traces["ddim"], traces["euler"]).summary())


if __name__ == "__main__":
    main()
