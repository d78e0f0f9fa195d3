"""The checkpoint pool of Random Checkpoint Replay (docs/method.md)."""

import json
import random
from collections import Counter

import pytest
import torch
from safetensors import safe_open

from sspo.training.pool import ERD_STRATEGIES, CheckpointPool


def state(value: float) -> dict[str, torch.Tensor]:
    return {
        "down.weight": torch.full((3, 2), value),
        "up.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) * value,
    }


def filled(root, n: int) -> CheckpointPool:
    pool = CheckpointPool(root)
    for i in range(n):
        assert pool.add(state(float(i)), step=10 * i) == i
    return pool


def test_starts_empty(tmp_path):
    pool = CheckpointPool(tmp_path / "pool")
    assert len(pool) == 0
    assert pool.steps() == []
    assert not (tmp_path / "pool").exists()  # made by the first add, so opening a pool changes nothing on disk
    with pytest.raises(RuntimeError, match="empty"):
        pool.draw("uniform", random.Random(0))
    pool.add({"w": torch.zeros(1)}, step=0)
    assert (tmp_path / "pool").is_dir()


def test_add_writes_safetensors_and_index(tmp_path):
    pool = filled(tmp_path, 2)
    assert len(pool) == 2
    assert pool.steps() == [0, 10]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoint-000.safetensors", "checkpoint-001.safetensors", "pool.json"]
    index = json.loads((tmp_path / "pool.json").read_text())
    assert index == {
        "entries": [
            {"file": "checkpoint-000.safetensors", "step": 0},
            {"file": "checkpoint-001.safetensors", "step": 10},
        ]
    }
    with safe_open(str(tmp_path / "checkpoint-001.safetensors"), framework="pt") as f:
        assert f.metadata() == {"step": "10"}
        assert sorted(f.keys()) == ["down.weight", "up.weight"]


def test_reopen_restores_entries(tmp_path):
    filled(tmp_path, 3)
    reopened = CheckpointPool(tmp_path)
    assert len(reopened) == 3
    assert reopened.steps() == [0, 10, 20]
    assert torch.equal(reopened.load(2)["down.weight"], torch.full((3, 2), 2.0))
    # growing after a restart continues the numbering
    assert reopened.add(state(3.0), step=30) == 3
    assert CheckpointPool(tmp_path).steps() == [0, 10, 20, 30]


def test_load_returns_exact_tensors(tmp_path):
    pool = CheckpointPool(tmp_path)
    tensors = {
        "a": torch.randn(4, 5, generator=torch.Generator().manual_seed(0)),
        "b": torch.randn(7, generator=torch.Generator().manual_seed(1)).to(torch.float16),
        "c": torch.arange(5, dtype=torch.int64),
        "d": torch.randn(3, 3, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16),
    }
    pool.add(tensors, step=0)
    loaded = pool.load(0)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key
    # a non-contiguous input is stored by value
    pool.add({"t": tensors["a"].t()}, step=1)
    assert torch.equal(pool.load(1)["t"], tensors["a"].t())


def test_draw_initial_and_last(tmp_path):
    pool = filled(tmp_path, 4)
    rng = random.Random(0)
    assert all(pool.draw("initial", rng) == 0 for _ in range(20))
    assert all(pool.draw("last", rng) == 3 for _ in range(20))
    pool.add(state(9.0), step=99)
    assert pool.draw("last", rng) == 4  # the newest entry
    assert pool.draw("initial", rng) == 0


def test_single_entry_every_strategy_gives_theta0(tmp_path):
    pool = filled(tmp_path, 1)
    rng = random.Random(3)
    for strategy in ERD_STRATEGIES:
        assert {pool.draw(strategy, rng) for _ in range(10)} == {0}


def test_draw_uniform_is_seeded(tmp_path):
    pool = filled(tmp_path, 5)

    def sequence(seed):
        rng = random.Random(seed)
        return [pool.draw("uniform", rng) for _ in range(50)]

    assert sequence(42) == sequence(42)
    assert sequence(42) != sequence(43)


def test_draw_uniform_covers_all_indices_uniformly(tmp_path):
    pool = filled(tmp_path, 4)
    rng = random.Random(0)
    n = 8000
    counts = Counter(pool.draw("uniform", rng) for _ in range(n))
    assert set(counts) == {0, 1, 2, 3}  # theta_0 included
    for index in range(4):
        # expected 2000 each; std ~ sqrt(8000 * 0.25 * 0.75) ~ 39, so +-200 is > 5 sigma
        assert abs(counts[index] - n / 4) < 200, counts


def test_invalid_strategy(tmp_path):
    pool = filled(tmp_path, 2)
    with pytest.raises(ValueError, match="erd"):
        pool.draw("random", random.Random(0))


@pytest.mark.parametrize("strategy, drawable", [("uniform", [0, 1, 2]), ("initial", [0]), ("last", [2])])
def test_drawable_names_what_draw_can_return(strategy, drawable, tmp_path):
    pool = filled(tmp_path, 3)
    assert pool.drawable(strategy) == drawable
    rng = random.Random(0)
    assert {pool.draw(strategy, rng) for _ in range(100)} == set(drawable)
    assert CheckpointPool(tmp_path / "empty").drawable(strategy) == []


def test_released_checkpoints_keep_their_entries_through_a_rebuilt_index(tmp_path):
    from sspo.errors import TrainingError

    pool = filled(tmp_path / "pool", 3)
    size = (tmp_path / "pool" / "checkpoint-000.safetensors").stat().st_size
    pool.release({"checkpoint-002.safetensors"})
    assert pool.kept() == [2] and pool.steps() == [0, 10, 20] and len(pool) == 3
    for name in ("checkpoint-000.safetensors", "checkpoint-001.safetensors"):
        with safe_open(str(tmp_path / "pool" / name), framework="pt") as f:
            assert list(f.keys()) == [] and f.metadata()["step"] in ("0", "10")
        assert (tmp_path / "pool" / name).stat().st_size < size / 2
    with pytest.raises(TrainingError, match=r"^pool checkpoint 1 in .* was released .*; the pool keeps 2$"):
        pool.load(1)
    assert torch.equal(pool.load(2)["down.weight"], state(2.0)["down.weight"])
    released = json.loads((tmp_path / "pool" / "pool.json").read_text())["entries"]
    assert released == [{"file": "checkpoint-000.safetensors", "step": 0, "released": True},
                        {"file": "checkpoint-001.safetensors", "step": 10, "released": True},
                        {"file": "checkpoint-002.safetensors", "step": 20}]
    (tmp_path / "pool" / "pool.json").unlink()
    assert CheckpointPool(tmp_path / "pool").entries == released
    pool.release({"checkpoint-002.safetensors"})  # nothing more to release: the index is not rewritten
    assert not (tmp_path / "pool" / "pool.json").exists()
    pool.truncate(2)
    assert pool.add(state(5.0), step=30) == 2 and pool.kept() == [2]


def test_truncate_removes_files(tmp_path):
    pool = filled(tmp_path, 4)
    pool.truncate(2)
    assert len(pool) == 2
    assert pool.steps() == [0, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-000.safetensors",
        "checkpoint-001.safetensors",
        "pool.json",
    ]
    reopened = CheckpointPool(tmp_path)
    assert reopened.steps() == [0, 10]
    assert pool.draw("last", random.Random(0)) == 1
    # the pool grows again from the truncated size, overwriting nothing it kept
    assert reopened.add(state(7.0), step=70) == 2
    assert torch.equal(reopened.load(2)["down.weight"], torch.full((3, 2), 7.0))
    assert torch.equal(reopened.load(1)["down.weight"], torch.full((3, 2), 1.0))


def test_truncate_noop_and_no_temp_files_left(tmp_path):
    pool = filled(tmp_path, 2)
    pool.truncate(5)
    assert len(pool) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", [b"", b'{"entries": [{"file": "checkpoint-000.safetensors"}]}', b"[]", b"\x00\xff", None])
def test_a_damaged_or_missing_index_is_rebuilt_from_the_checkpoint_files(damage, tmp_path):
    filled(tmp_path / "pool", 3)
    index = tmp_path / "pool" / "pool.json"
    expected = json.loads(index.read_text())["entries"]
    index.unlink() if damage is None else index.write_bytes(damage)
    pool = CheckpointPool(tmp_path / "pool")
    assert pool.entries == expected and pool.steps() == [0, 10, 20]
    assert torch.equal(pool.load(2)["down.weight"], state(2.0)["down.weight"])


def test_the_rebuilt_index_ends_before_an_unreadable_checkpoint(tmp_path):
    filled(tmp_path / "pool", 3)
    checkpoint = tmp_path / "pool" / "checkpoint-001.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:50])
    (tmp_path / "pool" / "pool.json").write_text("garbage")
    assert CheckpointPool(tmp_path / "pool").steps() == [0]


def test_loading_a_damaged_checkpoint_names_it(tmp_path):
    from sspo.io import DamagedFileError

    pool = filled(tmp_path / "pool", 2)
    checkpoint = tmp_path / "pool" / "checkpoint-001.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-20])
    with pytest.raises(DamagedFileError, match=rf"pool checkpoint 1 {checkpoint} is damaged \(.*\); resume the run"):
        pool.load(1)


@pytest.mark.parametrize("name", ["{victim}", "../victim.txt", "checkpoint-004.safetensors"])
def test_an_index_naming_other_files_is_rebuilt_and_truncate_deletes_only_the_pools_own(name, tmp_path, caplog):
    """A shared run's pool.json may name any file: a resume's truncate past it would delete it."""
    filled(tmp_path / "pool", 3)
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file\n")
    index = tmp_path / "pool" / "pool.json"
    recorded = json.loads(index.read_text())
    recorded["entries"].append({"file": name.format(victim=victim), "step": 30})
    index.write_text(json.dumps(recorded))
    pool = CheckpointPool(tmp_path / "pool")
    pool.truncate(3)
    assert victim.read_text() == "a user's file\n"
    assert pool.steps() == [0, 10, 20]
    assert f"is damaged (entry 3 names {name.format(victim=victim)!r}, not checkpoint-003.safetensors); rebuilding it" in caplog.text
