"""A tiny, deterministic StableDiffusionXLPipeline built from configs (random weights, no downloads).

Same component layout as SDXL-Turbo (two CLIP text encoders, the second with a projection; a
UNet2DConditionModel with cross-attention transformer blocks and ``text_time`` add embeddings; an
AutoencoderKL; an EulerDiscreteScheduler with ``timestep_spacing="trailing"``), shrunk so a 64x64
image takes well under a second on CPU. Used by tests and by the multimodal mechanics demo.

The tokenizers are byte-level CLIP BPE tokenizers with a character vocabulary and no merges: they
are built in memory, so nothing is fetched from a hub.

Block layout of the tiny U-Net (for hook names; the SAE reads each block's update):
- ``down_blocks.1.attentions.{0,1}``: 64 channels at 1/2 the latent resolution
- ``mid_block.attentions.0``: 64 channels at 1/2 the latent resolution
- ``up_blocks.0.attentions.{0,1,2}``: 64 channels at 1/2 the latent resolution
The VAE downsamples by 2, so a 64x64 image has 32x32 latents and 16x16 transformer blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

#: Hidden size of both tiny text encoders; the U-Net's cross-attention dim is their concatenation.
TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
ADD_TIME_EMBED_DIM = 8
#: Default image side of the tiny pipeline (pixels).
IMAGE_SIDE = 64


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol plain and with ``</w>``, plus the two specials."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    return vocab


def build_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (514 tokens) built in memory."""
    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=model_max_length)


def _text_config(seed_layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(byte_level_vocab()),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=seed_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_PROJECTION,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build the tiny pipeline with weights drawn from ``seed`` (same seed, same weights)."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(2))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(2))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIDE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADD_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADD_TIME_EMBED_DIM + TEXT_PROJECTION,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIDE,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        num_train_timesteps=1000,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """Build with ``seed`` and ``save_pretrained`` into ``path`` (safetensors); returns the path."""
    path = Path(path)
    build_tiny_sdxl(seed).save_pretrained(path, safe_serialization=True)
    return path


#: Transformer blocks of the tiny U-Net, in the order the U-Net runs them.
TINY_SDXL_BLOCKS = (
    "unet.down_blocks.1.attentions.0",
    "unet.down_blocks.1.attentions.1",
    "unet.mid_block.attentions.0",
    "unet.up_blocks.0.attentions.0",
    "unet.up_blocks.0.attentions.1",
    "unet.up_blocks.0.attentions.2",
)
