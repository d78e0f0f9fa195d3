"""Model names sspo knows besides hub ids and diffusers folders: the worlds' bases."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

from sspo.config import load_yaml
from sspo.errors import ConfigError, SSPOError
from sspo.worlds.registry import WORLDS, base_name, base_world


def resolve_model(name: str, key: str = "model") -> str:
    """A world's base (``shapes-base[:quick|:64px]``, ``moving-shapes-base[:quick]``, ...: shipped, or
    built and cached on first use) as its folder; any other name as it is. An unknown preset of a
    base is a ConfigError naming ``key``."""
    world = base_world(name)
    if world is None:
        check_not_a_misspelt_base(name, key)
    return str(world.resolve_base(name, key=key)) if world else name


def check_not_a_misspelt_base(name: str, key: str) -> None:
    """Refuse a name that is no folder, no hub id ("org/name") and close to a world's base name
    (``shapes-bse``): it would otherwise be looked up on the hub, and fail there."""
    if "/" in name or os.sep in name or os.path.exists(os.path.expanduser(name)):
        return
    close = difflib.get_close_matches(name.partition(":")[0], [world.base for world in WORLDS.values()], n=1, cutoff=0.75)
    if close:
        raise ConfigError(f"{key} {name!r} is neither a folder nor a world's base; did you mean {close[0]!r}?")


def usual_family(name: str, family: str = "auto", revision: str | None = None, key: str = "model.pretrained"):
    """The model family class of model ``name``: a world base's by its world (before it is built), or
    ``family`` when it names one; else, and for a named family checked to fit, the one its
    model_index.json is of. A misspelt world base is a ConfigError naming ``key``."""
    from sspo.models.families import FAMILIES, family_of
    from sspo.models.pipeline import load_pipeline_config

    name = base_name(name)
    if world := base_world(name):
        return FAMILIES[family] if family in FAMILIES else FAMILIES[world.family_of(name)]
    check_not_a_misspelt_base(name, key)
    return type(family_of(load_pipeline_config(name, revision), family))


def usual_guidance_scale(name: str, family: str = "auto", revision: str | None = None, key: str = "--model") -> float:
    """The classifier-free guidance model ``name`` is usually sampled with: its world's for a world's
    base, the one its run sampled with for a run's fully fine-tuned ``final/``, else its model
    family's (:func:`usual_family`): SD-1.5 and AnimateDiff 7.5, SDXL 5.
    A world base given by its shipped or cached folder is that base."""
    name = base_name(name)
    world = base_world(name)
    if world:
        return world.guidance_scale(name)
    check_not_a_misspelt_base(name, key)
    if (trained := _run_guidance_scale(name)) is not None:
        return trained
    return usual_family(name, family, revision, key).default_guidance_scale


def _run_guidance_scale(name: str) -> float | None:
    """``negatives.guidance_scale`` of the run whose ``final/`` folder ``name`` is (recorded resolved
    in its config.yaml: its base's usual guidance unless the config set another)."""
    folder = Path(name).expanduser()
    config = folder.parent / "config.yaml"
    if folder.name != "final" or not config.is_file():
        return None
    try:
        value = (load_yaml(config).get("negatives") or {}).get("guidance_scale")
    except (SSPOError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def shared_guidance_scale(names: Sequence[str]) -> float:
    """The usual guidance of every model of ``names``; a ConfigError naming --guidance-scale when they differ."""
    usual = {name: usual_guidance_scale(name) for name in names}
    if len(set(usual.values())) > 1:
        listed = ", ".join(f"{name}: {scale:g}" for name, scale in usual.items())
        raise ConfigError(f"--guidance-scale: the models are usually sampled with different guidance ({listed}); pass one --guidance-scale for all of them")
    return next(iter(usual.values()))
