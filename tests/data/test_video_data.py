"""Video training data: clips of every format users keep, sampled, cropped like images, cached as latents."""

import io
import json
import logging
import os
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sspo.data.config import DataConfig
from sspo.data.dataset import collate, load_dataset_from_config
from sspo.errors import ConfigError, DataError
from sspo.models.families.animatediff import AnimateDiff
from sspo.models.pipeline import decode_images, encode_images
from sspo.training.latent_cache import LatentCache, encode_rows
from sspo.video_io import MAX_CLIP_FRAMES, clip_length, encode_clip, read_clip, sample_frames, write_clip

RES = 16
LEVELS = [10 + 20 * i for i in range(12)]  # frame i is a flat grey of LEVELS[i]: survives lossy codecs


def levels(n=8, size=(RES, RES), offset=0):
    return np.stack([np.full((*size, 3), LEVELS[i] + offset, np.uint8) for i in range(n)])


def noise(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def frame_levels(clip):
    """The grey level of every frame, from uint8 frames or [-1, 1] tensors [F, 3, H, W]."""
    if isinstance(clip, torch.Tensor):
        return [round((float(frame.mean()) + 1) * 127.5) for frame in clip]
    return [round(float(frame.mean())) for frame in clip]


def close(found, expected, tolerance=3):
    return len(found) == len(expected) and all(abs(a - b) <= tolerance for a, b in zip(found, expected))


def apng(frames):
    buffer = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buffer, format="PNG", save_all=True, append_images=images[1:], duration=100)
    return buffer.getvalue()


def frame_folder(folder, frames):
    """Unpadded numbers: frame_10 must come after frame_9."""
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{i}.png")
    return folder


def clip_folder(root, clips: dict, captions=None, csv=False):
    """An imagefolder of clips: ``clips`` maps a file name to bytes or frames (a frame folder)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, clip in clips.items():
        if isinstance(clip, bytes):
            (root / name).write_bytes(clip)
        else:
            frame_folder(root / name, clip)
    captions = captions or [f"clip {name}" for name in clips]
    if csv:
        lines = ["file_name,text", *(f"{name},{text}" for name, text in zip(clips, captions))]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in zip(clips, captions)))
    return root


def clip_pairs(path, pairs, labels):
    """A parquet of clip pairs as the moving-shapes world writes them (TIFF bytes)."""
    rows = [{"caption": f"pair {i}", "video_0": encode_clip(a), "video_1": encode_clip(b), "label_0": label} for i, ((a, b), label) in enumerate(zip(pairs, labels))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cfg(path, **kw):
    video = {"image_0_column": "video_0", "image_1_column": "video_1"} if str(path).endswith(".parquet") else {"source": "imagefolder"}
    return DataConfig(path=str(path), resolution=RES, **{"frames": 4, **video, **kw})


# --------------------------------------------------------------------------------------------------
# Reading clips


@pytest.mark.parametrize("fmt", ["mp4", "webm", "mov", "mkv", "gif", "webp", "tiff", "apng"])
def test_every_format_reads_its_frames_in_order(fmt, tmp_path):
    frames = levels(8)
    data = apng(frames) if fmt == "apng" else encode_clip(frames, fmt)
    path = tmp_path / f"clip.{'png' if fmt == 'apng' else fmt}"
    path.write_bytes(data)
    for source in (path, data):  # a file by its suffix, bytes (a parquet cell) by their header
        clip = read_clip(source)
        assert clip.dtype == np.uint8 and clip.shape == (8, RES, RES, 3)
        assert close(frame_levels(clip), LEVELS[:8])
        assert clip_length(source) == 8 and close(frame_levels(read_clip(source, max_frames=3, first=4)), LEVELS[4:7])
    assert len(read_clip(path, max_frames=3)) == 3


def test_frame_folder_in_name_order(tmp_path):
    folder = frame_folder(tmp_path / "frames", levels(12))
    (folder / ".DS_Store").write_bytes(b"junk")  # neither an image nor a frame
    assert frame_levels(read_clip(folder)) == LEVELS
    assert len(read_clip(folder, max_frames=5)) == 5
    assert clip_length(folder) == 12 and frame_levels(read_clip(folder, max_frames=2, first=10)) == LEVELS[10:]
    Image.new("RGB", (RES + 2, RES)).save(folder / "frame_12.png")
    with pytest.raises(DataError, match=r"frame_12.png is 18x16 but frame frame_0.png is 16x16"):
        read_clip(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="frame folder .*empty has no image files"):
        read_clip(tmp_path / "empty")


def test_a_fifo_among_a_folders_frames_is_named_not_waited_on(tmp_path, fails_rather_than_hangs):
    folder = frame_folder(tmp_path / "frames", levels(2))
    os.mkfifo(folder / "frame_2.png")
    with pytest.raises(DataError, match=r"cannot read clip .*frames: frame frame_2.png is a FIFO, not a file"):
        read_clip(folder)


def test_mp4_is_written_with_h264_and_even_sizes(tmp_path):
    import av

    frames = noise(3, (15, 21), seed=0)
    path = write_clip(tmp_path / "out.mp4", frames)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    clip = read_clip(path)
    assert clip.shape == (3, 16, 22, 3)  # yuv420p: the last row and column repeated
    with pytest.raises(ValueError, match="uint8 RGB"):
        encode_clip(frames.astype(np.float32), "mp4")


def test_corrupt_and_missing_clips_are_data_errors_naming_them(tmp_path):
    mp4 = encode_clip(levels(8), "mp4")
    (tmp_path / "cut.mp4").write_bytes(mp4[: len(mp4) // 2])
    (tmp_path / "junk.webm").write_bytes(b"garbage")
    for name in ("cut.mp4", "junk.webm", "gone.mkv"):
        with pytest.raises(DataError, match=rf"cannot read clip .*{name}"):
            read_clip(tmp_path / name)
    with pytest.raises(DataError, match=r"cannot read clip \(bytes\): not a video"):
        read_clip(b"garbage")
    with pytest.raises(DataError, match=r"cannot read clip .*gone.gif: No such file or directory$"):  # missing, not damaged
        read_clip(tmp_path / "gone.gif")


@pytest.mark.parametrize("kept, reason", [(300, r"damaged or cut short \(.+\)"), (20, "damaged or cut short: not a readable TIFF file")])
def test_a_cut_short_tiff_says_so_without_pils_warnings(kept, reason, tmp_path):
    import warnings

    (tmp_path / "cut.tiff").write_bytes(encode_clip(levels(4), "tiff")[:kept])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "Truncated File Read" would be raised here
        with pytest.raises(DataError, match=rf"cannot read clip .*cut.tiff: {reason}$"):
            read_clip(tmp_path / "cut.tiff")


def long_gif(path):
    """Two 8x8 frames, the first shown 0 ms, the second 655.35 s (GIF's longest): 655,351 periods of 1 ms, in 300 bytes."""
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[0, 655350], loop=0)
    return path


def peak_memory(read):
    """``read()`` and the most memory numpy held meanwhile, in bytes."""
    import tracemalloc

    tracemalloc.start()
    try:
        return read(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_frame_shown_for_long_is_expanded_only_as_far_as_the_frames_asked_for(tmp_path):
    gif = long_gif(tmp_path / "long.gif")
    assert clip_length(gif) == 655351
    (clip, window), peak = peak_memory(lambda: (read_clip(gif, max_frames=16), read_clip(gif, max_frames=3, first=655349)))
    assert peak < 2**20  # expanded whole: 655,351 frames of 192 bytes, 120 MiB (a 64x64 GIF: 7.5 GiB)
    assert clip.shape == (16, 8, 8, 3) and clip[0, 0, 0].tolist() == [255, 0, 0] and (clip[1:] == [0, 0, 255]).all()
    assert len(window) == 2 and (window == [0, 0, 255]).all()  # the clip ends there
    with pytest.raises(DataError, match=rf"cannot read clip .*long.gif: it has more than {MAX_CLIP_FRAMES} frames, the most a clip read whole may have"):
        read_clip(gif)


def test_a_random_start_decodes_only_its_window(tmp_path):
    ds = load_dataset_from_config(cfg(clip_folder(tmp_path / "clips", {"long.gif": long_gif(tmp_path / "long.gif").read_bytes()}), frame_start="random"))
    items, peak = peak_memory(lambda: [ds.item(0, epoch) for epoch in range(3)])
    assert peak < 2**20 and ds.skipped == 0
    assert all(item["winner"].shape == (4, 3, RES, RES) for item in items)


def test_sample_frames_count_stride_start_and_too_short():
    clip = levels(12)
    assert frame_levels(sample_frames(clip, 4)) == LEVELS[:4]
    assert frame_levels(sample_frames(clip, 4, stride=3)) == LEVELS[0:10:3]
    assert frame_levels(sample_frames(clip, 3, stride=2, start=5)) == LEVELS[5:10:2]
    with pytest.raises(DataError, match=r"clip a.mp4 is too short: it has 12 frames, 16 are needed for 4 frames one every 5"):
        sample_frames(clip, 4, stride=5, where="a.mp4")
    with pytest.raises(DataError, match=r"clip a.png is too short: it is a still image \(1 frame\), 4 are needed"):
        sample_frames(clip[:1], 4, where="a.png")


# --------------------------------------------------------------------------------------------------
# Datasets of clips


def test_folder_of_clips_of_every_kind(tmp_path):
    clips = {"a.mp4": encode_clip(levels(8), "mp4"), "b.webm": encode_clip(levels(8), "webm"), "c.gif": encode_clip(levels(8), "gif"), "d": levels(8)}
    ds = load_dataset_from_config(cfg(clip_folder(tmp_path / "clips", clips), frame_stride=2))
    assert len(ds) == 4 and not ds.has_losers
    for i, name in enumerate(clips):
        item = ds[i]
        assert item["prompt"] == f"clip {name}" and item["loser"] is None and item["index"] == i
        assert item["winner"].shape == (4, 3, RES, RES) and item["winner"].dtype == torch.float32
        assert close(frame_levels(item["winner"]), LEVELS[0:8:2])
    batch = collate([ds[i] for i in range(3)])
    assert batch["winner"].shape == (3, 4, 3, RES, RES) and batch["loser"] is None


def test_caption_files_read_clip_files_and_frame_folders_with_a_caption_beside_them(tmp_path):
    root = tmp_path / "captions"
    root.mkdir()
    (root / "a.gif").write_bytes(encode_clip(levels(8), "gif"))
    frame_folder(root / "0003", levels(8, offset=20))
    frame_folder(root / "stills", levels(2))  # no caption beside it: its frames are images, each without a caption
    for name in ("a", "0003"):
        (root / f"{name}.txt").write_text(f"clip {name}")
    ds = load_dataset_from_config(DataConfig(source="caption-files", path=str(root), resolution=RES, frames=4))
    assert [ds[i]["prompt"] for i in range(2)] == ["clip 0003", "clip a"]
    assert close(frame_levels(ds[0]["winner"]), [level + 20 for level in LEVELS[:4]])
    assert len(ds) == 4 and ds.skipped == 0  # the stills are met only when read


def test_metadata_csv_with_numeric_looking_captions(tmp_path):
    clips = {"0.tiff": encode_clip(levels(4)), "1.tiff": encode_clip(levels(4))}
    ds = load_dataset_from_config(cfg(clip_folder(tmp_path / "clips", clips, captions=["a sunrise", "42"], csv=True)))
    assert [ds[i]["prompt"] for i in range(2)] == ["a sunrise", "42"]
    assert frame_levels(ds[1]["winner"]) == LEVELS[:4]


def test_folder_of_clip_pairs_with_labels_in_csv(tmp_path):
    folder = clip_folder(tmp_path / "pairs", {"x.tiff": encode_clip(levels(4)), "y.tiff": encode_clip(levels(4, offset=5))})
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("video_0_file_name,video_1_file_name,caption,label_0\nx.tiff,y.tiff,a,1\nx.tiff,y.tiff,b,0\n")
    ds = load_dataset_from_config(cfg(folder, image_0_column="video_0", image_1_column="video_1"))
    assert ds.has_losers and [ds[i]["prompt"] for i in range(2)] == ["a", "b"]
    assert frame_levels(ds[0]["winner"]) == frame_levels(ds[1]["loser"]) == LEVELS[:4]
    assert frame_levels(ds[1]["winner"]) == [v + 5 for v in LEVELS[:4]]


def test_parquet_clip_pairs_take_the_labelled_winner(tmp_path):
    pairs = [(levels(6), levels(6, offset=5)), (levels(6), levels(6, offset=5))]
    ds = load_dataset_from_config(cfg(clip_pairs(tmp_path / "p.parquet", pairs, labels=[1.0, 0.0])))
    assert ds.has_losers
    first, second = ds[0], ds[1]
    assert frame_levels(first["winner"]) == frame_levels(second["loser"]) == LEVELS[:4]
    assert frame_levels(first["loser"]) == frame_levels(second["winner"]) == [v + 5 for v in LEVELS[:4]]
    batch = collate([first, second])
    assert batch["winner"].shape == batch["loser"].shape == (2, 4, 3, RES, RES)


def test_hf_dataset_with_a_video_feature(tmp_path):
    import datasets

    paths = [str(write_clip(tmp_path / f"{i}.mp4", levels(6, offset=i))) for i in range(2)]
    features = datasets.Features({"video": datasets.Video(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"video": paths, "text": ["a", "b"]}, features=features).save_to_disk(str(tmp_path / "hf"))
    for path in paths:  # save_to_disk stored the bytes
        Path(path).unlink()
    ds = load_dataset_from_config(cfg(tmp_path / "hf", source="hf", image_column="video"))
    assert ds[1]["prompt"] == "b" and close(frame_levels(ds[1]["winner"]), [v + 1 for v in LEVELS[:4]])


def test_every_frame_is_cropped_and_flipped_like_an_image_and_like_its_pair(tmp_path):
    winner, loser = noise(3, (24, 40), seed=1), noise(3, (28, 20), seed=2)
    clips = load_dataset_from_config(cfg(clip_pairs(tmp_path / "clips.parquet", [(winner, loser)], [1.0]), frames=3, center_crop=False, random_flip=True))
    images = []  # frame k of the pair as a one-row image dataset: row 0 draws the same crop and flip
    for k in range(3):
        rows = [{"caption": "pair 0", "jpg_0": encode_clip(winner[k : k + 1]), "jpg_1": encode_clip(loser[k : k + 1]), "label_0": 1.0}]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"frame{k}.parquet")
        images.append(load_dataset_from_config(DataConfig(path=str(tmp_path / f"frame{k}.parquet"), resolution=RES, center_crop=False, random_flip=True)))
    seen = []
    for epoch in range(4):
        item = clips.item(0, epoch)
        for k, image in enumerate(images):
            assert torch.equal(item["winner"][k], image.item(0, epoch)["winner"]) and torch.equal(item["loser"][k], image.item(0, epoch)["loser"])
        seen.append(item["winner"])
    assert any(not torch.equal(seen[0], other) for other in seen[1:])  # the crop and flip do change per epoch


def test_random_start_is_fixed_per_epoch_and_varies_across_epochs(tmp_path):
    ds = load_dataset_from_config(cfg(clip_folder(tmp_path / "clips", {"a.tiff": encode_clip(levels(12))}), frames=3, frame_stride=2, frame_start="random"))
    starts = set()
    for epoch in range(8):
        found = frame_levels(ds.item(0, epoch)["winner"])
        assert found == frame_levels(ds.item(0, epoch)["winner"])
        start = LEVELS.index(found[0])
        assert found == LEVELS[start : start + 5 : 2]  # within the clip: 0 <= start <= 12 - 5
        starts.add(start)
    assert len(starts) > 1


@pytest.mark.parametrize("csv, junk_row", [(False, "metadata.jsonl line 3"), (True, "metadata.csv data row 3")])
def test_corrupt_and_short_clips_are_skipped_counted_and_named(csv, junk_row, tmp_path, caplog):
    good, mp4 = encode_clip(levels(8), "mp4"), encode_clip(levels(8), "mp4")
    clips = {"good.mp4": good, "cut.mp4": mp4[: len(mp4) // 2], "junk.webm": b"garbage", "short.mp4": encode_clip(levels(2), "mp4"), "last.mp4": good}
    ds = load_dataset_from_config(cfg(clip_folder(tmp_path / "clips", clips, csv=csv)))
    with caplog.at_level(logging.WARNING, logger="sspo.data.dataset"):
        assert [ds[i]["prompt"] for i in range(5)] == ["clip good.mp4", "clip last.mp4", "clip last.mp4", "clip last.mp4", "clip last.mp4"]
    assert ds.skipped == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "cannot read clip " + str(tmp_path / "clips" / "cut.mp4") in messages[0]
    assert "junk.webm" in messages[1] and f"{junk_row} column 'file_name'" in messages[1]
    assert "short.mp4" in messages[2] and "it has 2 frames, 4 are needed" in messages[2]


def test_clips_without_data_frames_say_so(tmp_path, caplog):
    folder = clip_folder(tmp_path / "clips", {"a.mp4": encode_clip(levels(4), "mp4"), "b": levels(4)})
    with caplog.at_level(logging.WARNING, logger="sspo.data.dataset"), pytest.raises(DataError, match="no readable row"):
        load_dataset_from_config(cfg(folder, frames=0))[0]
    assert caplog.text.count("it is a clip, and data.frames is 0 (images); clips train a video model") == 2


def test_missing_folder_and_metadata_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.path .*nowhere does not exist; expected a folder with metadata.jsonl or metadata.csv"):
        load_dataset_from_config(cfg(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"imagefolder .*empty \(data.path\) has no metadata.jsonl or metadata.csv; expected one with a file_name column"):
        load_dataset_from_config(cfg(tmp_path / "empty"))
    folder = clip_folder(tmp_path / "both", {"a.tiff": encode_clip(levels(4))})
    (folder / "metadata.csv").write_text("file_name,text\na.tiff,a\n")
    with pytest.raises(DataError, match="has both metadata.jsonl and metadata.csv; keep one"):
        load_dataset_from_config(cfg(folder))


@pytest.mark.parametrize(
    "settings, key",
    [({"frames": -1}, "data.frames"), ({"frame_stride": 0}, "data.frame_stride"), ({"frame_start": "middle"}, "data.frame_start"),
     ({"frames": 4, "frame_start": "random", "cache_latents": True}, "data.cache_latents.*data.frame_start: random")],
)
def test_frame_settings_are_checked(settings, key):
    with pytest.raises(ConfigError, match=key):
        DataConfig(**settings)


# --------------------------------------------------------------------------------------------------
# Latents of clips


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=RES,
    ).eval()


def test_clip_latents_are_frames_through_the_image_vae_in_animatediff_layout(vae):
    pixels = torch.rand(2, 3, 3, RES, RES) * 2 - 1
    latents = encode_images(vae, pixels)
    assert latents.shape == (2, 4, 3, RES // 2, RES // 2) and latents.is_contiguous()
    for f in range(3):
        torch.testing.assert_close(latents[:, :, f], encode_images(vae, pixels[:, f]), rtol=1e-4, atol=1e-5)
    clips = decode_images(vae, latents)
    assert clips.shape == (2, 3, RES, RES, 3) and clips.dtype == np.uint8
    assert np.array_equal(clips[1, 2], decode_images(vae, latents[1:2, :, 2])[0])


def test_latent_cache_of_clip_pairs_matches_live_encoding(vae, tmp_path):
    from accelerate import PartialState

    def encode_prompt(prompts, **kwargs):
        return torch.arange(len(prompts) * 6, dtype=torch.float32).reshape(len(prompts), 3, 2), None

    family = AnimateDiff(types.SimpleNamespace(vae=vae, encode_prompt=encode_prompt))
    pairs = [(noise(5, (RES, RES), seed), noise(5, (RES, RES), seed + 10)) for seed in range(3)]
    ds = load_dataset_from_config(cfg(clip_pairs(tmp_path / "p.parquet", pairs, [1.0, 0.0, 1.0]), frames=3, cache_latents=True))
    cache = LatentCache.build(family, ds, {"test": 1}, tmp_path / "cache", "cpu", batch_size=3, resolution=RES, state=PartialState())
    prompts, _, winners, losers = cache.rows(range(3))
    live_prompts, _, live_winners, live_losers = encode_rows(family, [ds[i] for i in range(3)], "cpu", RES)
    assert prompts == live_prompts == ["pair 0", "pair 1", "pair 2"]
    assert winners.shape == losers.shape == (3, 4, 3, RES // 2, RES // 2)
    assert torch.equal(winners, live_winners) and torch.equal(losers, live_losers)
