"""The worlds: procedural text-to-image and text-to-video worlds measured exactly, one folder each
(``sspo/worlds/<world>/``, its ``World`` entry the ``WORLD`` of its ``definition.py``), found here
and registered in one table (:mod:`sspo.worlds.registry`). What every world builds its data and
base model with is shared beside them (:mod:`sspo.worlds.world_data`, :mod:`sspo.worlds.base_building`)."""

import importlib
import importlib.util
import pkgutil

from sspo.worlds.registry import WORLDS, DemoSettings, TrainingDataRequest, World, base_world, find_world, get_world, prompt_set_world, register, unregister, world_names

for _folder in sorted(module.name for module in pkgutil.iter_modules(__path__) if module.ispkg):
    if importlib.util.find_spec(f"{__name__}.{_folder}.definition"):  # a world's folder; another package is shared code
        register(importlib.import_module(f"{__name__}.{_folder}.definition").WORLD)
del _folder

__all__ = ["WORLDS", "World", "DemoSettings", "TrainingDataRequest", "register", "unregister", "world_names", "find_world", "get_world", "base_world", "prompt_set_world"]
