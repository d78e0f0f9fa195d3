"""Tiny AnimateDiff, SDXL, SD3 and FLUX pipelines, saved offline from sspo's tiny components: the video,
SDXL and flow-matching code paths in tests (a module, not a conftest, so it can be imported)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AnimateDiffPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from sspo.models.tiny import TinySize, motion_adapter_for, scheduler_for, text_encoder_for, unet_for, vae_for, video_size, word_table_text_encoder, write_word_tokenizer
from sspo.worlds.shapes.world import vocabulary


def _seeded(folder: str | Path, words: Sequence[str] | None, size: TinySize | None, seed: int) -> tuple[Path, TinySize, list[str]]:
    """An image builder's folder, size and vocabulary (the shapes world's unless given), with torch seeded for its weights."""
    torch.manual_seed(seed)
    return Path(folder), size or TinySize.preset("quick"), list(words or vocabulary())


def build_video_pipeline(folder: str | Path, words: Sequence[str], size: TinySize | None = None, max_frames: int = 32, seed: int = 0,
                         identity_motion: bool = True, separate: bool = False) -> Path:
    """Save a tiny ``AnimateDiffPipeline``: word-table text encoder, VAE, a UNet and motion modules
    (:func:`motion_adapter_for`; the AnimateDiff code path, offline). ``separate``: as users get
    real weights instead, an image pipeline in ``folder/image`` and a ``MotionAdapter`` in
    ``folder/motion_adapter`` (SD-1.5 plus an AnimateDiff adapter).

    The UNet has no pooled-text embedding (the image world's ``addition_embed_type="text"``):
    ``UNetMotionModel`` supports only SDXL's ``text_time`` and drops it without a word.
    """
    folder = Path(folder)
    size = size or video_size("quick")
    torch.manual_seed(seed)
    tokenizer = write_word_tokenizer(folder / ("image" if separate else "") / "tokenizer", words)
    unet = unet_for(size, cross_attention_dim=size.text_hidden)
    components = dict(vae=vae_for(size), text_encoder=word_table_text_encoder(text_encoder_for(size, tokenizer), tokenizer, words, seed),
                      tokenizer=tokenizer, unet=unet, scheduler=scheduler_for(zero_terminal_snr=True))
    adapter = motion_adapter_for(unet, max_frames, seed=seed, identity=identity_motion)
    if separate:
        StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder / "image", safe_serialization=True)
        adapter.save_pretrained(folder / "motion_adapter", safe_serialization=True)
    else:
        AnimateDiffPipeline(**components, motion_adapter=adapter).save_pretrained(folder, safe_serialization=True)
    return folder


def build_sdxl_pipeline(folder: str | Path, words: Sequence[str] | None = None, size: TinySize | None = None, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``StableDiffusionXLPipeline`` (the SDXL code path, offline).

    As in SDXL: two text encoders whose penultimate hidden states are concatenated (the second
    with a projection giving the pooled embedding), and a UNet with ``text_time`` added
    conditioning on the pooled embedding plus six size/crop ids.
    """
    folder, size, words = _seeded(folder, words, size, seed)
    tokenizer = write_word_tokenizer(folder / "tokenizer", words)
    tokenizer_2 = write_word_tokenizer(folder / "tokenizer_2", words)
    time_dim = 8
    pipe = StableDiffusionXLPipeline(
        vae=vae_for(size),
        text_encoder=text_encoder_for(size, tokenizer),
        text_encoder_2=text_encoder_for(size, tokenizer_2, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet_for(
            size,
            cross_attention_dim=2 * size.text_hidden,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + size.text_hidden,
        ),
        scheduler=scheduler_for(),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_flux_pipeline(folder: str | Path, words: Sequence[str] | None = None, size: TinySize | None = None, seed: int = 0,
                        guidance_embeds: bool = True) -> Path:
    """Save a randomly initialised tiny ``FluxPipeline`` (the FLUX.1 code path, offline).

    As in FLUX.1: a CLIP text encoder for the pooled embedding, a T5 encoder for the token
    embeddings, a VAE with a shift factor, and a transformer over 2x2 patches of the latents
    (``in_channels`` 4x the VAE's) with a guidance embedding when ``guidance_embeds`` (FLUX-dev; off:
    schnell). The scheduler is FLUX-dev's: its dynamic shift grows with the image's sequence length
    from 256 to 4096 tokens (a 512 to 1024 px image of FLUX.1) and extrapolates linearly outside.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from sspo.models.tiny import write_t5_tokenizer

    folder, size, words = _seeded(folder, words, size, seed)
    tokenizer = write_word_tokenizer(folder / "tokenizer", words)
    tokenizer_2 = write_t5_tokenizer(folder / "tokenizer_2", words)
    t5_hidden = 32
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=t5_hidden, d_kv=8, d_ff=2 * t5_hidden, num_layers=1, num_heads=4,
                                             pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id))
    vae = vae_for(size)
    vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE's
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * size.latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=t5_hidden, pooled_projection_dim=size.text_hidden, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder_for(size, tokenizer), tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_sd3_pipeline(folder: str | Path, words: Sequence[str] | None = None, size: TinySize | None = None, seed: int = 0,
                       t5: bool = False) -> Path:
    """Save a randomly initialised tiny ``StableDiffusion3Pipeline`` (the flow-matching code path, offline).

    As in SD3: two CLIP encoders with projections (their penultimate hidden states concatenated,
    their pooled embeddings too), an MMDiT transformer and a shifted flow-matching Euler scheduler.
    With ``t5`` a tiny T5 encoder gives the token embeddings after CLIP's; without, as SD3 allows
    (``text_encoder_3=None``), the pipeline puts zeros where T5's would go, and plain diffusers loads
    it with ``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``.
    """
    from transformers import T5Config, T5EncoderModel

    from sspo.models.tiny import write_t5_tokenizer

    folder, size, words = _seeded(folder, words, size, seed)
    tokenizer = write_word_tokenizer(folder / "tokenizer", words)
    tokenizer_2 = write_word_tokenizer(folder / "tokenizer_2", words)
    latent_side = size.image_size // 2 ** (len(size.vae_channels) - 1)
    vae = vae_for(size)
    vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's: its latents are shifted, then scaled
    tokenizer_3 = write_t5_tokenizer(folder / "tokenizer_3", words) if t5 else None
    t5_config = T5Config(vocab_size=len(tokenizer_3), d_model=2 * size.text_hidden, d_kv=8, d_ff=4 * size.text_hidden, num_layers=1, num_heads=4,
                         pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id) if t5 else None
    pipe = StableDiffusion3Pipeline(
        vae=vae,
        text_encoder=text_encoder_for(size, tokenizer, with_projection=True),
        text_encoder_2=text_encoder_for(size, tokenizer_2, with_projection=True),
        text_encoder_3=T5EncoderModel(t5_config) if t5 else None,  # its width is the transformer's joint_attention_dim, as in SD3
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
        transformer=SD3Transformer2DModel(
            sample_size=latent_side, patch_size=2, in_channels=size.latent_channels, out_channels=size.latent_channels,
            num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=2 * size.text_hidden,
            caption_projection_dim=16, pooled_projection_dim=2 * size.text_hidden,
            pos_embed_max_size=latent_side,  # in patches of 2: latents up to twice the native side (training at 2x resolution)
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_pixart_pipeline(folder: str | Path, words: Sequence[str] | None = None, size: TinySize | None = None, seed: int = 0,
                          alpha: bool = False) -> Path:
    """Save a randomly initialised tiny ``PixArtSigmaPipeline`` (``alpha``: ``PixArtAlphaPipeline``
    with the size conditioning of PixArt-Alpha's 1024 px models), the PixArt code path, offline.

    As in PixArt: one T5 encoder (its token embeddings, with their attention mask, are the text
    condition), a DiT over 2x2 patches of the latents with learned sigma (``out_channels`` twice the
    latents'), and a DPM-Solver++ scheduler on the linear-beta epsilon schedule.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from sspo.models.tiny import write_t5_tokenizer

    folder, size, words = _seeded(folder, words, size, seed)
    tokenizer = write_t5_tokenizer(folder / "tokenizer", words)
    t5_hidden = 32
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=t5_hidden, d_kv=8, d_ff=2 * t5_hidden, num_layers=1, num_heads=4,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    latent_side = size.image_size // 2 ** (len(size.vae_channels) - 1)
    heads, head_dim = 3 if alpha else 2, 8  # the size embeddings take a third of the width each (height and width, aspect ratio)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=size.latent_channels, out_channels=2 * size.latent_channels,
        num_layers=2, cross_attention_dim=heads * head_dim, patch_size=2, caption_channels=t5_hidden,
        # PixArtAlphaPipeline tells the sizes to a transformer of sample_size 128 only (its 1024 px models), whatever the images' size
        sample_size=128 if alpha else latent_side, use_additional_conditions=alpha,
    )
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon")
    pipeline = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipe = pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae_for(size), transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
