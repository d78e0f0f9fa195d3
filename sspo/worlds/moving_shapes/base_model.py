"""``sspo base --world moving-shapes``: the moving-shapes world's base model (its "AnimateDiff"), built offline.

The image world's VAE encodes every frame, fine-tuned on this world's frames first: it knows only
the six palette colours and snaps the in-between hues of a colour change to them (a clean
"turning" clip kept 0.29 of its reward through it, a moving one 0.84). A word-table text encoder
covers both worlds' words and their positions (a direction is in the word order); the denoiser and its
zero-initialised motion modules are then pretrained together on clean clips of every combination.
The base that comes out follows some motions and not others (objects travel the prompted way, but
colours seldom turn and sizes change only partway), which is the room alignment has. A plain
``AnimateDiffPipeline`` folder, deterministic from the seed, cached by settings, and shipped in the
package like the image base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from sspo.config import check, setting, to_dict, validate
from sspo.models.families import family_of
from sspo.models.tiny import text_encoder_for, video_components, video_pipeline, video_size, word_table_text_encoder, write_word_tokenizer
from sspo.worlds.moving_shapes import world as motion
from sspo.worlds.shapes import world as shapes
from sspo.worlds.shapes.base_model import (
    BaseConfig,
    build_base,
    cached_build,
    pretraining_renders,
    save_base,
    train_denoiser,
    train_vae,
    unit_variance_latents,
    word_conditions,
)

log = logging.getLogger(__name__)
_FORMAT_VERSION = 2  # bump when the recipe changes, so stale caches are rebuilt


@dataclasses.dataclass
class VideoBaseConfig:
    size: str = setting("default", choices=("default", "quick"))  # TinySize preset (and the image base preset whose VAE is reused)
    seed: int = setting(0, at_least=0)
    frames: int = setting(8, at_least=2)  # a clip of one frame has no motion to learn
    clips_per_spec: int = setting(2, at_least=1)  # pretraining clips rendered per combination
    # Share of defective clips the denoiser learns from, and which. 0 by default: with 60% of them
    # (frozen, static, reversed, checker) the base's objects stand still (amplitude 0.01), and
    # neither SFT nor SSPO makes them move.
    defect_fraction: float = setting(0.0, at_least=0, at_most=1)
    defects: tuple[str, ...] = setting(("frozen", "static", "reversed", "checker"), choices=motion.MOTION_DEFECTS)
    vae_steps: int = setting(600, at_least=0)  # fine-tuning the image world's VAE on this world's frames (0: as it is)
    vae_batch_size: int = setting(32, at_least=1)  # frames
    vae_learning_rate: float = setting(5e-4, above=0)  # peak of its one-cycle schedule (the image VAE's second phase)
    # Motion modules learn a motion's direction late: at 2,000 and 4,000 steps each axis has one
    # direction whatever the prompt says; at 10,000 every translation goes the prompted way.
    denoiser_steps: int = setting(10000, at_least=1)
    batch_size: int = setting(8, at_least=1)  # clips per step
    denoiser_learning_rate: float = setting(2e-3, above=0)  # peak of the one-cycle schedule
    caption_dropout: float = setting(0.1, at_least=0, below=1)  # empty prompts, so classifier-free guidance works

    def __post_init__(self) -> None:
        validate(self)
        check(not self.defect_fraction or self.defects, "defects",
              f"is empty, so defect_fraction has no defect to render; name some of {', '.join(motion.MOTION_DEFECTS)}, or set defect_fraction: 0")

    @classmethod
    def preset(cls, name: str) -> VideoBaseConfig:
        if name == "quick":
            return cls(size="quick", vae_steps=40, denoiser_steps=100, clips_per_spec=1, batch_size=8)
        return cls(size=name)

    def cache_key(self) -> str:
        blob = json.dumps({"v": _FORMAT_VERSION, **to_dict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def vocabulary() -> list[str]:
    """Both worlds' words: the video base's tokenizer knows image prompts too."""
    return sorted(set(shapes.vocabulary()) | set(motion.motion_vocabulary()))


def _pretraining_clips(cfg: VideoBaseConfig, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """Clips ``[N, F, 3, H, W]`` in [-1, 1] and their prompts."""
    clips, prompts = pretraining_renders(motion.all_motion_specs(), cfg.clips_per_spec, cfg, lambda spec: motion.render_clip(spec, cfg.frames, image_size),
                                         lambda spec, rng, defect: motion.render_motion_defect(spec, rng, cfg.frames, image_size, defect))
    return torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 127.5 - 1, prompts


PACKAGED_VIDEO_BASE = Path(__file__).resolve().parent / "weights" / "moving-shapes-base"


def build_video_base(cfg: VideoBaseConfig, output: str | Path | None = None, force: bool = False) -> Path:
    """The video base pipeline folder: shipped, cached, or built now; returns its path."""
    return cached_build(cfg, _build, "video-base", PACKAGED_VIDEO_BASE, output, force)


def _build(cfg: VideoBaseConfig, staging: Path, output: Path) -> Path:
    from diffusers import AutoencoderKL

    started = time.time()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = video_size(cfg.size)
    image_base = build_base(BaseConfig.preset(cfg.size))
    vae = AutoencoderKL.from_pretrained(str(image_base), subfolder="vae")
    words = vocabulary()
    tokenizer = write_word_tokenizer(staging / "tokenizer", words)
    text_encoder = word_table_text_encoder(text_encoder_for(size, tokenizer), tokenizer, words, cfg.seed, positions=True)  # "from A to B"
    components, adapter = video_components(size, text_encoder, seed=cfg.seed)
    pixels, prompts = _pretraining_clips(cfg, size.image_size)
    if cfg.vae_steps:
        train_vae(vae.train(), pixels.flatten(0, 1), cfg.vae_steps, cfg.vae_learning_rate, cfg, generator, "motion frames")
    vae.eval().requires_grad_(False)
    latents = unit_variance_latents(vae, pixels, chunk=32)
    conds, empty = word_conditions(components["text_encoder"], tokenizer, prompts)
    train_denoiser(family_of(components), conds, torch.arange(len(prompts)), empty, latents, cfg, generator)
    pipe = video_pipeline(vae, tokenizer, adapter, components)
    return save_base(pipe, cfg, staging, output, started)
