"""The shapes world's exact evaluator (its "PickScore"): score an image against its prompt.

No learned model: the pixels are analysed against the world's geometry, palette and renderer
(:mod:`sspo.worlds.shapes.world`). The image's background color is read from its border; the object is
the set of pixels that differ from it, with a per-pixel coverage (0..1) from projecting each
(3x3-smoothed) pixel onto the background->object color axis. Every score is a float in [0, 1]:

Attributes (is the image *what the prompt asks for*?)
    ``background``  soft fraction of non-object pixels within RGB distance ~45-110 of the prompt's
                    background color.
    ``color``       soft fraction of object pixels (unmixed from the background at antialiased
                    edges) whose nearest palette color is the prompt's; the palette is the six
                    object colors plus the three backgrounds as distractors.
    ``shape``       every shape is rendered by the world's own renderer at the object's centroid
                    and scaled to its area (then refined by moment matching), optionally blurred to
                    match a blurry image; the soft IoU with the object gives a softmax over shapes
                    (temperature 0.02 IoU): high only when the prompt's shape is the best match by
                    a clear margin, ~1/4 when the object is a shapeless blob.
    ``size``        radius implied by the object's area and shape (the best-matching shape, or any
                    that fits about as well) against the prompt's size radius, on a log scale: 1
                    within 8%, then a Gaussian fall-off; ~0 at the other size (radii differ 1.86x).
    ``position``    distance from the centroid to the prompt's position center: 1 within 3% of the
                    side, ~0.4 at 10%, ~0 at a neighbouring position (22% away).

Quality (is it a *good image*?)
    ``noise``       ``exp(-(sigma / 16)^2)``, with sigma (gray levels) estimated from the
                    high-pass residual ``x - box3(x)`` where a clean render of the observed object
                    is flat (away from its edges).
    ``sharpness``   gradient energy around the object, less the noise's expected share, relative to
                    that of a clean render of the observed object (same shape, place, size and
                    colors); the worst of four directions, so a one-directional smear counts too.
                    A ratio of 0.92 or more (the clean render's own fit error) scores 1.
    ``quality``     ``sqrt(noise * sharpness)``: a geometric mean, because a good image must be both
                    clean *and* sharp; either defect alone makes it a poor image.

``attributes`` is the mean of the five attribute scores (each attribute counts the same, as in
compositional text-to-image benchmarks such as GenEval), and

    ``reward = attributes * quality``

Why this form: alignment and quality are both necessary, so they multiply (a perfectly aligned
but noisy or blurred image is a bad image, and so is a crisp image of the wrong thing). Within
alignment the mean gives partial credit: a clean render with one wrong attribute scores 0.8,
clearly below a correct one (~1) yet far above garbage, which keeps the reward informative for
ranking the mediocre samples a base model makes. A random-noise image has ``noise ~ 0`` and so
``reward ~ 0`` whatever its accidental attribute scores; an empty background-only image has no
object, so every object attribute and the sharpness are 0.

Works at any square size (the world renders 32x32): lengths scale with the side. About 4 ms per
32x32 image on one CPU core.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from sspo.errors import SSPOError
from sspo.worlds.shapes.world import (
    BACKGROUNDS,
    COLORS,
    POSITION_CENTER,
    SHAPES,
    SIZE_RADIUS,
    SUPERSAMPLE,
    ShapeSpec,
    parse_prompt,
    shape_polygon,
)

ATTRIBUTE_NAMES = ("background", "color", "shape", "size", "position")
QUALITY_NAMES = ("noise", "sharpness")
COMPONENT_NAMES = ATTRIBUTE_NAMES + QUALITY_NAMES + ("quality", "attributes", "reward")

# Palette used to classify object pixels: object colors first, backgrounds as distractors.
_PALETTE_NAMES = tuple(COLORS) + tuple(f"bg:{name}" for name in BACKGROUNDS)
_PALETTE = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)

_MIN_CONTRAST = 40.0  # an object must differ from the background by this much (RGB distance)
_BG_TOL = (45.0, 110.0)  # background color distance: full marks below, zero above
_COLOR_TAU = 28.0  # softness (RGB distance) of the per-pixel palette classification
_SHAPE_TAU = 0.02  # softmax temperature over shape IoUs
_SIZE_TOL, _SIZE_SCALE = 0.08, 0.12  # |log radius ratio|: tolerance, then Gaussian fall-off
_POS_TOL, _POS_SCALE = 0.03, 0.05  # centroid distance (fraction of side): tolerance, fall-off
_SHARP_FULL = 0.92  # edge energy ratio that counts as fully sharp (clean renders fit to ~5%)
_NOISE_SCALE = 16.0  # sigma (gray levels) at which the noise score is exp(-1)
_REF_RADIUS = 0.2
_FIT_STEPS = 3
_BLUR_LEVELS = (0.0, 0.7, 1.2, 1.8, 2.6)  # template blurs tried for the shape match (pixels at 32)


@dataclasses.dataclass(frozen=True)
class ShapeScore:
    """Per-component scores of one image, each in [0, 1] (see the module docstring)."""

    background: float
    color: float
    shape: float
    size: float
    position: float
    noise: float
    sharpness: float
    quality: float
    attributes: float
    reward: float

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in COMPONENT_NAMES}


# --------------------------------------------------------------------------------------------------
# Small numpy image helpers (no scipy). Separable filters are applied as small matrices, which is
# much faster than padding and shifting on images this small.


@functools.lru_cache(maxsize=64)
def _filter_matrix(side: int, kind: str, param: float) -> np.ndarray:
    """1-D edge-replicating filter as a side x side matrix: ``box`` (width) or ``gauss`` (sigma)."""
    if kind == "box":
        r = int(param) // 2
        taps = np.ones(2 * r + 1, dtype=np.float64)
    else:
        r = max(1, int(math.ceil(3 * param)))
        taps = np.exp(-0.5 * (np.arange(-r, r + 1) / param) ** 2)
    taps /= taps.sum()
    m = np.zeros((side, side), dtype=np.float64)
    for i in range(side):
        for k, w in zip(range(-r, r + 1), taps):
            m[i, min(max(i + k, 0), side - 1)] += w
    return m.astype(np.float32)


def _separable(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    if a.ndim == 3:
        return np.ascontiguousarray((m @ np.moveaxis(a, -1, 0) @ m.T).transpose(1, 2, 0), dtype=np.float32)
    return (m @ a @ m.T).astype(np.float32)


def _box(a: np.ndarray, k: int = 3) -> np.ndarray:
    """Mean over a k x k window (edge-replicated) of an HxW or HxWxC array."""
    return _separable(a, _filter_matrix(a.shape[0], "box", k))


def _gaussian(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (edge-replicated) of an HxW array."""
    if sigma <= 0:
        return a
    return _separable(a, _filter_matrix(a.shape[0], "gauss", round(float(sigma), 4)))


@functools.lru_cache(maxsize=32)
def _band_matrix(side: int, r: int) -> np.ndarray:
    idx = np.arange(side)
    return (np.abs(idx[:, None] - idx[None, :]) <= r).astype(np.float32)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1) x (2r+1) square."""
    if r <= 0:
        return mask.copy()
    band = _band_matrix(mask.shape[0], r)
    return (band @ mask.astype(np.float32) @ band) > 0.5


def _directional_energy(a: np.ndarray) -> list[np.ndarray]:
    """Squared differences along x, y and both diagonals, per pixel (summed over channels)."""
    p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    h, w = a.shape[:2]

    def shifted(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    out = []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        e = (shifted(dy, dx) - shifted(-dy, -dx)) ** 2 / (4.0 * (dy * dy + dx * dx))
        out.append(e.sum(axis=-1) if e.ndim == 3 else e)
    return out


def soft_window(x: float | np.ndarray, tol: float, scale: float):
    """1 within ``tol``, then a Gaussian fall-off of width ``scale``."""
    excess = np.maximum(0.0, np.abs(x) - tol)
    return np.exp(-0.5 * (excess / scale) ** 2)


def _to_array(image) -> np.ndarray:
    """RGB pixels as float32 in [0, 255] from a PIL image or an HxWx3 (or HxW, HxWx4) array.

    Integer arrays are read as 0..255; float arrays as 0..1 when their maximum is at most 1,
    else as 0..255.
    """
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    else:
        raw = np.asarray(image)
        if raw.ndim == 3 and raw.shape[-1] == 4:
            raw = raw[..., :3]
        if raw.ndim == 2:
            raw = np.repeat(raw[..., None], 3, axis=-1)
        if raw.ndim != 3 or raw.shape[-1] != 3:
            raise SSPOError(f"expected an HxWx3 image, got an array of shape {raw.shape}")
        if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
            raise SSPOError(f"expected numeric pixels, got dtype {raw.dtype}")
        array = raw.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise SSPOError("image has non-finite pixel values")
        if np.issubdtype(raw.dtype, np.floating) and array.size and float(np.abs(array).max()) <= 1.0:
            array = array * 255.0
    if array.shape[0] != array.shape[1] or array.shape[0] < 8:
        raise SSPOError(f"expected a square image of side >= 8, got {array.shape[1]}x{array.shape[0]}")
    return np.clip(array, 0.0, 255.0)


def _coverage(shape: str, side: int, center: tuple[float, float], radius: float) -> np.ndarray:
    """Unclipped coverage of one object, rendered exactly as :func:`shapes.render` renders it.

    Same supersampled PIL geometry (including its snapping of vertices to the supersampling grid)
    and LANCZOS downsampling, but on one float channel: a world render with background ``b`` and
    color ``c`` is ``clip(b + coverage * (c - b), 0, 255)`` within about 6 gray levels, ringing
    included (Pillow's 8-bit LANCZOS clips between its two passes: 0.2% of pixels differ by more than 1).
    """
    big = side * SUPERSAMPLE
    canvas = Image.new("F", (big, big), 0.0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = center[0] * big, center[1] * big, radius * big
    polygon = shape_polygon(shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1.0)
    else:
        draw.polygon(polygon, fill=1.0)
    return np.asarray(canvas.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32)


@functools.cache
def _area_coefficients(side: int) -> dict[str, float]:
    """Object area in pixels per (radius in pixels)^2, for every shape, at this image side."""
    return {
        shape: float(np.clip(_coverage(shape, side, (0.5, 0.5), _REF_RADIUS), 0, 1).sum()) / (_REF_RADIUS * side) ** 2
        for shape in SHAPES
    }


# --------------------------------------------------------------------------------------------------
# Evaluation


def _alpha(smoothed: np.ndarray, background: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Per-pixel object coverage: projection onto the background->object color axis, in [0, 1]."""
    v = color - background
    return np.clip(((smoothed - background) @ v) / max(float(v @ v), 1e-6), 0.0, 1.0)


def _moments(alpha: np.ndarray) -> tuple[float, float, float]:
    """Area (pixels) and centroid (fractions of the side) of a coverage map."""
    side = alpha.shape[0]
    area = float(alpha.sum())
    if area <= 1e-6:
        return 0.0, 0.5, 0.5
    grid = (np.arange(side, dtype=np.float32) + 0.5) / side
    cx = float((alpha.sum(axis=0) * grid).sum() / area)
    cy = float((alpha.sum(axis=1) * grid).sum() / area)
    return area, cx, cy


def _fit_template(shape: str, alpha: np.ndarray, background: np.ndarray, color: np.ndarray):
    """Place ``shape`` on the observed object: same centroid and area, through the same pipeline.

    Templates are rendered as the world renders (so antialiasing, ringing and the snapping of
    vertices to the supersampling grid match), composited in the observed colors and their
    coverage extracted like the image's. Moment-matching steps correct the snapping bias; the
    best-overlapping candidate is kept. Returns (template coverage, raw coverage, radius, center).
    """
    side = alpha.shape[0]
    area, cx, cy = _moments(alpha)
    r = math.sqrt(area / _area_coefficients(side)[shape]) / side
    best = None
    for _ in range(_FIT_STEPS):
        r = min(max(r, 0.02), 0.7)
        m = _coverage(shape, side, (cx, cy), r)
        image = np.clip(background + m[..., None] * (color - background), 0.0, 255.0)
        t = _alpha(_box(image, 3), background, color)
        iou = _soft_iou(alpha, t)
        if best is None or iou > best[0]:
            best = (iou, t, m, r, (cx, cy))
        t_area, t_cx, t_cy = _moments(t)
        if t_area <= 1e-6:
            break
        dr = r * (math.sqrt(area / t_area) - 1.0)
        dx, dy = cx - t_cx, cy - t_cy
        if max(abs(dr), abs(dx), abs(dy)) * side * SUPERSAMPLE < 0.25:
            break  # within a quarter of the renderer's snapping grid: converged
        r, cx, cy = r + dr, cx + dx, cy + dy
    return best[1:]


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(float(np.maximum(a, b).sum()), 1e-6))


def size_match(radii: Iterable[float], expected: float) -> float:
    """The size score: 1 when one of the object's plausible radii is within 8% of ``expected``
    (fractions of the side), then a Gaussian fall-off on the log ratio."""
    return max(float(soft_window(math.log(r / expected), _SIZE_TOL, _SIZE_SCALE)) for r in radii)


def position_match(center: tuple[float, float], expected: tuple[float, float]) -> float:
    """The position score: 1 when ``center`` is within 3% of the side of ``expected``, ~0.4 at 10%."""
    return float(soft_window(math.hypot(center[0] - expected[0], center[1] - expected[1]), _POS_TOL, _POS_SCALE))


def analyze(image, spec: ShapeSpec) -> dict:
    """The measurements behind :func:`evaluate`, for evaluators built on this one (the moving-shapes world).

    Always: ``side``, ``bg_obs`` (observed background RGB), ``found`` (an object was found),
    ``sigma`` (noise level) and ``scores`` (the :class:`ShapeScore` fields). With an object also:
    ``obj_color`` (its most distinct RGB), ``fill`` (its RGB unmixed from the background at
    antialiased edges and averaged), ``area`` (pixels), ``center`` (fractions of the side), ``ious`` and
    ``radii`` (per shape: its fit's overlap and radius), ``plausible`` (the shapes that fit about as
    well as the best), ``best_shape`` and ``radius`` (the best fit's).
    """
    x = _to_array(image)
    side = x.shape[0]
    unit = side / 32.0
    margin = max(1, int(round(2 * unit)))
    xs = _box(x, 3)
    bg_expected = np.array(BACKGROUNDS[spec.background], dtype=np.float32)

    # Observed background: median of the image border (the object never covers most of it).
    ring = max(1, int(round(unit)))
    border = np.ones((side, side), dtype=bool)
    border[ring:-ring, ring:-ring] = False
    bg_obs = np.median(xs[border], axis=0)

    # Object: pixels that differ from the observed background; its color from the most distinct.
    dist = np.linalg.norm(xs - bg_obs, axis=-1)
    dmax = float(dist.max())
    info: dict = {"side": side, "bg_obs": bg_obs, "found": False}
    alpha = np.zeros((side, side), dtype=np.float32)
    if dmax >= _MIN_CONTRAST:
        obj_color = np.median(x[dist >= 0.8 * dmax], axis=0)
        if float(np.linalg.norm(obj_color - bg_obs)) >= _MIN_CONTRAST:
            alpha_s = _alpha(xs, bg_obs, obj_color)
            hard = alpha_s > 0.5
            if hard.any():
                alpha = np.where(_dilate(hard, margin), alpha_s, 0.0).astype(np.float32)
                info.update(found=True, obj_color=obj_color, hard=hard, alpha_s=alpha_s)
    found = info["found"]

    # Background: non-object pixels close to the prompt's background color.
    not_object = ~_dilate(alpha > 0.05, 1)
    if not_object.sum() >= 0.05 * side * side:
        bg_dist = np.linalg.norm(xs[not_object] - bg_expected, axis=-1)
        lo, hi = _BG_TOL
        background = float(np.mean(1.0 - np.clip((bg_dist - lo) / (hi - lo), 0.0, 1.0)))
    else:
        background = 0.0

    scores = dict(background=background, color=0.0, shape=0.0, size=0.0, position=0.0, sharpness=0.0)
    model_coverage = None
    if found:
        area, cx, cy = _moments(alpha)
        info.update(area=area, center=(cx, cy))

        # Shape: soft IoU against each shape placed at the object's centroid and scaled to its
        # area, blurred as much as fits best (so a blurred image is judged on its shape, not blur).
        ious, fits = {}, {}
        for shape in SHAPES:
            t, m, r, center = _fit_template(shape, alpha, bg_obs, info["obj_color"])
            ious[shape] = max(_soft_iou(alpha, _gaussian(t, sigma * unit)) for sigma in _BLUR_LEVELS)
            fits[shape] = (r, center, m)
        iou = np.array([ious[s] for s in SHAPES])
        p = np.exp((iou - iou.max()) / _SHAPE_TAU)
        p /= p.sum()
        scores["shape"] = float(p[SHAPES.index(spec.shape)])
        best = SHAPES[int(np.argmax(iou))]
        radius, center, model_coverage = fits[best]
        info.update(ious=ious, best_shape=best, radius=radius)

        # Size: radius implied by the area and the object's shape vs the prompt's size. The shape
        # is the best match, or any shape that fits about as well (a blurred triangle is also a
        # blurred circle): the most favourable reading among those, so size is judged on its own.
        plausible = [s for s in SHAPES if ious[s] >= iou.max() - _SHAPE_TAU]
        radii = {s: fits[s][0] for s in SHAPES}
        scores["size"] = size_match([radii[s] for s in plausible], SIZE_RADIUS[spec.size])
        info.update(radii=radii, plausible=plausible)

        # Position: centroid vs the prompt's position center.
        scores["position"] = position_match((cx, cy), POSITION_CENTER[spec.position])

        # Color: unmix the object pixels from the background, classify each against the palette.
        alpha_s = info["alpha_s"]
        solid = (alpha_s >= 0.6) & (alpha > 0)
        pure = bg_obs + (xs[solid] - bg_obs) / alpha_s[solid][:, None]
        logits = -((pure[:, None, :] - _PALETTE[None]) ** 2).sum(-1) / (2 * _COLOR_TAU**2)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        weights = alpha_s[solid]
        # its fill: the unmixed pixels' weighted mean, steadier than obj_color (the moving-shapes world tracks it)
        info["fill"] = (pure * weights[:, None]).sum(axis=0) / weights.sum() if weights.sum() > 0 else info["obj_color"]
        target = _PALETTE_NAMES.index(spec.color)
        scores["color"] = float((probs[:, target] * weights).sum() / max(float(weights.sum()), 1e-6))

    # A clean render of what is there: the observed object (or nothing) on the observed background.
    if model_coverage is not None:
        model = np.clip(bg_obs + model_coverage[..., None] * (info["obj_color"] - bg_obs), 0.0, 255.0)
        model_mask = np.clip(model_coverage, 0.0, 1.0)
        inside = model_mask > 0.5
        edge = (model_mask > 0.01) & (model_mask < 0.99)
        edge |= _dilate(inside, 1) & ~inside
        edge |= _dilate(info["hard"], 1) & ~info["hard"]
        band = _dilate(edge, margin + 1)
    else:
        model = np.broadcast_to(bg_obs, x.shape)
        band = np.zeros((side, side), dtype=bool)
    flat = ~band
    if flat.sum() < 16:
        flat = np.ones((side, side), dtype=bool)

    # Noise: high-pass residual where the clean render is flat (x - box3(x) has var 8/9 sigma^2).
    residual = x - _box(x, 3)
    sigma = float(np.sqrt(np.mean(residual[flat] ** 2) / (8.0 / 9.0)))
    noise = math.exp(-((sigma / _NOISE_SCALE) ** 2))
    info["sigma"] = sigma

    # Sharpness: edge energy near the object (less the noise's expected share) relative to the
    # clean render's, in the worst of four directions (a smear blurs along one direction only).
    if model_coverage is not None:
        wide = _dilate(band, margin)
        ratios = []
        for e_obs, e_model in zip(_directional_energy(x), _directional_energy(model)):
            ideal = float(e_model[wide].sum())
            observed = float(e_obs[wide].sum()) - float(e_obs[flat].mean()) * float(wide.sum())
            ratios.append(observed / ideal if ideal > 1e-6 else 0.0)
        scores["sharpness"] = float(np.clip(min(ratios) / _SHARP_FULL, 0.0, 1.0))
        info["sharp_ratios"] = ratios

    attributes = float(np.mean([scores[name] for name in ATTRIBUTE_NAMES]))
    quality = math.sqrt(noise * scores["sharpness"])
    result = dict(scores, noise=noise, quality=quality, attributes=attributes, reward=attributes * quality)
    info["scores"] = {name: float(np.clip(result[name], 0.0, 1.0)) for name in COMPONENT_NAMES}
    return info


def evaluate(image, spec: ShapeSpec) -> ShapeScore:
    """Score ``image`` (PIL image or HxWx3 uint8 array, any square size) against ``spec``."""
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    return ShapeScore(**analyze(image, spec)["scores"])


def evaluate_prompt(image, prompt: str) -> ShapeScore:
    """Score ``image`` against a shapes-world prompt (parsed with :func:`parse_prompt`)."""
    return evaluate(image, parse_prompt(prompt))


def evaluate_batch(images: Sequence | np.ndarray, specs: Iterable[ShapeSpec | str]) -> list[ShapeScore]:
    """Score each image against its spec (or prompt); ``images`` may be an NxHxWx3 array."""
    images = list(images)
    specs = [parse_prompt(s) if isinstance(s, str) else s for s in specs]
    if len(images) != len(specs):
        raise SSPOError(f"evaluate_batch: {len(images)} images but {len(specs)} specs")
    return [evaluate(image, spec) for image, spec in zip(images, specs)]


def mean_scores(scores: Iterable, names: Sequence[str] = COMPONENT_NAMES) -> dict[str, float]:
    """Component-wise mean of several scores (for tables): ``names`` are the scores' components
    (an image's by default; a clip's score passes its own)."""
    rows = [s.as_dict() for s in scores]
    if not rows:
        return {name: float("nan") for name in names}
    return {name: float(np.mean([r[name] for r in rows])) for name in names}
