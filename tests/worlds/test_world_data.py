"""What any world builds its data with (sspo.worlds.world_data): on a toy world's specs, and on
the shapes world's split."""

import dataclasses
import json

import pyarrow.parquet as pq

from sspo.worlds.shapes.world import make_split
from sspo.worlds.world_data import cached_parquet, eval_prompts, pair_rows, split_specs, write_captioned_folder


@dataclasses.dataclass(frozen=True, order=True)
class Toy:
    """A world's spec as these helpers see it: sortable, hashable, with a prompt."""

    n: int

    @property
    def prompt(self) -> str:
        return f"toy {self.n}"


TOYS = [Toy(n) for n in range(40)]


def test_split_specs_is_deterministic_disjoint_and_complete_with_validation_inside_train():
    split = split_specs(TOYS, seed=3, heldout_fraction=0.25, validation_fraction=0.1)
    assert split == split_specs(TOYS, seed=3, heldout_fraction=0.25, validation_fraction=0.1)
    assert (len(split.heldout), len(split.validation)) == (10, 4)
    assert not set(split.train) & set(split.heldout) and set(split.train) | set(split.heldout) == set(TOYS)
    assert set(split.validation) <= set(split.train)
    assert set(split.train_without_validation) == set(split.train) - set(split.validation)
    assert split_specs(TOYS, seed=4, heldout_fraction=0.25, validation_fraction=0.1).heldout != split.heldout


def test_pair_rows_put_the_clean_render_on_the_labelled_side():
    rows = pair_rows(TOYS[:10], 3, seed=0, clean=lambda spec: b"good", defective=lambda spec, rng, defect: defect.encode(),
                     defects=("blur", "noise"), columns=("jpg_0", "jpg_1"))
    assert len(rows) == 30 and {row["defect"] for row in rows} == {"blur", "noise"}
    for row in rows:
        winner, loser = ("jpg_0", "jpg_1") if row["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        assert (row[winner], row[loser]) == (b"good", row["defect"].encode())
    assert {row["label_0"] for row in rows} == {0.0, 1.0}  # the winner's side is drawn
    ties = pair_rows(TOYS[:4], 1, seed=0, clean=lambda spec: b"good", defective=lambda spec, rng, defect: b"bad",
                     defects=("blur",), columns=("jpg_0", "jpg_1"), tie_fraction=1.0)
    assert [row["label_0"] for row in ties] == [0.5] * 4


def test_cached_parquet_builds_its_rows_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SSPO_CACHE", str(tmp_path / "cache"))
    built = []

    def rows():
        built.append(1)
        return [{"caption": "toy 0", "label_0": 1.0}]

    first, again = cached_parquet("toy.parquet", rows), cached_parquet("toy.parquet", rows)
    assert first == again and len(built) == 1
    assert pq.read_table(first).to_pylist() == [{"caption": "toy 0", "label_0": 1.0}]


def test_write_captioned_folder_lists_each_file_with_its_prompt(tmp_path):
    folder = write_captioned_folder(tmp_path / "toys", TOYS[:3], "txt", lambda spec, path: path.write_text(spec.prompt))
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert lines == [{"file_name": f"{i:05d}.txt", "text": f"toy {i}"} for i in range(3)]
    assert [(folder / line["file_name"]).read_text() for line in lines] == ["toy 0", "toy 1", "toy 2"]


def test_eval_prompts_are_fixed_subsets():
    split = make_split(0)
    first, again = eval_prompts(split, per_split=10, seed=5), eval_prompts(split, per_split=10, seed=5)
    assert first == again
    assert len(first["seen"]) == len(first["heldout"]) == 10
    assert set(first["seen"]) <= set(split.train)
    assert set(first["heldout"]) <= set(split.heldout)
