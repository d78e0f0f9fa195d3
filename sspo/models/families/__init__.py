"""Model families, one module each: :class:`ModelFamily` and its registry, ``model.family``."""

import importlib
import pkgutil

from sspo.models.families.base import EVERY_LAYER, FAMILIES, MOTION, TRAIN_MODULES, ModelFamily, Sampler, family_of, register, resolve_train_modules, usual_by_family

for _module in sorted(module.name for module in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # a family's module registers it (@register)
del _module

__all__ = ["EVERY_LAYER", "FAMILIES", "MOTION", "TRAIN_MODULES", "ModelFamily", "Sampler", "family_of", "register", "resolve_train_modules", "usual_by_family"]
