"""The paper's text-to-video metrics (its Table 5): FID, PSNR, FVD, MTScore and CHScore.

A clip is ``uint8`` RGB frames ``[F, H, W, 3]`` (:mod:`sspo.video_io`). Every learned backbone is
the user's: a TorchScript file (:func:`build_video_metric`) or a Python callable on CPU tensors
(the functions below; a callable moves its input to its own device). Nothing is downloaded.

- FID (Heusel et al., 2017, "GANs trained by a two time-scale update rule"): the Fréchet distance
  between image features of the generated clips' frames and of the reference clips' frames.
- FVD (Unterthiner et al., 2019, "FVD: a new metric for video generation"): the Fréchet distance
  between I3D features of whole clips, with StyleGAN-V's TorchScript port of the I3D.
- PSNR (Hore & Ziou, 2010): each generated clip against its prompt's reference clip, per frame.
- MTScore and CHScore (Yuan et al., 2024, ChronoMagic-Bench, github.com/PKU-YuanGroup/ChronoMagic-Bench):
  how time-lapse-like a clip looks to a video-text retrieval model, and how coherent it is to a
  point tracker.

docs/video-metrics.md gives each definition, the backbones' calling conventions and what differs
from the published code.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sspo.config import Allowed
from sspo.errors import ModelError, SSPOError

VIDEO_METRICS = ("fid", "psnr", "fvd", "mtscore", "chscore")  # the paper's Table 5, in its order
FD_OFFSET = 1e-6  # pytorch-fid's diagonal offset for a singular covariance product
PIXEL_GRID = 8  # pixel_features: cells per side
I3D_SIZE = 224
I3D_MIN_FRAMES = 9  # the I3D's temporal strides (2, 2, 2) and its final 2-frame average pool need ceil(T / 8) >= 2
FVD_FRAMES = 16
PSNR_MAX = 100.0  # dB for identical frames (the usual cap: a finite mean)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# MTScore: ChronoMagic-Bench's ten candidate captions, in its order; the last five describe time-lapse videos.
MTSCORE_CANDIDATES = (
    "A conventional video, not a time-condensed video.",
    "A usual video, not an accelerated video sequence.",
    "A normal video, not a time-lapse video.",
    "A standard video, not a time-lapse.",
    "An ordinary video, different from a fast-motion video.",
    "A time-lapse video, distinct from a regular recording.",
    "A time-lapse footage, not your typical video.",
    "A fast-motion video, unlike a standard video.",
    "A time-condensed video, not a conventional video.",
    "An accelerated video sequence, not a usual video.",
)
MTSCORE_METAMORPHIC = range(5, 10)
MTSCORE_TOPK = 5
MTSCORE_TEMPERATURE = 100.0

# CHScore: ChronoMagic-Bench's normalisation range and weight of each tracking statistic.
CHSCORE_RANGES = {"ampr": (0.0, 0.9368749856948853), "mpvr": (0.0, 0.8997353911399841), "fcr": (0.0, 0.625), "cmpv": (0.0, 20.0), "mcmpv": (0.0, 1.0)}
CHSCORE_WEIGHTS = {"ampr": 0.35, "mpvr": 0.25, "fcr": 0.15, "cmpv": 0.15, "mcmpv": 0.10}


# --- Fréchet distance -------------------------------------------------------------------------

def feature_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and sample covariance ``[D, D]`` (``n - 1`` denominator, as pytorch-fid) in float64, on the features' device."""
    x = torch.as_tensor(features).double()
    if x.ndim != 2 or len(x) < 2:
        raise SSPOError(f"a Fréchet distance needs at least 2 feature rows [N, D] per set, got shape {tuple(x.shape)}")
    return x.mean(dim=0), torch.atleast_2d(torch.cov(x.T))


def frechet_distance(features_a, features_b, device: str | torch.device | None = None) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (arrays or
    tensors), computed on ``device`` (default: where they are) by :func:`frechet_distance_from_stats`."""
    a, b = (torch.as_tensor(f, device=device) for f in (features_a, features_b))
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`` (Heusel et al., 2017), in float64.

    ``tr((S_a S_b)^(1/2))`` is the sum of the square roots of the eigenvalues of ``S_a S_b``, taken
    from the symmetric ``S_a^(1/2) S_b S_a^(1/2)`` (same eigenvalues) with ``eigh``: no complex
    parts to discard, unlike a general ``sqrtm``. When the product is singular (fewer samples than
    dimensions, or constant features), both covariances get :data:`FD_OFFSET` on the diagonal for
    the square-root term only, as pytorch-fid does.
    """
    mu_a, sigma_a, mu_b, sigma_b = (torch.as_tensor(t).double() for t in (mu_a, sigma_a, mu_b, sigma_b))
    eigenvalues = _product_eigenvalues(sigma_a, sigma_b)
    if eigenvalues.min() <= eigenvalues.max() * len(eigenvalues) * torch.finfo(torch.float64).eps:
        offset = FD_OFFSET * torch.eye(len(sigma_a), dtype=torch.float64, device=sigma_a.device)
        eigenvalues = _product_eigenvalues(sigma_a + offset, sigma_b + offset)
    diff = mu_a - mu_b
    return float(diff @ diff + sigma_a.trace() + sigma_b.trace() - 2 * eigenvalues.sqrt().sum())


def _product_eigenvalues(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``a @ b`` for symmetric positive semi-definite ``a``, ``b`` (clipped at 0)."""
    w, v = torch.linalg.eigh(a)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root @ b @ root
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)


# --- shared clip handling ---------------------------------------------------------------------

def resample_frames(clip: np.ndarray, count: int) -> np.ndarray:
    """``count`` frames spread evenly over the clip: frame ``floor(i * F / count)`` for i < count.

    A shorter clip repeats frames (8 -> 16 shows each twice), a longer one is subsampled; no blended
    frame that neither the generated nor the reference clip holds is ever made.
    """
    return clip[(np.arange(count) * len(clip)) // count]


def _frames_tensor(clip: np.ndarray) -> torch.Tensor:
    """``uint8 [F, H, W, 3]`` -> ``uint8 [F, 3, H, W]``."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
        raise SSPOError(f"a clip is uint8 RGB frames [F, H, W, 3], got {clip.dtype} {tuple(clip.shape)}")
    return torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2)


def _resized(clip: np.ndarray, size: tuple[int, int], *, antialias: bool = False) -> torch.Tensor:
    """Frames bilinearly resized to ``size`` (h, w), float ``[F, 3, h, w]`` on [0, 255].

    Half-pixel centres, no antialiasing by default: cv2's ``INTER_LINEAR`` (MTScore) and the FVD
    reference's bilinear resize; PSNR's reference frames are antialiased, as an image library would.
    """
    frames = _frames_tensor(clip).float()
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def _as_rows(output) -> np.ndarray:
    """A backbone's output as float64 ``[N, D]`` (pooled maps ``[N, D, 1, 1]`` flattened)."""
    return torch.as_tensor(output).detach().cpu().double().flatten(1).numpy()


# --- FID, FVD: features -----------------------------------------------------------------------

def pixel_features(frames: torch.Tensor) -> np.ndarray:
    """Exact, network-free frame features for the shapes world (and its clips, the motion world):
    each frame's RGB averaged over a :data:`PIXEL_GRID` x :data:`PIXEL_GRID` grid of cells, on [0, 1]
    (192 numbers).

    A shapes-world frame is a coloured shape on a plain background: the cells record its colour,
    size and position, the attributes its prompts ask for. ``frames``: ``uint8 [N, 3, H, W]``.
    """
    return _as_rows(F.adaptive_avg_pool2d(frames.double() / 255, PIXEL_GRID))


def fid_features(clip: np.ndarray, extractor: Callable, *, frames: int | None = None, batch_size: int = 16) -> np.ndarray:
    """Image features ``[F, D]`` of a clip's frames (all of them, or ``frames`` by :func:`resample_frames`).

    ``extractor(uint8 [N, 3, H, W]) -> [N, D]`` at the clip's own size: an Inception-v3 pool3
    (2048 features) that resizes and scales its input itself, as StyleGAN2-ADA's
    ``inception-2015-12-05.pt``, or :func:`pixel_features`.
    """
    x = _frames_tensor(clip if frames is None else resample_frames(clip, frames))
    return np.concatenate([_as_rows(extractor(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def fvd_features(clip: np.ndarray, detector: Callable, *, frames: int = FVD_FRAMES) -> np.ndarray:
    """The I3D features ``[1, D]`` of a clip, preprocessed as the FVD reference code does.

    The clip is resampled to ``frames`` frames (:func:`resample_frames`; sspo's 8-frame clips show
    each frame twice), each frame resized bilinearly to 224 x 224, then scaled to [-1, 1]:
    ``detector(float [1, 3, T, 224, 224])``. The TorchScript I3D is called with
    ``rescale=False, resize=False, return_features=True`` (:func:`build_video_metric`), so it
    receives exactly this and returns its 400 logits averaged over time.
    """
    if frames < I3D_MIN_FRAMES:
        raise SSPOError(f"fvd: frames={frames}, but the I3D needs at least {I3D_MIN_FRAMES} frames per clip")
    x = (_resized(resample_frames(clip, frames), (I3D_SIZE, I3D_SIZE)) / 127.5 - 1).clamp(-1, 1)  # clamp: float rounding only
    return _as_rows(detector(x.permute(1, 0, 2, 3).unsqueeze(0)))


# --- PSNR -------------------------------------------------------------------------------------

def psnr(clip: np.ndarray, reference: np.ndarray) -> float:
    """Mean over frames of ``10 log10(255^2 / MSE)`` against the reference clip, on [0, 255].

    MSE is over a frame's pixels and channels; identical frames count :data:`PSNR_MAX`. The
    reference is brought to the clip's frame count (:func:`resample_frames`) and size (bilinear,
    antialiased, rounded to integers like a saved frame) first.
    """
    frames = _frames_tensor(clip).double()
    ref = _resized(resample_frames(reference, len(clip)), tuple(frames.shape[-2:]), antialias=True).round().clamp(0, 255).double()
    mse = (frames - ref).pow(2).flatten(1).mean(dim=1).tolist()
    return math.fsum(10 * math.log10(255.0**2 / e) if e > 0 else PSNR_MAX for e in mse) / len(mse)


# --- MTScore ----------------------------------------------------------------------------------

def metamorphic_score(video_features, text_features) -> float:
    """ChronoMagic-Bench's MTScore of one clip from its embedding ``[D]`` (or ``[1, D]``) and the
    embeddings ``[10, D]`` of :data:`MTSCORE_CANDIDATES`: ``softmax(100 cos(video, text))`` over the
    ten captions, the five most probable kept, the probabilities of the time-lapse ones among them summed.
    """
    v = F.normalize(torch.as_tensor(video_features).detach().cpu().double().reshape(1, -1), dim=-1)
    t = F.normalize(torch.as_tensor(text_features).detach().cpu().double(), dim=-1)
    if t.shape != (len(MTSCORE_CANDIDATES), v.shape[1]):
        raise SSPOError(f"mtscore: text features must be [{len(MTSCORE_CANDIDATES)}, {v.shape[1]}] (one per candidate caption), got {tuple(t.shape)}")
    top = (MTSCORE_TEMPERATURE * v @ t.T).softmax(dim=-1)[0].topk(MTSCORE_TOPK)
    return float(sum(p for p, i in zip(top.values.tolist(), top.indices.tolist()) if i in MTSCORE_METAMORPHIC))


def mtscore(clip: np.ndarray, encoder: Callable, text_features, *, frames: int = 4, size: int = 224) -> float:
    """The MTScore of a clip: ``frames`` frames taken every ``len(clip) // frames`` from the first,
    resized to ``size`` (bilinear, rounded to integers as cv2 does for uint8), scaled to [0, 1] and
    ImageNet-normalised -> ``encoder(float [1, T, 3, size, size]) -> [1, D]`` (InternVideo2's
    ``get_vid_feat``; defaults: ChronoMagic's InternVideo2-stage2 4-frame 224 px setting).
    """
    if len(clip) < frames:
        raise SSPOError(f"mtscore: a clip of {len(clip)} frames, fewer than frames={frames}")
    picked = clip[:: len(clip) // frames][:frames]
    x = _resized(picked, (size, size)).round().clamp(0, 255) / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return metamorphic_score(encoder(x.unsqueeze(0)), text_features)


# --- CHScore ----------------------------------------------------------------------------------

def coherence_score(visibility, threshold: float = 0.1) -> float:
    """ChronoMagic-Bench's CHScore of one clip from its tracked points' visibility ``[T, N]``.

    With ``m_t`` the fraction of points not visible in frame t and ``d_t = m_{t+1} - m_t``: the
    mean of m (AMPR), the standard deviation of d (MPVR), the count of d > ``threshold`` (CMPV),
    that count over T (FCR) and the largest d (MCMPV), each min-max normalised with the published
    ranges and weighted (:data:`CHSCORE_RANGES`, :data:`CHSCORE_WEIGHTS`); the score is
    1 / weighted sum, and 0 when the sum is 0 (so a clip that never loses a point scores 0, as published).
    Computed in float32 as the published code, so that threshold comparisons agree.
    """
    visibility = torch.as_tensor(visibility)
    frames, points = visibility.shape
    if frames < 3:
        raise SSPOError(f"chscore needs at least 3 frames (the spread of frame-to-frame changes), got {frames}")
    missing = (visibility == 0).sum(dim=1).float() / points
    change = missing[1:] - missing[:-1]
    cuts = (change > threshold).sum().item()
    raw = {"ampr": missing.mean().item(), "mpvr": change.std().item(), "fcr": cuts / frames, "cmpv": cuts, "mcmpv": change.max().item()}
    total = sum(CHSCORE_WEIGHTS[k] * (v - CHSCORE_RANGES[k][0]) / (CHSCORE_RANGES[k][1] - CHSCORE_RANGES[k][0]) for k, v in raw.items())
    return 1 / total if total != 0 else 0.0


def chscore(clip: np.ndarray, tracker: Callable, *, threshold: float = 0.1) -> float:
    """The CHScore of a clip: ``tracker(float [1, T, 3, H, W] on [0, 255]) -> visibility [1, T, N]``
    (CoTracker's ``predictor(video, grid_size=30)[1]``: a 30 x 30 grid of points from frame 0),
    then :func:`coherence_score`.
    """
    visibility = tracker(_frames_tensor(clip).float().unsqueeze(0))
    return coherence_score(torch.as_tensor(visibility).detach().cpu()[0], threshold)


# --- backbones from files ---------------------------------------------------------------------

BACKBONES = {
    "fid": "an image feature extractor, TorchScript (e.g. StyleGAN2-ADA's inception-2015-12-05.pt), or 'pixels'",
    "fvd": "the I3D TorchScript file (StyleGAN-V's i3d_torchscript.pt)",
    "mtscore": "a TorchScript video encoder with a text_features attribute",
    "chscore": "a TorchScript point tracker",
}


def load_torchscript(path: str | Path, what: str) -> torch.jit.ScriptModule:
    """A TorchScript file on the CPU, in eval mode; a missing or other file is a one-line ModelError naming it.

    TorchScript is a program, run by loading and calling it: a file from a source the user trusts
    only (docs/video-metrics.md says so), as there is no data-only way to read it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{what}: no such file: {path}")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch, but the published files are TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0]  # torch's first sentence; the rest is advice about checkpoints
        raise ModelError(f"{what}: {path} is not a TorchScript file ({reason})") from None


def build_video_metric(
    name: str, backbone: str | Path | Callable | None = None, *, device: str | torch.device = "cpu", batch_size: int = 16, **options
) -> Callable:
    """``measure(clip, reference=None)`` for metric ``name``: a float for psnr / mtscore / chscore,
    a feature matrix ``[k, D]`` for fid / fvd (their distance is over whole sets: :func:`frechet_distance`).

    ``backbone``: its TorchScript file (:data:`BACKBONES`; ``fid`` also takes ``"pixels"`` for
    :func:`pixel_features`; psnr has none), loaded onto ``device``; or a module already loaded
    (e.g. CoTracker's ``CoTrackerPredictor``), called the same way and left where it is.
    ``options``: fid ``frames``; fvd ``frames``; mtscore ``frames``, ``size``; chscore
    ``grid_size`` (default 30), ``threshold``. ``batch_size``: frames per extractor call (fid).
    """
    if name not in VIDEO_METRICS:
        raise SSPOError(f"unknown video metric {name!r}; expected one of {', '.join(VIDEO_METRICS)}")
    check_options(name, options)  # before any backbone loads
    if name == "psnr":
        if backbone is not None:
            raise SSPOError(f"psnr has no backbone to load, got {backbone!r}")
        return functools.partial(psnr, **options)
    if backbone is None:
        raise ModelError(f"metric {name!r} needs {BACKBONES[name]}")
    device = torch.device(device)
    what = f"metric {name!r}"
    if name == "fid" and backbone == "pixels":
        return _clip_only(functools.partial(fid_features, **options), extractor=pixel_features, batch_size=batch_size)
    module = load_torchscript(backbone, what).to(device) if isinstance(backbone, (str, Path)) else backbone
    if name == "fid":  # StyleGAN2-ADA's Inception convention
        return _clip_only(functools.partial(fid_features, **options), batch_size=batch_size,
                          extractor=lambda x: module(x.to(device), return_features=True))
    if name == "fvd":  # StyleGAN-V's I3D convention, preprocessing done by fvd_features
        return _clip_only(functools.partial(fvd_features, **options),
                          detector=lambda x: module(x.to(device), rescale=False, resize=False, return_features=True))
    if name == "mtscore":
        if not hasattr(module, "text_features"):
            raise ModelError(f"{what}: {backbone} has no text_features attribute (the embeddings [10, D] of sspo.evaluation.video_metrics.MTSCORE_CANDIDATES)")
        return _clip_only(functools.partial(mtscore, **options), encoder=lambda x: module(x.to(device)), text_features=module.text_features)
    options = dict(options)
    grid_size = options.pop("grid_size", 30)  # CoTracker's call: (tracks, visibility) of a grid_size^2 grid
    return _clip_only(functools.partial(chscore, **options),
                      tracker=lambda x: module(x.to(device), grid_size=grid_size)[1])


_MEASURES = {"fid": fid_features, "psnr": psnr, "fvd": fvd_features, "mtscore": mtscore, "chscore": chscore}  # their keywords are the options


def check_options(name: str, options: Mapping) -> None:
    """Refuse an option metric ``name`` does not have (its measure's keyword-only parameters, and
    chscore's ``grid_size``) or a value it cannot take, before any backbone is loaded: every option is
    a count or a size (an integer above 0) or a threshold (a number, 0 or more), or None where the
    option's default is None."""
    function = _MEASURES[name]
    tracker = {"grid_size": int} if name == "chscore" else {}  # passed to CoTracker, not to chscore
    hints = typing.get_type_hints(function) | tracker
    allowed = [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY] + list(tracker)
    for key, value in options.items():
        if key not in allowed:
            raise SSPOError(f"metric {name!r} has no option {key!r}; its options: {', '.join(allowed) or 'none'}")
        hint = hints[key]
        if value is None and type(None) in typing.get_args(hint):
            continue
        count = hint is int or int in typing.get_args(hint)
        check_option_value(name, key, value, int if count else float, Allowed(above=0) if count else Allowed(at_least=0))


def check_option_value(metric: str, key: str, value, item_type: type, rule: Allowed) -> None:
    """One line naming the metric's option unless ``value`` is an ``item_type`` that ``rule`` admits."""
    if isinstance(value, bool) or not isinstance(value, int if item_type is int else (int, float)) or not rule.admits(value):
        raise SSPOError(f"metric {metric!r} option {key!r}: got {value!r}, expected {rule.describe(item_type)}")


def _clip_only(function: Callable, **backbone) -> Callable:
    """``measure(clip, reference=None)`` for a metric that does not look at the reference clip."""
    return lambda clip, reference=None: function(clip, **backbone)
