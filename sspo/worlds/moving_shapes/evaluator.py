"""The moving-shapes world's exact evaluator: score a clip against its prompt, frame by frame and over time.

No learned model. Every frame is analysed by the image world's evaluator
(:func:`sspo.worlds.shapes.evaluator.analyze`): observed background, object color, shape fits, center
and radius. The prompt's motion (:func:`sspo.worlds.moving_shapes.world.motion_state`) is a path of states
``s(t)``, ``t`` in [0, 1]; its animated quantity (the center of a moving object, the radius of a
growing or shrinking one, the fill of a turning one) is measured in every frame and located on
the path: the frame's *measured progress* ``p_f`` is the ``t`` whose state is nearest (a grid of
1025 states). The object's *identity* is the shape that fits (within the image evaluator's margin)
in the most frames, the prompt's shape winning ties; its radius is read through that shape's fit.
Every score is a float in [0, 1]; frames without an object count only in ``persistence`` (and
``background``), so that each failure is counted once:

Attributes (does every frame show *what the prompt names*?), means over the frames
    ``background``, ``shape``  the image evaluator's scores.
    ``color``, ``size``, ``position``  the image evaluator's scores for the attributes the motion
                    keeps fixed; the animated one is scored against the nearest state on the path
                    (the state at ``p_f``), as the image evaluator scores it against a fixed one
                    (position and size with the same windows; a fill by its RGB distance: 1 within
                    30, then a Gaussian fall-off of width 20). A frame from the wrong *moment* of
                    the motion keeps full attribute scores: timing is for the motion scores.

Motion (does the object *do what the prompt says*?)
    ``progress``    per frame, the animated quantity against the state the prompt asks for at that
                    frame, ``s(f / (F - 1))``, with the attribute's window; the mean over frames.
    ``direction``   ``(1 + net / travelled) / 2``: the net movement along the path (last ``p``
                    less first) over the distance travelled (the sum of ``|steps of p|``, at least
                    0.05): 1 the prompted way, 0 reversed, 0.5 for a clip without motion, less
                    for a clip that moves back and forth.
    ``amplitude``   how much of the path the clip covers, ``1 - (max p - min p)``: 1 within 0.1,
                    then a Gaussian fall-off of width 0.15 (~0 for half the path).

Coherence (is it *one object moving steadily*?)
    ``smoothness``  jerk: second differences between consecutive frames of the state: the
                    animated quantity's distance along the path, and the deviations from the path
                    of the center, the radius and the brightness of fill and background; each in
                    units of a just-visible change (about 0.02 of the side for center and radius,
                    16 levels of brightness; see ``_ALONG_UNIT``). The root mean square over frames
                    of the largest of them: 1 up to 1.5 units, then a Gaussian fall-off of width 1.
                    Constant speed has no jerk; a dropped, shuffled, shaking or flickering frame
                    has (a stop has a little).
    ``persistence`` the share of frames that lack an object or show one that does not fit the
                    clip's identity shape, in a Gaussian window of width 0.2: 0.82 when one frame
                    of 8 fails, 0.46 when two do; popping or morphing is glaring in a clip.

Quality (are the *frames good images*?)
    ``quality``     the image evaluator's quality (noise and sharpness), averaged over the frames
                    that show an object.

``attributes`` is the mean of the five attribute scores and ``motion`` the mean of the three
motion scores (partial credit within a group, as the image evaluator's attributes: the motion
scores see one failure from different sides, a reversal breaks progress and direction, a still
clip progress and amplitude), ``coherence = sqrt(smoothness * persistence)``, and

    ``reward = attributes * motion * coherence * quality``

    ``steady``      1 when ``smoothness`` is at least 0.5 (no visible jerk, shake, flicker or
                    stutter), else 0: not part of the reward; its mean over a model's clips is the
                    share without a visible temporal defect.

Why this form: the four groups are each necessary, so they multiply, as the image evaluator's
alignment and quality do. A crisp clip of the right object moving the wrong way, a right motion of
the wrong object, a jumpy clip and a blurred one are each a bad clip whatever the others score, and
a product keeps any one of them from being bought back by the rest; a mean of the four would rate
a crisp clip that moves backwards at 0.85. Within a group the mean gives graded credit, which keeps
the reward informative for ranking a mediocre model's samples.

Through the VAE (:func:`round_trip_clip_scores`, the shipped image VAE): clean moving, growing and
shrinking clips keep ~0.84, the VAE's own image ceiling (its frames' quality), and every temporal
defect stays a defect. Turning clips fall to ~0.3: that VAE has only seen palette colors and snaps
the in-between hues to them, so the color jumps midway (progress and smoothness). Pixel noise
vanishes in the latent, as in the image world, and so does brightness flicker on a black
background (the VAE restores palette colors). A video base that must show color changes needs a
VAE trained on the world's frames.

About 20 ms per clip of 8 32x32 frames on one CPU core (200 clips in 4 s): the image evaluator's
analysis of each frame is nearly all of it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from sspo.errors import ModelError, SSPOError
from sspo.worlds.moving_shapes.world import (
    MOTION_DEFECTS,
    MOVES,
    RESIZES,
    MotionSpec,
    MotionState,
    frame_times,
    make_motion_split,
    motion_state,
    parse_motion_prompt,
    render_clip,
    render_motion_defect,
)
from sspo.worlds.shapes.evaluator import ATTRIBUTE_NAMES, analyze, mean_scores, position_match, size_match, soft_window
from sspo.worlds.shapes.world import BACKGROUNDS, SHAPES

MOTION_NAMES = ("progress", "direction", "amplitude")
COHERENCE_NAMES = ("smoothness", "persistence")
COMPONENT_NAMES = ATTRIBUTE_NAMES + MOTION_NAMES + COHERENCE_NAMES + ("quality", "attributes", "motion", "coherence", "reward", "steady")

_GRID = 1025  # states per path for locating a frame on it: 1/1024 of the path apart
_COLOR_TOL, _COLOR_SCALE = 30.0, 20.0  # fill vs expected fill (RGB distance): tolerance, fall-off
_DIRECTION_EPS = 0.05  # path units: a clip that travels less has no direction (scores ~0.5)
_AMPLITUDE_TOL, _AMPLITUDE_SCALE = 0.1, 0.15  # uncovered share of the path: tolerance, fall-off
# Just-visible changes, the units of smoothness, set just above what the VAE round trip of a clean
# clip changes between frames (a dropped, shuffled or jittered frame changes 3 or more): along the
# path, the center and radius in fractions of the side (0.02 is 0.64 px at 32) and the fill in RGB
# distance; off it, the center, the radius (a moving object's wobbles by up to 0.03 through the VAE
# as it crosses the latent grid, a centred growing one's by 0.01) and the brightness of fill and
# background (their mean RGB: the VAE's frame-to-frame hue wobble of a small object is no flicker).
_ALONG_UNIT = {"position": 0.02, "size": 0.01, "color": 16.0}
_CENTER_UNIT, _RADIUS_UNIT, _BRIGHTNESS_UNIT = 0.02, 0.02, 16.0
_JERK_TOL, _JERK_SCALE = 1.5, 1.0  # jerk (in those units): tolerance, fall-off
_PERSISTENCE_SCALE = 0.2  # share of frames without the object (or another one): Gaussian fall-off
# A clip is steady when its smoothness is at least this: a jerk under ~2.7 units. The round trip of
# every clean clip is (its smoothness is 0.6 or more); a dropped, shuffled, shaking or flickering
# one is not. The share of steady clips is a model's rate of visible temporal defects, read off.
_STEADY_SMOOTHNESS = 0.5


@dataclasses.dataclass(frozen=True)
class MotionScore:
    """Per-component scores of one clip, each in [0, 1] (see the module docstring)."""

    background: float
    color: float
    shape: float
    size: float
    position: float
    progress: float
    direction: float
    amplitude: float
    smoothness: float
    persistence: float
    quality: float
    attributes: float
    motion: float
    coherence: float
    reward: float
    steady: float  # 1 without a visible temporal defect (smoothness >= 0.5), else 0; not in the reward

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in COMPONENT_NAMES}


class _Path:
    """The prompt's motion as a grid of states, and its animated quantity as vectors ``[G, D]``."""

    def __init__(self, spec: MotionSpec):
        self.spec = spec
        self.kind = "position" if spec.motion in MOVES else "size" if spec.motion in RESIZES else "color"
        self.t = np.linspace(0.0, 1.0, _GRID)
        states = [motion_state(spec, float(t)) for t in self.t]
        self.centers = np.array([s.center for s in states])
        self.radii = np.array([s.radius for s in states])
        self.fills = np.array([s.fill for s in states])
        self.animated = np.array([self.quantity(s) for s in states])
        # its length, in just-visible changes of the animated quantity (the unit of smoothness)
        self.length = float(np.linalg.norm(np.diff(self.animated, axis=0), axis=1).sum()) / _ALONG_UNIT[self.kind]

    def quantity(self, state: MotionState) -> np.ndarray:
        """The animated quantity of a state: its center, radius or fill."""
        return np.atleast_1d(np.asarray({"position": state.center, "size": state.radius, "color": state.fill}[self.kind], dtype=np.float64))

    def locate(self, value: np.ndarray) -> int:
        """Index of the grid state whose animated quantity is nearest to ``value``."""
        return int(np.argmin(((self.animated - value) ** 2).sum(axis=1)))

    def match(self, value: np.ndarray, expected: np.ndarray) -> float:
        """The attribute score of the animated quantity ``value`` against ``expected``."""
        if self.kind == "position":
            return position_match((value[0], value[1]), (expected[0], expected[1]))
        if self.kind == "size":
            return size_match([float(value[0])], float(expected[0]))
        return float(soft_window(float(np.linalg.norm(value - expected)), _COLOR_TOL, _COLOR_SCALE))


@functools.lru_cache(maxsize=256)
def _path(spec: MotionSpec) -> _Path:
    return _Path(spec)


def _to_clip(clip) -> np.ndarray:
    frames = np.asarray(clip)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise SSPOError(f"expected a clip of RGB frames [F, H, W, 3], got an array of shape {frames.shape}")
    frame_times(len(frames))  # at least 2 frames
    return frames


def _identity_shape(infos: list[dict], prompted: str) -> str:
    """The shape that fits the most frames (within the image evaluator's margin); ties: the prompt's."""
    counts = Counter(shape for info in infos if info["found"] for shape in info["plausible"])
    return max(SHAPES, key=lambda shape: (counts[shape], shape == prompted))


def _frame(info: dict, path: _Path, identity: str, t: float) -> tuple[dict[str, float], float, np.ndarray]:
    """One frame with an object: its attribute, progress and quality scores, its measured progress
    and its state for smoothness (distance along the path, then the deviations from the path's state
    there of center, radius unless animated, and the brightness of fill and background), in
    just-visible units."""
    radius = info["radii"][identity]
    value = {"position": np.array(info["center"]), "size": np.array([radius]), "color": np.asarray(info["fill"])}[path.kind]
    nearest = path.locate(value)
    scores = {name: info["scores"][name] for name in (*ATTRIBUTE_NAMES[1:], "quality")}
    scores[path.kind] = path.match(value, path.animated[nearest])
    scores["progress"] = path.match(value, path.quantity(motion_state(path.spec, t)))
    state = np.concatenate(
        [
            [path.t[nearest] * path.length],
            (np.array(info["center"]) - path.centers[nearest]) / _CENTER_UNIT,
            [(radius - path.radii[nearest]) / _RADIUS_UNIT] if path.kind != "size" else [],
            [np.mean(info["fill"] - path.fills[nearest]) / _BRIGHTNESS_UNIT],
            [np.mean(info["bg_obs"] - np.array(BACKGROUNDS[path.spec.background])) / _BRIGHTNESS_UNIT],
        ]
    )
    return scores, float(path.t[nearest]), state


def _trajectory_scores(count: int, seen: list[int], progress: list[float], states: list[np.ndarray]) -> dict[str, float]:
    """direction, amplitude and smoothness of a clip of ``count`` frames from the measured progress
    and states of the frames ``seen`` with an object; the others are interpolated from neighbours."""
    if len(seen) < 2:
        return {"direction": 0.0, "amplitude": 0.0, "smoothness": 0.0}
    frames = np.arange(count)
    p = np.interp(frames, seen, progress)
    z = np.stack([np.interp(frames, seen, column) for column in np.array(states).T], axis=1)
    travelled = max(float(np.abs(np.diff(p)).sum()), _DIRECTION_EPS)
    jerk = math.sqrt(float(np.mean(np.abs(np.diff(z, n=2, axis=0)).max(axis=1) ** 2))) if count > 2 else 0.0
    return {
        "direction": 0.5 + 0.5 * float(p[-1] - p[0]) / travelled,
        "amplitude": float(soft_window(1.0 - float(p.max() - p.min()), _AMPLITUDE_TOL, _AMPLITUDE_SCALE)),
        "smoothness": float(soft_window(jerk, _JERK_TOL, _JERK_SCALE)),
    }


def evaluate_clip(clip, spec: MotionSpec | str) -> MotionScore:
    """Score ``clip`` (``[F, H, W, 3]`` frames, uint8 or as the image evaluator reads them) against
    ``spec`` (or its prompt)."""
    if isinstance(spec, str):
        spec = parse_motion_prompt(spec)
    frames = _to_clip(clip)
    image_spec, path = spec.image_spec(), _path(spec)
    infos = [analyze(frame, image_spec) for frame in frames]
    identity = _identity_shape(infos, spec.shape)
    times = frame_times(len(frames))
    seen = [f for f, info in enumerate(infos) if info["found"]]
    rows = [_frame(infos[f], path, identity, float(times[f])) for f in seen]
    per_frame = (*ATTRIBUTE_NAMES[1:], "progress", "quality")
    result = {name: float(np.mean([row[0][name] for row in rows])) if rows else 0.0 for name in per_frame}
    result["background"] = float(np.mean([info["scores"]["background"] for info in infos]))
    result.update(_trajectory_scores(len(frames), seen, [row[1] for row in rows], [row[2] for row in rows]))
    consistent = sum(identity in infos[f]["plausible"] for f in seen)
    result["persistence"] = float(soft_window(1.0 - consistent / len(frames), 0.0, _PERSISTENCE_SCALE))
    result["attributes"] = float(np.mean([result[name] for name in ATTRIBUTE_NAMES]))
    result["motion"] = float(np.mean([result[name] for name in MOTION_NAMES]))
    result["coherence"] = math.sqrt(result["smoothness"] * result["persistence"])
    result["reward"] = result["attributes"] * result["motion"] * result["coherence"] * result["quality"]
    result["steady"] = float(result["smoothness"] >= _STEADY_SMOOTHNESS)
    return MotionScore(**{name: float(np.clip(result[name], 0.0, 1.0)) for name in COMPONENT_NAMES})


def evaluate_clips(clips: Sequence | np.ndarray, specs: Iterable[MotionSpec | str]) -> list[MotionScore]:
    """Score each clip against its spec (or prompt); ``clips`` may be an ``[N, F, H, W, 3]`` array."""
    clips = list(clips)
    specs = [parse_motion_prompt(s) if isinstance(s, str) else s for s in specs]
    if len(clips) != len(specs):
        raise SSPOError(f"evaluate_clips: {len(clips)} clips but {len(specs)} specs")
    return [evaluate_clip(clip, spec) for clip, spec in zip(clips, specs)]


# --------------------------------------------------------------------------------------------------
# The VAE round trip: the model sees latents, so a defect the latent cannot hold is none for it.


def load_vae(vae_folder_or_model):
    """An ``AutoencoderKL``: given, or loaded from a VAE folder or a pipeline folder's ``vae``."""
    from diffusers import AutoencoderKL

    if isinstance(vae_folder_or_model, AutoencoderKL):
        return vae_folder_or_model.eval()
    folder = Path(vae_folder_or_model)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise ModelError(f"no VAE at {folder}: expected an AutoencoderKL folder (config.json) or a pipeline folder with vae/")
    return AutoencoderKL.from_pretrained(str(folder)).eval()


def round_trip_clips(vae, clips: np.ndarray, batch: int = 256) -> np.ndarray:
    """``clips`` (``uint8 [N, F, H, W, 3]``) with every frame encoded (posterior mode) and decoded."""
    import torch

    from sspo.models.pipeline import decode_images, encode_images

    clips = np.asarray(clips)
    pixels = torch.from_numpy(clips.reshape(-1, *clips.shape[2:])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        decoded = [decode_images(vae, encode_images(vae, chunk)) for chunk in pixels.split(batch)]
    return np.concatenate(decoded).reshape(clips.shape)


def round_trip_clip_scores(vae_folder_or_model, n: int = 21, seed: int = 1, frames: int = 8) -> dict[str, float]:
    """Mean reward of ``n`` held-out clips (every motion in turn) after a round trip through the VAE,
    clean and with each defect. The clean value is the ceiling: no model decoding through this VAE
    scores higher. A defect whose value is near the clean one vanishes in the latent."""
    vae = load_vae(vae_folder_or_model)
    size = vae.config.sample_size
    rng = random.Random(seed)
    heldout = sorted(make_motion_split(0).heldout)
    by_motion = [[s for s in heldout if s.motion == motion] for motion in sorted({s.motion for s in heldout})]
    specs = [rng.choice(by_motion[i % len(by_motion)]) for i in range(n)]
    result = {}
    for name in ("clean", *MOTION_DEFECTS):
        clips = np.stack(
            [render_clip(s, frames, size) if name == "clean" else render_motion_defect(s, rng, frames, size, name) for s in specs]
        )
        result[name] = mean_scores(evaluate_clips(round_trip_clips(vae, clips), specs), COMPONENT_NAMES)["reward"]
    return result
