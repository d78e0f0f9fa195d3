"""Building and finding a world's base (sspo.worlds.base_building), on the shapes world's quick base."""

from pathlib import Path

import pytest

from sspo.worlds.shapes.base_model import BaseConfig


def test_a_forced_rebuild_stopped_while_it_swaps_in_the_new_base_leaves_nothing_the_next_build_refuses(quick_base, tmp_path, monkeypatch):
    import os
    import shutil
    import time
    from types import SimpleNamespace

    from sspo.worlds import base_building

    cfg, folder = BaseConfig.preset("quick"), tmp_path / "base"
    shutil.copytree(quick_base, folder)
    built = SimpleNamespace(save_pretrained=lambda staging, safe_serialization: shutil.copytree(quick_base, staging, dirs_exist_ok=True))
    moves, replace = [], os.replace

    def stopped_after_the_old_base_moved_aside(source, target):
        moves.append(Path(target).name)
        if len(moves) == 2:  # the new base's rename into place
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(base_building.os, "replace", stopped_after_the_old_base_moved_aside)
    with pytest.raises(KeyboardInterrupt):  # a --force rebuild's save (the build itself stood in for)
        base_building.save_base(built, cfg, tmp_path / ".base.partial", folder, time.time())
    monkeypatch.undo()
    assert moves == [".base.replaced", "base"] and not folder.exists()  # no half-deleted base in the folder
    base_building.check_base_folder(folder, cfg, force=False)  # the next build may write it
    shutil.rmtree(tmp_path / ".base.partial")  # as that build clears its staging first
    assert base_building.save_base(built, cfg, tmp_path / ".base.partial", folder, time.time()) == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # the replaced base is cleared too
