"""The worlds: procedural text-to-image and text-to-video worlds measured exactly, one folder each,
registered in one table (:mod:`sspo.worlds.registry`)."""

from sspo.worlds.moving_shapes.definition import WORLD as MOVING_SHAPES
from sspo.worlds.registry import WORLDS, DemoSettings, TrainingDataRequest, World, base_world, find_world, get_world, prompt_set_world, register, unregister, world_names
from sspo.worlds.shapes.definition import WORLD as SHAPES

register(SHAPES)
register(MOVING_SHAPES)

__all__ = ["WORLDS", "World", "DemoSettings", "TrainingDataRequest", "register", "unregister", "world_names", "find_world", "get_world", "base_world", "prompt_set_world"]
