import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sspo.errors import DataError
from sspo.evaluation.scorers.prompts import HPSV2_STYLES, PromptItem, load_prompt_set
from sspo.worlds.shapes import world as shapes


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_pickapic_val_dedups_captions_in_order(tmp_path):
    rows = [{"caption": c, "jpg_0": b"\x00" * 8, "label_0": 1.0} for c in ["a cat", "a dog", "a cat", "a fox", "a dog"]]
    path = _parquet(tmp_path / "validation-00000.parquet", rows)
    assert load_prompt_set("pickapic_val", str(path)) == [PromptItem("a cat"), PromptItem("a dog"), PromptItem("a fox")]


def test_pickapic_folder_prefers_validation_unique_shards(tmp_path):
    _parquet(tmp_path / "train-00000.parquet", [{"caption": "train only"}])
    _parquet(tmp_path / "validation_unique-00000.parquet", [{"caption": "val"}])
    assert load_prompt_set("pickapic_val", str(tmp_path)) == [PromptItem("val")]
    _parquet(tmp_path / "validation_unique-00000.parquet", [{"prompt": "no caption column"}])
    with pytest.raises(DataError, match="caption"):
        load_prompt_set("pickapic_val", str(tmp_path))


def test_hpsv2_benchmark_folder(tmp_path):
    for style in HPSV2_STYLES:
        (tmp_path / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(3)]))
    items = load_prompt_set("hpsv2", str(tmp_path))
    assert len(items) == 12 and items[0] == PromptItem("anime prompt 0", "anime")
    assert [i.category for i in items[::3]] == list(HPSV2_STYLES)
    assert load_prompt_set(str(tmp_path)) == items  # the folder alone is recognised
    (tmp_path / "photo.json").unlink()
    with pytest.raises(DataError, match="no photo.json"):
        load_prompt_set("hpsv2", str(tmp_path))


def test_parti_tsv(tmp_path):
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text('Prompt\tCategory\tChallenge\tNote\nA sign that says "Diffusion"\tWorld Knowledge\tWriting\t\nbond\tAbstract\tBasic\tx\n')
    assert load_prompt_set("parti", str(tsv)) == [
        PromptItem('A sign that says "Diffusion"', "World Knowledge"),
        PromptItem("bond", "Abstract"),
    ]
    with pytest.raises(DataError, match="PartiPrompts.tsv"):
        load_prompt_set("parti", str(tmp_path / "missing.tsv"))


def test_plain_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    (tmp_path / "p.json").write_text(json.dumps(["one", "two"]))
    (tmp_path / "c.json").write_text(json.dumps({"animals": ["cat"], "things": ["cup"]}))
    (tmp_path / "p.jsonl").write_text('{"caption": "one", "style": "s"}\n{"caption": "two", "style": "t"}\n')
    (tmp_path / "p.csv").write_text("text,category\none,x\ntwo,y\n")
    _parquet(tmp_path / "p.parquet", [{"prompt": "one"}, {"prompt": "two"}])
    for name in ("p.txt", "p.json", "p.jsonl", "p.csv", "p.parquet"):
        assert [i.prompt for i in load_prompt_set(str(tmp_path / name))] == ["one", "two"], name
    assert load_prompt_set(str(tmp_path / "c.json")) == [PromptItem("cat", "animals"), PromptItem("cup", "things")]
    for held, shown in ((1, "1"), ("a red circle", '"a red circle"')):  # a number; a string split into letters
        (tmp_path / "bad.json").write_text(json.dumps({"shapes": held}))
        with pytest.raises(DataError, match=rf"category 'shapes' holds {shown}, not a list of prompts; write \{{category: \[prompts\]\}}"):
            load_prompt_set(str(tmp_path / "bad.json"))
    (tmp_path / "bad.csv").write_text("words\nx\n")
    with pytest.raises(DataError, match="no prompt column"):
        load_prompt_set(str(tmp_path / "bad.csv"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompt_set(str(tmp_path / "empty.txt"))


def test_shapes_set_is_seen_then_heldout():
    items = load_prompt_set("shapes", per_split=5, seed=0)
    assert [i.category for i in items] == ["seen"] * 5 + ["heldout"] * 5
    split = shapes.make_split(0)
    heldout = {spec.prompt for spec in split.heldout}
    assert all((i.prompt in heldout) == (i.category == "heldout") for i in items)


def test_unknown_set_and_hub_failures(monkeypatch):
    with pytest.raises(DataError, match="unknown prompt set 'partiprompts'"):
        load_prompt_set("partiprompts")
    import datasets

    from sspo.models import pipeline

    monkeypatch.setattr(pipeline, "hub_reachable", lambda: True)  # the hub answers, the download fails

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="yuvalkirstain/pickapic_v2 \\(split validation_unique\\).*pass a local copy"):
        load_prompt_set("pickapic_val")
    with pytest.raises(DataError, match="nateraw/parti-prompts"):
        load_prompt_set("parti")


@pytest.mark.parametrize("name, what, downloaded", [
    ("parti", "nateraw/parti-prompts (split train)", "datasets--nateraw--parti-prompts/snapshots/c0/README.md"),
    ("pickapic_val", "yuvalkirstain/pickapic_v2 (split validation_unique)", "datasets--yuvalkirstain--pickapic_v2/snapshots/c0/README.md"),
    ("hpsv2", "zhwang/HPDv2 benchmark/anime.json", "datasets--zhwang--HPDv2/snapshots/c0/benchmark/anime.json"),
])
def test_a_named_set_from_an_unreachable_hub_is_one_line_at_once(name, what, downloaded, unreachable_hub, monkeypatch, tmp_path):
    import datasets
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing downloaded before

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the download was tried"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the download was tried"))
    with pytest.raises(DataError) as caught:
        load_prompt_set(name)
    assert str(caught.value).startswith(f"cannot load {what}: the Hugging Face hub (http://127.0.0.1:9) is unreachable; download it where the hub is reachable")
    cached = tmp_path / "hub" / downloaded  # as a download where the hub was reachable leaves it
    cached.parent.mkdir(parents=True)
    cached.write_text("{}")
    refs = tmp_path / "hub" / downloaded.split("/")[0] / "refs"
    refs.mkdir()
    (refs / "main").write_text("c0")
    with pytest.raises(DataError, match=r"is unreachable; it is in the local cache: set HF_HUB_OFFLINE=1 to load it from there$"):
        load_prompt_set(name)
