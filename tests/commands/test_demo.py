"""``sspo demo --quick``: the moving-shapes world and the flow base end to end, on tiny sizes."""

import json

import pytest
from PIL import Image

from sspo.commands.demo import run_demo
from sspo.errors import SSPOError


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
    # a demo of another world writes another grid and other arms: not into this folder
    with pytest.raises(SSPOError, match="holds the output of sspo demo for world 'moving-shapes', not 'shapes'; choose another --out"):
        run_demo(tmp_path, quick=True)
    assert not (tmp_path / "grid.png").exists()


def test_the_flow_base_demo_trains_every_arm_from_the_flow_base(tmp_path, caplog):
    import yaml

    with caplog.at_level("WARNING", logger="sspo"):
        results = run_demo(tmp_path, quick=True, base="shapes-base:flow")
    assert "fewer than one micro-batch" not in caplog.text  # the quick demo's batch fits its few pairs: no warning a user cannot act on
    assert list(results) == ["base", "sft", "dpo", "sspo"]
    for method in ("sft", "dpo", "sspo"):
        config = yaml.safe_load((tmp_path / method / "config.yaml").read_text())
        assert config["model"]["pretrained"] == "shapes-base:flow-quick" and config["negatives"]["scheduler"] == "pipeline"
        assert config["negatives"]["guidance_scale"] == 1.0  # the flow base's usual guidance, as its evaluation samples
    table = (tmp_path / "results.md").read_text()
    assert "R_win" in table
    assert "pairs sampled from G, shapes-base:quick after" in table and "(shapes-base:quick's samples)" in table  # the pairs' base, not the trained one


@pytest.mark.parametrize("base, message", [("shapes-base:64px", "has no demo"), ("moving-shapes-base", "is not a base of world 'shapes'")])
def test_a_base_without_a_demo_is_one_line(tmp_path, base, message):
    with pytest.raises(SSPOError, match=message):
        run_demo(tmp_path, quick=True, base=base)
    assert not any(tmp_path.iterdir())
