"""Per-token heatmaps, how a word's map forms over steps, layers compared, attribute binding.

    python examples/attention.py [--model HUB_ID --device cuda]
"""

from _common import parse, save_fig, setup


def main(argv=None):
    args = parse("attention", __doc__, argv)
    pipe, prompt, a, b, steps = setup(args)
    import matplotlib.pyplot as plt

    from sdlens import plot
    from sdlens.analysis.heatmaps import binarize, commitments, iou, word_heatmap
    from sdlens.engine.session import generate

    trace = generate(pipe, prompt, seed=0, steps=steps)
    save_fig(plot.heatmap_grid(trace), args.out / "heatmaps.png")
    save_fig(plot.heatmap_steps(trace, a, n=8), args.out / f"{a}_over_steps.png")
    words = ["red", "blue", a, b]
    for c in commitments(trace, words):
        print(f"{c.word:>8}: commits at step {c.step}")
    save_fig(plot.commitment_curves(trace, words), args.out / "commitment.png")

    res = sorted({max(trace.attention.resolution(l)) for l in trace.attention.layers}, reverse=True)
    fig, axs = plt.subplots(1, len(res) + 1, figsize=(2.2 * (len(res) + 1), 2.4))
    axs[0].imshow(trace.images[0])
    axs[0].set_title("image")
    for ax, r in zip(axs[1:], res):
        ax.imshow(word_heatmap(trace, a, layers=r), cmap="jet")
        ax.set_title(f"{a} @ {r}x{r}")
    for ax in axs:
        ax.axis("off")
    save_fig(fig, args.out / "layers.png")

    maps = {w: word_heatmap(trace, w) for w in words}
    print("attribute binding (IoU of thresholded maps):")
    print(f"{'':>8} {a:>8} {b:>8}")
    for colour in ["red", "blue"]:
        print(f"{colour:>8} " + " ".join(f"{iou(maps[colour], binarize(maps[t])):8.2f}" for t in [a, b]))


if __name__ == "__main__":
    main()
