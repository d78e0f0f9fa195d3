"""``sspo base``: build and pretrain the shapes world's base model (its "Stable Diffusion 1.5").

The VAE is trained for reconstruction; then the text encoder and denoiser are pretrained on a mix of
clean and defective renders of every attribute combination, so the base model is recognisably
right but mediocre, as a real base model is. Deterministic from the seed; cached by settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import torch

from sspo.config import MAX_SEED, check, setting, to_dict, validate
from sspo.models.families import family_of
from sspo.models.tiny import TinySize, build_components, write_word_tokenizer
from sspo.worlds.base_building import (
    cached_build,
    pixel_batch,
    pretraining_renders,
    round_trip_images,
    save_base,
    train_denoiser,
    train_vae,
    unit_variance_latents,
    word_conditions,
)
from sspo.worlds.shapes import world as shapes

_FORMAT_VERSION = 3  # bump when the recipe changes, so stale caches are rebuilt


@dataclasses.dataclass
class BaseConfig:
    size: str = setting("default", choices=("default", "quick", "64px"))  # TinySize preset
    seed: int = setting(0, at_least=0, at_most=MAX_SEED)  # seeds the renders, the initial weights and the training draws
    # The VAE learns in two phases: clean renders first (sharp edges: clean round trips score 0.90,
    # against 0.61 when it learns from the mix at once), then the mix of clean and defective renders
    # at a lower rate, so that the latent also holds the defects (a VAE that never saw a blur
    # sharpens it away, and a base pretrained on such latents never shows a defect).
    vae_steps: int = setting(2000, at_least=1)  # VAE clean phase: optimizer steps
    vae_defect_steps: int = setting(600, at_least=0)  # VAE mix phase: optimizer steps (0: no mix phase)
    vae_batch_size: int = setting(32, at_least=1)  # images per VAE step, both phases
    learning_rate: float = setting(2e-3, above=0)  # VAE clean phase, peak of the one-cycle schedule
    vae_defect_learning_rate: float = setting(5e-4, above=0)  # VAE mix phase, peak of its one-cycle schedule
    vae_defect_fraction: float = setting(0.5, at_least=0, at_most=1)  # share of defective renders in the VAE's mix phase
    vae_defects: tuple[str, ...] = setting(("blur", "smear", "checker"), choices=shapes.DEFECTS)  # pixel noise is too fine for any 8x8 latent
    denoiser_steps: int = setting(1500, at_least=1)  # denoiser pretraining: optimizer steps
    batch_size: int = setting(64, at_least=1)  # denoiser pretraining
    denoiser_learning_rate: float = setting(2e-3, above=0)  # peak of the one-cycle schedule
    images_per_spec: int = setting(6, at_least=1)  # pretraining images rendered per attribute combination
    defect_fraction: float = setting(0.6, at_least=0, at_most=1)  # share of defective renders the denoiser learns from: makes the base mediocre
    # Quality defects the latent holds; attribute errors are left to the model's own.
    defects: tuple[str, ...] = setting(("checker",), choices=shapes.DEFECTS)
    caption_dropout: float = setting(0.1, at_least=0, below=1)  # empty prompts, so classifier-free guidance works

    def __post_init__(self) -> None:
        validate(self)
        for fraction, defects in (("defect_fraction", "defects"), ("vae_defect_fraction", "vae_defects")):
            check(not getattr(self, fraction) or getattr(self, defects), defects,
                  f"is empty, so {fraction} has no defect to render; name some of {', '.join(shapes.DEFECTS)}, or set {fraction}: 0")

    @classmethod
    def preset(cls, name: str) -> BaseConfig:
        if name == "quick":
            return cls(size="quick", vae_steps=200, vae_defect_steps=60, denoiser_steps=500, images_per_spec=2, batch_size=32)
        return cls(size=name)

    def cache_key(self) -> str:
        blob = json.dumps({"v": _FORMAT_VERSION, **to_dict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretraining_images(cfg: BaseConfig, image_size: int) -> tuple[torch.Tensor, list[str]]:
    images, prompts = pretraining_renders(shapes.all_specs(), cfg.images_per_spec, cfg, lambda spec: shapes.render(spec, image_size),
                                          lambda spec, rng, defect: shapes.render_defect(spec, rng, image_size, defect))
    return pixel_batch(images), prompts


# The default base, as built by ``sspo base --force`` and shipped in the package: its build takes
# longer than the demo's 10-minute budget on a 2-core CPU. A plain diffusers folder.
PACKAGED_BASE = Path(__file__).resolve().parent / "weights" / "shapes-base"


def build_base(cfg: BaseConfig, output: str | Path | None = None, force: bool = False) -> Path:
    """The base pipeline folder: shipped, cached, or built now; returns its path.

    ``force`` builds it even when shipped or cached (``sspo base --force`` reproduces the shipped one).
    """
    return cached_build(cfg, _build, "base", PACKAGED_BASE, output, force)


def _build(cfg: BaseConfig, staging: Path, output: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    started = time.time()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = TinySize.preset(cfg.size)
    tokenizer = write_word_tokenizer(staging / "tokenizer", shapes.vocabulary())
    components = build_components(size, tokenizer, shapes.vocabulary(), seed=cfg.seed)
    vae = components["vae"]
    clean = pretraining_images(dataclasses.replace(cfg, defect_fraction=0.0), size.image_size)[0]
    train_vae(vae, clean, cfg.vae_steps, cfg.learning_rate, cfg, generator, "clean")
    if cfg.vae_defect_steps:
        mix = pretraining_images(dataclasses.replace(cfg, defect_fraction=cfg.vae_defect_fraction, defects=cfg.vae_defects), size.image_size)[0]
        train_vae(vae, mix, cfg.vae_defect_steps, cfg.vae_defect_learning_rate, cfg, generator, "defects")
    vae.eval().requires_grad_(False)
    pixels, prompts = pretraining_images(cfg, size.image_size)
    latents = unit_variance_latents(vae, pixels, chunk=256)
    conds, empty = word_conditions(components["text_encoder"], tokenizer, prompts)
    train_denoiser(family_of(components), conds, torch.arange(len(prompts)), empty, latents, cfg, generator)
    pipe = StableDiffusionPipeline(
        **components, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return save_base(pipe, cfg, staging, output, started)


@torch.no_grad()
def round_trip_scores(model: str | Path, n: int = 96, seed: int = 1) -> dict[str, dict[str, float]]:
    """Mean exact scores of ``n`` held-out renders after a round trip through the model's VAE, clean
    and with each defect. The clean row is the ceiling: no model decoding through this VAE scores
    higher. A defect whose row is near the clean one vanishes in the latent: a model never shows it."""
    from diffusers import AutoencoderKL

    from sspo.worlds.shapes.evaluator import evaluate_batch, mean_scores

    vae = AutoencoderKL.from_pretrained(str(model), subfolder="vae").eval()
    size = vae.config.sample_size
    specs = sorted(random.Random(seed).sample(list(shapes.make_split(0).heldout), n))
    rng = random.Random(seed)
    result = {}
    for name in ("clean", *shapes.DEFECTS):
        images = [shapes.render(spec, size) if name == "clean" else shapes.render_defect(spec, rng, size, name) for spec in specs]
        result[name] = mean_scores(evaluate_batch(round_trip_images(vae, images), specs))
    return result
