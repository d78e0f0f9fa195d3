"""Model families (SD-1.5, SDXL, AnimateDiff, SD3, FLUX.1): :class:`ModelFamily` and its registry, ``model.family``."""

import importlib
import pkgutil

from sspo.models.families.base import EVERY_LAYER, FAMILIES, MOTION, TRAIN_MODULES, ModelFamily, Sampler, family_of, register, resolve_train_modules

for _module in sorted(module.name for module in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # a family's module registers it (@register)
del _module

__all__ = ["EVERY_LAYER", "FAMILIES", "MOTION", "TRAIN_MODULES", "ModelFamily", "Sampler", "family_of", "register", "resolve_train_modules"]
