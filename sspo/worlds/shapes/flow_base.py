"""``sspo base --size flow``: the shapes world's flow-matching base (its "Stable Diffusion 3").

The image base's VAE and word table, two CLIP encoders with projections as SD3 has (the word table
in each; no T5, as SD3 allows), and an MMDiT transformer
pretrained by flow matching on the same mix of clean and defective renders as the image base, so
it is recognisably right but mediocre. A stock ``StableDiffusion3Pipeline``; deterministic from the
seed; shipped for the default size, cached otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from sspo.config import MAX_SEED, check, setting, to_dict, validate
from sspo.models.families import family_of
from sspo.models.pipeline import encode_images
from sspo.models.tiny import word_table_text_encoder
from sspo.worlds.base_building import cached_build, save_base, train_denoiser
from sspo.worlds.shapes import world as shapes
from sspo.worlds.shapes.base_model import BaseConfig, build_base, pretraining_images

_FORMAT_VERSION = 1  # bump when the recipe changes, so stale caches are rebuilt
PRESETS = ("flow", "flow-quick")  # the shapes world's base presets this module builds
PACKAGED_FLOW_BASE = Path(__file__).resolve().parent / "weights" / "shapes-base-flow"


@dataclasses.dataclass
class FlowBaseConfig:
    size: str = setting("default", choices=("default", "quick"))  # the image base whose VAE and word table it takes
    seed: int = setting(0, at_least=0, at_most=MAX_SEED)  # seeds the renders, the initial weights and the training draws
    layers: int = setting(4, at_least=1)  # MMDiT blocks
    heads: int = setting(4, at_least=1)  # attention heads of 16 dimensions each
    shift: float = setting(3.0, above=0)  # the flow scheduler's shift, SD3's: training and sampling lean to noisier latents
    denoiser_steps: int = setting(1500, at_least=1)  # denoiser pretraining: optimizer steps
    batch_size: int = setting(64, at_least=1)  # images per denoiser step
    denoiser_learning_rate: float = setting(2e-3, above=0)  # peak of the one-cycle schedule
    images_per_spec: int = setting(6, at_least=1)  # pretraining images rendered per attribute combination
    defect_fraction: float = setting(0.6, at_least=0, at_most=1)  # share of defective renders: makes the base mediocre
    defects: tuple[str, ...] = setting(("checker",), choices=shapes.DEFECTS)  # the kinds of defective render it learns from
    caption_dropout: float = setting(0.1, at_least=0, below=1)  # empty prompts, so classifier-free guidance works

    def __post_init__(self) -> None:
        validate(self)
        check(not self.defect_fraction or self.defects, "defects", "is empty, so defect_fraction has no defect to render")

    @classmethod
    def preset(cls, name: str) -> FlowBaseConfig:
        if name == "flow-quick":
            return cls(size="quick", layers=2, heads=2, denoiser_steps=200, images_per_spec=2, batch_size=32)
        return cls()

    @property
    def image_base(self) -> BaseConfig:
        return BaseConfig.preset(self.size)

    def cache_key(self) -> str:
        blob = json.dumps({"v": _FORMAT_VERSION, "image_base": self.image_base.cache_key(), **to_dict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_flow_base(cfg: FlowBaseConfig, output: str | Path | None = None, force: bool = False) -> Path:
    """The flow base's pipeline folder: shipped, cached, or built now."""
    return cached_build(cfg, _build, "base-flow", PACKAGED_FLOW_BASE, output, force)


def _build(cfg: FlowBaseConfig, staging: Path, output: Path) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    started = time.time()
    image_base = build_base(cfg.image_base)
    # Seeded after the image base, which draws from torch's global RNG when this call builds it, not when it is cached.
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    vae = AutoencoderKL.from_pretrained(str(image_base), subfolder="vae").eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline shifts its latents; the image base's are centred already
    tokenizer = CLIPTokenizer.from_pretrained(str(image_base), subfolder="tokenizer")
    text_config = CLIPTextConfig.from_pretrained(str(image_base), subfolder="text_encoder")
    encoders = [word_table_text_encoder(CLIPTextModelWithProjection(text_config), tokenizer, shapes.vocabulary(), cfg.seed) for _ in range(2)]
    latent_side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    hidden = text_config.hidden_size
    transformer = SD3Transformer2DModel(
        sample_size=latent_side, patch_size=2, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        num_layers=cfg.layers, attention_head_dim=16, num_attention_heads=cfg.heads, joint_attention_dim=2 * hidden,
        caption_projection_dim=16 * cfg.heads, pooled_projection_dim=2 * hidden,
        pos_embed_max_size=latent_side,  # in patches of 2: latents up to twice the native side
    )
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift), vae=vae,
                                    text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pixels, prompts = pretraining_images(cfg, vae.config.sample_size)
    latents = torch.cat([encode_images(vae, part) for part in pixels.split(256)])
    family = family_of(pipe)  # FlowConfig's defaults: logit-normal sigma, unweighted errors
    # Each distinct prompt encoded once: SD3's condition is 256 T5 slots (zeros here) after CLIP's tokens.
    distinct = list(dict.fromkeys(prompts))
    conds = family.encode_prompts(distinct, "cpu")
    empty = family.encode_prompts([""], "cpu")
    index = {prompt: i for i, prompt in enumerate(distinct)}
    train_denoiser(family, conds, torch.tensor([index[p] for p in prompts]), empty, latents, cfg, generator)
    return save_base(pipe, cfg, staging, output, started)
