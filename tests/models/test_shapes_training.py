"""The training recipe's pieces: the attention loss scores maps the way its docstring says
(synthetic maps), and the model card describes the UNet that ships."""

import torch

from sdlens.models.shapes.train import attention_loss


def _scene(word_maps):
    """One 4x4 attention layer, one caption with one object (tokens 1 = colour, 2 = shape) in the
    top-left 2x2 block; ``word_maps`` (2, 4, 4) the two words' attention per pixel."""
    r, tokens = 4, 8
    probs = torch.full((1, r * r, tokens), 0.0)
    probs[0, :, 1] = word_maps[0].flatten()
    probs[0, :, 2] = word_maps[1].flatten()
    probs[0, :, 0] = 1 - probs[0, :, 1:3].sum(-1)  # the rest on <|startoftext|>
    mask = torch.zeros(1, 2, r, r)
    mask[0, 0, :2, :2] = 1
    obj_tokens = torch.tensor([[[1, 2], [-1, -1]]])
    return [probs], obj_tokens, {r: mask}, torch.tensor([True])


def test_flat_maps_on_their_object_cost_nothing():
    maps = torch.zeros(2, 4, 4)
    maps[:, :2, :2] = 0.4  # each word: 0.4 everywhere on its object, nothing elsewhere
    loc, use, cover = attention_loss(*_scene(maps))
    assert loc.item() < 1e-6 and use.item() < 1e-6 and cover.item() < 1e-6


def test_a_peak_at_the_centre_is_localised_but_not_covering():
    maps = torch.zeros(2, 4, 4)
    maps[0, :2, :2] = 0.5       # colour word covers the object
    maps[1, 0, 0] = 0.45        # shape word: one pixel of it
    loc, use, cover = attention_loss(*_scene(maps))
    assert loc.item() < 1e-6     # all of both words' mass is inside the object
    assert use.item() < 1e-6     # the two words together take >= 0.5 everywhere on it
    # the shape word is below half its peak on 3 of the object's 4 pixels: 0.5 * 3/4 over 2 words
    assert abs(cover.item() - 0.5 * 0.75 / 2) < 1e-5


def test_attention_outside_the_object_is_penalised():
    maps = torch.zeros(2, 4, 4)
    maps[:, 2:, 2:] = 0.4       # both words on the wrong quarter
    loc, use, cover = attention_loss(*_scene(maps))
    assert abs(loc.item() - 1.0) < 1e-6 and abs(use.item() - 0.5) < 1e-6 and abs(cover.item() - 0.5) < 1e-6


def test_dropped_captions_are_ignored():
    maps = torch.zeros(2, 4, 4)
    store, tok, masks, _ = _scene(maps)
    loc, use, cover = attention_loss(store, tok, masks, torch.tensor([False]))
    assert loc == use == cover == 0.0


def test_model_card_describes_the_shipped_unet():
    """The card's UNet row is read from ``architecture``; it must match the shipped weights."""
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from sdlens.models.shapes.evaluate import unet_description

    folder = Path(__file__).resolve().parents[2] / "sdlens/models/shapes/weights/unet"
    shipped = UNet2DConditionModel.from_pretrained(folder)
    desc = unet_description()
    channels = json.loads((folder / "config.json").read_text())["block_out_channels"]
    assert desc["text"].startswith(f"{'/'.join(map(str, channels))} channels, {len(channels)} levels")
    # where the shipped UNet's attn2 layers really run: their query counts in one forward
    sizes = {}

    def seen(module, args, kwargs):
        n = (args[0] if args else kwargs["hidden_states"]).shape[1]
        sizes[n] = sizes.get(n, 0) + 1

    hooks = [m.register_forward_pre_hook(seen, with_kwargs=True)
             for name, m in shipped.named_modules() if name.endswith("attn2")]
    with torch.no_grad():
        shipped(torch.zeros(1, 4, 16, 16), 10, torch.zeros(1, 77, 64))
    for h in hooks:
        h.remove()
    side = {n: int(round(n ** 0.5)) for n in sizes}
    where = ", ".join(f"{k} at {side[n]}x{side[n]}" for n, k in sorted(sizes.items(), reverse=True))
    assert f"{sum(sizes.values())} cross-attention layers ({where})" in desc["text"]
    assert desc["params"] == sum(p.numel() for p in shipped.parameters())


def test_the_shipped_schedule_replays_the_shipped_learning_rates():
    """--schedule shipped (the fair ablation's) gives, step for step, the learning rates the
    shipped UNet stage's time-budgeted runs had (training.json): fully annealed to 10% at the end
    of the 72-minute run (step 2,250), a warm restart at ~6.3e-4, annealed again at step 5,700."""
    import json
    import math

    from sdlens.models.shapes.train import SCHEDULES, TOKENIZER_DIR

    lr = lambda step: 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * SCHEDULES["shipped"](step))))  # noqa: E731
    assert abs(lr(2250) - 1e-4) < 1e-9 and abs(lr(5700) - 1e-4) < 1e-9
    assert abs(lr(2251) - 6.3e-4) < 1e-5
    assert all(lr(s) >= lr(s + 1) for s in range(200, 2250)) and lr(2251) > lr(2250)
    facts = json.loads((TOKENIZER_DIR.parent / "training.json").read_text())
    assert facts["unet_steps"] == 5700 and "6.3e-4" in facts["schedule"]
