"""Model families (SD-1.5, SDXL, AnimateDiff, SD3, FLUX.1): :class:`ModelFamily` and its registry, ``model.family``."""

from sspo.models.families import animatediff, flux, sd, sd3, sdxl  # noqa: F401  (each registers its family)
from sspo.models.families.base import EVERY_LAYER, FAMILIES, MOTION, TRAIN_MODULES, ModelFamily, Sampler, family_of, register, resolve_train_modules

__all__ = ["EVERY_LAYER", "FAMILIES", "MOTION", "TRAIN_MODULES", "ModelFamily", "Sampler", "family_of", "register", "resolve_train_modules"]
