"""Video diffusion traced: Wan 2.1's per-word heatmaps per latent frame, each word's activity over
time, and a heatmap-over-video GIF per word.

    python examples/video.py [--model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --device cuda]

Without --model it runs a random-weight Wan 2.1 test bed (the real architecture, shrunk; its
videos are noise and its maps show no objects): the figures show what sdlens records, not what
a trained model attends to.
"""

from _common import parse, save_fig


def main(argv=None):
    args = parse("video", __doc__, argv)
    import sdlens
    from matplotlib.figure import Figure

    from sdlens import plot

    if args.model is None:
        from sdlens.testing import random_pipeline

        pipe = random_pipeline("wan", seed=0)
        size, frames = dict(height=64, width=64), 9
    else:
        pipe = sdlens.load_pipeline(args.model, device=args.device)
        size, frames = {}, 33
    print(sdlens.describe(pipe))
    prompt, words, steps = "a red circle rolling on the beach", ["circle", "beach"], args.steps or 4
    trace = sdlens.generate(pipe, prompt, seed=0, steps=steps, num_frames=frames,
                            output_type="latent", attention_steps=slice(None), **size)
    n = trace.meta["latent_frames"]
    fig = Figure(figsize=(2.0 * n, 2.2 * len(words)), layout="constrained")
    axes = fig.subplots(len(words), n, squeeze=False)
    for i, word in enumerate(words):
        heat = trace.heatmap(word)  # (latent frames, H, W), normalised over the clip
        for f in range(n):
            axes[i, f].imshow(heat[f].numpy(), cmap="jet", vmin=0, vmax=1)
            axes[i, f].set_title(f"{word!r} · frame {f}", fontsize=8)
            axes[i, f].set_axis_off()
    save_fig(fig, args.out / "heatmaps_per_frame.png")
    save_fig(plot.word_activity(trace, words), args.out / "word_activity.png")
    for word in words:
        print("wrote", plot.heatmap_video(trace, word, args.out / f"{word}.gif", fps=4))


if __name__ == "__main__":
    main()
