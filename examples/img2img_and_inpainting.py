"""img2img at three denoising strengths and inpainting with a mask taken from attention, traced.

    python examples/img2img_and_inpainting.py [--model HUB_ID --device cuda]
"""

from _common import parse, save_fig, save_image, setup


def main(argv=None):
    args = parse("img2img_and_inpainting", __doc__, argv)
    pipe, prompt, a, b, steps = setup(args)
    import numpy as np
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting
    from PIL import Image

    from sdlens import plot
    from sdlens.analysis.heatmaps import binarize, word_heatmap
    from sdlens.engine.session import generate

    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    source = generate(pipe, prompt, seed=0, steps=steps)
    init = source.images[0]
    save_image(init, args.out / "input.png")

    new_prompt = prompt.replace("red", "green")
    for strength in [0.3, 0.6, 0.9]:
        t = generate(img2img, new_prompt, seed=1, steps=steps, image=init, strength=strength)
        print(f"strength {strength}: {len(t.timesteps)} steps, first t = {float(t.timesteps[0]):.0f}")
        save_image(t.images[0], args.out / f"img2img_strength{strength}.png")
        save_fig(plot.step_strip(t, n=min(6, len(t.timesteps))), args.out / f"img2img_strength{strength}_steps.png")

    mask = Image.fromarray((binarize(word_heatmap(source, b), 0.4) * 255).astype(np.uint8))
    save_image(mask, args.out / "mask.png")
    painted = generate(inpaint, prompt.replace("blue", "green"), seed=2, steps=steps, image=init,
                       mask_image=mask, strength=1.0)
    save_image(painted.images[0], args.out / "inpainted.png")
    save_fig(plot.step_strip(painted, n=6), args.out / "inpainted_steps.png")


if __name__ == "__main__":
    main()
