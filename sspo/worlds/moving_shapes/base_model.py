"""``sspo base --world moving-shapes``: the moving-shapes world's base model (its "AnimateDiff"), built offline.

Two stages. The first pretrains on clean clips: the image world's VAE encodes every frame,
fine-tuned on this world's frames first (as it came, it knew only the six palette colours and
snapped the in-between hues of a colour change to them); a word-table text encoder covers both
worlds' words and their positions (a direction is in the word order); the denoiser and its
zero-initialised motion modules are pretrained together on clean clips of every combination. That
base moves objects the prompted way, seldom turns colours and changes sizes only partway, and
nothing at a demo's budget moves it: it carries no defect that a clean winner teaches away.
The second stage gives it one, as the image base's checkerboard does: the denoiser continues on a
mix in which part of the clips shake, flicker or stutter, so the base shows these temporal
defects in part of its samples (the VAE's decoder first learns the checkerboard, which otherwise
fades in a latent fitted to clean frames). A plain ``AnimateDiffPipeline`` folder, deterministic
from the seed, cached by settings (each stage on its own), and shipped in the package like the
image base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from sspo.config import MAX_SEED, check, setting, to_dict, validate
from sspo.models.families import family_of
from sspo.models.pipeline import encode_images
from sspo.models.tiny import text_encoder_for, video_components, video_pipeline, video_size, word_table_text_encoder, write_word_tokenizer
from sspo.worlds.base_building import (
    cached_build,
    pretraining_renders,
    save_base,
    train_denoiser,
    train_vae,
    unit_variance_latents,
    word_conditions,
)
from sspo.worlds.moving_shapes import world as motion
from sspo.worlds.shapes import world as shapes
from sspo.worlds.shapes.base_model import BaseConfig, build_base

_FORMAT_VERSION = 2  # bump when the recipe changes, so stale caches are rebuilt
_SECOND_STAGE = ("defect_fraction", "defects", "defect_learning_rate", "vae_defect_fraction", "vae_defects")


@dataclasses.dataclass
class VideoBaseConfig:
    size: str = setting("default", choices=("default", "quick"))  # TinySize preset (and the image base preset whose VAE is reused)
    seed: int = setting(0, at_least=0, at_most=MAX_SEED)  # seeds the renders, the initial weights and the training draws
    frames: int = setting(8, at_least=2)  # a clip of one frame has no motion to learn
    clips_per_spec: int = setting(2, at_least=1)  # pretraining clips rendered per combination
    vae_steps: int = setting(600, at_least=0)  # fine-tuning the image world's VAE on this world's frames (0: as it is)
    vae_batch_size: int = setting(32, at_least=1)  # frames
    vae_learning_rate: float = setting(5e-4, above=0)  # peak of its one-cycle schedule (the image VAE's second phase)
    # Motion modules learn a motion's direction late: at 2,000 and 4,000 steps each axis has one
    # direction whatever the prompt says; at 10,000 every translation goes the prompted way.
    denoiser_steps: int = setting(10000, at_least=1)
    batch_size: int = setting(8, at_least=1)  # clips per step
    denoiser_learning_rate: float = setting(2e-3, above=0)  # peak of the one-cycle schedule
    caption_dropout: float = setting(0.1, at_least=0, below=1)  # empty prompts, so classifier-free guidance works
    # The second stage, the base's headroom (the image base's checkerboard, in time): the denoiser,
    # pretrained on clean clips, continues on a mix in which `defect_fraction` of the clips carry
    # one of `defects`. Temporal defects that keep the motion's path: a base pretrained with 60%
    # frozen, static and reversed clips from the start never learned to move its objects at all
    # (amplitude 0.01), and nothing moved it. 0 steps: the clean base.
    defect_steps: int = setting(2000, at_least=0)
    defect_fraction: float = setting(0.5, at_least=0, at_most=1)  # second stage: share of clips with a defect
    defects: tuple[str, ...] = setting(("jitter", "flicker", "dropped"), choices=motion.MOTION_DEFECTS)  # second stage: the defects drawn from
    # Peak of its one-cycle schedule: at 1e-3 the base unlearned the sign of two translations
    # (right to left, bottom to top: direction 0.18, 0.03), the last thing the first stage learned.
    defect_learning_rate: float = setting(3e-4, above=0)
    # Before it, the VAE's decoder learns from a mix with the image defects that fade in a latent
    # fitted to clean frames only, so that losers showing them still differ from a clean clip. The
    # encoder stays as it is, so the pretrained denoiser's latents do not move.
    vae_defect_steps: int = setting(300, at_least=0)
    vae_defect_fraction: float = setting(0.5, at_least=0, at_most=1)  # share of frames with a defect in the decoder's mix
    vae_defects: tuple[str, ...] = setting(("checker",), choices=motion.MOTION_DEFECTS)  # the defects of that mix

    def __post_init__(self) -> None:
        validate(self)
        for fraction, defects in (("defect_fraction", "defects"), ("vae_defect_fraction", "vae_defects")):
            check(not getattr(self, fraction) or getattr(self, defects), defects,
                  f"is empty, so {fraction} has no defect to render; name some of {', '.join(motion.MOTION_DEFECTS)}, or set {fraction}: 0")

    @classmethod
    def preset(cls, name: str) -> VideoBaseConfig:
        if name == "quick":
            return cls(size="quick", vae_steps=40, denoiser_steps=100, clips_per_spec=1, batch_size=8, defect_steps=40, vae_defect_steps=40)
        return cls(size=name)

    def cache_key(self) -> str:
        values = to_dict(self)
        if not (self.defect_steps or self.vae_defect_steps):  # a clean base: the second stage's settings do not shape it
            values = {name: value for name, value in values.items() if name not in _SECOND_STAGE}
        blob = json.dumps({"v": _FORMAT_VERSION, **values}, sort_keys=True)
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


def clean_stage(cfg: VideoBaseConfig) -> VideoBaseConfig:
    """The first stage's recipe: ``cfg`` pretrained on clean clips only (cached on its own)."""
    return dataclasses.replace(cfg, defect_steps=0, vae_defect_steps=0)


def _build(cfg: VideoBaseConfig, staging: Path, output: Path) -> Path:
    if cfg.defect_steps or cfg.vae_defect_steps:
        return _build_headroom(cfg, staging, output)
    return _build_clean(cfg, staging, output)


def _build_clean(cfg: VideoBaseConfig, staging: Path, output: Path) -> Path:
    from diffusers import AutoencoderKL

    started = time.time()
    image_base = build_base(BaseConfig.preset(cfg.size))
    # Seeded after the image base, which draws from torch's global RNG when this call builds it, not when it is cached.
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = video_size(cfg.size)
    vae = AutoencoderKL.from_pretrained(str(image_base), subfolder="vae")
    words = vocabulary()
    tokenizer = write_word_tokenizer(staging / "tokenizer", words)
    text_encoder = word_table_text_encoder(text_encoder_for(size, tokenizer), tokenizer, words, cfg.seed, positions=True)  # "from A to B"
    components, adapter = video_components(size, text_encoder, seed=cfg.seed)
    pixels, prompts = _pretraining_clips(dataclasses.replace(cfg, defect_fraction=0.0), size.image_size)  # clean clips only: its key ignores the second stage
    if cfg.vae_steps:
        train_vae(vae.train(), pixels.flatten(0, 1), cfg.vae_steps, cfg.vae_learning_rate, cfg, generator, "motion frames")
    vae.eval().requires_grad_(False)
    latents = unit_variance_latents(vae, pixels, chunk=32)
    conds, empty = word_conditions(components["text_encoder"], tokenizer, prompts)
    train_denoiser(family_of(components), conds, torch.arange(len(prompts)), empty, latents, cfg, generator)
    pipe = video_pipeline(vae, tokenizer, adapter, components)
    return save_base(pipe, cfg, staging, output, started)


def _build_headroom(cfg: VideoBaseConfig, staging: Path, output: Path) -> Path:
    from diffusers import AnimateDiffPipeline

    started = time.time()
    pipe = AnimateDiffPipeline.from_pretrained(str(build_video_base(clean_stage(cfg))))
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = video_size(cfg.size)
    vae = pipe.vae
    if cfg.vae_defect_steps:
        mix = _pretraining_clips(dataclasses.replace(cfg, defect_fraction=cfg.vae_defect_fraction, defects=cfg.vae_defects), size.image_size)[0]
        vae.train().requires_grad_(False)
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
        train_vae(vae, mix.flatten(0, 1), cfg.vae_defect_steps, cfg.vae_learning_rate, cfg, generator, "defects, decoder")
    vae.eval().requires_grad_(False)
    tokenizer = write_word_tokenizer(staging / "tokenizer", vocabulary())  # saved as the first stage saves it
    if cfg.defect_steps:
        pixels, prompts = _pretraining_clips(cfg, size.image_size)
        latents = torch.cat([encode_images(vae, part) for part in pixels.split(32)])  # the clean stage's scale, kept
        conds, empty = word_conditions(pipe.text_encoder, tokenizer, prompts)
        stage = dataclasses.replace(cfg, denoiser_steps=cfg.defect_steps, denoiser_learning_rate=cfg.defect_learning_rate)
        train_denoiser(family_of(pipe), conds, torch.arange(len(prompts)), empty, latents, stage, generator)
    components = {"text_encoder": pipe.text_encoder, "unet": pipe.unet.eval(), "scheduler": pipe.scheduler}
    return save_base(video_pipeline(vae, tokenizer, pipe.motion_adapter, components), cfg, staging, output, started)
