"""The backbone seam (engine/arch): the UNet adapter, its naming without a pipeline, and one
clear error for pipelines sdlens does not support."""

from __future__ import annotations


import pytest
import torch

import diffusers
from sdlens.engine.arch import adapter_for, naming_for
from sdlens.engine.arch.unet import UNetAdapter
from sdlens.engine.session import trace
from sdlens.engine.sites import Hooks
from sdlens.pipeline import describe
from pipelines import cached_pipe, call_pipe


def test_unet_adapter():
    pipe = cached_pipe("sd15")
    adapter = adapter_for(pipe)
    assert isinstance(adapter, UNetAdapter) and adapter.denoiser is pipe.unet
    sites = adapter.sites()
    assert sites == sorted(k[: -len(".processor")] for k in pipe.unet.attn_processors
                           if k.endswith(".attn2.processor")) != []  # (down < mid < up, here)
    assert [adapter.site_of(k) for k in pipe.unet.attn_processors if ".attn1." in k] == \
        [None] * len(sites)
    res = adapter.resolutions((8, 8))
    assert res[sites[0]] == (8, 8) and res["mid_block.attentions.0.transformer_blocks.0.attn2"] == (1, 1)
    assert adapter.heads(sites[0]) == pipe.unet.get_submodule(sites[0]).heads
    assert adapter.family() == "sd1" and adapter.default_latent_hw() == (8, 8)
    assert adapter.latent_channels() == 4 and adapter.max_text_tokens == 77
    x = torch.arange(6.0)[:, None]
    assert adapter.cfg_rows(3) == {"uncond": slice(0, 3), "text": slice(3, 6)}
    halves = adapter.split_cfg(x)
    assert halves["uncond"].flatten().tolist() == [0, 1, 2] and halves["text"][0].item() == 3
    seen = []
    with Hooks() as hooks:
        hooks.forward_pre_hook(adapter.denoiser, lambda m, a, k: seen.append(
            ("in", adapter.denoiser_input(a, k).shape[0])), with_kwargs=True)
        hooks.forward_hook(adapter.denoiser, lambda m, a, k, o: seen.append(
            ("out", adapter.denoiser_output(o).shape[0])), with_kwargs=True)
        call_pipe(pipe, num_inference_steps=1, guidance_scale=1.0)
    assert seen == [("in", 1), ("out", 1)]
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks


def test_unet_naming_without_a_pipeline():
    naming = naming_for("sdxl")
    assert naming is naming_for(None) is naming_for("shapes")
    site = "up_blocks.1.attentions.2.transformer_blocks.3.attn2"
    assert naming.alias(site) == "up.1.2.3" and naming.expand("up.1.2.3") + ".attn2" == site
    assert naming.alias("mid_block.attentions.0.transformer_blocks.0.attn2") == "mid"
    assert naming.expand("mid") == "mid_block" and naming.expand("sideways") is None
    assert naming.expand("down.1.0.0.0") is None
    assert [naming.group(s) for s in ("down_blocks.2.attentions.0.transformer_blocks.0.attn2",
                                      "mid_block.attentions.0.transformer_blocks.0.attn2", site)] \
        == ["down", "mid", "up"]
    assert sorted([site, "mid_block.x", "down_blocks.10.y", "down_blocks.2.y"],
                  key=naming.sort_key) == ["down_blocks.2.y", "down_blocks.10.y", "mid_block.x", site]
    with pytest.raises(ValueError, match="unknown model family 'kandinsky'.*sd1"):
        naming_for("kandinsky")
    # saved traces resolve selectors through their family's naming
    from sdlens.trace import AttentionMaps

    maps = AttentionMaps({site: torch.zeros(1, 1, 3, 2, 2)}, {site: (2, 2)}, [0], [0, 1, 2],
                         family="sdxl")
    assert maps.names("up.1") == [site] and maps.alias(site) == "up.1.2.3"
    with pytest.raises(ValueError, match="unknown model family"):
        AttentionMaps({}, {}, [], [], family="kandinsky")


def test_unsupported_pipelines():
    class FakeSD3:
        transformer = object()

    with pytest.raises(TypeError, match="transformer.*StableDiffusionPipeline"):
        trace(FakeSD3())
    with pytest.raises(TypeError, match="transformer.*StableDiffusionPipeline"):
        describe(FakeSD3())
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, mid_block_type=None, layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=32)
    pipe = cached_pipe("sd15")

    class NoCross:
        def __init__(self):
            self.unet, self.scheduler, self.tokenizer = unet, pipe.scheduler, pipe.tokenizer

    with pytest.raises(TypeError, match="no cross-attention"):
        trace(NoCross())


def test_what_the_rest_of_sdlens_asks_the_adapters():
    """The questions engine/batch.py and the experiments ask instead of reading the pipeline's
    components: CFG halves joined back, the denoiser's output tensor, guidance as an input, the
    text encoders on the text axis and their token embeddings."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from sdlens.testing import random_pipeline

    sdxl = adapter_for(cached_pipe("sdxl"))
    x = torch.arange(6.0)[:, None]
    assert torch.equal(sdxl.join_cfg(sdxl.split_cfg(x)), x)
    t, new = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    assert sdxl.output_tensor((t, None)) is t and sdxl.output_tensor("no tensor") is None
    out = sdxl.with_output_tensor((t, "rest"), new)
    assert out[0] is new and out[1] == "rest"
    dc = sdxl.with_output_tensor(UNet2DConditionOutput(sample=t), new)
    assert sdxl.output_tensor(dc) is new and sdxl.denoiser_output(dc) is new
    pixart = adapter_for(random_pipeline("pixart", seed=0))
    both = torch.randn(2, 8, 8, 8)  # learned sigmas: noise and variance channels
    assert pixart.output_tensor((both,)) is both and pixart.denoiser_output((both,)).shape[1] == 4

    sd3 = adapter_for(random_pipeline("sd3", seed=0))
    flux = adapter_for(random_pipeline("flux", seed=0))
    assert [a.embeds_guidance() for a in (sdxl, pixart, sd3, flux)] == [False, False, False, True]
    assert [a.distilled_guidance() for a in (sdxl, pixart, sd3, flux)] == [False] * 3 + [True]

    def layout(adapter, params):
        return [(e.name, e.start, e.length) for e in adapter.text_encoders(params)]

    assert layout(sdxl, {}) == [("text_encoder", 0, 77), ("text_encoder_2", 0, 77)]
    assert layout(sd3, {"max_sequence_length": 64}) == [
        ("text_encoder", 0, 77), ("text_encoder_2", 0, 77), ("text_encoder_3", 77, 64)]
    assert layout(adapter_for(random_pipeline("sd3", seed=0, t5=False)), {}) == [
        ("text_encoder", 0, 77), ("text_encoder_2", 0, 77)]
    assert layout(flux, {"max_sequence_length": 128}) == [("text_encoder_2", 0, 128)]
    assert layout(pixart, {}) == [("text_encoder", 0, 300)]
    for adapter in (sdxl, sd3, flux, pixart):
        for enc in adapter.text_encoders({}):
            assert enc.tokenizer is getattr(adapter.pipe, enc.name.replace("text_encoder",
                                                                           "tokenizer"))
            embeddings = adapter.token_embeddings(enc.encoder)
            assert enc.encoder.get_input_embeddings() in embeddings
