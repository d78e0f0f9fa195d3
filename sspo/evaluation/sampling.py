"""``sspo sample``: generate images (or clips) with fixed seeds and write a captioned PNG (or GIF) grid."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sspo.errors import ConfigError
from sspo.io import atomic_path


def sampling_device(name: str = "auto") -> torch.device:
    """The device ``name`` names (cpu, cuda, cuda:1, mps); ``auto``: the accelerator there is (CUDA, else Apple's MPS), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: got {name!r}, expected auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ConfigError(f"--device {name}: torch sees no such device here; use --device auto (or cpu)")
    return device


def check_sample_size(pipe, size: int | None, key: str = "resolution") -> None:
    """Refuse an image side ``size`` the pipeline's denoiser cannot take (None: its native size), naming ``key``."""
    from sspo.models.families import family_of

    if size is not None:
        family = family_of(pipe)
        family.check_image_sizes(dict(family.denoiser.config), getattr(pipe, "vae_scale_factor", 8), [(size, size)], key)


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 32,
    size: int | None = None,
    frames: int = 8,
) -> list:
    """One image per (prompt, seed) pair, ``size`` pixels square (default: the model's native size);
    for a video pipeline one clip of ``frames`` frames, ``uint8 [F, H, W, 3]`` (sspo/video_io.py).

    A seed fixes its image whatever the batching.
    """
    from sspo.models.families import family_of

    family = family_of(pipe)
    video, longest = family.video, family.longest_clip  # longest: None for an image model
    if longest is not None and frames > longest:
        raise ConfigError(f"frames: {frames}, but this model's motion modules make clips of at most {longest} frames; ask for {longest} or fewer")
    check_sample_size(pipe, size)
    extra = {"num_frames": frames, "output_type": "np"} if video else {"output_type": "pil"}
    extra |= family.pipeline_call_kwargs()
    images: list = []
    device = pipe.device
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators, height=size, width=size, **extra)
        # Rounded as diffusers' numpy_to_pil rounds images.
        images.extend(list((out.frames * 255).round().astype(np.uint8)) if video else out.images)
    return images


LABEL_WIDTH, CAPTION_HEIGHT, NOTE_HEIGHT = 90, 44, 12  # pixels of image_grid's row labels, captions (4 lines) and notes


def image_grid_size(n_rows: int, n_cols: int, cell: int = 96, labelled: bool = True, captioned: bool = True, noted: bool = False) -> tuple[int, int]:
    """(width, height) in pixels of :func:`image_grid`'s grid of ``n_rows`` x ``n_cols`` cells."""
    return LABEL_WIDTH * labelled + n_cols * cell, CAPTION_HEIGHT * captioned + n_rows * (cell + NOTE_HEIGHT * noted)


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] = (), captions: Sequence[str] = (), cell: int = 96,
               notes: Sequence[Sequence[str]] = ()) -> Image.Image:
    """A grid with one row per model (labelled on the left) and one captioned column per prompt;
    ``notes[r][c]``, where given, is a short text under cell (r, c) (its exact reward)."""
    n_cols = max(len(r) for r in rows)
    font = ImageFont.load_default()
    label_width = LABEL_WIDTH if row_labels else 0
    caption_height = CAPTION_HEIGHT if captions else 0
    row_height = cell + (NOTE_HEIGHT if notes else 0)
    grid = Image.new("RGB", image_grid_size(len(rows), n_cols, cell, bool(row_labels), bool(captions), bool(notes)), "white")
    draw = ImageDraw.Draw(grid)
    for c, caption in enumerate(captions):
        lines = textwrap.wrap(caption, width=max(8, cell // 6))[:4]
        draw.multiline_text((label_width + c * cell + 2, 1), "\n".join(lines), fill="black", font=font, spacing=0)
    for r, row in enumerate(rows):
        top = caption_height + r * row_height
        if r < len(row_labels):
            draw.text((4, top + cell // 2 - 6), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (label_width + c * cell, top))
            if r < len(notes) and c < len(notes[r]):
                draw.text((label_width + c * cell + 2, top + cell), notes[r][c], fill="black", font=font)
    return grid


def clip_grid(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str] = (), captions: Sequence[str] = (), cell: int = 96,
              notes: Sequence[Sequence[str]] = ()) -> list[Image.Image]:
    """:func:`image_grid` of clips: one grid per frame, the frames of an animated GIF."""
    frames = max(len(clip) for row in rows for clip in row)
    return [image_grid([[Image.fromarray(clip[min(f, len(clip) - 1)]) for clip in row] for row in rows], row_labels, captions, cell, notes)
            for f in range(frames)]


def save_animation(frames: Sequence[Image.Image], path: str | Path) -> Path:
    """Frames as one animated file, its suffix naming the format (``.gif``, looping: a grid has few
    colours and GIF's palette keeps them; ``.mp4``, ``.webp``)."""
    from sspo.video_io import write_clip

    return write_clip(path, np.stack([np.asarray(frame.convert("RGB")) for frame in frames]))


STILL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # a still grid's suffixes, PNG first: the default
LONGEST_SIDE = {"JPEG": 65500, "WEBP": 16383}  # pixels a side may have in these formats (PNG: no limit that matters)


def save_image(image: Image.Image, path: str | Path, image_format: str = "PNG") -> Path:
    """``image`` written whole or not at all; a ``image_format`` other than PNG (sspo sample's grid named
    .jpg, say) is the user's choice of a lossy file."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=image_format, **({"quality": 95} if image_format in ("JPEG", "WEBP") else {}))
    return Path(path)
