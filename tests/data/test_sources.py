"""Data that need not fit in memory: parquet read a row group at a time, caption files, webdataset
shards, shuffling in windows of row groups, caption dropout, and DataLoader workers that serve
exactly what the training process would read."""

import io
import json
import logging
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sspo.data.config import DataConfig
from sspo.data.dataset import load_dataset_from_config
from sspo.data.loader import MicroBatchReader
from sspo.errors import ConfigError, DataError
from sspo.io import write_parquet
from sspo.worlds.shapes.world import all_specs, preference_pairs, render

RES = 32
SPECS = all_specs()[::37][:6]


def _cfg(path, **kw):
    return DataConfig(path=str(path), resolution=RES, **kw)


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _noise_png(rng, size):
    return _png(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


def _pairs(n, size=48, seed=0):
    """``n`` Pick-a-Pic rows of incompressible images (noise PNGs, ~7 KB each at 48 px)."""
    rng = np.random.default_rng(seed)
    return [{"caption": f"prompt {i}", "jpg_0": _noise_png(rng, size), "jpg_1": _noise_png(rng, size), "label_0": float(i % 2)} for i in range(n)]


def _same(a, b):
    return a["prompt"] == b["prompt"] and torch.equal(a["winner"], b["winner"]) and (a["loser"] is None or torch.equal(a["loser"], b["loser"]))


def test_parquet_is_read_a_row_group_at_a_time_with_the_items_of_a_whole_read(tmp_path, monkeypatch):
    rows = _pairs(192)
    whole = load_dataset_from_config(_cfg(write_parquet(tmp_path / "one-group.parquet", rows)))
    grouped_path = tmp_path / "grouped.parquet"
    pq.write_table(pa.Table.from_pylist(rows), grouped_path, row_group_size=8)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read the whole table"))
    grouped = load_dataset_from_config(_cfg(grouped_path))
    group_bytes = pq.read_metadata(grouped_path).row_group(0).total_byte_size
    order = grouped.epoch_order(0, seed=0).tolist()
    assert sorted(order) == list(range(192))
    expected = [whole[i] for i in order]
    del whole
    before, peak = pa.total_allocated_bytes(), 0
    for i, item in zip(order, expected):
        assert _same(grouped[i], item)
        peak = max(peak, pa.total_allocated_bytes() - before)
        assert len(grouped._rows._cache) <= 2
    # All 24 row groups were read, and never more than two of them held, plus the one being read.
    total = sum(pq.read_metadata(grouped_path).row_group(g).total_byte_size for g in range(24))
    # Arrow's pool rounds each buffer up to 64 bytes: a few bytes over 4 groups is that, not a 5th group.
    assert peak <= 4 * group_bytes + 4096 < total / 5


def test_shuffle_row_groups_reads_windows_of_groups_in_a_seeded_order(tmp_path):
    path = tmp_path / "grouped.parquet"
    pq.write_table(pa.Table.from_pylist(_pairs(40)), path, row_group_size=5)
    plain = load_dataset_from_config(_cfg(path))
    assert torch.equal(plain.epoch_order(3, seed=7), torch.randperm(40, generator=torch.Generator().manual_seed(10)))
    windowed = load_dataset_from_config(_cfg(path, shuffle_row_groups=2, remove_ties=False))
    orders = [windowed.epoch_order(epoch, seed=0).tolist() for epoch in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2]
    for order in orders:
        assert sorted(order) == list(range(40))
        windows = [order[k : k + 10] for k in range(0, 40, 10)]  # 2 groups of 5 rows each
        assert all(len({row // 5 for row in window}) == 2 for window in windows)
    assert orders[0] != sorted(orders[0])  # rows shuffled within a window


def test_caption_files_folder(tmp_path, caplog):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for i, spec in enumerate(SPECS[:4]):
        image = folder / ("nested" if i == 3 else "") / f"{i:03d}.png"
        render(spec, RES).save(image)
        if i != 1:  # 001.png has no caption: skipped when read, as an unreadable image is
            image.with_suffix(".TXT" if i == 2 else ".txt").write_text(spec.prompt + "\n")
    ds = load_dataset_from_config(_cfg(folder, source="caption-files"))
    assert f"1 of the 4 images in {folder} has no caption (no .txt file of the same name, or an empty one), e.g. {folder / '001.png'}" in caplog.text
    assert len(ds) == 4 and not ds.has_losers
    assert [ds[i]["prompt"] for i in range(4)] == [SPECS[0].prompt, SPECS[2].prompt, SPECS[2].prompt, SPECS[3].prompt]
    assert ds.skipped == 1
    assert torch.allclose(ds[3]["winner"], torch.from_numpy(np.asarray(render(SPECS[3], RES), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    with pytest.raises(DataError, match="no images in folder"):
        load_dataset_from_config(_cfg(_empty(tmp_path), source="caption-files"))
    for text in folder.rglob("*.[tT][xX][tT]"):
        text.unlink()
    with pytest.raises(DataError, match=rf"no image in folder {folder} \(data.path\) has a caption: caption-files expects 0001.txt beside 0001.png"):
        load_dataset_from_config(_cfg(folder, source="caption-files"))


def test_a_caption_files_dataset_pickles_for_spawned_workers(tmp_path):
    import pickle

    folder = tmp_path / "images"
    folder.mkdir()
    render(SPECS[0], RES).save(folder / "0.png")
    (folder / "0.txt").write_text(SPECS[0].prompt)
    ds = pickle.loads(pickle.dumps(load_dataset_from_config(_cfg(folder, source="caption-files"))))  # macOS and Windows spawn workers
    assert ds[0]["prompt"] == SPECS[0].prompt


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_serve_the_parquet_items(tmp_path):
    rows = preference_pairs(SPECS, per_spec=1, seed=0, size=RES)
    parquet = load_dataset_from_config(_cfg(write_parquet(tmp_path / "p.parquet", rows)))
    (tmp_path / "shards").mkdir()
    for shard in range(2):  # the Pick-a-Pic columns as file extensions, the caption and label in JSON
        chunk = [(f"sample{i:04d}", {"jpg_0": r["jpg_0"], "jpg_1": r["jpg_1"], "json": json.dumps({"caption": r["caption"], "label_0": r["label_0"]}).encode()})
                 for i, r in enumerate(rows) if i // 3 == shard]
        _tar(tmp_path / "shards" / f"{shard:05d}.tar", chunk)
    shards = load_dataset_from_config(_cfg(tmp_path / "shards", source="webdataset"))
    assert len(shards) == len(parquet) and shards.has_losers
    assert all(_same(shards[i], parquet[i]) for i in range(len(rows)))
    assert [list(g) for g in shards._groups()] == [[0, 1, 2], [3, 4, 5]]  # a shard is a row group

    images = _tar(tmp_path / "images.tar", [(f"dir/{i}", {"png": _png(render(s, RES)), "txt": s.prompt.encode()}) for i, s in enumerate(SPECS[:2])])
    single = load_dataset_from_config(_cfg(images, source="webdataset", image_column="png", text_column="txt"))
    assert not single.has_losers and single[1]["prompt"] == SPECS[1].prompt
    with pytest.raises(DataError, match=r"images.tar has neither the image column of pairs, 'jpg_0' \(data.image_0_column\), nor that of single images, "
                                        r"'image' \(data.image_column\); available columns: 'png', 'txt': set one of those keys"):
        load_dataset_from_config(_cfg(images, source="webdataset"))
    bad = _tar(tmp_path / "bad.tar", [("a", {"jpg_0": b"", "json": b"{not json"})])
    with pytest.raises(DataError, match="a.json is not valid JSON"):
        load_dataset_from_config(_cfg(bad, source="webdataset"))


@pytest.mark.parametrize("compression, tool", [("gz", "gunzip"), ("bz2", "bunzip2"), ("xz", "unxz")])
def test_a_compressed_shard_is_refused_saying_to_decompress_it(compression, tool, tmp_path):
    # tarfile would open it (decompressing every text member whole), but its images' offsets would point into the decompressed stream.
    with tarfile.open(tmp_path / "shard.tar", f"w:{compression}") as tar:
        for name, data in (("a.png", _png(render(SPECS[0], RES))), ("a.txt", SPECS[0].prompt.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=rf"tar shard .*shard.tar \(data.path\) is {compression.replace('gz', 'gzip').replace('bz2', 'bzip2')}-compressed; "
                                        rf".*decompress it into a plain .tar \(with {tool}\)"):
        load_dataset_from_config(_cfg(tmp_path / "shard.tar", source="webdataset", image_column="png", text_column="txt"))


def test_a_caption_or_json_member_past_the_limit_is_named(tmp_path):
    from sspo.data.sources import MAX_TEXT_MEMBER

    png = _png(render(SPECS[0], RES))
    for extension in ("txt", "json"):
        shard = _tar(tmp_path / f"{extension}.tar", [("a", {"png": png, extension: b" " * (MAX_TEXT_MEMBER + 1)})])
        with pytest.raises(DataError, match=rf"{extension}.tar member a.{extension} is {MAX_TEXT_MEMBER + 1} bytes, more than the {MAX_TEXT_MEMBER} "
                                            "a caption or JSON file may have"):
            load_dataset_from_config(_cfg(shard, source="webdataset", image_column="png", text_column="txt"))


def test_a_shard_sample_missing_a_column_is_skipped_naming_what_it_has(tmp_path, caplog):
    import logging

    samples = [(f"{i:04d}", {"png" if i == 1 else "jpg": _png(render(s, RES)), **({} if i == 2 else {"txt": s.prompt.encode()})})
               for i, s in enumerate(SPECS[:4])]
    ds = load_dataset_from_config(_cfg(_tar(tmp_path / "mixed.tar", samples), source="webdataset", image_column="jpg", text_column="txt"))
    with caplog.at_level(logging.WARNING, logger="sspo.data.dataset"):
        assert [ds[i]["prompt"] for i in range(4)] == [SPECS[0].prompt, SPECS[3].prompt, SPECS[3].prompt, SPECS[3].prompt]
    assert ds.skipped == 2
    assert "sample 0001 of mixed.tar: nothing in column 'jpg' (this row has 'png', 'txt'; data.image_column names the column)" in caplog.text
    assert "sample 0002 of mixed.tar" in caplog.text and "no caption in column 'txt'" in caplog.text


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_captions_that_are_not_utf8_are_refused_naming_the_file(encoding, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, spec in enumerate(SPECS[:2]):
        render(spec, RES).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(spec.prompt + (" café" if i else ""), encoding="utf-8" if i == 0 else encoding)
    with pytest.raises(DataError, match=rf"caption file {folder / '1.txt'} is not UTF-8 text \(byte \d+\); save it as UTF-8"):
        load_dataset_from_config(_cfg(folder, source="caption-files"))
    images = _tar(tmp_path / "images.tar", [("a", {"png": _png(render(SPECS[0], RES)), "txt": "café".encode(encoding)})])
    with pytest.raises(DataError, match="images.tar member a.txt is not UTF-8 text"):
        load_dataset_from_config(_cfg(images, source="webdataset", image_column="png", text_column="txt"))


def test_a_bom_is_dropped_and_hidden_folders_are_not_data(tmp_path):
    folder = tmp_path / "images"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    for name in ("0", ".ipynb_checkpoints/0-checkpoint"):
        render(SPECS[0], RES).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("\ufeff" + SPECS[0].prompt, encoding="utf-8")
    ds = load_dataset_from_config(_cfg(folder, source="caption-files"))
    assert len(ds) == 1 and ds[0]["prompt"] == SPECS[0].prompt


def test_folders_linked_in_are_read_once_each(tmp_path):
    from sspo.io import files_under

    cats = tmp_path / "cats"
    cats.mkdir()
    for i, spec in enumerate(SPECS[:2]):
        render(spec, RES).save(cats / f"{i}.png")
        (cats / f"{i}.txt").write_text(spec.prompt)
    (cats / "loop").symlink_to(cats)  # a link loop ends
    folder = tmp_path / "images"
    folder.mkdir()
    render(SPECS[2], RES).save(folder / "own.png")
    (folder / "own.txt").write_text(SPECS[2].prompt)
    (folder / "cats").symlink_to(cats)
    (folder / "zz-cats").symlink_to(cats)  # the same folder twice: read once, under the first name
    ds = load_dataset_from_config(_cfg(folder, source="caption-files"))
    assert sorted(ds[i]["prompt"] for i in range(len(ds))) == sorted(spec.prompt for spec in SPECS[:3])
    assert files_under(folder, (".png",)) == [folder / "cats" / "0.png", folder / "cats" / "1.png", folder / "own.png"]


@pytest.mark.parametrize("content, message", [
    ('[{"file_name": "0.png", "text": "a"}]\n', "line 1 is a JSON list, not an object: write one object per line"),
    ('{"file_name": "0.png", "text": "a"}\n42\n', "line 2 is a JSON int, not an object"),
])
def test_metadata_lines_that_are_not_objects_are_named(content, message, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    render(SPECS[0], RES).save(folder / "0.png")
    (folder / "metadata.jsonl").write_text(content)
    with pytest.raises(DataError, match=f"metadata.jsonl {message}"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n', encoding="utf-16")
    with pytest.raises(DataError, match="metadata.jsonl is not UTF-8 text"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))


def test_an_imagefolder_without_file_name_says_to_name_it_so(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    render(SPECS[0], RES).save(folder / "0.png")
    (folder / "metadata.csv").write_text("file, caption\n0.png,a red circle\n")
    with pytest.raises(DataError, match=r"metadata.csv has no file_name column \(it has 'file', ' caption'\): name the column of file names file_name"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))
    (folder / "metadata.csv").write_text("file_name;text\n0.png;a red circle\n")
    with pytest.raises(DataError, match=r"\(it has 'file_name;text'; its columns are separated by ';': a CSV's are by ','\)"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))
    (folder / "metadata.csv").write_text("file_name;text\n0.png;a red circle, white background\n")  # a comma in a caption
    with pytest.raises(DataError, match=r"metadata.csv: CSV parse error: .*; its header's columns are separated by ';': a CSV's are by ','$"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))
    (folder / "metadata.csv").write_text('file_name,text\n0.png,a\n0.png,"a red circle\n0.png,"a blue circle, left"\n')  # a quote left open
    with pytest.raises(DataError, match=r'metadata.csv: CSV parse error: Row #3: Expected 2 columns, got 3: 0.png,"a red circle \.\.\. '
                                        r'\(a quoted field runs on past its line: a quote left open\?\)$'):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))
    (folder / "metadata.csv").write_text("file_name,caption\n0.png,a red circle\n")  # named as the file names them, file_name not image
    with pytest.raises(DataError, match=r"metadata.csv has no column 'text' \(set data.text_column\); available columns: 'file_name', 'caption'$"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))
    (folder / "metadata.csv").write_text('file_name,text\n0.png,""\n0.png,"  "\n')  # every caption empty: said when it opens, before a dry run ends
    with pytest.raises(DataError, match=r"^no row of .*metadata.csv has a caption: column 'text' is empty or null in every row; write each image's prompt there$"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))
    (folder / "metadata.csv").write_bytes("file_name,text\n0.png,café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"metadata.csv is not UTF-8 text; save it as UTF-8"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))


def test_files_an_imagefolder_names_are_checked_when_it_opens(tmp_path, caplog):
    import logging

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        render(SPECS[i], RES).save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text("file_name,text\nimages/0.png,a\nimages/1.png,b\nimages/2.png,c\n")  # a folder too many
    with pytest.raises(DataError, match=rf"none of the 3 files {folder / 'metadata.csv'} names exists, e.g. {folder / 'images' / '0.png'}"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))
    (folder / "metadata.csv").write_text("file_name,text\n0.png,a\n1.jpg,b\n2.png,c\n")
    with caplog.at_level(logging.WARNING, logger="sspo.data"):
        dataset = load_dataset_from_config(_cfg(folder, source="imagefolder"))
    assert f"1 of the 3 files {folder / 'metadata.csv'} names do not exist, e.g. {folder / '1.jpg'}; their rows are skipped" in caplog.text
    assert len(dataset) == 2  # counted without the row it cannot read, as a dry run reports it
    assert [dataset[i]["prompt"] for i in range(2)] == ["a", "c"]
    (folder / "metadata.csv").write_text("file_name,loser_file_name,text\n0.png,0.jpg,a\n2.png,1.jpg,c\n")  # each row misses its loser
    with pytest.raises(DataError, match=rf"every row of {folder / 'metadata.csv'} names a file that does not exist \(2 of its 4 files, e.g. {folder / '0.jpg'}\)"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))


@pytest.mark.parametrize("name", ["../private/me.png", "a/../../private/me.png", "PRIVATE/me.png"])
def test_an_imagefolder_file_outside_its_folder_is_refused_naming_the_row(name, tmp_path):
    folder, private = tmp_path / "downloaded", tmp_path / "private"
    for at, spec in ((folder / "own.png", SPECS[0]), (private / "me.png", SPECS[1])):
        at.parent.mkdir(exist_ok=True)
        render(spec, RES).save(at)
    name = name.replace("PRIVATE", str(private))  # an absolute path
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a"}) + "\n" for n in ("own.png", name)))
    with pytest.raises(DataError, match=rf"metadata.jsonl line 2: file_name '{re.escape(name)}' is outside {re.escape(str(folder))}; "
                                        "an imagefolder's files are named relative to its metadata file's folder and lie inside it"):
        load_dataset_from_config(_cfg(folder, source="imagefolder"))
    # A parquet file's path column may name files anywhere.
    paths = write_parquet(tmp_path / "paths.parquet", [{"image": str(private / "me.png"), "text": "a"}])
    assert load_dataset_from_config(_cfg(paths))[0]["prompt"] == "a"


def test_a_row_workers_skip_is_logged_once_by_the_training_process(tmp_path, caplog):
    import logging

    rows = _pairs(6, size=8)
    rows[2] = {**rows[2], "jpg_0": b"not an image", "jpg_1": b"not an image"}
    ds = load_dataset_from_config(_cfg(write_parquet(tmp_path / "p.parquet", rows), num_workers=2, remove_ties=False))
    reader = MicroBatchReader(ds, lambda m: [(i, m) for i in range(6)])  # every row, an epoch a micro-batch: both workers meet row 2
    with caplog.at_level(logging.WARNING, logger="sspo.data.dataset"):
        batches = [reader(m) for m in range(4)]
    assert [r.getMessage().startswith("skipping unreadable row (1 so far)") and "row 2" in r.getMessage() for r in caplog.records] == [True]
    assert ds.skipped == 1 and ds.skipped_rows == {2} and all("skipped" not in item for batch in batches for item in batch)


def test_caption_dropout_is_seeded_per_row_and_epoch(tmp_path):
    rows = _pairs(64, size=8)
    path = write_parquet(tmp_path / "p.parquet", rows)
    ds = load_dataset_from_config(_cfg(path, caption_dropout=0.25, remove_ties=False))
    dropped = [[ds.item(i, epoch)["prompt"] == "" for i in range(64)] for epoch in range(4)]
    assert dropped[0] == [ds.item(i, 0)["prompt"] == "" for i in range(64)]
    assert 0.1 < np.mean(dropped) < 0.4 and dropped[0] != dropped[1]
    assert all(ds.item(i, 0)["prompt"] == rows[i]["caption"] for i in range(64) if not dropped[0][i])
    assert not any(load_dataset_from_config(_cfg(path, remove_ties=False))[i]["prompt"] == "" for i in range(64))
    with pytest.raises(ConfigError, match="caption_dropout"):
        DataConfig(cache_latents=True, caption_dropout=0.1)


def test_workers_serve_the_batches_of_the_training_process(tmp_path):
    path = tmp_path / "grouped.parquet"
    pq.write_table(pa.Table.from_pylist(_pairs(30, size=40)), path, row_group_size=4)

    def placements(m):
        order = torch.randperm(30, generator=torch.Generator().manual_seed(m // 10)).tolist()
        return [(order[(3 * m + k) % 30], m // 10) for k in range(3)]

    def batches(workers, ms):
        ds = load_dataset_from_config(_cfg(path, num_workers=workers, center_crop=False, random_flip=True, caption_dropout=0.3, remove_ties=False))
        reader = MicroBatchReader(ds, placements)
        return [reader(m) for m in ms]

    ms = [0, 1, 2, 3, 11, 12, 5, 6, 25]  # runs of consecutive micro-batches, and jumps (a resume)
    plain, workers = batches(0, ms), batches(2, ms)
    for a, b in zip(plain, workers):
        assert len(a) == len(b) == 3 and all(_same(x, y) and x["index"] == y["index"] for x, y in zip(a, b))


def test_data_path_from_home_a_relative_miss_and_an_imagefolders_metadata_file(tmp_path, monkeypatch):
    from sspo.worlds.shapes.world import write_imagefolder

    monkeypatch.setenv("HOME", str(tmp_path))
    write_imagefolder(tmp_path / "images", SPECS[:2])
    assert len(load_dataset_from_config(_cfg("~/images", source="imagefolder"))) == 2
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"data.path imagez does not exist \(a relative path is taken from the current folder, {tmp_path}\)"):
        load_dataset_from_config(_cfg("imagez", source="imagefolder"))
    with pytest.raises(DataError, match=rf"data.path {tmp_path / 'images' / 'metadata.jsonl'} is a file; .* set data.path to {tmp_path / 'images'}$"):
        load_dataset_from_config(_cfg(tmp_path / "images" / "metadata.jsonl", source="imagefolder"))


def test_a_damaged_row_groups_rows_are_skipped_as_unreadable_naming_the_file(tmp_path, caplog):
    path = tmp_path / "grouped.parquet"
    pq.write_table(pa.Table.from_pylist(_pairs(16)), path, row_group_size=8, compression="snappy")
    first = pq.read_metadata(path).row_group(1).column(1)  # the second group's first image column
    data = bytearray(path.read_bytes())
    start = first.data_page_offset + 64
    data[start : start + 2000] = bytes(2000)  # its compressed page zeroed; the footer is intact
    path.write_bytes(bytes(data))
    dataset = load_dataset_from_config(_cfg(path, remove_ties=False))
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(16)]
    assert all(_same(item, items[0]) for item in items[8:])  # the group's rows skipped as unreadable, each replaced by the next readable
    assert sorted(dataset.skipped_rows) == list(range(8, 16))
    assert f"{path}: row group 1 cannot be read (" in caplog.text and "the file is damaged: restore or write it again" in caplog.text


@pytest.mark.parametrize("name, fix", [
    ("metadata.jsonl", "set data.path to {parent}"), ("pairs.parquet", "for a parquet file set data.source: parquet"),
    ("shard-0.tar", "for a .tar shard set data.source: webdataset"), ("notes.txt", "set data.path to the folder that holds one"),
])
def test_an_imagefolder_given_a_file_says_what_to_set(name, fix, tmp_path):
    (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=rf"^data.path {tmp_path / name} is a file; an imagefolder is the folder that holds metadata.jsonl or metadata.csv: "
                                        rf"{re.escape(fix.format(parent=tmp_path))}$"):
        load_dataset_from_config(_cfg(tmp_path / name, source="imagefolder"))
