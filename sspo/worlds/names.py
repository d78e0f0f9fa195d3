"""Model names sspo knows besides hub ids and diffusers folders."""

from __future__ import annotations


def resolve_model(name: str) -> str:
    """``shapes-base[:quick]`` is the shapes world's base model, ``shapes-video-base[:quick]`` the
    moving-shapes world's (shipped, or built and cached on first use)."""
    if name.startswith("shapes-video-base"):
        from sspo.worlds.moving_shapes.base_model import VideoBaseConfig, build_video_base

        return str(build_video_base(VideoBaseConfig.preset(name.partition(":")[2] or "default")))
    if name.startswith("shapes-base"):
        from sspo.worlds.shapes.base_model import BaseConfig, build_base

        preset = name.partition(":")[2] or "default"
        return str(build_base(BaseConfig.preset(preset)))
    return name
