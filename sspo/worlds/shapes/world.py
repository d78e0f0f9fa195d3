"""The shapes world: a procedural text-to-image world where alignment can be measured exactly.

An image shows one object described by five attributes (shape, color, size, position, background);
its prompt is generated from them ("a large red circle on the left, white background"). Clean
renders are winners; :data:`DEFECTS` make losing / low-quality images of the same prompt.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sspo.errors import SSPOError
from sspo.worlds.world_data import Split, cached_parquet, pair_rows, png_bytes, split_specs, write_captioned_folder

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}

# Object geometry as fractions of the image side: radius by size, center by position.
SIZE_RADIUS = {"small": 0.14, "large": 0.26}
POSITION_CENTER = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
_POSITION_TEXT = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
SUPERSAMPLE = 4  # renders are drawn this many times larger, then downsampled: antialiased edges


class UnknownAttributeError(SSPOError):
    """A prompt uses a word that is not an attribute of the shapes world."""


@dataclasses.dataclass(frozen=True, order=True)
class ShapeSpec:
    """One object: the attributes an image and its prompt are generated from."""

    shape: str
    color: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, valid in ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in valid:
                raise UnknownAttributeError(
                    f"unknown {name} {value!r} in the shapes world; expected one of {', '.join(valid)}"
                )

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {_POSITION_TEXT[self.position]}, {self.background} background"

    def replace(self, **changes: str) -> ShapeSpec:
        return dataclasses.replace(self, **changes)


ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
_FILLER = {"a", "an", "the", "on", "at", "in", "background", "of"}


def vocabulary() -> list[str]:
    """Every word a prompt of this world can contain (the tiny tokenizer's vocabulary)."""
    words = set(_FILLER) | {","}
    for values in ATTRIBUTES.values():
        words.update(values)
    return sorted(words)


def parse_prompt(text: str) -> ShapeSpec:
    """Recover the attributes of a prompt; a word outside the world raises UnknownAttributeError."""
    words = text.lower().replace(",", " ").split()
    found: dict[str, str] = {}
    for word in words:
        attribute = next((name for name, values in ATTRIBUTES.items() if word in values), None)
        if attribute is None:
            if word in _FILLER:
                continue
            raise UnknownAttributeError(
                f"prompt {text!r}: unknown word {word!r}; the shapes world knows "
                + "; ".join(f"{name}: {', '.join(values)}" for name, values in ATTRIBUTES.items())
            )
        found[attribute] = word
    missing = [name for name in ATTRIBUTES if name not in found]
    if missing:
        raise UnknownAttributeError(f"prompt {text!r} does not name a {', '.join(missing)}")
    return ShapeSpec(**found)


def all_specs() -> list[ShapeSpec]:
    return [ShapeSpec(*combo) for combo in itertools.product(*ATTRIBUTES.values())]


# --------------------------------------------------------------------------------------------------
# Rendering


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The vertices of ``shape`` at center (cx, cy) and radius r (pixels); None for a circle, drawn as an ellipse."""
    if shape == "square":
        s = r * 0.9
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def render(
    spec: ShapeSpec,
    size: int = 32,
    *,
    center: tuple[float, float] | None = None,
    radius: float | None = None,
    fill: tuple[int, int, int] | None = None,
) -> Image.Image:
    """The ideal (antialiased) image of ``spec``; keyword overrides are for defects and analysis."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    fx, fy = center or POSITION_CENTER[spec.position]
    cx, cy, r = fx * big, fy * big, (radius or SIZE_RADIUS[spec.size]) * big
    color = fill or COLORS[spec.color]
    polygon = shape_polygon(spec.shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon(polygon, fill=color)
    return image.resize((size, size), Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------------------------------
# Defects: each makes a low-quality or wrong image for the same prompt. Signature: (spec, rng, size).
# The quality defects (blur, noise, smear, checker) also take :func:`render`'s keyword overrides, so
# that the moving-shapes world can apply them to frames whose object is between the image world's places.


def _other(values: Sequence[str], current: str, rng: random.Random) -> str:
    return rng.choice([v for v in values if v != current])


# Quality defects must survive the VAE's 8x8 latent, or a base pretrained on them never shows
# them and clean-vs-defect pairs carry no signal: a blur of sigma 1.2-2 px or a short smear
# round-trips to the same image as a clean render; these strengths do not.
def blur(spec: ShapeSpec, rng: random.Random, size: int = 32, **overrides) -> Image.Image:
    return render(spec, size, **overrides).filter(ImageFilter.GaussianBlur(radius=size / 32 * rng.uniform(2.0, 3.0)))


def noise(spec: ShapeSpec, rng: random.Random, size: int = 32, **overrides) -> Image.Image:
    """Pixel noise. Too fine for the 8x8 latent (it round-trips to a clean image), so the base is
    not pretrained on it; it stays a defect of the preference pairs and of the evaluator's tests."""
    pixels = np.asarray(render(spec, size, **overrides), dtype=np.float32)
    sigma = rng.uniform(35, 60)
    noisy = pixels + np.random.default_rng(rng.randrange(2**32)).normal(0, sigma, pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def wrong_color(spec: ShapeSpec, rng: random.Random, size: int = 32) -> Image.Image:
    return render(spec.replace(color=_other(tuple(COLORS), spec.color, rng)), size)


def wrong_shape(spec: ShapeSpec, rng: random.Random, size: int = 32) -> Image.Image:
    return render(spec.replace(shape=_other(SHAPES, spec.shape, rng)), size)


def wrong_position(spec: ShapeSpec, rng: random.Random, size: int = 32) -> Image.Image:
    return render(spec.replace(position=_other(POSITIONS, spec.position, rng)), size)


def smear(
    spec: ShapeSpec, rng: random.Random, size: int = 32, center: tuple[float, float] | None = None, **overrides
) -> Image.Image:
    """Smeared edges: the object dragged along one direction, like a motion-blurred render."""
    cx, cy = center or POSITION_CENTER[spec.position]
    angle = rng.uniform(0, 2 * math.pi)
    steps = 8
    length = rng.uniform(0.20, 0.28)
    frames = [
        np.asarray(
            render(
                spec,
                size,
                center=(cx + k / steps * length * math.cos(angle), cy + k / steps * length * math.sin(angle)),
                **overrides,
            ),
            dtype=np.float32,
        )
        for k in range(-steps // 2, steps // 2 + 1)
    ]
    return Image.fromarray(np.mean(frames, axis=0).astype(np.uint8))


def checker(spec: ShapeSpec, rng: random.Random, size: int = 32, **overrides) -> Image.Image:
    """Checkerboard artifacts in the background, as transposed convolutions leave in generated
    images: a +-20-30 gray level checkerboard on every pure background pixel. Its cells (4 px at 32)
    match the 8x8 latent's grid, so a VAE that has seen it keeps it (pixel noise is too fine for
    that); the object is left intact, so the defect is one of quality, not of attributes."""
    clean = np.asarray(render(spec, size, **overrides), dtype=np.float32)
    background = np.abs(clean - np.array(BACKGROUNDS[spec.background], dtype=np.float32)).max(axis=-1, keepdims=True) < 1
    cell = max(1, size // 8)
    rows, cols = np.mgrid[0:size, 0:size] // cell
    pattern = np.where((rows + cols) % 2 == 0, 1.0, -1.0)[..., None]
    return Image.fromarray(np.clip(clean + rng.uniform(20, 30) * pattern * background, 0, 255).astype(np.uint8))


# Bump when renders, defects or pairs change, so that cached world data is rebuilt.
WORLD_VERSION = 2

DEFECTS: dict[str, Callable[[ShapeSpec, random.Random, int], Image.Image]] = {
    "blur": blur,
    "noise": noise,
    "wrong_color": wrong_color,
    "wrong_shape": wrong_shape,
    "wrong_position": wrong_position,
    "smear": smear,
    "checker": checker,
}


def render_defect(spec: ShapeSpec, rng: random.Random, size: int = 32, defect: str | None = None) -> Image.Image:
    """A losing image for ``spec``: the named defect, or one drawn at random."""
    name = defect or rng.choice(sorted(DEFECTS))
    if name not in DEFECTS:
        raise SSPOError(f"unknown defect {name!r}; expected one of {', '.join(DEFECTS)}")
    return DEFECTS[name](spec, rng, size)


# --------------------------------------------------------------------------------------------------
# Splits and datasets


def make_split(seed: int = 0, heldout_fraction: float = 0.25, validation_fraction: float = 0.1) -> Split:
    """Deterministic split of all combinations into alignment-train and held-out sets, and a
    validation part of train (``validation_fraction`` of all combinations)."""
    return split_specs(all_specs(), seed, heldout_fraction, validation_fraction)


def preference_pairs(
    specs: Iterable[ShapeSpec], per_spec: int, seed: int, size: int = 32, tie_fraction: float = 0.0
) -> list[dict]:
    """Pick-a-Pic-style rows: ``caption``, ``jpg_0``, ``jpg_1`` (PNG bytes), ``label_0``.

    The clean render wins against a defective render of the same prompt; the winner's column is
    random. ``tie_fraction`` of rows are ties (``label_0 == 0.5``), as Pick-a-Pic has.
    """
    return pair_rows(
        specs,
        per_spec,
        seed,
        clean=lambda spec: png_bytes(render(spec, size)),
        defective=lambda spec, rng, defect: png_bytes(render_defect(spec, rng, size, defect)),
        defects=sorted(DEFECTS),
        columns=("jpg_0", "jpg_1"),
        tie_fraction=tie_fraction,
    )


def cached_pickapic_parquet(split_seed: int, pairs_per_prompt: int, size: int, without_validation: bool = False) -> Path:
    """The world's alignment data (train combinations only, less the validation ones if asked) as a
    cached Pick-a-Pic parquet."""
    suffix = "-noval" if without_validation else ""

    def rows() -> list[dict]:
        split = make_split(split_seed)
        specs = split.train_without_validation if without_validation else split.train
        return preference_pairs(specs, pairs_per_prompt, seed=split_seed, size=size)

    return cached_parquet(f"shapes-pairs-v{WORLD_VERSION}-s{split_seed}-n{pairs_per_prompt}-r{size}{suffix}.parquet", rows)


def write_imagefolder(folder: str | Path, specs: Iterable[ShapeSpec], size: int = 32) -> Path:
    """Write clean renders as a diffusers/datasets imagefolder with ``metadata.jsonl``."""
    return write_captioned_folder(folder, specs, "png", lambda spec, path: render(spec, size).save(path, format="PNG"))
