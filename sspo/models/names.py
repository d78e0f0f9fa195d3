"""Model names sspo knows besides hub ids and diffusers folders."""

from __future__ import annotations


def resolve_model(name: str) -> str:
    """``shapes-base[:quick]`` is the shapes world's base model (built and cached on first use)."""
    if name.startswith("shapes-base"):
        from ..base import BaseConfig, build_base

        preset = name.partition(":")[2] or "default"
        return str(build_base(BaseConfig.preset(preset)))
    return name
