"""The worlds: procedural text-to-image and text-to-video worlds measured exactly, one folder each
(``sspo/worlds/<world>/``, its ``World`` entry the ``WORLD`` of its ``definition.py``), found here
and registered in one table (:mod:`sspo.worlds.registry`)."""

import importlib
import pkgutil

from sspo.worlds.registry import WORLDS, DemoSettings, TrainingDataRequest, World, base_world, find_world, get_world, prompt_set_world, register, unregister, world_names

for _folder in sorted(module.name for module in pkgutil.iter_modules(__path__) if module.ispkg):
    register(importlib.import_module(f"{__name__}.{_folder}.definition").WORLD)

__all__ = ["WORLDS", "World", "DemoSettings", "TrainingDataRequest", "register", "unregister", "world_names", "find_world", "get_world", "base_world", "prompt_set_world"]
