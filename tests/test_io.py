"""sspo/io.py: safetensors headers made byte-identical; readers that turn a damaged file into one
DamagedFileError naming it and the way out."""

import json
import logging

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sspo.errors import SSPOError
from sspo.io import (
    DamagedFileError,
    check_image,
    check_output_folder,
    claimed_output_folder,
    open_tensors,
    read_json,
    read_jsonl,
    read_tensors,
    save_tensors,
    shape_problem,
    sort_safetensors_metadata,
)

METADATA = {"format": "pt", "lora_adapter_metadata": json.dumps({"r": 4, "target_modules": ["to_k", "to_q"]}, indent=2)}
TENSORS = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(3, dtype=torch.float16)}


def with_metadata_in_order(path, keys) -> None:
    """Rewrite ``path``'s header with its metadata in the order ``keys``, as another process's save may list it."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = {key: header["__metadata__"][key] for key in keys}
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    path.write_bytes(data[:8] + text + data[8 + length :])


def test_two_saves_listing_the_metadata_in_different_orders_become_the_same_bytes(tmp_path):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    for path, order in ((first, ["format", "lora_adapter_metadata"]), (second, ["lora_adapter_metadata", "format"])):
        save_file(TENSORS, str(path), metadata=METADATA)
        with_metadata_in_order(path, order)
    assert first.read_bytes() != second.read_bytes()
    for path in (first, second):
        sort_safetensors_metadata(path)
    assert first.read_bytes() == second.read_bytes()
    with safe_open(str(first), framework="pt") as f:
        assert f.metadata() == METADATA
    loaded = load_file(str(first))
    assert all(torch.equal(loaded[key], tensor) for key, tensor in TENSORS.items())


def test_sorting_an_already_sorted_header_changes_no_byte(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(TENSORS, str(path), metadata=METADATA)
    with_metadata_in_order(path, sorted(METADATA))
    written = path.read_bytes()
    sort_safetensors_metadata(path)
    assert path.read_bytes() == written


SHAPE = {"entries": [{"file": str, "step": int}], "sizes": {str: float}}
GOOD = {"entries": [{"file": "a", "step": 1}], "sizes": {"a": 1.5, "b": 2}}


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    (json.dumps(GOOD)[:20], "not valid JSON (cut short?)"),
    (json.dumps(GOOD)[:16], "not valid JSON (cut short?)"),  # inside a string
    ("\x00\x01garbage", "not valid JSON: Expecting value at line 1 column 1"),
    ("[1, 2]", "the top level is a list, not a mapping"),
    ('{"entries": []}', "sizes is missing"),
    ('{"entries": [{"file": "a", "step": "1"}], "sizes": {}}', "entries[0].step is a string, not an integer"),
    ('{"entries": [{"file": "a", "step": true}], "sizes": {}}', "entries[0].step is true or false, not an integer"),
    ('{"entries": [], "sizes": {"a": null}}', "sizes['a'] is null, not a number"),
])
def test_read_json_names_the_file_what_is_wrong_and_the_way_out(text, problem, tmp_path):
    path = tmp_path / "f.json"
    path.write_text(text)
    with pytest.raises(DamagedFileError) as caught:
        read_json(path, what="the index", fix="delete it", shape=SHAPE)
    assert str(caught.value) == f"the index {path} is damaged ({problem}" + str(caught.value).partition(problem)[2]
    assert str(caught.value).endswith("; delete it") and "\n" not in str(caught.value)
    assert isinstance(caught.value, SSPOError) and caught.value.fix == "delete it"


def test_read_json_reads_what_fits_and_handles_missing_and_cached_files(tmp_path, caplog):
    path = tmp_path / "f.json"
    path.write_text(json.dumps(GOOD))
    assert read_json(path, what="the index", fix="", shape=SHAPE) == GOOD
    assert read_json(tmp_path / "none.json", what="the index", fix="", default=7) == 7
    with pytest.raises(DamagedFileError, match=r"the index .*none.json is missing; restore it"):
        read_json(tmp_path / "none.json", what="the index", fix="restore it")
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(DamagedFileError, match=r"is damaged \(not UTF-8 text at byte 0\)"):
        read_json(path, what="the index", fix="")
    with caplog.at_level(logging.WARNING):
        assert read_json(path, what="the cache", fix="", default={}, cache=True) == {}
    assert f"the cache {path} is damaged" in caplog.text and "computing it again" in caplog.text


def test_read_jsonl_leaves_out_a_last_line_cut_short_and_names_any_other_damage(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    assert read_jsonl(path) == []
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # killed while writing step 3
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(path, shape={"step": int}) == [{"step": 1}, {"step": 2}]
    assert "leaving out its last line, cut short" in caplog.text
    path.write_text('{"step": 1}\n{"step": 2')  # the last line is whole when it parses, newline or not
    assert read_jsonl(path) == [{"step": 1}]
    path.write_text('{"step": 1}\n{"step": 2}')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(DamagedFileError, match=r"the log .*log.jsonl is damaged \(line 2 is not valid JSON: .*\); fix it"):
        read_jsonl(path, fix="fix it")
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(DamagedFileError, match=r"line 2: the top level is a list, not a mapping"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n{"loss": 2}\n')
    with pytest.raises(DamagedFileError, match=r"line 2: step is missing"):
        read_jsonl(path, shape={"step": int})


def test_shape_problem_walks_nested_shapes():
    assert shape_problem(GOOD, SHAPE) is None
    assert shape_problem({"a": [1, 2.5]}, {"a": [float]}) is None
    assert shape_problem({"a": [1, "x"]}, {"a": [float]}) == "a[1] is a string, not a number"
    assert shape_problem(3, dict) == "the top level is an integer, not a mapping"


def test_tensor_and_image_readers_name_a_damaged_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors({"w": torch.arange(100.0)}, path, metadata={"step": "3"})
    assert torch.equal(read_tensors(path, what="weights", fix="")["w"], torch.arange(100.0))
    assert open_tensors(path, what="weights", fix="")[1] == {"step": "3"}
    path.write_bytes(path.read_bytes()[:-40])
    for read in (read_tensors, open_tensors):
        with pytest.raises(DamagedFileError, match=rf"weights {path} is damaged \(.*\); train again"):
            read(path, what="weights", fix="train again")
    with pytest.raises(DamagedFileError, match="is missing"):
        read_tensors(tmp_path / "none.safetensors", what="weights", fix="")

    image = tmp_path / "i.png"
    Image.new("RGB", (16, 16), "red").save(image)
    check_image(image, what="sample", fix="")
    for damaged in (image.read_bytes()[:-30], b"garbage"):
        image.write_bytes(damaged)
        with pytest.raises(DamagedFileError, match=rf"sample {image} is damaged \(.*\); generate it"):
            check_image(image, what="sample", fix="generate it")


OUTPUTS = ("results.md", "grid.png", "runs")


def test_an_output_folder_is_claimed_when_new_or_empty_and_kept_by_its_command(tmp_path):
    out = tmp_path / "new" / "demo"
    with claimed_output_folder(out, "--out", "demo", OUTPUTS, {"world": "shapes"}):
        (out / "results.md").write_text("table")
    assert json.loads((out / "sspo-demo.json").read_text()) == {"command": "demo", "world": "shapes"}
    with claimed_output_folder(out, "--out", "demo", OUTPUTS, {"world": "shapes"}):  # its own output: written again
        (out / "results.md").write_text("table 2")
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", "--out", "demo", OUTPUTS)


@pytest.mark.parametrize("names, problem", [
    (["results.md", "notes.txt"], "holds files that are not sspo demo's output (notes.txt); choose an empty or new folder"),
    (["results.md", "grid.png"], "holds files named as sspo demo names its output (grid.png, results.md) but not its record; choose an empty "
                                 "or new folder, or, if an earlier sspo demo wrote them, write {\"command\": \"demo\"} into {tmp}/sspo-demo.json "
                                 "to go on with them"),
    (["results.md", "sspo-eval.json"], "holds files that are not sspo demo's output (sspo-eval.json); choose an empty or new folder"),
])
def test_a_folder_of_the_users_or_another_commands_files_is_refused_untouched(names, problem, tmp_path):
    for name in names:
        (tmp_path / name).write_text("mine")
    with pytest.raises(SSPOError) as raised, claimed_output_folder(tmp_path, "--out", "demo", OUTPUTS):
        pytest.fail("the command ran")
    assert str(raised.value) == f"--out {tmp_path} " + problem.replace("{tmp}", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names) and all((tmp_path / n).read_text() == "mine" for n in names)


def test_the_record_the_refusal_names_lets_an_earlier_commands_files_go_on_and_hidden_files_count_as_none(tmp_path):
    (tmp_path / "results.md").write_text("an earlier demo's table")
    (tmp_path / "sspo-demo.json").write_text('{"command": "demo"}')  # as the refusal of such a folder says
    check_output_folder(tmp_path, "--out", "demo", OUTPUTS)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("")
    check_output_folder(tmp_path / "empty", "--out", "demo", OUTPUTS)


def test_a_demo_of_another_world_is_refused(tmp_path):
    with claimed_output_folder(tmp_path, "--out", "demo", OUTPUTS, {"world": "shapes"}):
        (tmp_path / "grid.png").write_text("a grid")
    with pytest.raises(SSPOError, match=r"holds the output of sspo demo for world 'shapes', not 'moving-shapes'; choose another --out, or delete that folder"):
        check_output_folder(tmp_path, "--out", "demo", OUTPUTS, {"world": "moving-shapes"})


def test_a_command_that_fails_before_writing_leaves_no_mark_and_no_folder(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(KeyboardInterrupt), claimed_output_folder(out, "--out", "eval", OUTPUTS):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # one that wrote something keeps it, and its mark, so that a re-run may go on
    with pytest.raises(RuntimeError), claimed_output_folder(out, "--out", "eval", OUTPUTS):
        (out / "runs").mkdir()
        raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == ["runs", "sspo-eval.json"]


def test_file_stats_follow_linked_folders_and_keep_hidden_ones(tmp_path):
    from sspo.io import file_stats

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.parquet").write_bytes(b"a")
    data = tmp_path / "data"
    (data / ".cache").mkdir(parents=True)
    (data / ".cache" / "w.metadata").write_bytes(b"m")  # as hf download --local-dir leaves: part of a model folder's stamp
    (data / "_SUCCESS").write_bytes(b"")
    (data / "linked").symlink_to(shards)
    assert [row[0] for row in file_stats(data)] == [".cache/w.metadata", "linked/a.parquet"]
    assert [row[0] for row in file_stats(data, {".parquet"})] == ["linked/a.parquet"]


def test_a_failed_write_names_the_file_written_not_its_temporary_name(tmp_path):
    import errno
    import os

    from sspo.io import atomic_path

    target = tmp_path / "scores.csv"
    for failure in (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), None):  # a full disk names no file; a temporary name is named
        with pytest.raises(OSError) as failed, atomic_path(target) as tmp:
            raise failure or OSError(errno.EACCES, os.strerror(errno.EACCES), str(tmp))
        assert failed.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []
