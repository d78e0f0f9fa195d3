"""``sspo base``: build and pretrain the shapes world's base model (its "Stable Diffusion 1.5").

The VAE is trained for reconstruction; then the text encoder and UNet are pretrained on a mix of
clean and defective renders of every attribute combination, so the base model is recognisably
right but mediocre, as a real base model is. Deterministic from the seed; cached by settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import check, to_dict
from .models.pipeline import TextCondition, denoising_errors, encode_images
from .models.tiny import TinySize, build_components, write_word_tokenizer
from .paths import cache_root
from .worlds import shapes

log = logging.getLogger(__name__)
_FORMAT_VERSION = 1  # bump when the recipe changes, so stale caches are rebuilt


@dataclasses.dataclass
class BaseConfig:
    size: str = "default"  # TinySize preset: default | quick
    seed: int = 0
    vae_steps: int = 400
    unet_steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 1e-3
    images_per_spec: int = 6  # pretraining images rendered per attribute combination
    defect_fraction: float = 0.5  # share of defective renders: makes the base mediocre
    caption_dropout: float = 0.1  # empty prompts, so classifier-free guidance works

    def __post_init__(self) -> None:
        TinySize.preset(self.size)
        check(0 <= self.defect_fraction <= 1, "defect_fraction", "must be in [0, 1]")
        check(0 <= self.caption_dropout < 1, "caption_dropout", "must be in [0, 1)")
        check(self.vae_steps > 0 and self.unet_steps > 0, "vae_steps/unet_steps", "must be positive")

    @classmethod
    def preset(cls, name: str) -> "BaseConfig":
        if name == "quick":
            return cls(size="quick", vae_steps=100, unet_steps=150, images_per_spec=2, batch_size=32)
        check(name == "default", "size", f"got {name!r}, expected default or quick")
        return cls()

    def cache_key(self) -> str:
        blob = json.dumps({"v": _FORMAT_VERSION, **to_dict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _pretraining_images(cfg: BaseConfig, image_size: int) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(cfg.seed)
    images, prompts = [], []
    for spec in shapes.all_specs():
        for _ in range(cfg.images_per_spec):
            if rng.random() < cfg.defect_fraction:
                image = shapes.render_defect(spec, rng, image_size)
            else:
                image = shapes.render(spec, image_size)
            images.append(np.asarray(image))
            prompts.append(spec.prompt)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, prompts


def _train_vae(vae, pixels: torch.Tensor, cfg: BaseConfig, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate)
    for _ in tqdm(range(cfg.vae_steps), desc="base: VAE", leave=False):
        batch = pixels[torch.randint(len(pixels), (cfg.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    vae.eval().requires_grad_(False)


def _train_denoiser(components: dict, tokenizer, latents, prompts, cfg: BaseConfig, generator) -> None:
    from diffusers import DDPMScheduler

    text_encoder, unet = components["text_encoder"], components["unet"]
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate / 2, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.learning_rate / 2, total_steps=cfg.unet_steps, pct_start=0.05)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    bar = tqdm(range(cfg.unet_steps), desc="base: UNet + text encoder", leave=False)
    for _ in bar:
        index = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
        batch_ids = ids[index].clone()
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        batch_ids[drop] = empty
        cond = TextCondition(text_encoder(batch_ids)[0])
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        loss = denoising_errors(unet, scheduler, x0, noise, t, cond).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")


def build_base(cfg: BaseConfig, output: str | Path | None = None, force: bool = False) -> Path:
    """Build (or reuse from the cache) the base pipeline folder; returns its path."""
    from filelock import FileLock

    output = Path(output) if output else cache_root() / f"base-{cfg.size}-{cfg.cache_key()}"
    output.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output) + ".lock"):  # parallel test workers and runs share one build
        if (output / "model_index.json").is_file() and not force:
            log.info("base model cached at %s", output)
            return output
        return _build(cfg, output)


def _build(cfg: BaseConfig, output: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    started = time.time()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = TinySize.preset(cfg.size)
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = write_word_tokenizer(staging / "tokenizer", shapes.vocabulary())
    components = build_components(size, tokenizer)
    pixels, prompts = _pretraining_images(cfg, size.image_size)
    vae = components["vae"]
    _train_vae(vae, pixels, cfg, generator)
    raw = torch.cat([encode_images(vae, chunk) / vae.config.scaling_factor for chunk in pixels.split(256)])
    # Like SD's 0.18215: scale latents to unit variance so the noise schedule fits them.
    vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    latents = raw * vae.config.scaling_factor
    _train_denoiser(components, tokenizer, latents, prompts, cfg, generator)
    pipe = StableDiffusionPipeline(
        **components, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(staging, safe_serialization=True)
    (staging / "sspo_base.json").write_text(json.dumps({"config": to_dict(cfg), "seconds": round(time.time() - started, 1)}, indent=2))
    shutil.rmtree(output, ignore_errors=True)
    os.replace(staging, output)
    log.info("built base model in %.0f s at %s", time.time() - started, output)
    return output
