"""Randomly initialised SD 1.x and SDXL topology pipelines for tests and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level CLIP tokenizer written from scratch (the 256 byte
symbols, their "</w>" word-final forms and the two special tokens, no merges), and every component is a
real diffusers / transformers module saved as a real diffusers folder, so it loads through the same code
path as SD 1.5.

Sizes:
  tiny  a UNet step in well under a second on a CPU (2 down blocks, 32/64 channels, 32-wide text encoder)
  mid   SD 1.5 topology (4 down blocks, 3 with cross-attention), UNet 64/128/256/256, 768-wide text
        encoder, the SD VAE's real sizes
  sd15  SD 1.5's real sizes with random weights, for benchmarks only
  sdxl-tiny  SDXL's structure at tiny widths: two text encoders (32- and 48-wide, the second with a
        40-wide projection, so that no two widths coincide), a UNet with text_time added conditioning,
        transformer_layers_per_block (1, 2) and SDXL's real attention head dim, 64
  sdxl-mid   SDXL's structure with 3 blocks of 128/256/512 channels, 4-layer 768- and 1280-wide text
        encoders, SDXL's real added-conditioning widths (256 per time id, 2816 in all) and the SD VAE sizes
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

SIZES = ("tiny", "mid", "sd15", "sdxl-tiny", "sdxl-mid")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def byte_vocab() -> dict[str, int]:
    """The 256 byte symbols, then their word-final "</w>" forms: a base on which any text tokenizes."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    return vocab


def byte_level_clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer over single bytes: every string tokenizes, nothing is downloaded. pad_token: SDXL's
    second tokenizer pads with "!" instead of the end token."""
    from transformers import CLIPTokenizer

    vocab = byte_vocab()
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token=pad_token)


def model_configs(size: str, vocab_size: int = 2) -> tuple[dict, dict, dict]:
    """The (text encoder, UNet, VAE) configs of an SD 1.x `size` pipeline (vocab_size: the tokenizer's)."""
    if size == "tiny":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        unet = dict(
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, norm_num_groups=8, sample_size=16,
        )
        vae = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    elif size in ("mid", "sd15"):
        sd_down = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        sd_up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
        channels = (64, 128, 256, 256) if size == "mid" else (320, 640, 1280, 1280)
        text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                    num_hidden_layers=4 if size == "mid" else 12)
        unet = dict(
            block_out_channels=channels, layers_per_block=2, cross_attention_dim=768,
            down_block_types=sd_down, up_block_types=sd_up, attention_head_dim=8,
            norm_num_groups=32, sample_size=64,
        )
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    else:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    text.update(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_act="quick_gelu")
    unet.update(in_channels=4, out_channels=4)
    vae.update(in_channels=3, out_channels=3, latent_channels=4)
    return text, unet, vae


def build_vae(size: str = "tiny", seed: int = 0):
    """The AutoencoderKL of a `size` pipeline alone (the SD VAE's real sizes from "mid" on), randomly initialised."""
    from diffusers import AutoencoderKL

    _, _, vae_cfg = model_configs(size)
    torch.manual_seed(seed)
    return AutoencoderKL(**vae_cfg)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, steps_offset=1, prediction_type="epsilon")


def build_pipeline(size: str = "tiny", seed: int = 0):
    """Build a randomly initialised StableDiffusionPipeline (StableDiffusionXLPipeline for the sdxl-* sizes)
    of the given size (on the CPU, fp32)."""
    if size.startswith("sdxl"):
        return build_sdxl_pipeline(size, seed)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_level_clip_tokenizer()
    text_cfg, unet_cfg, vae_cfg = model_configs(size, len(tokenizer))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    scheduler = _scheduler()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl_configs(size: str, vocab_size: int) -> tuple[dict, dict, dict, dict]:
    """text encoder 1, text encoder 2 (with projection), UNet and VAE configs of an SDXL-topology model."""
    if size == "sdxl-tiny":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        text_2 = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=40)
        time_dim = 8
        # head dim 64, SDXL's own (diffusers' attention_head_dim holds the number of heads here)
        unet = dict(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(1, 2),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2), norm_num_groups=8, sample_size=16)
        vae = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    elif size == "sdxl-mid":
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12)
        text_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=4, num_attention_heads=20,
                      projection_dim=1280, hidden_act="gelu")
        time_dim = 256
        unet = dict(block_out_channels=(128, 256, 512), layers_per_block=2, attention_head_dim=(2, 4, 8),
                    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                    up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                    transformer_layers_per_block=(1, 2, 4), norm_num_groups=32, sample_size=64)
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   scaling_factor=0.13025)
    else:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    for t in (text, text_2):
        t.setdefault("hidden_act", "quick_gelu")
        t.update(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                 eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    unet.update(in_channels=4, out_channels=4, use_linear_projection=True,
                cross_attention_dim=text["hidden_size"] + text_2["hidden_size"],
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                # 6 time ids (original size, crop top-left, target size) and encoder 2's pooled projection
                projection_class_embeddings_input_dim=6 * time_dim + text_2["projection_dim"])
    vae.update(in_channels=3, out_channels=3, latent_channels=4)
    return text, text_2, unet, vae


def build_sdxl_pipeline(size: str = "sdxl-tiny", seed: int = 0):
    """A randomly initialised StableDiffusionXLPipeline (base model: both text encoders) on the CPU, fp32."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = byte_level_clip_tokenizer()
    tokenizer_2 = byte_level_clip_tokenizer(pad_token="!")
    text_cfg, text_2_cfg, unet_cfg, vae_cfg = _sdxl_configs(size, len(tokenizer))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2_cfg))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=_scheduler(), force_zeros_for_empty_prompt=True)


def save_pipeline(size: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a pipeline of one of SIZES as a diffusers folder (safetensors) and return its path."""
    path = Path(path)
    build_pipeline(size, seed).save_pretrained(path, safe_serialization=True)
    return path


def write_concept_images(folder: str | os.PathLike, n: int = 2, size: int = 64, seed: int = 0) -> Path:
    """Write n small distinct RGB PNGs (a coloured square on a background) as a concept folder."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((size, size, 3), 235, dtype=np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        img[y0:y0 + size // 2, x0:x0 + size // 2] = (200, 40 + 60 * i % 200, 40)
        Image.fromarray(img).save(folder / f"img_{i}.png")
    return folder


def save_clip_vision(path: str | os.PathLike, seed: int = 0, projection: bool = True) -> Path:
    """A tiny randomly initialised CLIP vision model (with or without its projection), saved as a transformers
    folder: the stand-in for a local CLIP vision folder (E4T's --image-encoder)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    model = (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(config)
    model.save_pretrained(path)
    return Path(path)
