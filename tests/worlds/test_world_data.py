"""What any world builds its data with (sspo.worlds.world_data), on the shapes world's split."""

from sspo.worlds.shapes.world import make_split
from sspo.worlds.world_data import eval_prompts


def test_eval_prompts_are_fixed_subsets():
    split = make_split(0)
    first, again = eval_prompts(split, per_split=10, seed=5), eval_prompts(split, per_split=10, seed=5)
    assert first == again
    assert len(first["seen"]) == len(first["heldout"]) == 10
    assert set(first["seen"]) <= set(split.train)
    assert set(first["heldout"]) <= set(split.heldout)
