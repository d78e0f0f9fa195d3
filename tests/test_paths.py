from pathlib import Path

import sspo
from sspo.paths import build_lock
from sspo.worlds.base_building import cached_build
from sspo.worlds.shapes.base_model import BaseConfig


def test_a_build_lock_lives_in_the_cache_one_per_target(tmp_path, monkeypatch):
    monkeypatch.setenv("SSPO_CACHE", str(tmp_path / "cache"))
    lock = build_lock(tmp_path / "a" / "base")
    assert lock.parent == tmp_path / "cache" / "locks" and lock.parent.is_dir()
    assert build_lock(tmp_path / "a" / ".." / "a" / "base") == lock  # the same folder, spelled otherwise
    assert build_lock(tmp_path / "b" / "base") != lock


def test_a_build_into_a_named_folder_leaves_no_lock_beside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SSPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "weights" / "shapes-base"

    def build(cfg, *folders: Path) -> Path:  # the folder to build is the last argument
        output = folders[-1]
        output.mkdir()
        (output / "model_index.json").write_text("{}")
        return output

    assert cached_build(BaseConfig.preset("quick"), build, "base", tmp_path / "not-shipped", out, force=True) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["shapes-base"]


def test_the_package_holds_no_lock_files():
    assert list(Path(sspo.__file__).parent.rglob("*.lock")) == []
