"""Model names sspo knows besides hub ids and diffusers folders: the worlds' bases."""

from __future__ import annotations

from sspo.worlds.registry import base_world


def resolve_model(name: str, key: str = "model") -> str:
    """A world's base (``shapes-base[:quick|:64px]``, ``moving-shapes-base[:quick]``, ...: shipped, or
    built and cached on first use) as its folder; any other name as it is. An unknown preset of a
    base is a ConfigError naming ``key``."""
    world = base_world(name)
    return str(world.resolve_base(name, key=key)) if world else name
