"""The moving-shapes world: the shapes world in time, a procedural text-to-video world measured exactly.

A clip (``uint8 [F, H, W, 3]``, 8 frames of 32x32 by default) shows one shapes-world object doing
one thing; its prompt is generated from its attributes:

    "a small red circle moving from left to right, white background"   (and right to left,
                                                                         top to bottom, bottom to top)
    "a blue square growing, black background"                          (and shrinking)
    "a small green triangle turning from green to yellow, gray background"

Every frame is drawn by the image world's renderer (:func:`sspo.worlds.shapes.world.render`) with the
object's place, radius and fill set from the motion's state at that frame, so a clip's first and
last frames are the image world's renders of the start and end of the motion:

* moving: the center goes from one image-world position to the opposite one (left (0.28, 0.5) to
  right (0.72, 0.5), ...); the object, large or small, stays fully in frame.
* growing / shrinking: at the center, the radius goes between the small and the large radius; the
  prompt names no size, since the motion sets it.
* turning: the fill goes round the hue circle the shorter way from one palette color to the other,
  saturation and value interpolated. A linear RGB blend would fade some objects into the
  background midway (blue to yellow passes within 4 levels of the gray background); every
  palette color is saturated, so a hue path keeps the object distinct from white, black and gray.

Progress is linear in time: frame ``f`` of ``F`` shows the state at ``t = f / (F - 1)``. Constant
speed makes the expected state of every frame exact and every step the same size, which the
evaluator (:mod:`sspo.worlds.moving_shapes.evaluator`) uses as the reference of smoothness.

Prompts are at most 12 tokens (the tiny CLIP tokenizer has 14 after BOS and EOS) and use the image
world's words plus six for motion (:data:`MOTION_WORDS`). :data:`MOTION_DEFECTS` make losing clips
of the same prompt: temporal ones (the motion is wrong, jumpy, flickering or interrupted) and the
image world's defects on every frame.
"""

from __future__ import annotations

import colorsys
import dataclasses
import itertools
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from sspo.errors import SSPOError
from sspo.video_io import encode_clip
from sspo.worlds.shapes.world import (
    BACKGROUNDS,
    COLORS,
    DEFECTS,
    POSITION_CENTER,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    WORLD_VERSION,
    ShapeSpec,
    UnknownAttributeError,
    render,
)
from sspo.worlds.world_data import Split, cached_parquet, eval_prompts, pair_rows, split_specs, write_captioned_folder

# Motion name -> the image-world positions it moves between.
MOVES = {
    "left-to-right": ("left", "right"),
    "right-to-left": ("right", "left"),
    "top-to-bottom": ("top", "bottom"),
    "bottom-to-top": ("bottom", "top"),
}
# Motion name -> the image-world sizes it changes between.
RESIZES = {"growing": ("small", "large"), "shrinking": ("large", "small")}
MOTIONS = (*MOVES, *RESIZES, "turning")
MOTION_WORDS = ("moving", "from", "to", "growing", "shrinking", "turning")
_PLACES = tuple(sorted({place for pair in MOVES.values() for place in pair}))

# Bump when clips, defects or pairs change, so that cached motion data is rebuilt (the image
# world's WORLD_VERSION is part of every cache name too: its renderer draws the frames).
MOTION_WORLD_VERSION = 1


@dataclasses.dataclass(frozen=True, order=True)
class MotionSpec:
    """One object and what it does: the attributes a clip and its prompt are generated from.

    ``size`` is ``""`` for growing and shrinking (the motion sets the size); ``target`` is the color
    a turning object turns to, ``""`` for every other motion.
    """

    shape: str
    color: str
    size: str
    motion: str
    background: str
    target: str = ""

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("color", self.color, tuple(COLORS))
        _check("background", self.background, tuple(BACKGROUNDS))
        _check("motion", self.motion, MOTIONS)
        if self.motion in RESIZES and self.size:
            raise UnknownAttributeError(f"a {self.motion} object has no size (its motion sets it), got size {self.size!r}")
        if self.motion not in RESIZES:
            _check("size", self.size, SIZES)
        if self.motion == "turning":
            _check(f"target color of a {self.color} object", self.target, tuple(c for c in COLORS if c != self.color))
        elif self.target:
            raise UnknownAttributeError(f"only a turning object has a target color, got {self.target!r} for a {self.motion} object")

    @property
    def prompt(self) -> str:
        if self.motion in RESIZES:
            article = "an" if self.color[0] in "aeiou" else "a"
            return f"{article} {self.color} {self.shape} {self.motion}, {self.background} background"
        if self.motion == "turning":
            action = f"turning from {self.color} to {self.target}"
        else:
            action = "moving from {} to {}".format(*MOVES[self.motion])
        return f"a {self.size} {self.color} {self.shape} {action}, {self.background} background"

    def replace(self, **changes: str) -> MotionSpec:
        return dataclasses.replace(self, **changes)

    def image_spec(self) -> ShapeSpec:
        """The image-world object every frame draws; :func:`motion_state` sets its place, radius and
        fill per frame (a resizing object's size attribute is a placeholder)."""
        return ShapeSpec(self.shape, self.color, self.size or "small", "center", self.background)


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        problem = f"unknown {name} {value!r}" if value else f"no {name}"
        raise UnknownAttributeError(f"{problem} in the moving-shapes world; expected one of {', '.join(valid)}")


def motion_vocabulary() -> list[str]:
    """Every word a prompt of this world can contain (the tiny tokenizer's vocabulary)."""
    words = {"a", "an", ",", "background", *SHAPES, *COLORS, *SIZES, *BACKGROUNDS, *_PLACES, *MOTION_WORDS}
    return sorted(words)


def all_motion_specs() -> list[MotionSpec]:
    """Every combination: 576 moving, 144 growing or shrinking, 720 turning (1440)."""
    moving = [MotionSpec(*c) for c in itertools.product(SHAPES, COLORS, SIZES, MOVES, BACKGROUNDS)]
    resizing = [MotionSpec(s, c, "", m, b) for s, c, m, b in itertools.product(SHAPES, COLORS, RESIZES, BACKGROUNDS)]
    turning = [
        MotionSpec(s, c, z, "turning", b, t)
        for s, c, z, b, t in itertools.product(SHAPES, COLORS, SIZES, BACKGROUNDS, COLORS)
        if t != c
    ]
    return sorted(moving + resizing + turning)


# --------------------------------------------------------------------------------------------------
# Prompts

_WORD_KIND = {
    **{w: "shape" for w in SHAPES},
    **{w: "color" for w in COLORS},
    **{w: "size" for w in SIZES},
    **{w: "background" for w in BACKGROUNDS},
    **{w: "place" for w in _PLACES},
    **{w: "motion" for w in ("moving", "growing", "shrinking", "turning")},
}
_FILLER = {"a", "an", "from", "to", "background"}


def parse_motion_prompt(text: str) -> MotionSpec:
    """Recover the attributes of a prompt; a word outside the world raises UnknownAttributeError."""
    found: dict[str, list[str]] = {kind: [] for kind in ("shape", "color", "size", "background", "place", "motion")}
    for word in text.lower().replace(",", " ").split():
        kind = _WORD_KIND.get(word)
        if kind is None:
            if word in _FILLER:
                continue
            raise UnknownAttributeError(
                f"prompt {text!r}: unknown word {word!r}; the moving-shapes world knows shapes ({', '.join(SHAPES)}), "
                f"colors ({', '.join(COLORS)}), sizes ({', '.join(SIZES)}), backgrounds ({', '.join(BACKGROUNDS)}) and "
                f"motions: moving from <{'|'.join(_PLACES)}> to <...>, growing, shrinking, turning from <color> to <color>"
            )
        found[kind].append(word)

    def one(kind: str, optional: bool = False) -> str:
        values = found[kind]
        if len(values) > 1 or (not values and not optional):
            raise UnknownAttributeError(f"prompt {text!r} must name one {kind}, found {len(values)}: {', '.join(values)}")
        return values[0] if values else ""

    verb, colors = one("motion"), found["color"]
    motion, target = verb, ""
    if verb == "moving":
        motion = "-to-".join(found["place"])
        if motion not in MOVES:
            raise UnknownAttributeError(
                f"prompt {text!r}: expected 'moving from <place> to <opposite place>', found places {found['place']}"
            )
    elif found["place"]:
        raise UnknownAttributeError(f"prompt {text!r}: a {verb} object has no places, found {', '.join(found['place'])}")
    if verb == "turning":
        # "a green triangle turning from green to yellow": the object's color, then from and to
        if len(colors) not in (2, 3) or len(set(colors[:-1])) != 1:
            raise UnknownAttributeError(f"prompt {text!r}: expected 'turning from <color> to <other color>' after the object's color")
        colors, target = colors[:1], colors[-1]
    found["color"] = colors
    return MotionSpec(one("shape"), one("color"), one("size", optional=True), motion, one("background"), target)


# --------------------------------------------------------------------------------------------------
# Rendering


@dataclasses.dataclass(frozen=True)
class MotionState:
    """The object at one moment: center and radius (fractions of the side) and fill (RGB, float)."""

    center: tuple[float, float]
    radius: float
    fill: tuple[float, float, float]

    def render_overrides(self) -> dict:
        """Keyword overrides for :func:`sspo.worlds.shapes.world.render` (and its quality defects)."""
        return {"center": self.center, "radius": self.radius, "fill": tuple(int(round(c)) for c in self.fill)}


def _hue_blend(start: tuple[int, int, int], end: tuple[int, int, int], t: float) -> tuple[float, float, float]:
    """The color a fraction ``t`` of the way round the hue circle (the shorter way) from ``start``."""
    (h0, s0, v0), (h1, s1, v1) = (colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb)) for rgb in (start, end))
    dh = (h1 - h0 + 0.5) % 1.0 - 0.5
    rgb = colorsys.hsv_to_rgb((h0 + t * dh) % 1.0, s0 + t * (s1 - s0), v0 + t * (v1 - v0))
    return tuple(255.0 * c for c in rgb)  # type: ignore[return-value]


def motion_state(spec: MotionSpec, t: float) -> MotionState:
    """Where, how big and what color the prompt says the object is a fraction ``t`` into the clip."""
    center, radius, fill = POSITION_CENTER["center"], SIZE_RADIUS.get(spec.size, 0.0), tuple(map(float, COLORS[spec.color]))
    if spec.motion in MOVES:
        (x0, y0), (x1, y1) = (POSITION_CENTER[p] for p in MOVES[spec.motion])
        center = (x0 + t * (x1 - x0), y0 + t * (y1 - y0))
    elif spec.motion in RESIZES:
        r0, r1 = (SIZE_RADIUS[s] for s in RESIZES[spec.motion])
        radius = r0 + t * (r1 - r0)
    else:
        fill = _hue_blend(COLORS[spec.color], COLORS[spec.target], t)
    return MotionState(center, radius, fill)  # type: ignore[arg-type]


def frame_times(frames: int) -> np.ndarray:
    """The motion's progress at each frame: ``f / (F - 1)``, linear in time."""
    if frames < 2:
        raise SSPOError(f"a clip needs at least 2 frames to show motion, got {frames}")
    return np.linspace(0.0, 1.0, frames)


def _render_at(spec: MotionSpec, times: Iterable[float], size: int, offsets: np.ndarray | None = None) -> np.ndarray:
    """Frames showing the motion's state at the given progress values, the centers shifted by
    ``offsets`` (``[F, 2]``, fractions of the side) if given."""
    image_spec, frames = spec.image_spec(), []
    for f, t in enumerate(times):
        overrides = motion_state(spec, float(t)).render_overrides()
        if offsets is not None:
            overrides["center"] = tuple(np.add(overrides["center"], offsets[f]))
        frames.append(np.asarray(render(image_spec, size, **overrides)))
    return np.stack(frames)


def render_clip(spec: MotionSpec, frames: int = 8, size: int = 32) -> np.ndarray:
    """The clean clip of ``spec``: ``uint8 [frames, size, size, 3]``."""
    return _render_at(spec, frame_times(frames), size)


# --------------------------------------------------------------------------------------------------
# Defects: each makes a losing clip for the same prompt. Signature: (spec, rng, frames, size).
# Temporal defects retime or disturb the motion; the evaluator's component each one breaks is
# named in its docstring.

MotionDefect = Callable[[MotionSpec, random.Random, int, int], np.ndarray]


def frozen(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
    """The object stops partway (a quarter to 60% of the way) and later frames repeat that frame:
    amplitude (and progress)."""
    times = frame_times(frames)
    stop = times[int(round(rng.uniform(0.25, 0.6) * (frames - 1)))]
    return _render_at(spec, np.minimum(times, stop), size)


def reversed_motion(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
    """Time runs backwards (right to left when asked for left to right): direction (and progress)."""
    return render_clip(spec, frames, size)[::-1].copy()


def static(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
    """No motion at all: one frame from the middle third of the motion, repeated: amplitude (and progress)."""
    return _render_at(spec, np.full(frames, rng.uniform(0.35, 0.65)), size)


def shuffled(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
    """Frame order permuted, at most a quarter of neighbours kept in order: smoothness (and direction)."""
    order = list(range(frames))
    while sum(b == a + 1 for a, b in zip(order, order[1:])) > (frames - 1) // 4 or order[::-1] == sorted(order):
        rng.shuffle(order)
    return render_clip(spec, frames, size)[order]


def jitter(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
    """The object shakes: each frame's center moves 4-7% of the side (1.3-2.2 px at 32) in a random
    direction, along or off the path: smoothness."""
    angles = [rng.uniform(0, 2 * np.pi) for _ in range(frames)]
    lengths = [rng.uniform(0.04, 0.07) for _ in range(frames)]
    offsets = np.array([(r * np.cos(a), r * np.sin(a)) for r, a in zip(lengths, angles)])
    return _render_at(spec, frame_times(frames), size, offsets)


def flicker(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
    """Brightness flicker: every frame scaled by 1 -+ 15-30%, alternately: smoothness."""
    gains = [1.0 + (-1) ** f * rng.uniform(0.15, 0.3) for f in range(frames)]
    clip = render_clip(spec, frames, size).astype(np.float32)
    return np.clip(clip * np.array(gains, dtype=np.float32)[:, None, None, None], 0, 255).round().astype(np.uint8)


def dropped(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
    """Half the frames dropped, each kept frame held until the next (first and last kept), so the
    motion jumps: smoothness."""
    inner = sorted(rng.sample(range(1, frames - 1), max(0, frames // 2 - 2)))
    kept = [0, *inner, frames - 1]
    held = [max(k for k in kept if k <= f) for f in range(frames)]
    return render_clip(spec, frames, size)[held]


def vanish(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
    """The object is missing (background only) in a quarter of the frames, never the first: persistence."""
    clip = render_clip(spec, frames, size)
    clip[rng.sample(range(1, frames), max(1, frames // 4))] = BACKGROUNDS[spec.background]
    return clip


def wrong_color(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
    """The object in another color (a turning object turns between two other colors): color."""
    others = [c for c in COLORS if c not in (spec.color, spec.target)]
    rng.shuffle(others)
    return render_clip(spec.replace(color=others[0], target=others[1] if spec.target else ""), frames, size)


def wrong_shape(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
    """Another shape doing the prompted motion: shape."""
    return render_clip(spec.replace(shape=rng.choice([s for s in SHAPES if s != spec.shape])), frames, size)


def _per_frame(defect: str) -> MotionDefect:
    """The image world's quality defect ``defect`` on every frame, at one strength (and one noise
    pattern, smear direction or checker contrast) for the whole clip: quality."""

    def apply(spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32) -> np.ndarray:
        seed, image_spec = rng.randrange(2**32), spec.image_spec()
        return np.stack(
            [
                np.asarray(DEFECTS[defect](image_spec, random.Random(seed), size, **motion_state(spec, float(t)).render_overrides()))
                for t in frame_times(frames)
            ]
        )

    apply.__name__ = apply.__qualname__ = defect
    return apply


MOTION_DEFECTS: dict[str, MotionDefect] = {
    "frozen": frozen,
    "reversed": reversed_motion,
    "static": static,
    "shuffled": shuffled,
    "jitter": jitter,
    "flicker": flicker,
    "dropped": dropped,
    "vanish": vanish,
    "wrong_color": wrong_color,
    "wrong_shape": wrong_shape,
    **{name: _per_frame(name) for name in ("blur", "noise", "smear", "checker")},
}


def render_motion_defect(
    spec: MotionSpec, rng: random.Random, frames: int = 8, size: int = 32, defect: str | None = None
) -> np.ndarray:
    """A losing clip for ``spec``: the named defect, or one drawn at random."""
    name = defect or rng.choice(sorted(MOTION_DEFECTS))
    if name not in MOTION_DEFECTS:
        raise SSPOError(f"unknown motion defect {name!r}; expected one of {', '.join(MOTION_DEFECTS)}")
    if frames < 4:  # fewer frames cannot be shuffled, dropped or stopped unlike a reversal or a clean clip
        raise SSPOError(f"motion defects need clips of at least 4 frames, got {frames}")
    return MOTION_DEFECTS[name](spec, rng, frames, size)


# --------------------------------------------------------------------------------------------------
# Splits and datasets


def make_motion_split(seed: int = 0, heldout_fraction: float = 0.25, validation_fraction: float = 0.1) -> Split:
    """Deterministic split of all motion combinations into alignment-train and held-out sets, and a
    validation part of train, as the image world's :func:`~sspo.worlds.shapes.world.make_split`."""
    return split_specs(all_motion_specs(), seed, heldout_fraction, validation_fraction)


def motion_eval_prompts(split: Split, per_split: int = 24, seed: int = 0) -> dict[str, list[MotionSpec]]:
    """Fixed evaluation specs: ``per_split`` seen (train) and ``per_split`` held-out combinations."""
    return eval_prompts(split, per_split, seed)


def motion_preference_pairs(specs: Iterable[MotionSpec], per_spec: int, seed: int, frames: int = 8, size: int = 32) -> list[dict]:
    """Pick-a-Pic-style rows for video: ``caption``, ``video_0``, ``video_1`` (lossless TIFF clip
    bytes, :func:`sspo.video_io.encode_clip`), ``label_0``, ``defect``. The clean clip wins against
    a defective clip of the same prompt; the winner's column is random."""
    return pair_rows(
        specs,
        per_spec,
        seed,
        clean=lambda spec: encode_clip(render_clip(spec, frames, size)),
        defective=lambda spec, rng, defect: encode_clip(render_motion_defect(spec, rng, frames, size, defect)),
        defects=sorted(MOTION_DEFECTS),
        columns=("video_0", "video_1"),
    )


def cached_motion_parquet(split_seed: int, pairs_per_prompt: int, frames: int, size: int, without_validation: bool = False) -> Path:
    """The world's alignment data (train combinations only, less the validation ones if asked) as a
    cached parquet of clip pairs."""
    suffix = "-noval" if without_validation else ""

    def rows() -> list[dict]:
        split = make_motion_split(split_seed)
        specs = split.train_without_validation if without_validation else split.train
        return motion_preference_pairs(specs, pairs_per_prompt, seed=split_seed, frames=frames, size=size)

    version = f"{WORLD_VERSION}.{MOTION_WORLD_VERSION}"
    return cached_parquet(f"motion-pairs-v{version}-s{split_seed}-n{pairs_per_prompt}-f{frames}-r{size}{suffix}.parquet", rows)


def write_clip_folder(folder: str | Path, specs: Iterable[MotionSpec], frames: int = 8, size: int = 32) -> Path:
    """Write clean clips (``00000.tiff``, ...: lossless multi-page TIFF) and ``metadata.jsonl``."""
    return write_captioned_folder(folder, specs, "tiff", lambda spec, path: path.write_bytes(encode_clip(render_clip(spec, frames, size))))
