"""The ``data:`` section of a training config: where the rows come from and how they become items."""

from __future__ import annotations

import dataclasses

from sspo.config import MAX_CLIP_FRAMES, MAX_RESOLUTION, MAX_SEED, Registered, check, setting, validate
from sspo.worlds.registry import WORLDS

FILE_SOURCES = ("parquet", "imagefolder", "caption-files", "webdataset", "hf")  # data.source: these, or a world's name (sspo.worlds)
MODES = ("winners", "random")
FRAME_STARTS = ("first", "random")


@dataclasses.dataclass
class DataConfig:
    # "parquet" | "imagefolder" | "caption-files" (images, each with a .txt caption of the same name) | "webdataset" (.tar shards) |
    # "hf" (datasets: save_to_disk folder or hub id) | a world (sspo.worlds): "shapes" | "moving-shapes" (clips) | a registered one
    source: str = setting("parquet", choices=Registered(WORLDS, *FILE_SOURCES))
    path: str = ""  # parquet file or folder of shards | imagefolder with metadata.jsonl or .csv | caption-files folder | .tar or folder of them | hf folder or id
    split: str = "train"  # hf split; for an imagefolder, a subfolder used when it exists
    caption_column: str = setting("caption", nonempty=True)  # pairs: prompt text
    image_0_column: str = setting("jpg_0", nonempty=True)  # pairs: first image (encoded bytes or {'bytes': ...})
    image_1_column: str = setting("jpg_1", nonempty=True)  # pairs: second image
    label_column: str = setting("label_0", nonempty=True)  # pairs: 1 = image_0 wins, 0 = image_1 wins, 0.5 = tie
    image_column: str = setting("image", nonempty=True)  # single images (imagefolder / hf)
    text_column: str = setting("text", nonempty=True)  # single images: prompt text
    remove_ties: bool = True  # drop pairs with label 0.5 (kept ties get a random winner, as in "random")
    mode: str = setting("winners", choices=MODES)  # "winners": winner from the label | "random": SSPOr, random side per row
    # Shorter side resized to this, then cropped square. A multiple of 8, the VAE's downsampling
    # factor in SD-1.5, SDXL and AnimateDiff (the tiny worlds' VAEs downsample by 4).
    resolution: int = setting(512, at_least=8, at_most=MAX_RESOLUTION, multiple_of=8)
    center_crop: bool = True  # False: random crop (deterministic per seed, row and epoch)
    random_flip: bool = False  # horizontal flip with probability 0.5
    max_samples: int | None = setting(None, at_least=1)  # keep only the first N rows (after tie removal); None = all
    # Probability that a row trains with the empty prompt instead of its caption (drawn per row and
    # epoch), so that the model keeps an unconditional prediction for classifier-free guidance.
    caption_dropout: float = setting(0.0, at_least=0, at_most=1)
    # 0: one random order over all rows. N: row groups (parquet) or shards (webdataset) in random
    # order, rows shuffled within windows of N of them, so each is read about once per epoch: for
    # data far larger than memory, where a random row would cost a row group's read.
    shuffle_row_groups: int = setting(0, at_least=0)
    num_workers: int = setting(0, at_least=0)  # DataLoader processes that read and decode ahead of training; 0: the training process reads
    prefetch_factor: int = setting(2, at_least=1)  # with num_workers: micro-batches each worker reads ahead
    # Aspect-ratio buckets: each image is resized and cropped to the bucket (width x height of about
    # resolution^2 pixels, sides multiples of bucket_step) nearest its aspect ratio, and every
    # micro-batch holds one bucket (a bucket's last batch is filled with its first rows again).
    # False: the shorter side resized to resolution, then cropped square.
    buckets: bool = False
    bucket_step: int = setting(64, at_least=8, at_most=MAX_RESOLUTION, multiple_of=8)  # bucket sides are multiples of this: 64 keeps SD's latent sides divisible by 8
    # The widest bucket's width / height, and the tallest's height / width; at most 16, as the buckets are listed width by width.
    bucket_max_aspect: float = setting(2.0, at_least=1, at_most=16)
    # Video: with frames > 0 every image column holds clips (video files, multi-frame images or
    # frame folders) and an item is [frames, 3, H, W], all frames of a pair cropped and flipped alike.
    frames: int = setting(0, at_least=0, at_most=MAX_CLIP_FRAMES)  # 0: images | N: N frames per clip; a shorter clip is skipped like an unreadable image
    frame_stride: int = setting(1, at_least=1)  # take every k-th source frame (2: every other frame)
    frame_start: str = setting("first", choices=FRAME_STARTS)  # "first": from frame 0 | "random": a random start (per seed, row and epoch)
    seed: int = setting(0, at_least=0, at_most=MAX_SEED)  # seeds SSPOr sides, random crops and flips
    world_pairs_per_prompt: int = setting(4, at_least=1)  # a world source: pairs rendered per alignment-train combination
    world_split_seed: int = setting(0, at_least=0, at_most=MAX_SEED)  # a world source: the world's train / held-out split
    world_without_validation: bool = False  # a world source: leave out the validation combinations (choosing settings)
    # Encode every row once (VAE latents, text embeddings) and train from safetensors shards
    # (sspo/training/latent_cache.py). Needs center_crop true, random_flip false and frame_start first:
    # augmentation would change an item's latents from epoch to epoch.
    cache_latents: bool = False
    cache_dir: str | None = setting(None, own_folder=True)  # None: $SSPO_CACHE/latents/<hash of model, dtype, data config, data files>

    def __post_init__(self) -> None:
        validate(self, "data.")
        check(self.source in FILE_SOURCES or not self.path, "data.path", f"is set, but data.source {self.source!r} is a world, which builds its own pairs; "
              f"drop data.path, or set data.source to the path's format ({', '.join(FILE_SOURCES)})")
        if self.buckets:
            check(self.bucket_step <= self.resolution, "data.bucket_step", f"{self.bucket_step} is above data.resolution {self.resolution}; lower it")
            clashing = [key for key, on in (("data.frames", self.frames), ("data.cache_latents", self.cache_latents),
                                             ("data.shuffle_row_groups", self.shuffle_row_groups)) if on]
            check(not clashing, "data.buckets", f"works with images read live in one random order; unset {' and '.join(clashing)} or set data.buckets: false")
        if self.cache_latents:
            changing = (("data.center_crop: false", not self.center_crop), ("data.random_flip: true", self.random_flip),
                        ("data.frame_start: random", self.frames and self.frame_start == "random"))
            augmented = [key for key, on in changing if on]
            check(not augmented, "data.cache_latents", f"cached latents need unaugmented images, but {' and '.join(augmented)} change them every epoch; "
                  "set data.center_crop: true, data.random_flip: false and data.frame_start: first, or data.cache_latents: false")
            check(not self.caption_dropout, "data.cache_latents", "cached text conditions cannot drop captions epoch by epoch; "
                  "set data.caption_dropout: 0, or data.cache_latents: false")
