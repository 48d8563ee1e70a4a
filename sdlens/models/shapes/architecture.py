"""The shipped "shapes" model's components: the same classes as Stable Diffusion, much smaller.

- tokenizer: the real CLIP BPE tokenizer (49408 ids, 77 positions), see ``tokenizer.py``
- text encoder: ``CLIPTextModel``, hidden 64, 3 layers, 4 heads (causal, like CLIP)
- VAE: ``AutoencoderKL`` 64x64x3 <-> 16x16x4 (f=4), 0.7M params
- UNet: ``UNet2DConditionModel`` 64/128/128 channels, cross-attention at 16x16 and 8x8 in the
  down path, 4x4 in the middle, 8x8 and 16x16 in the up path (7 ``attn2`` layers)
- scheduler: ``DDIMScheduler`` with SD's scaled-linear betas (0.00085 .. 0.012, 1000 steps)
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

IMAGE_SIZE = 64
LATENT_SIZE = 16
TEXT_HIDDEN = 64


def text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=TEXT_HIDDEN,
    )
    return CLIPTextModel(config)


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
