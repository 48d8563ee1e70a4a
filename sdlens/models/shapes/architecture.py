"""The shipped "shapes" model's components: the same classes as Stable Diffusion, much smaller.

- tokenizer: the real CLIP BPE tokenizer (49408 ids, 77 positions), see ``tokenizer.py``
- text encoder: ``CLIPTextModel``, hidden 64, 3 layers, 4 heads (causal, like CLIP)
- VAE: ``AutoencoderKL`` 64x64x3 <-> 16x16x4 (f=4), 0.7M params
- UNet: ``UNet2DConditionModel`` 64/128/128 channels, cross-attention at 16x16 and 8x8 in the
  down path, 4x4 in the middle, 8x8 and 16x16 in the up path (7 ``attn2`` layers)
- scheduler: ``DDIMScheduler`` with SD's scaled-linear betas (0.00085 .. 0.012, 1000 steps)

The second shipped model, "shapes-mmdit", is Stable Diffusion 3's architecture, much smaller
(loaded by ``StableDiffusion3Pipeline``):

- tokenizers: the same CLIP tokenizer for both CLIP slots; no T5 (``text_encoder_3=None``)
- text encoders: two ``CLIPTextModelWithProjection`` (hidden 64 and 32, 3 layers), whose
  penultimate hidden states are joined channel-wise (96 = ``joint_attention_dim``) and whose
  projected pooled outputs are joined into the 96-d pooled vector, as SD3 joins CLIP-L and CLIP-G
- transformer: ``SD3Transformer2DModel``, 6 joint-attention blocks, width 128 (4 heads of 32),
  patch 2: the 16x16 latents are 8x8 image tokens
- VAE: the shapes VAE above (its ``scaling_factor`` / ``shift_factor`` measured for this model)
- scheduler: ``FlowMatchEulerDiscreteScheduler`` (shift 1)
"""

from __future__ import annotations

from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler,
                       SD3Transformer2DModel, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

IMAGE_SIZE = 64
LATENT_SIZE = 16
TEXT_HIDDEN = 64


def _clip_config(hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=hidden,
    )


def text_encoder() -> CLIPTextModel:
    return CLIPTextModel(_clip_config(TEXT_HIDDEN))


# ``attention_head_dim`` is, in diffusers' UNet2DConditionModel, the number of heads per block
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 128), layers_per_block=1,
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=32,
)


def unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
        norm_num_groups=16, sample_size=IMAGE_SIZE,
    )


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="epsilon",
    )


# ----------------------------------------------------------------------------- shapes-mmdit
MMDIT_TEXT_HIDDEN = (64, 32)  # the "CLIP-L" and "CLIP-G" slots
MMDIT_CONFIG = dict(
    sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
    attention_head_dim=32, num_attention_heads=4, joint_attention_dim=sum(MMDIT_TEXT_HIDDEN),
    caption_projection_dim=128, pooled_projection_dim=sum(MMDIT_TEXT_HIDDEN),
    pos_embed_max_size=32,  # up to 128 px images
)
# The T5 slot is empty (``text_encoder_3=None``): the pipeline appends ``max_sequence_length``
# zero tokens to the text sequence. The model was trained mostly without them (and on 256 of them
# now and then, the pipeline's default, so that a plain call still works); sdlens's own calls on
# this model pass these arguments, which cost nothing.
MMDIT_CALL_DEFAULTS = {"max_sequence_length": 0}


def mmdit_text_encoders() -> tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    return tuple(CLIPTextModelWithProjection(_clip_config(h)) for h in MMDIT_TEXT_HIDDEN)


def mmdit_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(**MMDIT_CONFIG)


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
