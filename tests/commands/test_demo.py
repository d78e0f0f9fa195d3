"""``sspo demo --world moving-shapes --quick``: the moving-shapes world end to end, on tiny sizes."""

import json

from PIL import Image

from sspo.commands.demo import run_demo


def test_video_demo_trains_evaluates_and_writes_an_animated_grid(tmp_path):
    results = run_demo(tmp_path, quick=True, world="moving-shapes")
    assert list(results) == ["base", "sft", "sspo"]
    for scores in results.values():
        assert set(scores) == {"seen", "heldout"} and all(0 <= s["moving-shapes"] <= 1 for s in scores.values())
        assert {"moving-shapes.direction", "moving-shapes.amplitude", "moving-shapes.quality"} <= set(scores["heldout"])
    with Image.open(tmp_path / "grid.gif") as grid:
        assert grid.n_frames == 8  # one grid per frame of the clips
    assert "gain vs base" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["seconds"]["total"] > 0
    assert (tmp_path / "sspo" / "validation.jsonl").is_file() and (tmp_path / "training.png").is_file()
