"""Random-weight pipelines of the real Stable Diffusion architectures, for tests and benchmarks.

No weights can be downloaded here, so tests run on pipelines built from the real architecture
configs (SD 1.5, SD 2.1, SDXL, and the shipped "shapes" model) with random weights:

>>> pipe = random_pipeline("sd15")                 # shrunk: fast enough for unit tests
>>> pipe = random_pipeline("sd15", scale=1.0)      # the full 859M-parameter UNet (benchmarks)
>>> pipe = random_pipeline("sdxl", task="inpaint") # 9-channel UNet, StableDiffusionXLInpaintPipeline
>>> refiner = random_pipeline("sdxl-refiner")      # SDXL refiner: text_encoder_2 only, img2img
>>> sd3 = random_pipeline("sd3")                   # SD3 medium's MMDiT, CLIP-L/G + a tiny T5
>>> sd35 = random_pipeline("sd35", t5=False)       # SD3.5 medium, text_encoder_3=None
>>> flux = random_pipeline("flux")                 # Flux.1-dev: double + single blocks, CLIP-L + T5
>>> wan = random_pipeline("wan")                   # Wan 2.1 T2V 1.3B (video); "wan-i2v", "wan22"
>>> klein = random_pipeline("flux2-klein", variant="base-4b")  # the 2026 families: pipeline_2026
>>> big = random_pipeline("qwen-image", scale=1, device="meta")  # 20B transformer, no memory

``scale`` multiplies every channel count (rounded to a multiple of 16) and, below 0.5, keeps one
resnet / transformer layer per block; block types, attention layout, cross-attention widths'
structure, prediction type and scheduler are those of the real model. The tokenizer is the real
CLIP BPE tokenizer (see ``sdlens.models.shapes.tokenizer``); SD 2.x and SDXL's second tokenizer
pad with "!" as OpenCLIP does.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

SD3_ARCHS = ("sd3", "sd35")
ARCHS = ("sd15", "sd21", "sdxl", "sdxl-refiner", "shapes") + SD3_ARCHS + ("flux",)
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
                    dtype: torch.dtype = torch.float32, t5: bool = True,
                    variant: str | None = None):
    """A diffusers pipeline of a real SD architecture with random (seeded) weights.

    Args:
        arch: "sd15", "sd21" (v-prediction), "sdxl", "sdxl-refiner" (text_encoder_2 /
            tokenizer_2 only, aesthetic-score time ids; an img2img pipeline: task "txt2img" gives
            StableDiffusionXLImg2ImgPipeline), "shapes" (the shipped model's layout), or the
            diffusion transformers "pixart" (PixArt-Σ) and "sana" (:func:`random_dit_pipeline`),
            "sd3" / "sd35" (:func:`sd3_pipeline`), "flux" (Flux.1-dev, :func:`flux_pipeline`),
            the 2026 families (:func:`pipeline_2026`): "flux2", "flux2-klein", "qwen-image",
            "qwen-image-edit", "z-image", "chroma", "flux-kontext", and the video DiTs "wan" /
            "wan-i2v" / "wan22" (Wan 2.1 T2V 1.3B, Wan 2.1 I2V 14B, Wan 2.2 T2V A14B:
            :func:`wan_pipeline`).
        scale: channel multiplier; 1.0 is the real size, the default 0.05 a ~1-4M-parameter
            version that keeps every block type and attention layer of the real one.
        task: "txt2img", "img2img" or "inpaint" (inpainting UNets take 9 input channels).
        seed: seeds the weights.
        sample_size: the UNet's latent size (default: 8 when shrunk, the real one at scale 1).
        prediction_type: override the scheduler's ("epsilon", "v_prediction", "sample"; not
            for the flow-matching "sd3" / "sd35" / "flux").
        t5: "sd3" / "sd35" only: with a T5 encoder (False: ``text_encoder_3=None``, as the
            pipelines allow; the T5 segment of the text is zeros).
        variant: "flux2-klein": "4b", "9b", "base-4b", "base-9b"; "qwen-image-edit": "2511".
    """
    import diffusers

    if arch in BEDS_2026:
        if task != "txt2img" or prediction_type is not None:
            raise ValueError(f"{arch}: only task='txt2img' with its own prediction type")
        return pipeline_2026(arch, scale, seed, sample_size, variant, device=device, dtype=dtype)
    if variant is not None:
        raise ValueError("variant is for flux2-klein and qwen-image-edit only")
    if arch in WAN_ARCHS:
        if task != "txt2img" or prediction_type is not None:
            raise ValueError(f"{arch}: only task='txt2img' with its own prediction type (the "
                             "image-to-video pipeline is arch 'wan-i2v')")
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        torch.manual_seed(seed)
        return _finish(wan_pipeline(arch, scale, seed), device, dtype)

    if arch in DIT_ARCHS:
        if task != "txt2img" or prediction_type is not None:
            raise ValueError(f"{arch}: only task='txt2img' with its own prediction type")
        return random_dit_pipeline(arch, scale, seed, sample_size, device=device, dtype=dtype)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; allowed: "
                         f"{', '.join(ARCHS + DIT_ARCHS + BEDS_2026 + WAN_ARCHS)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if arch in SD3_ARCHS:
        return _finish(sd3_pipeline(arch, scale, task, seed, sample_size, t5), device, dtype)
    if arch == "flux":
        return _finish(flux_pipeline(scale, task, seed, sample_size), device, dtype)
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
    return _finish(cls(**components), device, dtype)


def _finish(pipe, device, dtype):
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ====================================================================== diffusion transformers:
# PixArt-Σ and Sana (cross-attention DiTs)
#
# The real T5 / Gemma-2 vocabularies cannot be downloaded here, so their tokenizers are
# SentencePiece models trained locally (in about a second) on a few hundred generated prompts,
# wrapped as transformers' ``T5Tokenizer`` (unigram, ``</s>`` end token, ``<pad>``) and
# ``GemmaTokenizer`` (BPE with byte fallback, ``<bos>`` start token, no dummy prefix). Their
# pieces are SentencePiece pieces ("▁red") as the real ones are; their vocabularies are tiny.

DIT_ARCHS = ("pixart", "sana")

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS (transformer), google/t5-v1_1-xxl (text encoder), the
# SDXL VAE PixArt-Σ uses, its DPM-Solver++ scheduler.
_PIXART_SIGMA = dict(
    transformer=dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                     num_layers=28, cross_attention_dim=1152, attention_bias=True,
                     activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                     norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                     caption_channels=4096, sample_size=128, patch_size=2, interpolation_scale=2,
                     use_additional_conditions=False),
    text=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu"),
    vae=_SDXL["vae"],
)
# Efficient-Large-Model/Sana_1600M_1024px_diffusers (transformer), google/gemma-2-2b-it (text
# encoder), mit-han-lab/dc-ae-f32c32-sana-1.0 (AutoencoderDC), DPM-Solver++ on flow sigmas.
_SANA_1600M = dict(
    transformer=dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
                     num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
                     cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5,
                     sample_size=32, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
                     attention_bias=False),
    text=dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
              num_attention_heads=8, num_key_value_heads=4, head_dim=256),
    vae=dict(latent_channels=32, attention_head_dim=32,
             encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
             decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
             encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
             decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
             encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
             decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
             encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
             decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
             upsample_block_type="interpolate", downsample_block_type="Conv",
             decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407),
)
# a shrunk DC-AE: three stages (f4: SanaPipeline wants sizes divisible by 32, 32 px -> 8x8
# latents), the real block kinds and 32 latent channels
_SANA_VAE_SMALL = dict(latent_channels=32, attention_head_dim=8,
                       encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                       decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                       encoder_block_out_channels=(8, 16, 32),
                       decoder_block_out_channels=(8, 16, 32),
                       encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                       encoder_qkv_multiscales=((), (), (5,)),
                       decoder_qkv_multiscales=((), (), (5,)),
                       upsample_block_type="interpolate", downsample_block_type="Conv",
                       decoder_norm_types="rms_norm", decoder_act_fns="silu",
                       scaling_factor=0.41407)


def _prompt_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Generated prompts to train the local SentencePiece models on."""
    import random

    rng = random.Random(seed)
    colors = "red green blue yellow black white orange purple pink brown gray golden".split()
    things = ("circle square triangle star cat dog house tree car boat mountain river flower "
              "bird castle robot horse lighthouse beach forest city").split()
    places = "beach forest city desert sky ocean garden street room field lake island".split()
    adjectives = "small large bright dark old new shiny soft tall tiny huge round".split()
    styles = ["highly detailed", "a photo", "an oil painting", "at night", "in the rain",
              "cinematic lighting", "watercolor", "sharp focus"]
    out = []
    for _ in range(n):
        s = (f"a {rng.choice(adjectives)} {rng.choice(colors)} {rng.choice(things)} "
             f"on the {rng.choice(places)}")
        if rng.random() < 0.5:
            s += f", {rng.choice(styles)}."
        out.append(s)
    return out


@functools.lru_cache(maxsize=None)  # a second's training, once per process and kind
def _spm_pieces(**options) -> tuple[tuple[str, float], ...]:
    import io

    try:
        import sentencepiece as spm
    except ImportError as e:
        raise ImportError("the SD3 / PixArt / Sana test beds build their T5 / Gemma tokenizers "
                          "with SentencePiece: pip install sentencepiece (in sdlens[dev])") from e

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_prompt_corpus()), model_writer=buf,
                                   hard_vocab_limit=False, minloglevel=2, **options)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return tuple((sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size()))


def t5_tokenizer(max_length: int = 300):
    """A T5-style SentencePiece tokenizer (unigram; ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2),
    trained locally on generated prompts (the real T5 vocabulary cannot be had here)."""
    from transformers import T5Tokenizer

    pieces = _spm_pieces(vocab_size=400, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                         bos_id=-1)
    return T5Tokenizer(vocab=list(pieces), extra_ids=0, model_max_length=max_length)


def gemma_tokenizer(max_length: int = 300):
    """A Gemma-style SentencePiece tokenizer (BPE with byte fallback, no dummy prefix;
    ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3), trained locally on generated prompts
    (the real Gemma vocabulary cannot be had here)."""
    from transformers import GemmaTokenizer

    pieces = _spm_pieces(vocab_size=600, model_type="bpe", pad_id=0, eos_id=1, bos_id=2,
                         unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                         unk_piece="<unk>", byte_fallback=True, add_dummy_prefix=False,
                         normalization_rule_name="identity")
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    return GemmaTokenizer(**GemmaTokenizer.convert_to_native_format(vocab=vocab),
                          add_bos_token=True, model_max_length=max_length)


def _dit_pipeline(arch: str, scale: float, sample_size: int | None, layers: int | None):
    import diffusers

    small = scale < 1
    if arch == "pixart":
        from transformers import T5Config, T5EncoderModel

        spec = _PIXART_SIGMA
        tok = t5_tokenizer()
        text_cfg = dict(spec["text"])
        if small:
            text_cfg.update(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2)
        text = T5EncoderModel(T5Config(vocab_size=len(tok), pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0, **text_cfg))
        cfg = dict(spec["transformer"])
        if small:
            cfg.update(num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                       num_layers=layers or 2, sample_size=sample_size or 8)
        elif sample_size:
            cfg["sample_size"] = sample_size
        cfg["caption_channels"] = text.config.d_model
        transformer = diffusers.PixArtTransformer2DModel(**cfg)
        vae = _vae(spec["vae"], scale)
        scheduler = diffusers.DPMSolverMultistepScheduler(
            beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
            solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True)
        return diffusers.PixArtSigmaPipeline(tokenizer=tok, text_encoder=text, vae=vae,
                                             transformer=transformer, scheduler=scheduler)
    from transformers import Gemma2Config, Gemma2Model

    spec = _SANA_1600M
    tok = gemma_tokenizer()
    text_cfg = dict(spec["text"])
    if small:
        text_cfg.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    text = Gemma2Model(Gemma2Config(vocab_size=len(tok), pad_token_id=0, eos_token_id=1,
                                    bos_token_id=2, attn_implementation="eager", **text_cfg))
    cfg = dict(spec["transformer"])
    if small:
        cfg.update(num_attention_heads=2, attention_head_dim=16, num_cross_attention_heads=2,
                   cross_attention_head_dim=16, cross_attention_dim=32, num_layers=layers or 2,
                   sample_size=sample_size or 8)
    elif sample_size:
        cfg["sample_size"] = sample_size
    cfg["caption_channels"] = text.config.hidden_size
    transformer = diffusers.SanaTransformer2DModel(**cfg)
    vae = diffusers.AutoencoderDC(**(_SANA_VAE_SMALL if small else spec["vae"]))
    scheduler = diffusers.DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=3.0, solver_order=2, algorithm_type="dpmsolver++",
        lower_order_final=True)
    return diffusers.SanaPipeline(tokenizer=tok, text_encoder=text, vae=vae,
                                  transformer=transformer, scheduler=scheduler)


def random_dit_pipeline(arch: str = "pixart", scale: float = 0.05, seed: int = 0,
                        sample_size: int | None = None, layers: int | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A PixArt-Σ (``"pixart"``) or Sana (``"sana"``) pipeline of the real architecture with
    random (seeded) weights; :func:`random_pipeline` dispatches here for those archs.

    At ``scale=1`` the real sizes (PixArt-Σ XL/2 1024: 28 blocks, T5-XXL, SDXL VAE; Sana 1600M:
    20 blocks, Gemma-2 2B, DC-AE f32c32); below, 2 blocks (``layers``), 32-wide transformers,
    tiny text encoders and VAEs (Sana: a two-stage DC-AE), latents 8x8 (``sample_size``). The
    tokenizers are local SentencePiece models (:func:`t5_tokenizer`, :func:`gemma_tokenizer`).
    """
    if arch not in DIT_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(DIT_ARCHS)}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    torch.manual_seed(seed)
    pipe = _dit_pipeline(arch, scale, sample_size, layers)
    for module in pipe.components.values():  # as from_pretrained leaves them (T5 has dropout)
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ====================================================================== SD3 / SD3.5 (MMDiT)
# The transformer configs of stabilityai/stable-diffusion-3-medium-diffusers and
# stable-diffusion-3.5-medium (diffusers' SD3Transformer2DModel); CLIP-L and CLIP-G as SDXL's
# encoders (both with projection); T5-XXL (google/t5-v1_1-xxl's encoder); the 16-channel VAE.
_SD3 = dict(
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                     num_layers=24, attention_head_dim=64, num_attention_heads=24,
                     caption_projection_dim=1536, pos_embed_max_size=192,
                     dual_attention_layers=(), qk_norm=None),
    scheduler=dict(num_train_timesteps=1000, shift=3.0),
)
_SD35 = dict(
    transformer=dict(_SD3["transformer"], pos_embed_max_size=384,
                     dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    scheduler=_SD3["scheduler"],
)
_T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
_SD3_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=16,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False, sample_size=1024)


def _flow_vae(config: dict, scale: float):
    """The 16-channel VAE of SD3 / Flux from its real ``config`` (full size at ``scale`` 1,
    channels shrunk, one layer per block, 8 norm groups below)."""
    import diffusers

    vcfg = dict(config)
    channels = tuple(_shrink(c, scale / 4) if scale < 1 else c
                     for c in vcfg.pop("block_out_channels"))
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=2 if scale >= 1 else 1, norm_num_groups=32 if scale >= 1 else 8, **vcfg)


def _t5(scale: float, d_model: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = dict(_T5_XXL)
    if scale < 1:
        cfg.update(d_model=d_model, d_ff=2 * d_model, num_layers=2, num_heads=2,
                   d_kv=d_model // 2)
        cfg["vocab_size"] = vocab_size
    return T5EncoderModel(T5Config(**cfg, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def sd3_pipeline(arch: str = "sd3", scale: float = 0.05, task: str = "txt2img", seed: int = 0,
                 sample_size: int | None = None, t5: bool = True):
    """A random-weight ``StableDiffusion3Pipeline`` (or Img2Img / Inpaint) of SD3 medium
    ("sd3") or SD3.5 medium ("sd35": dual-attention blocks, RMS q/k norms), on the CPU in
    float32 (see :func:`random_pipeline`). Shrunk (``scale < 1``): a few transformer blocks of 2
    heads (SD3.5: the first ~half dual-attention, as the real one), 2-layer CLIP encoders, a
    2-layer T5 over :func:`t5_tokenizer`'s vocabulary, a small 16-channel VAE with SD3's
    scaling and shift factors, 8x8 latents (64 px images)."""
    import diffusers

    torch.manual_seed(seed)
    spec = {"sd3": _SD3, "sd35": _SD35}[arch]
    clip_l = _text(_SDXL["text"][0], scale, with_projection=True)
    clip_g = _text(_SDXL["text"][1], scale, with_projection=True)
    clip_width = clip_l.config.hidden_size + clip_g.config.hidden_size
    tcfg = dict(spec["transformer"])
    if scale < 1:
        heads, head_dim = 2, 16
        n = max(2, round(tcfg["num_layers"] * scale))
        dual = tcfg["dual_attention_layers"]
        tcfg.update(num_layers=n, num_attention_heads=heads, attention_head_dim=head_dim,
                    caption_projection_dim=heads * head_dim, pos_embed_max_size=16,
                    sample_size=sample_size or 8,
                    dual_attention_layers=tuple(range(max(1, round(len(dual) / 24 * n))))
                    if dual else ())
    elif sample_size is not None:
        tcfg["sample_size"] = sample_size
    joint_dim = _T5_XXL["d_model"] if scale >= 1 else max(clip_width, _shrink(4096, scale / 1.5))
    tok3 = t5_tokenizer(max_length=512)
    text_encoder_3 = _t5(scale, joint_dim, len(tok3)) if t5 else None
    transformer = diffusers.SD3Transformer2DModel(
        joint_attention_dim=joint_dim,
        pooled_projection_dim=clip_l.config.projection_dim + clip_g.config.projection_dim, **tcfg)
    vae = _flow_vae(_SD3_VAE, scale)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**spec["scheduler"])
    cls = {"txt2img": "StableDiffusion3Pipeline", "img2img": "StableDiffusion3Img2ImgPipeline",
           "inpaint": "StableDiffusion3InpaintPipeline"}[task]
    for module in (clip_l, clip_g, text_encoder_3, transformer, vae):
        if module is not None:
            module.eval()  # T5's dropout is on in training mode: runs would differ
    return getattr(diffusers, cls)(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
        tokenizer=tokenizer(), text_encoder_2=clip_g, tokenizer_2=tokenizer("!"),
        text_encoder_3=text_encoder_3, tokenizer_3=tok3)


# ====================================================================== Flux.1
# black-forest-labs/FLUX.1-dev's transformer, VAE and scheduler configs (diffusers'
# FluxTransformer2DModel: 19 double-stream and 38 single-stream blocks, guidance-distilled);
# CLIP-L (only its pooled vector conditions the transformer) and T5-XXL (the 512-token sequence
# the blocks attend to).
_FLUX_DEV = dict(
    transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                     pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    vae=dict(block_out_channels=(128, 256, 512, 512), latent_channels=16, scaling_factor=0.3611,
             shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
             sample_size=1024),
    scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                   base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                   max_image_seq_len=4096),
)


def flux_pipeline(scale: float = 0.05, task: str = "txt2img", seed: int = 0,
                  sample_size: int | None = None):
    """A random-weight ``FluxPipeline`` (or ``FluxImg2ImgPipeline`` / ``FluxInpaintPipeline``)
    of Flux.1-dev, on the CPU in float32 (see :func:`random_pipeline`). At ``scale=1`` the real
    sizes (19 double + 38 single blocks of 24 x 128-wide heads, CLIP-L, T5-XXL, the 16-channel
    VAE; 1024 px by default). Shrunk: 2 double and 2 single blocks (more with a larger
    ``scale``) of 2 heads x 16 (RoPE axes 4 + 6 + 6), 2-layer CLIP-L and T5 encoders, a small
    16-channel VAE with Flux's scaling and shift factors, latents 8x8 by default (64 px images;
    ``sample_size``: the latent size). The T5 tokenizer is the local SentencePiece one
    (:func:`t5_tokenizer`, 512 positions), the CLIP tokenizer the real CLIP BPE one."""
    import diffusers

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    torch.manual_seed(seed)
    spec = _FLUX_DEV
    clip = _text(_SDXL["text"][0], scale, with_projection=False)
    tok2 = t5_tokenizer(max_length=512)
    tcfg = dict(spec["transformer"])
    if scale < 1:
        heads, head_dim = 2, 16
        tcfg.update(num_layers=max(2, round(19 * scale)), num_single_layers=max(2, round(38 * scale)),
                    num_attention_heads=heads, attention_head_dim=head_dim, axes_dims_rope=(4, 6, 6))
        t5_width = _shrink(4096, scale / 2)
    else:
        t5_width = _T5_XXL["d_model"]
    t5 = _t5(scale, t5_width, len(tok2))
    transformer = diffusers.FluxTransformer2DModel(
        **{**tcfg, "joint_attention_dim": t5.config.d_model,
           "pooled_projection_dim": clip.config.hidden_size})
    vae = _flow_vae(spec["vae"], scale)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**spec["scheduler"])
    for module in (clip, t5, transformer, vae):
        module.eval()  # T5's dropout is on in training mode: runs would differ
    cls = {"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline",
           "inpaint": "FluxInpaintPipeline"}[task]
    pipe = getattr(diffusers, cls)(transformer=transformer, scheduler=scheduler, vae=vae,
                                   text_encoder=clip, tokenizer=tokenizer(), text_encoder_2=t5,
                                   tokenizer_2=tok2)
    if scale < 1 or sample_size is not None:  # the pipelines' default image size (1024 px)
        pipe.default_sample_size = sample_size or 8
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


# ====================================================================== Wan 2.1 / 2.2 (video)
# The transformer configs of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan2.1-T2V-14B-Diffusers,
# Wan2.1-I2V-14B-480P-Diffusers and Wan2.2-T2V-A14B-Diffusers (two 14B experts switched at
# boundary_ratio 0.875); UMT5-XXL (google/umt5-xxl's encoder); the Wan 2.1 VAE (diffusers'
# AutoencoderKLWan defaults: 4x temporal, 8x spatial compression); ViT-H/14 (open-clip) as the
# I2V image encoder; UniPC on flow sigmas, as the released scheduler configs.
WAN_ARCHS = ("wan", "wan-i2v", "wan22")
_WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                 in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                 num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                 image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
_WAN_14B = dict(_WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
_WAN_I2V_14B = dict(_WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
_UMT5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                 vocab_size=256384, feed_forward_proj="gated-gelu",
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 layer_norm_epsilon=1e-6, tie_word_embeddings=False)
_VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                hidden_act="gelu")
_WAN_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction",
                      use_flow_sigmas=True, flow_shift=3.0, solver_order=2)


def wan_pipeline(arch: str = "wan", scale: float = 0.05, seed: int = 0, size: str = "1.3B"):
    """A Wan pipeline of the real architecture with random (seeded) weights
    (:func:`random_pipeline` dispatches here for ``"wan"``, ``"wan-i2v"``, ``"wan22"``).

    ``"wan"``: ``WanPipeline`` with Wan 2.1 T2V's transformer (``size`` "1.3B" or "14B");
    ``"wan-i2v"``: ``WanImageToVideoPipeline`` with Wan 2.1 I2V 14B's (36 input channels: the
    latents and the first frame's condition; image-context keys from a CLIP ViT-H/14's
    penultimate hidden states); ``"wan22"``: ``WanPipeline`` with Wan 2.2 T2V A14B's two experts
    (``transformer`` for t >= 0.875 * 1000, ``transformer_2`` below). At ``scale`` 1 the real
    sizes (build them under ``torch.device("meta")`` to count parameters without memory); below,
    2 blocks of 2 heads x 16, a 2-layer 32-wide UMT5 over :func:`t5_tokenizer`'s vocabulary
    (512 positions, as the pipelines encode), a 16-wide Wan VAE (same 4x / 8x compression), a
    2-layer 32-wide CLIP vision tower on 28 px images (5 image-context tokens)."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, \
        UMT5EncoderModel

    if arch not in WAN_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(WAN_ARCHS)}")
    if size not in ("1.3B", "14B"):
        raise ValueError(f"size must be '1.3B' or '14B', got {size!r}")
    small = scale < 1
    tok = t5_tokenizer(max_length=512)
    text_cfg = dict(_UMT5_XXL)
    if small:  # the local tokenizer's vocabulary (at scale 1 the real one: its ids fit in it)
        text_cfg.update(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2)
    text = UMT5EncoderModel(UMT5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                       **text_cfg))
    base = {"wan": _WAN_1_3B if size == "1.3B" else _WAN_14B, "wan-i2v": _WAN_I2V_14B,
            "wan22": _WAN_14B}[arch]
    cfg = dict(base, text_dim=text.config.d_model)
    vision = None
    if small:
        cfg.update(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2)
    if arch == "wan-i2v":
        vcfg = dict(_VIT_H14)
        if small:
            vcfg.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, image_size=28, projection_dim=32)
        vision = CLIPVisionModel(CLIPVisionConfig(**vcfg))
        cfg.update(image_dim=vision.config.hidden_size,
                   added_kv_proj_dim=cfg["num_attention_heads"] * cfg["attention_head_dim"])
    transformers_ = [diffusers.WanTransformer3DModel(**cfg)]
    if arch == "wan22":
        transformers_.append(diffusers.WanTransformer3DModel(**cfg))
    vae = diffusers.AutoencoderKLWan(**({"base_dim": 16, "num_res_blocks": 1} if small else {}))
    shift = 12.0 if arch == "wan22" else 3.0  # Wan 2.2 T2V A14B's scheduler config
    with torch.device("cpu"):  # its sigmas are data even where the models are built on "meta"
        scheduler = diffusers.UniPCMultistepScheduler(**{**_WAN_SCHEDULER, "flow_shift": shift})
    for module in (text, vae, vision, *transformers_):
        if module is not None:
            module.eval()  # UMT5's dropout is on in training mode: runs would differ
    common = dict(tokenizer=tok, text_encoder=text, vae=vae, scheduler=scheduler,
                  transformer=transformers_[0])
    if arch == "wan-i2v":
        side = vision.config.image_size
        proc = CLIPImageProcessor(size={"shortest_edge": side},
                                  crop_size={"height": side, "width": side})
        return diffusers.WanImageToVideoPipeline(image_encoder=vision, image_processor=proc,
                                                 **common)
    if arch == "wan22":
        return diffusers.WanPipeline(transformer_2=transformers_[1], boundary_ratio=0.875,
                                     **common)
    return diffusers.WanPipeline(**common)


# ====================================================================== the 2026 families
# Flux.2 (dev, klein), Qwen-Image (+ Edit), Z-Image, Chroma and Flux.1 Kontext. Their text
# encoders are LLMs whose vocabularies cannot be had here, so their tokenizers are byte-level BPE
# models trained locally with the ``tokenizers`` library (:func:`qwen_tokenizer`,
# :func:`mistral_tokenizer`): the real pre-tokenizer split, the real special tokens and the chat
# templates the pipelines apply, a vocabulary of a few hundred pieces.

BEDS_2026 = ("flux2", "flux2-klein", "qwen-image", "qwen-image-edit", "z-image", "chroma",
             "flux-kontext")
KLEIN_VARIANTS = ("4b", "9b", "base-4b", "base-9b")
QWEN_EDIT_VARIANTS = ("2511",)  # Qwen-Image-Edit-2511: EditPlus, zero_cond_t

# Qwen2's pre-tokenizer split (the GPT-4-style regex of Qwen2 / Qwen2.5 / Qwen3's tokenizer.json).
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Tekken's (Mistral-Small-3.x) split: cased words kept whole, "/" joins the trailing newlines.
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")
# Tekken's control tokens at their real ids 0..18 ("<pad>" is 11; unused ones keep their slot).
_MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                     "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]",
                     "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
                     "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
# Qwen3's chat template, the part the pipelines use: string messages, the generation prompt and
# the empty think block that ``enable_thinking=False`` adds (Flux.2 klein; Z-Image passes True).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
# Mistral-Small-3.1's template, the part Flux2Pipeline uses: a system prompt, user turns whose
# content is a list of text / image chunks ("[IMG]" where the processor expands an image).
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = namespace(s='') %}"
    "{%- for chunk in message['content'] %}"
    "{%- if chunk['type'] == 'text' %}{%- set text.s = text.s + chunk['text'] %}"
    "{%- else %}{%- set text.s = text.s + '[IMG]' %}{%- endif %}{%- endfor %}"
    "{%- set text = text.s %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}")


def _template_texts() -> list[str]:
    """The fixed texts the 2026 pipelines put around a prompt (system prompts, templates), so
    that the local BPE learns their words whole as the real vocabularies hold them."""
    import ast
    import inspect
    import textwrap

    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline

    texts = [SYSTEM_MESSAGE]
    for cls in (QwenImagePipeline, QwenImageEditPipeline):
        # an instance attribute set in __init__: read it from the source, without building one
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
        texts += [ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Assign) and ast.unparse(node.targets[0])
                  == "self.prompt_template_encode"]
    return texts


@functools.lru_cache(maxsize=None)  # a fraction of a second's training, once per process
def _byte_bpe(split: str, specials: tuple[str, ...]) -> str:
    """A byte-level BPE (``tokenizers``' JSON) trained on generated prompts and the pipelines'
    template texts, ``split`` the pre-tokenizer's regex, ``specials`` the first ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_prompt_corpus() + _template_texts() * 20, trainer)
    return tok.to_str()


def qwen_tokenizer(max_length: int = 32768, chat_template: str | None = QWEN3_CHAT_TEMPLATE):
    """A Qwen2/3-style ``Qwen2Tokenizer``: byte-level BPE with Qwen2's pre-tokenizer split and
    its special tokens (``<|endoftext|>`` 0 pads, ``<|im_start|>``, ``<|im_end|>``,
    ``<|vision_start|>``, ``<|image_pad|>``, ..., ``<think>``), Qwen3's chat template, trained
    locally (the real 151k vocabulary cannot be had here). Every word of the pipelines' fixed
    texts is one piece, as in the real vocabulary, so Qwen-Image's template prefixes are the 34
    / 64 tokens the pipelines drop."""
    import json

    from transformers import Qwen2Tokenizer

    model = json.loads(_byte_bpe(_QWEN_SPLIT, _QWEN_SPECIALS))["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None,
                         model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIALS[1:])})
    tok.chat_template = chat_template
    return tok


def mistral_tokenizer(max_length: int = 131072):
    """Mistral-Small-3.1's tokenizer as ``Flux2Pipeline`` uses it: a byte-level BPE with
    Tekken's pre-tokenizer split, its control tokens at their real ids (``<s>`` 1, ``</s>`` 2,
    ``[INST]`` 3, ``[IMG]`` 10, ``<pad>`` 11, ``[SYSTEM_PROMPT]`` 17) and the chat template's
    system / user turns; trained locally (the real 131k Tekken vocabulary cannot be had here).

    The real pipeline holds a ``PixtralProcessor`` around the tokenizer; that class needs
    torchvision, which is not installed here. ``Flux2Pipeline``'s text path calls only
    ``tokenizer.apply_chat_template(conversations, tokenize=True, padding="max_length", ...)``,
    which the tokenizer answers as the processor does for text-only conversations; the prompt
    upsampling path (``caption_upsample_temperature``: generation, images) is not served."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_bpe(_TEKKEN_SPLIT, _MISTRAL_SPECIALS)),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=max_length, chat_template=MISTRAL_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": list(_MISTRAL_SPECIALS[3:])})
    return tok


# The real configs. Transformers: diffusers' conversion script convert_flux2_to_diffusers.py
# (FLUX.2-dev, klein 4B / 9B; dev is also Flux2Transformer2DModel's defaults); the class defaults
# of QwenImageTransformer2DModel (Qwen/Qwen-Image), ZImageTransformer2DModel
# (Tongyi-MAI/Z-Image-Turbo) and ChromaTransformer2DModel (lodestones/Chroma1-HD) -- each gives
# the published size (32.2B, 3.9B, 9.1B, 20.4B, 6.2B, 8.9B, tests/test_testbeds_2026.py).
# VAEs: AutoencoderKLFlux2's and AutoencoderKLQwenImage's defaults (what the conversion loads);
# Z-Image and Chroma use Flux.1's 16-channel VAE. Text encoders: the hub configs of
# mistralai/Mistral-Small-3.1-24B-Instruct-2503, Qwen/Qwen3-4B, Qwen/Qwen3-8B,
# Qwen/Qwen2.5-VL-7B-Instruct and google/t5-v1_1-xxl.
_FLUX2_DEV = dict(num_layers=8, num_single_layers=48, num_attention_heads=48,
                  joint_attention_dim=15360, guidance_embeds=True)
_FLUX2_KLEIN = {
    "4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24,
               joint_attention_dim=7680, guidance_embeds=False),
    "9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32,
               joint_attention_dim=12288, guidance_embeds=False),
}
_MISTRAL_SMALL_31 = dict(
    text=dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
              num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
              max_position_embeddings=131072, rope_theta=1e9, sliding_window=None),
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, head_dim=64, patch_size=14, image_size=1540,
                rope_theta=10000.0),
)
_QWEN3 = {  # Qwen3-4B (klein 4B, Z-Image) and Qwen3-8B (klein 9B)
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               tie_word_embeddings=True),
    "9b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               tie_word_embeddings=False),
}
_QWEN25_VL_7B = dict(
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
              max_position_embeddings=128000, rope_theta=1e6, mrope_section=(16, 24, 24)),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=112, fullatt_block_indexes=(7, 15, 23, 31),
                tokens_per_second=2),
)
_FLUX2_SCHEDULER = _FLUX_DEV["scheduler"]  # the conversion script takes FLUX.1-dev's
# Qwen/Qwen-Image's scheduler_config.json: exponential time shift, resolution-dependent mu
_QWEN_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                             base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                             max_image_seq_len=8192, shift_terminal=0.02,
                             time_shift_type="exponential")
_Z_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

# shrunk (scale < 1): transformer heads 2 x 16, text encoders 32 wide (2 heads, 1 KV head)
_HEADS, _HEAD_DIM, _TEXT_WIDTH = 2, 16, 32


def _count(n: int, scale: float) -> int:
    return n if scale >= 1 else max(2, round(n * scale))


def _small_llm(cfg: dict, vocab: int, layers: int | None = None) -> dict:
    """A real LLM config made 32 wide (2 heads of 16, 1 KV head), its vocabulary the local
    tokenizer's, ``layers`` deep (default: the real depth, where the pipeline reads hidden
    states by index)."""
    return dict(cfg, hidden_size=_TEXT_WIDTH, intermediate_size=2 * _TEXT_WIDTH,
                num_attention_heads=2, num_key_value_heads=1, head_dim=_TEXT_WIDTH // 2,
                vocab_size=vocab, num_hidden_layers=layers or cfg["num_hidden_layers"])


def _mistral3(scale: float, vocab: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text, vision = dict(_MISTRAL_SMALL_31["text"]), dict(_MISTRAL_SMALL_31["vision"])
    if scale < 1:  # Flux.2 reads hidden states 10, 20 and 30 of 40: the real depth stays
        text = _small_llm(text, vocab)
        vision.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, head_dim=8)
    config = Mistral3Config(text_config=dict(text, model_type="mistral"),
                            vision_config=dict(vision, model_type="pixtral"),
                            image_token_index=10, spatial_merge_size=2,
                            multimodal_projector_bias=False, projector_hidden_act="gelu",
                            vision_feature_layer=-1, tie_word_embeddings=False)
    config.text_config.pad_token_id = 11
    return Mistral3ForConditionalGeneration(config)


def _qwen3(size: str, scale: float, vocab: int, causal_lm: bool, layers: int | None = None):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    cfg = dict(_QWEN3[size], vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6,
               rms_norm_eps=1e-6)
    if scale < 1:
        cfg = _small_llm(cfg, vocab, layers)
    config = Qwen3Config(pad_token_id=0, bos_token_id=None, eos_token_id=2, **cfg)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def _qwen25_vl(scale: float, tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision = dict(_QWEN25_VL_7B["text"]), dict(_QWEN25_VL_7B["vision"])
    mrope = text.pop("mrope_section")
    if scale < 1:  # Qwen-Image reads the last hidden state: two layers do
        text = _small_llm(text, len(tok), layers=2)
        text.pop("head_dim")
        mrope = (2, 3, 3)  # halves of the 16-wide heads' rotary, as (16, 24, 24) of 128
        vision.update(depth=2, hidden_size=16, intermediate_size=32, num_heads=2,
                      out_hidden_size=_TEXT_WIDTH, fullatt_block_indexes=(1,))
    rope = dict(rope_type="default", mrope_section=list(mrope), rope_theta=text.pop("rope_theta"))
    ids = {name: tok.convert_tokens_to_ids(piece) if scale < 1 else real
           for name, piece, real in (("image_token_id", "<|image_pad|>", 151655),
                                     ("video_token_id", "<|video_pad|>", 151656),
                                     ("vision_start_token_id", "<|vision_start|>", 151652),
                                     ("vision_end_token_id", "<|vision_end|>", 151653))}
    if scale < 1:  # <|endoftext|> / <|im_end|> as in the real config, the local tokenizer's ids
        text.update(bos_token_id=0, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    config = Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=rope),
                              vision_config=vision, **ids)
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen2vl_processor(tok):
    """Qwen2.5-VL's processor (14-px patches merged 2x2 into ``<|image_pad|>`` tokens, the PIL
    image processor) for images only: transformers' video processors need torchvision, which
    is not installed here, and ``Qwen2VLProcessor`` insists on one; the Qwen-Image pipelines
    never pass videos."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    class Qwen2VLImageProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template, **kwargs)

    return Qwen2VLImageProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tok)


def _flux2_vae(scale: float):
    import diffusers

    if scale >= 1:
        return diffusers.AutoencoderKLFlux2()
    return diffusers.AutoencoderKLFlux2(block_out_channels=(16, 16, 16, 16), layers_per_block=1,
                                        norm_num_groups=8)


def _qwen_vae(scale: float):
    import diffusers

    if scale >= 1:
        return diffusers.AutoencoderKLQwenImage()
    # the edit pipelines VAE-encode every reference at ~1 MP (the bed's slowest part): 2 channels
    # at every level take half the time of base_dim=4 with the real dim_mult
    return diffusers.AutoencoderKLQwenImage(base_dim=2, dim_mult=[1, 1, 1, 1], num_res_blocks=1)


def _components_2026(arch: str, scale: float, variant: str | None) -> dict:
    """The components of one 2026 bed (see :func:`pipeline_2026`), built on the current
    default device."""
    import diffusers

    small = scale < 1
    heads = dict(num_attention_heads=_HEADS, attention_head_dim=_HEAD_DIM) if small else {}
    if arch == "flux2":
        tok = mistral_tokenizer(max_length=512)
        text = _mistral3(scale, len(tok))
        cfg = dict(_FLUX2_DEV, joint_attention_dim=3 * text.config.text_config.hidden_size)
        if small:
            cfg.update(heads, num_layers=_count(8, scale), num_single_layers=_count(48, scale),
                       axes_dims_rope=(4, 4, 4, 4))
        return dict(transformer=diffusers.Flux2Transformer2DModel(**cfg), vae=_flux2_vae(scale),
                    text_encoder=text, tokenizer=tok,
                    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**_FLUX2_SCHEDULER))
    if arch == "flux2-klein":
        variant = variant or "4b"
        if variant not in KLEIN_VARIANTS:
            raise ValueError(f"unknown flux2-klein variant {variant!r}; allowed: "
                             f"{', '.join(KLEIN_VARIANTS)}")
        size = variant[-2:]
        tok = qwen_tokenizer(max_length=512)
        text = _qwen3(size, scale, len(tok), causal_lm=True)
        cfg = dict(_FLUX2_KLEIN[size], joint_attention_dim=3 * text.config.hidden_size)
        if small:
            cfg.update(heads, num_layers=_count(cfg["num_layers"], scale),
                       num_single_layers=_count(cfg["num_single_layers"], scale),
                       axes_dims_rope=(4, 4, 4, 4))
        return dict(transformer=diffusers.Flux2Transformer2DModel(**cfg), vae=_flux2_vae(scale),
                    text_encoder=text, tokenizer=tok, is_distilled=not variant.startswith("base"),
                    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**_FLUX2_SCHEDULER))
    if arch in ("qwen-image", "qwen-image-edit"):
        tok = qwen_tokenizer(chat_template=None)  # the pipelines format their own template
        text = _qwen25_vl(scale, tok)
        cfg = dict(joint_attention_dim=text.config.text_config.hidden_size)
        if variant is not None:
            if arch != "qwen-image-edit" or variant not in QWEN_EDIT_VARIANTS:
                raise ValueError(f"unknown {arch} variant {variant!r}; allowed: qwen-image-edit "
                                 f"{', '.join(QWEN_EDIT_VARIANTS)}")
            cfg["zero_cond_t"] = True  # 2511: the references modulated at t = 0
        if small:
            cfg.update(heads, num_layers=_count(60, scale), axes_dims_rope=(4, 6, 6))
        out = dict(transformer=diffusers.QwenImageTransformer2DModel(**cfg), vae=_qwen_vae(scale),
                   text_encoder=text, tokenizer=tok,
                   scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**_QWEN_IMAGE_SCHEDULER))
        if arch == "qwen-image-edit":
            out["processor"] = _qwen2vl_processor(tok)
        return out
    if arch == "z-image":
        tok = qwen_tokenizer(max_length=512)
        text = _qwen3("4b", scale, len(tok), causal_lm=False, layers=2)  # reads hidden_states[-2]
        cfg = dict(cap_feat_dim=text.config.hidden_size)
        if small:
            cfg.update(dim=_HEADS * _HEAD_DIM, n_heads=_HEADS, n_kv_heads=_HEADS,
                       n_layers=_count(30, scale), n_refiner_layers=1, axes_dims=[4, 6, 6])
        return dict(transformer=diffusers.ZImageTransformer2DModel(**cfg),
                    vae=_flow_vae(_FLUX_DEV["vae"], scale), text_encoder=text, tokenizer=tok,
                    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**_Z_IMAGE_SCHEDULER))
    if arch == "chroma":
        tok = t5_tokenizer(max_length=512)
        t5 = _t5(scale, _shrink(4096, scale / 2) if small else _T5_XXL["d_model"], len(tok))
        cfg = dict(joint_attention_dim=t5.config.d_model)
        if small:
            cfg.update(heads, num_layers=_count(19, scale), num_single_layers=_count(38, scale),
                       axes_dims_rope=(4, 6, 6), approximator_hidden_dim=32,
                       approximator_layers=1)
        return dict(transformer=diffusers.ChromaTransformer2DModel(**cfg),
                    vae=_flow_vae(_FLUX_DEV["vae"], scale), text_encoder=t5, tokenizer=tok,
                    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**_FLUX_DEV["scheduler"]))
    raise ValueError(f"unknown arch {arch!r}")


def pipeline_2026(arch: str = "flux2", scale: float = 0.05, seed: int = 0,
                  sample_size: int | None = None, variant: str | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A random-weight pipeline of a 2026 family; :func:`random_pipeline` dispatches here.

    Args:
        arch: "flux2" (``Flux2Pipeline``: FLUX.2-dev's 8 double + 48 single blocks of 48 heads,
            Mistral-Small-3.1 as ``Mistral3ForConditionalGeneration``, hidden states 10 / 20 /
            30 stacked into 3 x 5120 text features, AutoencoderKLFlux2), "flux2-klein"
            (``Flux2KleinPipeline``, ``Qwen3ForCausalLM``, hidden states 9 / 18 / 27),
            "qwen-image" (``QwenImagePipeline``: 60 joint blocks, Qwen2.5-VL-7B's last hidden
            state, AutoencoderKLQwenImage), "qwen-image-edit" (``QwenImageEditPipeline``, the
            same components plus a ``Qwen2VLProcessor``: the reference image goes through
            Qwen2.5-VL's vision tower and, as latents, beside the noise), "z-image"
            (``ZImagePipeline``: Z-Image-Turbo's single stream of 30 blocks after 2 + 2 refiner
            blocks, ``Qwen3Model`` hidden_states[-2], Flux.1's VAE), "chroma"
            (``ChromaPipeline``: Chroma1-HD, T5-XXL only, Flux.1's VAE) or "flux-kontext"
            (``FluxKontextPipeline`` on FLUX.1-Kontext-dev, which has Flux.1-dev's
            configs: :func:`flux_pipeline`'s components).
        scale: 1.0 the real sizes (build them with ``device="meta"``); below, transformers of
            2 heads x 16 with ``round(blocks * scale)`` (at least 2) blocks of each kind, text
            encoders 32 wide (2 heads; the real depth where the pipeline reads hidden states by
            index: Mistral 40, Qwen3 36 layers; else 2), small VAEs with the real latent
            channels and scaling.
        sample_size: the latent size (default 4 below scale 1: 32-px images; the real
            pipelines' 128, 1024 px, at scale 1). ``default_sample_size`` of the pipeline.
        variant: "flux2-klein": "4b" (default; step-distilled, no CFG), "9b",
            "base-4b" or "base-9b" (undistilled: true CFG with a second call);
            "qwen-image-edit": "2511" (Qwen-Image-Edit-2511: ``QwenImageEditPlusPipeline`` on a
            transformer with ``zero_cond_t``, the reference patches modulated at t = 0).
        device: "meta" builds every module on the meta device (no memory; for sizes).

    The tokenizers are local (:func:`mistral_tokenizer`, :func:`qwen_tokenizer`,
    :func:`t5_tokenizer`); the text encoders' token ids (pad, image / vision markers) are those
    tokenizers' at ``scale < 1`` and the real ones at ``scale=1``.
    """
    import diffusers

    if arch not in BEDS_2026:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(BEDS_2026)}")
    if variant is not None and arch not in ("flux2-klein", "qwen-image-edit"):
        raise ValueError(f"variant is for flux2-klein and qwen-image-edit only, not {arch!r}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    torch.manual_seed(seed)
    meta = torch.device(device).type == "meta"
    with torch.device("meta") if meta else contextlib.nullcontext():
        if arch == "flux-kontext":
            pipe = flux_pipeline(scale, seed=seed, sample_size=sample_size)
            pipe = diffusers.FluxKontextPipeline(**pipe.components)
        else:
            components = _components_2026(arch, scale, variant)
            cls = {"flux2": "Flux2Pipeline", "flux2-klein": "Flux2KleinPipeline",
                   "qwen-image": "QwenImagePipeline", "qwen-image-edit": "QwenImageEditPipeline",
                   "z-image": "ZImagePipeline", "chroma": "ChromaPipeline"}[arch]
            if variant == "2511":
                cls = "QwenImageEditPlusPipeline"
            pipe = getattr(diffusers, cls)(**components)
    for module in pipe.components.values():  # as from_pretrained leaves them (T5 has dropout)
        if isinstance(module, torch.nn.Module):
            module.eval()
    if (scale < 1 or sample_size is not None) and arch != "z-image":  # Z-Image: 1024 px fixed
        pipe.default_sample_size = sample_size or 4
    if meta:
        return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
    return _finish(pipe, device, dtype)


def reference_image(size: int = 32, seed: int = 0):
    """A seeded random RGB ``PIL.Image`` of ``size`` x ``size`` px: the editing beds' input."""
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def call_kwargs_2026(arch: str, steps: int = 2, size: int = 32, seed: int = 0, **overrides) -> dict:
    """The keywords of a fast call of a :func:`pipeline_2026` bed: ``steps`` steps of a
    ``size``-px image, a seeded generator, the reference image for the editing beds.

    Where the pipelines would resize: Z-Image defaults to 1024 px (height / width given here);
    Kontext scales its output to ``max_area`` (1024² by default) and snaps the reference to a
    preferred ~1 MP resolution unless ``_auto_resize=False``; Qwen-Image-Edit always resizes the
    reference to ~1 MP (its VAE encode of 1024² px is most of that bed's run) and gives the
    output its size unless height / width are given.
    """
    if arch not in BEDS_2026:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(BEDS_2026)}")
    kw = dict(prompt="a red cat on the beach", num_inference_steps=steps, height=size,
              width=size, generator=torch.Generator().manual_seed(seed), output_type="latent")
    if arch in ("qwen-image-edit", "flux-kontext"):
        kw["image"] = reference_image(size, seed)
    if arch == "flux-kontext":
        kw.update(_auto_resize=False, max_area=size * size)
    kw.update(overrides)
    return kw
