"""SD-1.5 and SDXL architectures with random weights: their real topologies, for ``sspo bench`` and tests.

``small=True`` keeps each topology with tiny widths, so tests run them on a CPU in seconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from sspo.config import one_of
from sspo.models.tiny import scheduler_for as sd15_scheduler
from sspo.models.tiny import write_word_tokenizer
from sspo.paths import build_lock, cache_root

ARCH_MODELS = ("sd15", "sdxl")


def _unet_kwargs(name: str, small: bool) -> dict:
    """``UNet2DConditionModel`` arguments of SD-1.5 / SDXL (``small``: same topology, tiny widths; tests)."""
    if name == "sd15":
        return dict(
            sample_size=8 if small else 64, in_channels=4, out_channels=4, layers_per_block=1 if small else 2,
            block_out_channels=(32, 32, 64, 64) if small else (320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32 if small else 768, attention_head_dim=8, norm_num_groups=8 if small else 32,
        )
    return dict(  # SDXL base 1.0
        sample_size=8 if small else 128, in_channels=4, out_channels=4, layers_per_block=1 if small else 2,
        block_out_channels=(40, 80, 160) if small else (320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2) if small else (1, 2, 10),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, norm_num_groups=8 if small else 32,
        cross_attention_dim=64 if small else 2048,  # text_encoder + text_encoder_2 hidden sizes
        addition_embed_type="text_time", addition_time_embed_dim=8 if small else 256,
        projection_class_embeddings_input_dim=32 + 6 * 8 if small else 1280 + 6 * 256,  # pooled + 6 time ids
    )


def _text_kwargs(kind: str, small: bool) -> dict:
    """CLIP text encoders: ``clip-l`` (SD-1.5, SDXL's first), ``clip-bigg`` (SDXL's second)."""
    if kind == "clip-l":
        sizes = (32, 2, 2, 32) if small else (768, 12, 12, 768)
        act = "quick_gelu"
    else:
        sizes = (32, 2, 2, 32) if small else (1280, 32, 20, 1280)
        act = "gelu"
    hidden, layers, heads, projection = sizes
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                projection_dim=projection, hidden_act=act, max_position_embeddings=77, vocab_size=49408)


def _vae_kwargs(name: str, small: bool) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if small else 2,
        block_out_channels=(8, 8, 16, 16) if small else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4 if small else 32, sample_size=(64 if small else 512) * (2 if name == "sdxl" else 1),
        scaling_factor=0.13025 if name == "sdxl" else 0.18215, force_upcast=name == "sdxl",
    )


def arch_components(name: str, tokenizer, small: bool = False) -> dict:
    """Randomly initialised components of SD-1.5 or SDXL (``small``: the same topology, tiny widths)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if small:
        ids["vocab_size"] = len(tokenizer)
    components = {
        "unet": UNet2DConditionModel(**_unet_kwargs(name, small)),
        "vae": AutoencoderKL(**_vae_kwargs(name, small)),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**{**_text_kwargs("clip-l", small), **ids})),
        "tokenizer": tokenizer,
        "scheduler": sd15_scheduler(),  # SD-1.5 and SDXL share this noise schedule
    }
    if name == "sdxl":
        components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**{**_text_kwargs("clip-bigg", small), **ids}))
        components["tokenizer_2"] = tokenizer
    return components


def build_arch(name: str, folder: str | Path | None = None, small: bool = False, *, words: Sequence[str]) -> Path:
    """A diffusers folder with SD-1.5's or SDXL's architecture and random weights (fp16), cached.

    The tokenizer is a word-level CLIP tokenizer of ``words`` (a world's vocabulary) with CLIP's
    77-token length, so prompts are that world's; the text encoders keep CLIP's 49408-token
    embedding tables.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from filelock import FileLock

    one_of(name, ARCH_MODELS, "model")
    folder = Path(folder) if folder else cache_root() / "bench" / f"{name}{'-small' if small else ''}-random-v1"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(build_lock(folder)):
        if (folder / "model_index.json").is_file():
            return folder
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer = write_word_tokenizer(staging / "tokenizer-build", words, max_length=77)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):  # random init of billions of parameters is much faster on a GPU
            components = arch_components(name, tokenizer, small)
        if name == "sdxl":
            pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.to(torch.float16).save_pretrained(str(staging), safe_serialization=True)
        shutil.rmtree(staging / "tokenizer-build", ignore_errors=True)
        staging.rename(folder)
    return folder


def native_resolution(folder: str | Path) -> int:
    folder = Path(folder)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
