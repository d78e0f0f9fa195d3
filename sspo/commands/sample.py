"""``sspo sample``: a grid of samples, one row per sampler seed and one column per prompt; an
animated grid (GIF, MP4 or WebP) for a video model.

What a user can get wrong (the flags' values, the device, ``--out`` and whether it exists, a grid
larger than its image format takes, a LoRA path, ``--frames`` for an image model) is refused before
any weights load or a world's base is built; a resolution the model cannot take, once it has loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm

from sspo.config import MAX_CLIP_FRAMES, MAX_RESOLUTION, Allowed
from sspo.errors import ConfigError
from sspo.evaluation import sampling
from sspo.io import check_write_target, write_error
from sspo.models import pipeline
from sspo.models.families import family_of
from sspo.worlds import base_world, names

CLIP_FRAMES = 8  # a video model's clips, unless --frames says


def sample_grid(model: str, prompts: list[str], out: str, *, rows: int = 2, steps: int = 20, guidance_scale: float | None = None, frames: int | None = None,
                resolution: int | None = None, lora: str | None = None, motion_adapter: str | None = None, device: str = "auto",
                force: bool = False, shapes_check: bool = False) -> Path:
    """Sample ``rows`` seeds (0..rows-1) of every prompt with ``model`` and write the grid to ``out``
    (its suffix made one the grid's format takes); the file written."""
    for flag, value, rule in (("--steps", steps, Allowed(at_least=1)), ("--rows", rows, Allowed(at_least=1)),
                              ("--guidance-scale", guidance_scale, Allowed(at_least=0)), ("--frames", frames, Allowed(at_least=1, at_most=MAX_CLIP_FRAMES)),
                              ("--resolution", resolution, Allowed(at_least=8, at_most=MAX_RESOLUTION, multiple_of=8))):
        if value is not None and not rule.admits(value):
            raise ConfigError(f"{flag}: got {value!r}, expected {rule.describe(type(value))}")
    target = sampling.sampling_device(device)
    path = Path(out)
    if not out.strip() or path.is_dir() or out.endswith(("/", os.sep)):  # a trailing slash names a folder
        raise ConfigError(f"--out {out!r} is a folder, not a file; name the grid's file, e.g. --out {path / 'grid.png'}")
    check_write_target(path, "--out", file=True)
    if shapes_check:
        from sspo.worlds.shapes.world import parse_prompt

        for prompt in prompts:
            parse_prompt(prompt)
    lora_path = pipeline.lora_location(lora) if lora else None
    if lora_path:  # before resolve_model builds a world's base
        pipeline.check_lora_path(lora_path)
    # Whether the grid is animated (GIF, or MP4 / WebP by the suffix), so which file it is, before any
    # weights load: a world's base says by its world (before it is built), another model by its index.
    world = base_world(model)
    resolved = None if world else names.resolve_model(model, key="--model")
    video = motion_adapter is not None or (world.clips if world else family_of(pipeline.load_pipeline_config(resolved)).video)
    if frames is not None and not video:
        raise ConfigError(f"--frames {frames}: {model} makes images, not clips; leave --frames out (it is for video models)")
    suffixes = (".gif", ".mp4", ".webp") if video else tuple(sampling.STILL_FORMATS)
    path = path if path.suffix.lower() in suffixes else path.with_suffix(suffixes[0])
    if path.exists() and not force:
        raise ConfigError(f"--out {path} exists; pass --force to replace it, or name another file")
    if not video and (longest := sampling.LONGEST_SIDE.get(sampling.STILL_FORMATS[path.suffix.lower()])):
        size = sampling.image_grid_size(rows, len(prompts))
        if max(size) > longest:  # found now, not after every sample is made
            raise ConfigError(f"--out {path}: a grid of {rows} rows x {len(prompts)} prompts is {size[0]} x {size[1]} pixels, past the "
                              f"{longest} a side {sampling.STILL_FORMATS[path.suffix.lower()]} takes; name a .png, or give fewer --rows or --prompt")
    pipe = pipeline.load_pipeline(resolved or names.resolve_model(model, key="--model"), lora=lora_path, motion_adapter=motion_adapter).to(target)
    sampling.check_sample_size(pipe, resolution, "--resolution")
    guidance = names.usual_guidance_scale(model, family_of(pipe).name) if guidance_scale is None else guidance_scale
    seeds = list(range(rows))
    frames = CLIP_FRAMES if frames is None else frames
    grid_rows = [sampling.generate(pipe, prompts, [seed] * len(prompts), steps=steps, guidance_scale=guidance, frames=frames, size=resolution)
                 for seed in tqdm(seeds, desc="sampling", unit="row")]
    labels = [f"seed {s}" for s in seeds]
    try:
        if video:
            return sampling.save_animation(sampling.clip_grid(grid_rows, labels, prompts), path)
        return sampling.save_image(sampling.image_grid(grid_rows, labels, prompts), path, sampling.STILL_FORMATS[path.suffix.lower()])
    except OSError as exc:
        raise write_error(path, exc) from None
