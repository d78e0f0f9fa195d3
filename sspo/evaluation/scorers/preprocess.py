"""Image preprocessing of the published scorers, reproduced without torchvision.

Two recipes cover every scorer here:

* :class:`ClipTransform` -- resize the shortest side with PIL bicubic, center crop, scale to [0, 1],
  normalise. This is both transformers' ``CLIPImageProcessor`` (PickScore, CLIP score) and OpenAI
  CLIP's torchvision ``Resize/CenterCrop/ToTensor/Normalize`` on PIL images (LAION aesthetic,
  ImageReward). The two differ only in how an odd crop margin is split, hence ``crop_rounding``.
* :class:`LongestSideTransform` -- HPSv2's ``ResizeMaxSize``: to a [0, 1] tensor first, then resize
  the longest side with torch's bicubic (what torchvision does to tensors; antialiased since
  torchvision 0.17) and pad with zeros to a square.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sspo.io import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1], like torchvision's ``ToTensor``."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (pixels - mean_t) / std_t


def resize_shortest_side(image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Shortest side to ``size``, the long side truncated (not rounded), as both torchvision and transformers do."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image if new_size == image.size else image.resize(new_size, resample)


def center_crop(image: Image.Image, size: int, rounding: str = "floor") -> Image.Image:
    """``rounding="floor"``: transformers (margin // 2); ``"round"``: torchvision (round(margin / 2))."""
    width, height = image.size
    if rounding == "floor":
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@dataclasses.dataclass(frozen=True)
class ClipTransform:
    size: int = 224
    crop_size: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    crop_rounding: str = "floor"
    resample: int = int(Image.Resampling.BICUBIC)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.one(image) for image in images])

    def one(self, image: Image.Image) -> torch.Tensor:
        image = resize_shortest_side(image.convert("RGB"), self.size, self.resample)
        image = center_crop(image, self.crop_size, self.crop_rounding)
        return normalize(to_unit_tensor(image), self.mean, self.std)

    @classmethod
    def from_processor_config(cls, path: str | None, default_size: int, **overrides) -> ClipTransform:
        """Read ``preprocessor_config.json`` (transformers' CLIPImageProcessor fields); defaults without one."""
        config = read_json(path, what="the image processor config", fix="pass an intact preprocessor_config.json, or download it again") if path else {}
        size = _side(config.get("size"), default_size)
        fields = dict(
            size=size,
            crop_size=_side(config.get("crop_size"), size),
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
        )
        fields.update(overrides)
        return cls(**fields)


def _side(value, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height"))
    return int(value)


@dataclasses.dataclass(frozen=True)
class LongestSideTransform:
    size: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    # torchvision >= 0.17 antialiases tensor resizes by default; 0.15/0.16 (2023 installs) did not.
    antialias: bool = True

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.one(image) for image in images])

    def one(self, image: Image.Image) -> torch.Tensor:
        pixels = to_unit_tensor(image)
        height, width = pixels.shape[1:]
        scale = self.size / max(height, width)
        if scale != 1.0:
            new_h, new_w = round(height * scale), round(width * scale)
            pixels = F.interpolate(
                pixels[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=self.antialias
            )[0]
        # HPSv2 pads only when it resized; padding a non-square image that is already at size too
        # keeps the batch square (the original would hand the model a non-square tensor).
        pad_h, pad_w = self.size - pixels.shape[1], self.size - pixels.shape[2]
        if pad_h or pad_w:
            pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        return normalize(pixels, self.mean, self.std)
