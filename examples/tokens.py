"""Tokenisation, the 75-token limit, attention share per token, reweighting and ablation.

    python examples/tokens.py [--model HUB_ID --device cuda]
"""

from _common import parse, save_fig, setup


def main(argv=None):
    args = parse("tokens", __doc__, argv)
    pipe, prompt, a, b, steps = setup(args)
    import warnings

    import matplotlib.pyplot as plt

    from sdlens import plot
    from sdlens.engine.session import generate
    from sdlens.experiments.steer import reweight, token_effects
    from sdlens.analysis.tokens import tokenize, token_view

    print(tokenize(prompt, pipe))
    print(tokenize("a dreambeach circle", pipe))
    trace = generate(pipe, prompt, seed=0, steps=steps)
    print(token_view(trace))
    save_fig(plot.token_view(trace), args.out / "attention_share.png")

    long_prompt = prompt + ", " + ", ".join(["with a thin outline"] * 16) + ", on a green background"
    print("cut by the 77-token limit:", tokenize(long_prompt, pipe).truncated_words)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        long_trace = generate(pipe, long_prompt, seed=0, steps=4)
    print("trace.truncated_words:", long_trace.truncated_words[0])

    steered, base = reweight(pipe, prompt, {a: 3.0}, baseline=True, seed=0, steps=steps)
    fig, axs = plt.subplots(1, 2, figsize=(5, 2.6))
    for ax, (name, t) in zip(axs, [("original", base), (f"{a} x3", steered)]):
        ax.imshow(t.images[0])
        ax.set_title(name)
        ax.axis("off")
    save_fig(fig, args.out / "reweight.png")

    effects = token_effects(pipe, prompt, seed=0, steps=steps)
    for word, e in effects.ranked():
        print(f"{word:>8}: {e:.3f}")
    fig, axs = plt.subplots(1, len(effects.words) + 1, figsize=(1.8 * (len(effects.words) + 1), 2.2))
    axs[0].imshow(effects.image)
    axs[0].set_title("prompt")
    for ax, w in zip(axs[1:], effects.words):
        ax.imshow(effects.ablated[w])
        ax.set_title(f"- {w}")
    for ax in axs:
        ax.axis("off")
    save_fig(fig, args.out / "ablation.png")


if __name__ == "__main__":
    main()
