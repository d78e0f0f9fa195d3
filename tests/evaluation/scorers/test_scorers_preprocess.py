"""Pre-processing against hand-computed values and against transformers' own CLIP image processor."""

import numpy as np
import pytest
import torch
from PIL import Image

from sspo.evaluation.scorers.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipTransform,
    LongestSideTransform,
    center_crop,
    resize_shortest_side,
)


def test_resize_shortest_side_truncates_the_long_side():
    assert resize_shortest_side(Image.new("RGB", (300, 200)), 224).size == (336, 224)
    assert resize_shortest_side(Image.new("RGB", (200, 301)), 224).size == (224, 337)  # int(337.12)
    square = Image.new("RGB", (224, 224))
    assert resize_shortest_side(square, 224) is square


def test_center_crop_splits_odd_margins_like_each_library():
    columns = np.tile(np.arange(7, dtype=np.uint8)[None, :, None] * 10, (5, 1, 3))  # pixel = 10 * column
    image = Image.fromarray(columns)
    # margin 3: transformers takes 3 // 2 = 1, torchvision round(1.5) = 2 (banker's rounding)
    assert np.asarray(center_crop(image, 4, "floor"))[0, 0, 0] == 10
    assert np.asarray(center_crop(image, 4, "round"))[0, 0, 0] == 20


def test_clip_normalisation_by_hand():
    pixels = np.array([[[255, 0, 128], [0, 0, 0]], [[255, 255, 255], [10, 20, 30]]], dtype=np.uint8)
    out = ClipTransform(size=2, crop_size=2)([Image.fromarray(pixels)])
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    expected_top_left = [
        (1.0 - 0.48145466) / 0.26862954,
        (0.0 - 0.4578275) / 0.26130258,
        (128 / 255 - 0.40821073) / 0.27577711,
    ]
    assert out[0, :, 0, 0].tolist() == pytest.approx(expected_top_left, abs=1e-6)
    assert out[0, 2, 1, 1].item() == pytest.approx((30 / 255 - 0.40821073) / 0.27577711, abs=1e-6)


def _transformers_clip_processor(size):
    try:  # transformers 5: the PIL backend; 4.x: the (PIL-based) slow processor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.mark.parametrize("width,height", [(512, 512), (640, 481), (300, 517), (224, 224)])
def test_resize_224_bicubic_crop_matches_transformers(width, height):
    image = Image.fromarray(np.random.default_rng(width + height).integers(0, 256, (height, width, 3), dtype=np.uint8))
    theirs = np.asarray(_transformers_clip_processor(224)(image, return_tensors="np")["pixel_values"][0])
    ours = ClipTransform(size=224, crop_size=224, crop_rounding="floor")([image])[0]
    assert ours.shape == (3, 224, 224)
    assert np.abs(ours.numpy() - theirs).max() < 1e-5


def test_clip_transform_reads_processor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 16}, "crop_size": {"height": 12, "width": 12}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}'
    )
    transform = ClipTransform.from_processor_config(str(tmp_path / "preprocessor_config.json"), 224, crop_rounding="round")
    assert (transform.size, transform.crop_size, transform.mean, transform.crop_rounding) == (16, 12, (0.5, 0.5, 0.5), "round")
    assert ClipTransform.from_processor_config(None, 32).size == 32


def test_longest_side_pads_with_black_without_resizing_at_size():
    pixels = np.full((2, 4, 3), 200, dtype=np.uint8)  # h=2, w=4: longest side already 4
    out = LongestSideTransform(size=4)([Image.fromarray(pixels)])[0]
    black = [-m / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    grey = [(200 / 255 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    for row, expected in ((0, black), (1, grey), (2, grey), (3, black)):
        assert out[:, row, :].mean(dim=1).tolist() == pytest.approx(expected, abs=1e-6)


def test_longest_side_resizes_with_antialiased_bicubic_then_pads():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)  # h=8, w=4 -> 4x2, padded 1 column each side
    out = LongestSideTransform(size=4, mean=(0, 0, 0), std=(1, 1, 1))([Image.fromarray(pixels)])[0]
    unit = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255
    resized = torch.nn.functional.interpolate(unit, size=(4, 2), mode="bicubic", align_corners=False, antialias=True)[0]
    assert torch.allclose(out[:, :, 1:3], resized, atol=1e-6)
    assert out[:, :, 0].abs().max() == 0 and out[:, :, 3].abs().max() == 0
