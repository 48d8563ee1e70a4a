"""IP-Adapter pipelines (SD 1.x and SDXL; plain, FaceID, masks, two adapters): traced images equal
untraced ones, the pipeline is restored, and the image-prompt tokens' maps are recorded."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import sdlens
from sdlens.analysis.tokens import IMAGE_PROMPT_POSITION
from sdlens.testing import ip_adapter_state_dict, random_pipeline
from sdlens.trace.core import Trace
from pipelines import assert_restored, call_pipe, pipe_state

EMBED = 8  # width of the image / face-ID embedding the tests pass


def ip_pipe(arch="sd15", kinds=("plain",), task="txt2img"):
    pipe = random_pipeline(arch, task=task, seed=0)
    pipe.unet._load_ip_adapter_weights(
        [ip_adapter_state_dict(pipe.unet, k, image_embed_dim=EMBED, seed=i) for i, k in enumerate(kinds)])
    return pipe


def image_embeds(kinds, images=1, cfg=True, seed=1):
    """``ip_adapter_image_embeds``: per adapter (2 if cfg (negative, positive), images, EMBED)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 if cfg else 1, images, EMBED, generator=g) for _ in kinds]


def traced_and_plain(pipe, **kw):
    plain = call_pipe(pipe, num_inference_steps=2, **kw)
    state = pipe_state(pipe)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sdlens")  # nothing skipped
        with sdlens.trace(pipe, attention_dtype=torch.float16) as tr:  # sums checked
            traced = call_pipe(pipe, num_inference_steps=2, **kw)
    assert_restored(pipe, state)
    np.testing.assert_array_equal(plain, traced)
    return tr.runs[-1]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", ["plain", "faceid"])
def test_ip_adapter_traced_faithfully_with_image_prompt_maps(arch, kind):
    pipe = ip_pipe(arch, (kind,))
    tr = traced_and_plain(pipe, ip_adapter_image_embeds=image_embeds([kind]))
    maps = tr.attention
    assert "skipped" not in tr.meta
    assert tr.meta["image_prompt_tokens"] == [4]
    n_text = len(tr.tokens[0]) - 4
    assert tr.tokens[0][n_text:] == [f"<image prompt 0:{k}>" for k in range(4)]
    assert maps.token_positions == list(range(n_text)) + [IMAGE_PROMPT_POSITION + k for k in range(4)]
    assert len(maps.layers) == len(pipe.unet.attn_processors) // 2
    for layer in maps.layers:
        m = maps[layer].float()  # (steps, batch, tokens, h, w)
        assert m.shape[:3] == (len(tr.timesteps), 1, n_text + 4)
        # the image prompt is its own softmax: its 4 tokens' maps sum to 1 at every pixel
        torch.testing.assert_close(m[:, :, n_text:].sum(2), torch.ones_like(m[:, :, 0]), atol=2e-3, rtol=0)
    img = tr.heatmap("image prompt")
    assert img.shape == (tr.meta["height"], tr.meta["width"]) or img.ndim == 2
    assert float(img.max()) > 0
    assert "image prompt" in sdlens.analysis.tokens.word_texts(tr)
    back = Trace.from_bytes(tr.to_bytes())  # the file keeps the positions
    assert back.attention.token_positions == maps.token_positions and back.tokens == tr.tokens
    torch.testing.assert_close(back.heatmap("image prompt"), img)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_ip_adapter_with_masks_and_two_adapters(arch):
    from diffusers.image_processor import IPAdapterMaskProcessor

    kinds = ("plain", "faceid")
    pipe = ip_pipe(arch, kinds)
    m0 = np.zeros((64, 64), np.float32)
    m0[:, :32] = 1
    masks = IPAdapterMaskProcessor().preprocess([torch.from_numpy(m0)[None], torch.from_numpy(1 - m0)[None]],
                                                height=64, width=64)
    masks = [masks[:1].reshape(1, 1, 64, 64), masks[1:].reshape(1, 1, 64, 64)]
    tr = traced_and_plain(pipe, ip_adapter_image_embeds=image_embeds(kinds),
                          cross_attention_kwargs={"ip_adapter_masks": masks})
    assert tr.meta["image_prompt_tokens"] == [4, 4]
    assert tr.meta["ip_adapter"]["adapters"] == 2
    first = tr.attention.get(tr.attention.layers[0], token="image prompt", batch=0)
    second = tr.attention.get(tr.attention.layers[0], token="image prompt", batch=0, occurrence=1)
    assert first.shape == second.shape and not torch.equal(first, second)


def test_ip_adapter_two_reference_images_per_adapter_and_img2img():
    pipe = ip_pipe("sd15", ("plain",), task="img2img")
    from pipelines import task_inputs

    tr = traced_and_plain(pipe, ip_adapter_image_embeds=image_embeds(["plain"], images=2),
                          **task_inputs("img2img"))
    assert tr.meta["image_prompt_tokens"] == [8]  # 2 images x 4 tokens, one softmax


def test_ip_adapter_without_guidance():
    pipe = ip_pipe("sd15", ("plain",))
    tr = traced_and_plain(pipe, guidance_scale=1.0,
                          ip_adapter_image_embeds=image_embeds(["plain"], cfg=False))
    assert not tr.do_cfg and tr.meta["image_prompt_tokens"] == [4]


def test_ip_adapter_with_a_tiny_image_encoder():
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=EMBED, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, image_size=32, patch_size=8)).eval()
    pipe = ip_pipe("sd15", ("plain",))
    pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    rng = np.random.default_rng(0)
    ref = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    tr = traced_and_plain(pipe, ip_adapter_image=ref)
    assert tr.meta["image_prompt_tokens"] == [4]


def test_reweighting_the_text_with_an_ip_adapter():
    """The equalizer edits the text part of an IP-Adapter site (weight 1: bit-identical)."""
    pipe = ip_pipe("sd15", ("plain",))
    kw = dict(ip_adapter_image_embeds=image_embeds(["plain"]), output_type="np")
    base = sdlens.generate(pipe, "a red circle", seed=0, steps=2, **kw)
    same = sdlens.generate(pipe, "a red circle", seed=0, steps=2, reweight={"red": 1.0}, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sdlens")
        more = sdlens.generate(pipe, "a red circle", seed=0, steps=2, reweight={"red": 3.0}, **kw)
    assert more.meta["image_prompt_tokens"] == [4] and "skipped" not in more.meta
    assert torch.equal(base.latents, same.latents)
    assert not torch.equal(base.latents, more.latents)
