import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sspo.config import from_dict
from sspo.data.config import DataConfig
from sspo.data.dataset import PreferenceDataset, collate, load_dataset_from_config
from sspo.errors import ConfigError, DataError
from sspo.io import write_parquet
from sspo.worlds.shapes.world import all_specs, parse_prompt, preference_pairs, render, write_imagefolder

RES = 32
SPECS = all_specs()[::37][:6]


def _tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _load(data):
    return Image.open(io.BytesIO(data)).convert("RGB")


def _rows(tie_fraction=0.0, per_spec=1, seed=0):
    return preference_pairs(SPECS, per_spec=per_spec, seed=seed, size=RES, tie_fraction=tie_fraction)


def _cfg(path, **kw):
    return DataConfig(path=str(path), resolution=RES, **kw)


@pytest.fixture
def parquet(tmp_path):
    rows = _rows()
    return write_parquet(tmp_path / "pairs.parquet", rows), rows


def test_config_validation():
    with pytest.raises(ConfigError, match="data.mode"):
        DataConfig(mode="best")
    with pytest.raises(ConfigError, match="data.resolution"):
        from_dict(DataConfig, {"resolution": 0})
    with pytest.raises(ConfigError, match="data.path"):
        load_dataset_from_config(DataConfig())


def test_parquet_winners_are_clean_renders(parquet):
    path, rows = parquet
    ds = load_dataset_from_config(_cfg(path))
    assert isinstance(ds, PreferenceDataset) and ds.has_losers and len(ds) == len(rows)
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i and item["prompt"] == rows[i]["caption"]
        clean = _tensor(render(parse_prompt(item["prompt"]), RES))
        assert item["winner"].shape == (3, RES, RES) and item["winner"].dtype == torch.float32
        assert torch.allclose(item["winner"], clean)
        assert not torch.allclose(item["loser"], clean)
        assert item["winner"].min() >= -1 and item["winner"].max() <= 1
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_folder_of_shards_and_max_samples(tmp_path):
    rows = _rows()
    write_parquet(tmp_path / "shards" / "a.parquet", rows[:2])
    write_parquet(tmp_path / "shards" / "sub" / "b.parquet", rows[2:])
    ds = load_dataset_from_config(_cfg(tmp_path / "shards"))
    assert [ds[i]["prompt"] for i in range(len(ds))] == [r["caption"] for r in rows]
    assert len(load_dataset_from_config(_cfg(tmp_path / "shards", max_samples=3))) == 3


def test_tie_removal(tmp_path):
    rows = _rows(tie_fraction=0.5, per_spec=2)
    ties = sum(r["label_0"] == 0.5 for r in rows)
    assert 0 < ties < len(rows)
    path = write_parquet(tmp_path / "t.parquet", rows)
    assert len(load_dataset_from_config(_cfg(path))) == len(rows) - ties
    assert len(load_dataset_from_config(_cfg(path, remove_ties=False))) == len(rows)
    all_ties = write_parquet(tmp_path / "ties.parquet", [{**r, "label_0": 0.5} for r in rows])
    with pytest.raises(DataError, match="no rows after removing ties"):
        load_dataset_from_config(_cfg(all_ties))


def test_random_mode_is_deterministic_and_uses_both_sides(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", _rows(per_spec=4))
    picks = []
    for _ in range(2):
        ds = load_dataset_from_config(_cfg(path, mode="random"))
        picks.append(
            [torch.allclose(ds[i]["winner"], _tensor(render(parse_prompt(ds[i]["prompt"]), RES))) for i in range(len(ds))]
        )
    assert picks[0] == picks[1]
    assert any(picks[0]) and not all(picks[0])


def test_missing_column_message(parquet, tmp_path):
    path, _ = parquet
    with pytest.raises(DataError) as err:
        load_dataset_from_config(_cfg(path, caption_column="prompt"))
    message = str(err.value)
    assert str(path) in message and "'prompt'" in message and "data.caption_column" in message
    assert "'caption', 'jpg_0', 'jpg_1', 'label_0'" in message
    with pytest.raises(DataError, match="does-not-exist"):
        load_dataset_from_config(_cfg(path.parent / "does-not-exist.parquet"))
    (tmp_path / "notes.txt").write_text("notes")
    with pytest.raises(DataError, match=r"cannot read parquet .*notes.txt \(data.path\): .*; give a Parquet file or a folder of them, or set data.source"):
        load_dataset_from_config(_cfg(tmp_path / "notes.txt"))


def test_corrupt_image_skipped_and_counted(tmp_path, caplog):
    rows = _rows()
    rows[1] = {**rows[1], "jpg_0": b"not an image", "jpg_1": b"\x89PNG broken"}
    ds = load_dataset_from_config(_cfg(write_parquet(tmp_path / "c.parquet", rows)))
    with caplog.at_level(logging.WARNING, logger="sspo.data.dataset"):
        first, again = ds[1], ds[1]
    assert first["index"] == again["index"] == 2 and first["prompt"] == rows[2]["caption"]
    assert ds.skipped == 1 and len([r for r in caplog.records if "row 1" in r.getMessage()]) == 1
    assert "row 1 column 'jpg_1': cannot identify image file\n" in caplog.text and "BytesIO" not in caplog.text
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["winner"].shape[0] == len(rows)


def test_imagefolder_and_corrupt_file(tmp_path):
    folder = write_imagefolder(tmp_path / "imgs", SPECS[:4], size=RES)
    (folder / "00002.png").write_bytes(b"garbage")
    ds = load_dataset_from_config(_cfg(folder, source="imagefolder"))
    assert not ds.has_losers and len(ds) == 4
    item = ds[0]
    assert item["loser"] is None and item["prompt"] == SPECS[0].prompt
    assert torch.allclose(item["winner"], _tensor(render(SPECS[0], RES)))
    assert ds[2]["prompt"] == SPECS[3].prompt and ds.skipped == 1
    with pytest.raises(DataError, match="random"):
        load_dataset_from_config(_cfg(folder, source="imagefolder", mode="random"))


def test_hf_save_to_disk(tmp_path, parquet):
    import datasets

    _, rows = parquet
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    ds = load_dataset_from_config(_cfg(tmp_path / "hf", source="hf"))
    assert len(ds) == len(rows) and ds.has_losers
    assert torch.allclose(ds[0]["winner"], _tensor(render(parse_prompt(rows[0]["caption"]), RES)))

    images = datasets.Dataset.from_dict(
        {"image": [render(s, RES) for s in SPECS[:3]], "text": [s.prompt for s in SPECS[:3]]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    images.save_to_disk(str(tmp_path / "hf_images"))
    single = load_dataset_from_config(_cfg(tmp_path / "hf_images", source="hf"))
    assert not single.has_losers and single[2]["prompt"] == SPECS[2].prompt
    assert torch.allclose(single[2]["winner"], _tensor(render(SPECS[2], RES)))
    with pytest.raises(DataError, match="/nope"):
        load_dataset_from_config(_cfg("/nope", source="hf"))


def test_a_misspelt_local_hf_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("looked up on the hub"))
    with pytest.raises(DataError, match=r"data.path data/hf_imagse does not exist \(folder data here does: a misspelt local path\?\)"):
        load_dataset_from_config(_cfg("data/hf_imagse", source="hf"))


def test_resize_crop_flip(tmp_path):
    rows = _rows()
    path = write_parquet(tmp_path / "p.parquet", rows)
    # Rendered at 32, trained at 16: resized, then center crop is a no-op on square images.
    small = load_dataset_from_config(DataConfig(path=str(path), resolution=16))
    assert small[0]["winner"].shape == (3, 16, 16)

    wide_rows = [{**r, "jpg_0": _png(_load(r["jpg_0"]).resize((48, 32))), "jpg_1": _png(_load(r["jpg_1"]).resize((48, 32)))} for r in rows]
    wide = write_parquet(tmp_path / "wide.parquet", wide_rows)
    center = load_dataset_from_config(DataConfig(path=str(wide), resolution=24))
    expected = _tensor(_load(wide_rows[0]["jpg_0"] if rows[0]["label_0"] == 1 else wide_rows[0]["jpg_1"]).resize((36, 24), Image.Resampling.BICUBIC).crop((6, 0, 30, 24)))
    assert torch.allclose(center[0]["winner"], expected)
    crops = load_dataset_from_config(DataConfig(path=str(wide), resolution=24, center_crop=False))
    a0 = crops[0]["winner"]
    assert torch.equal(a0, crops[0]["winner"])  # same (seed, index, epoch): same crop
    assert torch.equal(crops.item(0, epoch=1)["winner"], crops.item(0, epoch=1)["winner"])
    epochs = [crops.item(0, epoch)["winner"] for epoch in range(4)]
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])  # crops vary across epochs
    assert torch.equal(crops.item(0, epoch=0)["winner"], a0)  # and come back on resume

    flips = load_dataset_from_config(_cfg(path, random_flip=True))
    plain = load_dataset_from_config(_cfg(path))
    seen = set()
    for epoch in range(4):
        for i in range(len(plain)):
            item, ref = flips.item(i, epoch), plain[i]
            flipped = all(torch.equal(item[k], ref[k].flip(-1)) for k in ("winner", "loser"))
            same = all(torch.equal(item[k], ref[k]) for k in ("winner", "loser"))
            assert flipped or same  # the pair flips together
            if flipped != same:  # symmetric images cannot tell
                seen.add(flipped)
    assert seen == {True, False}


def test_collate_shapes(parquet, tmp_path):
    path, _ = parquet
    ds = load_dataset_from_config(_cfg(path))
    batch = collate([ds[i] for i in range(3)])
    assert batch["winner"].shape == batch["loser"].shape == (3, 3, RES, RES)
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1, 2]
    assert len(batch["prompts"]) == 3
    folder = write_imagefolder(tmp_path / "imgs", SPECS[:2], size=RES)
    single = load_dataset_from_config(_cfg(folder, source="imagefolder"))
    loader = torch.utils.data.DataLoader(single, batch_size=2, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["loser"] is None and batch["winner"].shape == (2, 3, RES, RES)


def _pairs_dataset(tmp_path, first_row: dict):
    """A pairs dataset whose row 0 is replaced by ``first_row``'s columns (label 1: image_0 is the winner)."""
    rows = _rows()
    rows[0] = {**rows[0], "label_0": 1.0, **first_row}
    return load_dataset_from_config(_cfg(write_parquet(tmp_path / "p.parquet", rows)))


@pytest.mark.parametrize(
    "image, pixel",
    [
        (Image.new("L", (RES, RES), 100), [100, 100, 100]),  # grayscale: three equal channels
        (Image.new("RGBA", (RES, RES), (255, 0, 0, 0)), [255, 255, 255]),  # transparent: over white, not the hidden red
        (Image.fromarray(np.full((RES, RES), 32896, np.uint16)), [128, 128, 128]),  # 16-bit: scaled, not clipped to white
        (Image.new("RGB", (1, 1), (0, 0, 255)), [0, 0, 255]),  # tiny: upscaled to data.resolution
    ],
    ids=["grayscale", "rgba", "16-bit", "1x1"],
)
def test_any_image_mode_and_size_becomes_rgb_at_the_resolution(image, pixel, tmp_path):
    item = _pairs_dataset(tmp_path, {"jpg_0": _png(image)})[0]
    assert item["winner"].shape == (3, RES, RES)
    assert torch.allclose(item["winner"][:, RES // 2, RES // 2], torch.tensor(pixel) / 127.5 - 1)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_camera_s_rotated_photo_is_read_upright(fmt, tmp_path):
    from sspo.data.images import image_size

    stored = Image.new("RGB", (2 * RES, RES), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, RES, RES))  # the left half red: upright, the top half
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown turned a quarter clockwise
    buffer = io.BytesIO()
    stored.save(buffer, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    assert image_size(buffer.getvalue(), "") == (RES, 2 * RES)  # what aspect-ratio buckets see
    winner = _pairs_dataset(tmp_path, {"jpg_0": buffer.getvalue()})[0]["winner"]  # the upright centre: red above blue
    for row, color in ((2, [255, 0, 0]), (RES - 3, [0, 0, 255])):
        for column in (2, RES - 3):
            assert torch.allclose(winner[:, row, column], torch.tensor(color) / 127.5 - 1, atol=0.1)


@pytest.mark.parametrize("values, pixel", [(0.5, 128), (200.0, 200)], ids=["0-1", "0-255"])
def test_a_float_tiff_is_scaled_not_rounded_to_black(values, pixel, tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.full((RES, RES), values, np.float32)).save(buffer, format="TIFF")  # mode F
    item = _pairs_dataset(tmp_path, {"jpg_0": buffer.getvalue()})[0]
    assert torch.allclose(item["winner"][:, RES // 2, RES // 2], torch.tensor([pixel] * 3) / 127.5 - 1)


def test_huge_and_truncated_images_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # a decompression bomb past 2x that: 64 x 64 here
    rows = _rows()
    rows[0] = {**rows[0], "jpg_0": _png(Image.new("RGB", (64, 64)))}
    rows[1] = {**rows[1], "jpg_1": rows[1]["jpg_1"][: len(rows[1]["jpg_1"]) // 2]}
    ds = load_dataset_from_config(_cfg(write_parquet(tmp_path / "p.parquet", rows)))
    with caplog.at_level(logging.WARNING, logger="sspo.data.dataset"):
        assert [ds[i]["index"] for i in range(3)] == [2, 2, 2]
    assert ds.skipped == 2
    assert "decompression bomb" in caplog.text and "row 1 column 'jpg_1'" in caplog.text


def test_a_fifo_or_device_named_by_a_row_is_skipped_as_unreadable(tmp_path, caplog, fails_rather_than_hangs):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    render(SPECS[0], RES).save(tmp_path / "real.png")
    rows = [{"image": str(path), "text": f"prompt {i}"} for i, path in enumerate([fifo, "/dev/zero", tmp_path / "real.png"])]
    ds = load_dataset_from_config(_cfg(write_parquet(tmp_path / "paths.parquet", rows)))
    with caplog.at_level(logging.WARNING, logger="sspo.data.dataset"):
        assert [ds[i]["prompt"] for i in range(3)] == ["prompt 2"] * 3
    assert ds.skipped == 2
    table = tmp_path / "paths.parquet"
    assert f"cannot read image {fifo} ({table} row 0 column 'image'): it is a FIFO, not a file" in caplog.text
    assert f"cannot read image /dev/zero ({table} row 1 column 'image'): it is a device, not a file" in caplog.text


@pytest.mark.parametrize("label", [2.0, -1.0, float("nan"), None])
def test_labels_other_than_0_half_and_1_are_an_error_naming_the_row(label, tmp_path):
    with pytest.raises(DataError, match=r"row 0: label .* must be 1 \(image_0 wins\), 0 \(image_1 wins\) or 0.5"):
        _pairs_dataset(tmp_path, {"label_0": label})


def test_labels_written_as_text_are_named_as_text(tmp_path):
    rows = [{**row, "label_0": str(row["label_0"])} for row in _rows()]
    with pytest.raises(DataError, match=r"row 0: label '1.0' .* or 0.5 \(a tie\), a number, not text; fix or drop the row"):
        load_dataset_from_config(_cfg(write_parquet(tmp_path / "p.parquet", rows)))


def test_empty_missing_and_non_string_captions_skip_the_row(tmp_path, caplog):
    folder = write_imagefolder(tmp_path / "imgs", SPECS[:4], size=RES)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    lines[0]["text"], lines[1]["text"] = "", None
    del lines[2]["text"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    ds = load_dataset_from_config(_cfg(folder, source="imagefolder"))
    with caplog.at_level(logging.WARNING, logger="sspo.data.dataset"):
        assert ds[0]["prompt"] == SPECS[3].prompt and ds.skipped == 3
    assert "caption '' in column 'text'" in caplog.text and "no caption in column 'text'" in caplog.text
    assert f"metadata.jsonl line 2 ({folder / lines[1]['file_name']}): no caption in column 'text'" in caplog.text  # the image is named
    lines[0]["text"] = 7  # a number among strings
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataError, match="a column mixes types"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))


def test_duplicate_rows_are_kept_like_any_other(tmp_path):
    rows = _rows()
    ds = load_dataset_from_config(_cfg(write_parquet(tmp_path / "p.parquet", rows + rows[:2])))
    assert len(ds) == len(rows) + 2 and ds[len(rows)]["prompt"] == rows[0]["caption"]


def test_a_caption_of_only_spaces_skips_its_row(tmp_path):
    rows = _rows()
    rows[0]["caption"] = "   "
    dataset = load_dataset_from_config(_cfg(write_parquet(tmp_path / "pairs.parquet", rows)))
    assert dataset[0]["prompt"] == rows[1]["caption"] and dataset.skipped_rows == {0}
