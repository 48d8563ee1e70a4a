"""Random-weight pipelines of the real Stable Diffusion architectures, for tests and benchmarks.

No weights can be downloaded here, so tests run on pipelines built from the real architecture
configs (SD 1.5, SD 2.1, SDXL, and the shipped "shapes" model) with random weights:

>>> pipe = random_pipeline("sd15")                 # shrunk: fast enough for unit tests
>>> pipe = random_pipeline("sd15", scale=1.0)      # the full 859M-parameter UNet (benchmarks)
>>> pipe = random_pipeline("sdxl", task="inpaint") # 9-channel UNet, StableDiffusionXLInpaintPipeline
>>> refiner = random_pipeline("sdxl-refiner")      # SDXL refiner: text_encoder_2 only, img2img

``scale`` multiplies every channel count (rounded to a multiple of 16) and, below 0.5, keeps one
resnet / transformer layer per block; block types, attention layout, cross-attention widths'
structure, prediction type and scheduler are those of the real model. The tokenizer is the real
CLIP BPE tokenizer (see ``sdlens.models.shapes.tokenizer``); SD 2.x and SDXL's second tokenizer
pad with "!" as OpenCLIP does.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("sd15", "sd21", "sdxl", "sdxl-refiner", "shapes")
TASKS = ("txt2img", "img2img", "inpaint")
TOKENIZER_DIR = Path(__file__).parent / "models" / "shapes" / "weights" / "tokenizer"

# The real UNet / text encoder / VAE hyper-parameters (from the hub configs of
# stable-diffusion-v1-5, stable-diffusion-2-1 and stable-diffusion-xl-base-1.0).
_SD15 = dict(
    unet=dict(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
        sample_size=64,
    ),
    text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)],
    vae=dict(block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215, sample_size=512),
    scheduler=("PNDMScheduler", dict(skip_prk_steps=True)),
    prediction_type="epsilon",
)
_SD21 = dict(
    unet=dict(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True,
        sample_size=96,
    ),
    text=[dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
               num_attention_heads=16, hidden_act="gelu", projection_dim=512)],
    vae=dict(block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215, sample_size=768),
    scheduler=("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    prediction_type="v_prediction",
)
_SDXL = dict(
    unet=dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, sample_size=128,
    ),
    text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
          dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
               num_attention_heads=20, hidden_act="gelu", projection_dim=1280)],
    vae=dict(block_out_channels=(128, 256, 512, 512), scaling_factor=0.13025, sample_size=1024),
    scheduler=("EulerDiscreteScheduler", dict(timestep_spacing="leading")),
    prediction_type="epsilon",
)
# stable-diffusion-xl-refiner-1.0: only the OpenCLIP bigG encoder; 5 time ids (aesthetic score).
_SDXL_REFINER = dict(
    unet=dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(384, 768, 1536, 1536), layers_per_block=2,
        transformer_layers_per_block=(4, 4, 4, 4), attention_head_dim=(6, 12, 24, 24),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, sample_size=128, n_time_ids=5,
    ),
    text=[_SDXL["text"][1]],
    vae=_SDXL["vae"],
    scheduler=_SDXL["scheduler"],
    prediction_type="epsilon",
)


def _shrink(c: int, scale: float) -> int:
    return c if scale >= 1 else max(16, int(round(c * scale / 16)) * 16)


def _unet(cfg: dict, scale: float, cross_dim: int, in_channels: int, proj_dim: int | None,
          sample_size: int | None):
    from diffusers import UNet2DConditionModel

    cfg = dict(cfg)
    n_time_ids = cfg.pop("n_time_ids", 6)
    channels = tuple(_shrink(c, scale) for c in cfg.pop("block_out_channels"))
    heads = cfg.pop("attention_head_dim")
    if scale < 1:
        # SD 1.x counts heads (8); SD 2.x / SDXL count 64-wide heads: keep the same rule.
        heads = 8 if isinstance(heads, int) else tuple(max(1, c // 64) for c in channels)
        if isinstance(heads, int) and min(channels) % heads:
            heads = 4
        cfg["layers_per_block"] = 1 if scale < 0.5 else cfg["layers_per_block"]
        if "transformer_layers_per_block" in cfg:
            cfg["transformer_layers_per_block"] = tuple(
                max(1, round(n * scale)) for n in cfg["transformer_layers_per_block"])
        if "addition_time_embed_dim" in cfg:
            cfg["addition_time_embed_dim"] = 8
    if cfg.get("addition_embed_type") == "text_time":
        cfg["projection_class_embeddings_input_dim"] = (n_time_ids * cfg["addition_time_embed_dim"]
                                                        + proj_dim)
    if sample_size is not None:
        cfg["sample_size"] = sample_size
    return UNet2DConditionModel(
        in_channels=in_channels, out_channels=4, block_out_channels=channels,
        attention_head_dim=heads, cross_attention_dim=cross_dim,
        norm_num_groups=32 if scale >= 1 else 8, **cfg)


def _text(cfg: dict, scale: float, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(cfg)
    if scale < 1:
        heads = 2
        hidden = max(32, int(round(cfg["hidden_size"] * scale / 32)) * 32)
        cfg.update(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=heads,
                   num_hidden_layers=2, projection_dim=hidden)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407, **cfg)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(cfg: dict, scale: float):
    from diffusers import AutoencoderKL

    cfg = dict(cfg)
    channels = tuple(_shrink(c, scale / 4) if scale < 1 else c for c in cfg.pop("block_out_channels"))
    n = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=2 if scale >= 1 else 1, norm_num_groups=32 if scale >= 1 else 8, **cfg)


def tokenizer(pad_token: str | None = None):
    """The real CLIP tokenizer (SD 1.x); ``pad_token="!"`` gives SD 2.x / SDXL-2's padding."""
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, **kwargs)


def random_pipeline(arch: str = "sd15", scale: float = 0.05, task: str = "txt2img",
                    seed: int = 0, sample_size: int | None = None,
                    prediction_type: str | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32):
    """A diffusers pipeline of a real SD architecture with random (seeded) weights.

    Args:
        arch: "sd15", "sd21" (v-prediction), "sdxl", "sdxl-refiner" (text_encoder_2 /
            tokenizer_2 only, aesthetic-score time ids; an img2img pipeline: task "txt2img" gives
            StableDiffusionXLImg2ImgPipeline), or "shapes" (the shipped model's layout).
        scale: channel multiplier; 1.0 is the real size, the default 0.05 a ~1-4M-parameter
            version that keeps every block type and attention layer of the real one.
        task: "txt2img", "img2img" or "inpaint" (inpainting UNets take 9 input channels).
        seed: seeds the weights.
        sample_size: the UNet's latent size (default: 8 when shrunk, the real one at scale 1).
        prediction_type: override the scheduler's ("epsilon", "v_prediction", "sample").
    """
    import diffusers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    torch.manual_seed(seed)
    in_channels = 9 if task == "inpaint" else 4
    if arch == "shapes":
        from sdlens.models.shapes import architecture as shapes_arch

        unet = shapes_arch.unet()
        if in_channels != 4:
            cfg = dict(unet.config)
            cfg["in_channels"] = in_channels
            unet = diffusers.UNet2DConditionModel.from_config(cfg)
        components = dict(unet=unet, vae=shapes_arch.vae(), text_encoder=shapes_arch.text_encoder(),
                          tokenizer=tokenizer(), scheduler=shapes_arch.scheduler())
        family = "sd"
    else:
        spec = {"sd15": _SD15, "sd21": _SD21, "sdxl": _SDXL, "sdxl-refiner": _SDXL_REFINER}[arch]
        refiner = arch == "sdxl-refiner"
        texts = [_text(c, scale, with_projection=(i == 1 or refiner))
                 for i, c in enumerate(spec["text"])]
        cross_dim = sum(t.config.hidden_size for t in texts)
        proj_dim = texts[-1].config.projection_dim if arch.startswith("sdxl") else None
        size = sample_size or (None if scale >= 1 else 8)
        unet = _unet(spec["unet"], scale, cross_dim, in_channels, proj_dim, size)
        vae = _vae(spec["vae"], scale)
        sched_name, sched_kwargs = spec["scheduler"]
        scheduler = getattr(diffusers, sched_name)(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", steps_offset=1,
            prediction_type=prediction_type or spec["prediction_type"], **sched_kwargs)
        components = dict(unet=unet, vae=vae, text_encoder=texts[0], scheduler=scheduler,
                          tokenizer=tokenizer("!" if arch == "sd21" else None))
        if arch == "sdxl":
            components.update(text_encoder_2=texts[1], tokenizer_2=tokenizer("!"))
        if refiner:
            components.update(text_encoder=None, tokenizer=None, text_encoder_2=texts[0],
                              tokenizer_2=tokenizer("!"), requires_aesthetics_score=True)
            task = "img2img" if task == "txt2img" else task
        family = "sdxl" if arch.startswith("sdxl") else "sd"
    if prediction_type and arch == "shapes":
        components["scheduler"].register_to_config(prediction_type=prediction_type)
    prefix = {"sd": "StableDiffusion", "sdxl": "StableDiffusionXL"}[family]
    suffix = {"txt2img": "Pipeline", "img2img": "Img2ImgPipeline", "inpaint": "InpaintPipeline"}[task]
    cls = getattr(diffusers, prefix + suffix)
    if family == "sd":
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls(**components)
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ip_adapter_state_dict(unet, kind: str = "plain", image_embed_dim: int = 8,
                          num_tokens: int = 4, seed: int = 0) -> dict:
    """A random-weight IP-Adapter for ``unet`` in the layout of the released checkpoints
    (``{"image_proj": ..., "ip_adapter": ...}``), for
    ``unet._load_ip_adapter_weights([...])`` / ``pipe.load_ip_adapter``.

    Args:
        kind: "plain" (``ImageProjection``: 4 tokens from a CLIP image embedding) or "faceid"
            (``IPAdapterFaceIDImageProjection``: ``num_tokens`` tokens from a face-ID embedding).
        image_embed_dim: the width of the image (or face-ID) embedding the pipeline is given.
    """
    if kind not in ("plain", "faceid"):
        raise ValueError(f"unknown IP-Adapter kind {kind!r}; allowed: plain, faceid")
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    cross = unet.config.cross_attention_dim
    if kind == "plain":
        num_tokens = 4  # what diffusers' loader assumes for this layout
        image_proj = {"proj.weight": rand(cross * num_tokens, image_embed_dim),
                      "proj.bias": rand(cross * num_tokens)}
    else:
        mult = 2
        image_proj = {"proj.0.weight": rand(image_embed_dim * mult, image_embed_dim),
                      "proj.0.bias": rand(image_embed_dim * mult),
                      "proj.2.weight": rand(cross * num_tokens, image_embed_dim * mult),
                      "proj.2.bias": rand(cross * num_tokens)}
    image_proj.update({"norm.weight": 1 + rand(cross), "norm.bias": rand(cross)})
    ip_adapter = {}
    key_id = 1  # the checkpoints number the cross-attention layers 1, 3, 5, ...
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
        ip_adapter[f"{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        ip_adapter[f"{key_id}.to_v_ip.weight"] = rand(hidden, cross)
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def controlnet_for(pipe, seed: int = 0):
    """A random-weight ``ControlNetModel`` for ``pipe``'s UNet (``ControlNetModel.from_unet``,
    its zero convolutions randomised so that the condition acts)."""
    import diffusers

    torch.manual_seed(seed)
    # the condition image is at pixel size: four embedding widths = three 2x downsamplings (vae/8)
    unet = pipe.unet
    if unet.config.in_channels != unet.config.out_channels:  # inpainting: the net sees the latents
        cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        unet = diffusers.UNet2DConditionModel.from_config({**cfg, "in_channels": cfg["out_channels"]})
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 16, 16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
