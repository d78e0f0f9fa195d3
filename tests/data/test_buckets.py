"""Aspect-ratio buckets (data.buckets): bucket sizes, every micro-batch one bucket, the real size and
crop as SDXL's conditioning, and training on images of several shapes."""

import json

import numpy as np
import pytest
from PIL import Image

from sspo.data.config import DataConfig
from sspo.data.dataset import load_dataset_from_config
from sspo.data.images import bucket_sizes
from sspo.errors import ConfigError
from sspo.worlds.shapes.world import all_specs, render

WIDE, TALL, SQUARE = (40, 24), (24, 40), (32, 32)  # the buckets of resolution 32, step 8, aspect <= 2


def _folder(tmp_path, shapes):
    """A caption-files folder: a shapes-world render stretched to each (width, height) of ``shapes``."""
    folder = tmp_path / "images"
    folder.mkdir(parents=True)
    for i, (size, spec) in enumerate(zip(shapes, all_specs()[::41])):
        render(spec, 32).resize(size, Image.Resampling.BICUBIC).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(spec.prompt)
    return folder


MIXED = [(64, 32)] * 4 + [(30, 60)] * 3 + [(48, 48)] * 3  # 4 wide, 3 tall, 3 square


def _cfg(folder, **kw):
    return DataConfig(source="caption-files", path=str(folder), resolution=32, buckets=True, bucket_step=8, **kw)


def test_bucket_sizes():
    sizes = bucket_sizes(512, 64, 2.0)
    assert {(512, 512), (576, 448), (448, 576), (640, 384), (384, 640)} <= set(sizes)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2 for w, h in sizes)
    assert bucket_sizes(32, 8, 2.0) == [(24, 40), (32, 32), (40, 24)]


def test_every_batch_is_one_bucket_and_every_item_is_served(tmp_path):
    ds = load_dataset_from_config(_cfg(_folder(tmp_path, MIXED)))
    assert ds.epoch_length(2) == 4 + 4 + 4  # the tall bucket's last batch filled up
    shapes = {i: tuple(ds[i]["winner"].shape[1:]) for i in range(len(ds))}
    assert [shapes[i] for i in range(len(ds))] == [WIDE[::-1]] * 4 + [TALL[::-1]] * 3 + [SQUARE[::-1]] * 3  # (height, width)
    orders = [ds.epoch_order(epoch, seed=0, batch_size=2).tolist() for epoch in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2]
    for order in orders:
        assert len(order) == 12 and set(order) == set(range(10))
        assert all(shapes[order[k]] == shapes[order[k + 1]] for k in range(0, 12, 2))


def test_size_and_crop_are_the_real_ones(tmp_path):
    ds = load_dataset_from_config(_cfg(_folder(tmp_path, MIXED)))
    # 64 x 32 to the 40 x 24 bucket: scaled by 0.75 to 48 x 24, centre crop from left 4.
    assert ds[0]["size_and_crop"] == (32, 64, 0, 4, 24, 40)
    # 30 x 60 to 24 x 40: scaled by 0.8 to 24 x 48, crop from top 4.
    assert ds[4]["size_and_crop"] == (60, 30, 4, 0, 40, 24)
    flipped = load_dataset_from_config(_cfg(_folder(tmp_path / "f", MIXED), center_crop=False, random_flip=True))
    found = {flipped.item(0, epoch)["size_and_crop"] for epoch in range(12)}
    assert len(found) > 2 and all(g[:3] == (32, 64, 0) and 0 <= g[3] <= 8 and g[4:] == (24, 40) for g in found)  # 48 - 40 = 8 columns to crop from
    plain = load_dataset_from_config(DataConfig(source="caption-files", path=str(_folder(tmp_path / "p", MIXED)), resolution=32))
    assert plain[0]["size_and_crop"] == (32, 64, 0, 16, 32, 32)  # without buckets: the shorter side to 32, square centre crop


def test_sdxl_conditions_on_each_images_size_and_crop(tmp_path):
    from sspo.models.families import family_of
    from sspo.models.pipeline import load_pipeline

    from tiny_pipelines import build_sdxl_pipeline

    family = family_of(load_pipeline(build_sdxl_pipeline(tmp_path / "sdxl")))
    geometry = [(32, 64, 0, 4, 24, 40), (60, 30, 4, 0, 40, 24)]
    cond = family.encode_prompts(["a", "b"], "cpu", 32, geometry)
    assert cond.time_ids.tolist() == [list(g) for g in geometry]


def test_buckets_refuse_what_they_cannot_serve():
    with pytest.raises(ConfigError, match="data.buckets.*data.cache_latents"):
        DataConfig(buckets=True, cache_latents=True)
    with pytest.raises(ConfigError, match="data.bucket_step"):
        DataConfig(buckets=True, resolution=32)


def test_sspo_trains_on_buckets_generating_negatives_at_each_size(quick_base, tmp_path, monkeypatch):
    from sspo.training.pairs import PairBuilder
    from sspo.training.trainer import Trainer

    from test_trainer import tiny_config

    sampled = []
    sample = PairBuilder.sample
    monkeypatch.setattr(PairBuilder, "sample", lambda self, d, cond, seeds, settings, size: sampled.append(tuple(size)) or sample(self, d, cond, seeds, settings, size))
    folder = _folder(tmp_path, MIXED)
    trainer = Trainer(tiny_config(tmp_path / "run", quick_base, "data.source=caption-files", f"data.path={folder}", "data.buckets=true",
                                  "data.bucket_step=8", "optim.batch_size=2", "steps_per_iteration=3"))
    final = trainer.train()
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert {(h * 4, w * 4) for h, w in sampled} == {WIDE[::-1], TALL[::-1], SQUARE[::-1]}  # latents of the VAE's 1/4 size
    assert all(np.isfinite(json.loads(line)["loss"]) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
