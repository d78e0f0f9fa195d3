"""Tiny but real diffusers components: the shapes world's "Stable Diffusion", built offline.

Every component is a stock diffusers / transformers class with small sizes, so that
``StableDiffusionPipeline.from_pretrained(folder)`` loads the result with no sspo import, and
every code path of the trainer is exercised exactly as with SD-1.5.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from ..config import check

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclasses.dataclass
class TinySize:
    """Sizes of the tiny model. ``default`` is the demo's base model; ``quick`` is for tests."""

    image_size: int = 32
    text_hidden: int = 64
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 blocks: 32x32 images -> 8x8 latents
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    latent_channels: int = 4

    def __post_init__(self) -> None:
        check(self.image_size % 2 ** (len(self.vae_channels) - 1) == 0, "image_size", "must divide by the VAE's downsampling")
        check(self.text_hidden % 16 == 0, "text_hidden", "must be a multiple of 16")

    @classmethod
    def preset(cls, name: str) -> "TinySize":
        presets = {
            "default": cls(),
            "quick": cls(text_hidden=32, vae_channels=(8, 16, 16), unet_channels=(16, 32)),
        }
        check(name in presets, "size", f"got {name!r}, expected one of {', '.join(presets)}")
        return presets[name]


def write_word_tokenizer(folder: str | Path, words: Sequence[str], max_length: int = 16):
    """Write a CLIP tokenizer (vocab.json + merges.txt) in which every world word is one token.

    The merges come from training a real BPE on the words with CLIP's ``</w>`` end-of-word
    suffix, so stock ``CLIPTokenizer`` reproduces them exactly.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, special_tokens=[BOS, EOS], end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator([" ".join(words)], trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"),
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=max_length,
    )
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        check(len(ids) == 1, "tokenizer", f"world word {word!r} tokenizes to {len(ids)} tokens, expected 1")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_components(size: TinySize, tokenizer) -> dict:
    """Randomly initialised text encoder, VAE and UNet of the given size, plus the scheduler."""
    text_encoder = _text_encoder(size, tokenizer)
    vae = _vae(size)
    unet = _unet(size, cross_attention_dim=size.text_hidden)
    return {"text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": _scheduler()}


def build_sdxl_pipeline(folder: str | Path, words: Sequence[str] | None = None, size: TinySize | None = None, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``StableDiffusionXLPipeline`` (the SDXL code path, offline).

    As in SDXL: two text encoders whose penultimate hidden states are concatenated (the second
    with a projection giving the pooled embedding), and a UNet with ``text_time`` added
    conditioning on the pooled embedding plus six size/crop ids.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    from ..worlds.shapes import vocabulary

    folder = Path(folder)
    size = size or TinySize.preset("quick")
    words = list(words or vocabulary())
    torch.manual_seed(seed)
    tokenizer = write_word_tokenizer(folder / "tokenizer", words)
    tokenizer_2 = write_word_tokenizer(folder / "tokenizer_2", words)
    time_dim = 8
    pipe = StableDiffusionXLPipeline(
        vae=_vae(size),
        text_encoder=_text_encoder(size, tokenizer),
        text_encoder_2=_text_encoder(size, tokenizer_2, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_unet(
            size,
            cross_attention_dim=2 * size.text_hidden,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + size.text_hidden,
        ),
        scheduler=_scheduler(),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _text_encoder(size: TinySize, tokenizer, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_hidden * 4,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_hidden // 16,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=size.text_hidden,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(size: TinySize):
    from diffusers import AutoencoderKL

    n_vae = len(size.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=size.vae_channels,
        layers_per_block=1,
        latent_channels=size.latent_channels,
        norm_num_groups=min(size.vae_channels) // 2,
        sample_size=size.image_size,
    )


def _unet(size: TinySize, cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    n_unet = len(size.unet_channels)
    return UNet2DConditionModel(
        sample_size=size.image_size // 2 ** (len(size.vae_channels) - 1),
        in_channels=size.latent_channels,
        out_channels=size.latent_channels,
        block_out_channels=size.unet_channels,
        layers_per_block=size.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=min(size.unet_channels) // 2,
        **extra,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    # SD-1.5's noise schedule; DDIM is its usual fast sampler.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
