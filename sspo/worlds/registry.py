"""The world registry: every procedural world sspo can train on and score exactly, in one table.

A world is one folder (``sspo/worlds/<world>/``: its renderer, data writer, base recipe, exact
evaluator, built with the shared :mod:`sspo.worlds.world_data` and :mod:`sspo.worlds.base_building`)
and one :class:`World` entry (its ``definition.py``) that says how the rest of sspo uses it. Data
(``data.source: <name>``), evaluation (prompt sets ``<name>`` and ``<name>-validation``, metric
``<name>``), the trainer's validation, ``sspo compare``, ``sspo demo --world <name>`` and ``sspo
base --world <name>`` read the entry and nothing else; no code outside a world's folder asks which
world it is. :func:`register` adds a world (a test's throw-away one, or a user's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sspo.errors import ConfigError, SSPOError


@dataclasses.dataclass(frozen=True)
class TrainingDataRequest:
    """What a world's training data writer is asked for (from the ``data.*`` keys)."""

    split_seed: int  # data.world_split_seed: the world's train / held-out split
    pairs_per_prompt: int  # data.world_pairs_per_prompt: pairs rendered per alignment-train combination
    resolution: int  # data.resolution: image side in pixels
    frames: int  # data.frames: frames per clip (0 for an image world)
    without_validation: bool  # data.world_without_validation: leave out the validation combinations


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """How ``sspo demo --world <name>`` runs the world."""

    config: Path  # the training config every arm starts from (YAML)
    methods: tuple[str, ...]  # the arms trained from the base, in the table's order
    prompts_per_split: int  # evaluation prompts per split (seen, held-out): enough for a CI on paired gains
    sampler_steps: int = 20  # evaluation sampler steps
    # Pick-a-Pic-shaped pairs of this level (`sspo pairs --level`, the world's PairsSettings) instead
    # of the world's own pairs; None: the world's own.
    data_level: str | None = None
    # Settings per arm on top of the config, e.g. {"sft": ("optim.learning_rate=3e-3",)}.
    arm_overrides: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    quick_preset: str | None = "quick"  # the base preset `--quick` trains from instead (a smaller base); None: the same base


@dataclasses.dataclass(frozen=True)
class PairLevel:
    """A named quality of Pick-a-Pic-shaped winners (``sspo pairs --level``)."""

    steps: int  # G's SFT steps, read off the measured R_win-vs-steps curve
    target_r_win: float  # the winners' mean round-tripped reward the level aims at


@dataclasses.dataclass(frozen=True)
class PairsSettings:
    """How ``sspo pairs`` builds a world's Pick-a-Pic-shaped pairs (:mod:`sspo.worlds.pairs`)."""

    generator_config: Path  # the SFT recipe G trains with (its LoRA, learning rate, batch), YAML
    levels: Mapping[str, PairLevel]  # level name -> G's steps and the R_win it aims at
    encode: Callable[[Any], bytes]  # a sample -> the bytes its parquet column holds (PNG, lossless clip)
    vae_round_trip: Callable[[str, list], list]  # (base folder, samples) -> the samples encoded by its VAE as training encodes them, decoded
    version: int | str  # part of G's and the pairs' cache keys: bump when the world's samples or evaluator change
    sampler_steps: int = 20  # G's sampler steps, as the world's evaluation samples
    max_prompts: int | None = None  # training prompts the pairs are drawn from (a seeded sample); None: every one


@dataclasses.dataclass(frozen=True)
class World:
    """One world: everything sspo needs to train on it and score it exactly.

    ``name`` is what configs and flags call it: ``data.source``, ``validation.world``, the prompt
    sets ``<name>`` and ``<name>-validation``, the metric ``<name>`` (with a ``<name>.<component>``
    column per component), ``sspo demo --world`` and ``sspo base --world``.
    """

    name: str
    clips: bool  # its samples are clips (uint8 [F, H, W, 3] arrays), not PIL images
    parse_prompt: Callable[[str], Any]  # prompt -> spec; a prompt outside the world raises an SSPOError
    make_split: Callable[[int], Any]  # split seed -> the world's Split of its prompts' specs (train, heldout, validation)
    eval_specs: Callable[[Any, int, int], dict[str, list]]  # (split, per_split, seed) -> {"seen": specs, "heldout": specs}
    training_data: Callable[[TrainingDataRequest], Path]  # its alignment pairs as a (cached) Pick-a-Pic-style parquet
    pair_columns: tuple[str, str]  # that parquet's two media columns (data.image_0_column, data.image_1_column)
    base: str  # its base model's name (model.pretrained); "<base>:<preset>" names a preset
    build_base: Callable[..., Path]  # (preset, output=None, force=False) -> the base's diffusers folder (shipped, cached or built)
    find_base: Callable[[str], Path | None]  # preset -> the base's folder if shipped or cached already, else None (nothing is built)
    base_presets: tuple[str, ...]  # the presets build_base knows, the default first
    base_pipeline: str  # what the base is, for summaries ("tiny Stable Diffusion pipeline")
    base_guidance_scale: float  # the classifier-free guidance its base is sampled with unless a config or flag says otherwise
    evaluate: Callable[[Any, str], dict[str, float]]  # (sample, prompt) -> every component of the exact score, "reward" among them
    components: tuple[str, ...]  # those components, in the order of the metric's columns
    table_columns: tuple[str, ...]  # the components a results table shows after the reward
    round_trip: Callable[[Path], dict[str, dict[str, float]]]  # base folder -> mean exact scores of clean and defective samples after a VAE round trip
    demo: DemoSettings
    preset_guidance_scales: Mapping[str, float] = dataclasses.field(default_factory=dict)  # presets sampled with another guidance than base_guidance_scale
    preset_pipelines: Mapping[str, str] = dataclasses.field(default_factory=dict)  # presets that are another kind of pipeline than base_pipeline
    base_family: str = "sd"  # its base's model family (sspo.models.families), known before the base is built: the defaults it trains with
    preset_families: Mapping[str, str] = dataclasses.field(default_factory=dict)  # presets of another family than base_family
    # `sspo demo --base <base>:<preset>`: the demo of a preset that is another model (a flow-matching base), not a smaller one
    preset_demos: Mapping[str, DemoSettings] = dataclasses.field(default_factory=dict)
    pairs: PairsSettings | None = None  # its Pick-a-Pic-shaped pairs (`sspo pairs --world`); None: it has none

    def reads_prompt(self, prompt: str) -> bool:
        """Whether ``prompt`` is one of this world's prompts."""
        try:
            self.parse_prompt(prompt)
        except SSPOError:
            return False
        return True

    def demo_of(self, name: str, key: str = "--base") -> DemoSettings:
        """The demo of base ``name`` (``<base>`` or ``<base>:<preset>``); a preset without one is a ConfigError."""
        preset = self.base_preset(name, key)
        if preset == self.base_presets[0]:
            return self.demo
        if preset not in self.preset_demos:
            names = ", ".join([repr(self.base), *(repr(f"{self.base}:{p}") for p in self.preset_demos)])
            raise ConfigError(f"{key}: {name!r} has no demo; the demos of world {self.name!r} train {names}")
        return self.preset_demos[preset]

    def pipeline_of(self, name: str) -> str:
        """What base ``name`` (``<base>`` or ``<base>:<preset>``) is, for summaries."""
        return self.preset_pipelines.get(self.base_preset(name), self.base_pipeline)

    def family_of(self, name: str) -> str:
        """The model family of base ``name`` (``<base>`` or ``<base>:<preset>``)."""
        return self.preset_families.get(self.base_preset(name), self.base_family)

    def guidance_scale(self, name: str) -> float:
        """The guidance base ``name`` (``<base>`` or ``<base>:<preset>``) is usually sampled with."""
        return self.preset_guidance_scales.get(self.base_preset(name), self.base_guidance_scale)

    def resolve_base(self, name: str, output: str | Path | None = None, force: bool = False, key: str = "model") -> Path:
        """The folder of base ``name`` (``<base>`` or ``<base>:<preset>``)."""
        return Path(self.build_base(self.base_preset(name, key), output=output, force=force))

    def existing_base(self, name: str, key: str = "model") -> Path | None:
        """The folder of base ``name`` if it is shipped or cached already (None: using it would build it);
        an unknown preset is a ConfigError naming ``key``."""
        return self.find_base(self.base_preset(name, key))

    def base_preset(self, name: str, key: str = "model") -> str:
        """The preset base ``name`` names; an unknown one is a ConfigError naming ``key`` and the valid names."""
        preset = name.partition(":")[2] or self.base_presets[0]
        if preset not in self.base_presets:
            names = ", ".join([repr(self.base), *(repr(f"{self.base}:{p}") for p in self.base_presets)])
            raise ConfigError(f"{key}: got {name!r}, an unknown preset of {self.base}; expected one of {names}")
        return preset

    def base_command(self, name: str) -> str:
        """The ``sspo base`` command that prints the folder of base ``name``."""
        preset = self.base_preset(name)
        return f"sspo base --world {self.name}" + (f" --size {preset}" if preset != self.base_presets[0] else "")

    def names_base(self, name: str) -> bool:
        """``name`` is this world's base (``<base>`` or ``<base>:<preset>``)."""
        return name == self.base or name.startswith(self.base + ":")


WORLDS: dict[str, World] = {}  # name -> world; filled by register (read it, never write it)


def register(world: World) -> World:
    """Add ``world`` to the table; a name or base already registered is refused."""
    if world.name in WORLDS:
        raise ConfigError(f"a world named {world.name!r} is already registered; give it another name")
    if any(other.base == world.base for other in WORLDS.values()):
        raise ConfigError(f"base name {world.base!r} is already another world's; give it another name")
    WORLDS[world.name] = world
    return world


def unregister(name: str) -> None:
    """Remove the world ``name`` (a test's throw-away one) from the table."""
    WORLDS.pop(name, None)


def world_names() -> tuple[str, ...]:
    return tuple(WORLDS)


def find_world(name: str) -> World | None:
    """The world called ``name``, or None."""
    return WORLDS.get(name)


def get_world(name: str, key: str = "world") -> World:
    """The world called ``name``; another name is a ConfigError that names ``key`` and the worlds."""
    world = WORLDS.get(name)
    if world is None:
        raise ConfigError(f"{key}: unknown world {name!r}; expected one of {', '.join(WORLDS)}")
    return world


def base_world(model: str) -> World | None:
    """The world whose base ``model`` names (``shapes-base:quick``, ...), or None."""
    return next((world for world in WORLDS.values() if world.names_base(model)), None)


def base_name(model: str) -> str:
    """The world base (``shapes-base:quick``, ...) whose shipped or cached folder ``model`` is, else
    ``model`` as given: a base given by its path is the base it names (its guidance, say)."""
    path = Path(model).expanduser()
    if not (path / "model_index.json").is_file():
        return model
    for world in WORLDS.values():
        for preset in world.base_presets:
            name = world.base if preset == world.base_presets[0] else f"{world.base}:{preset}"
            found = world.find_base(preset)
            if found is not None and Path(found).resolve() == path.resolve():
                return name
    return model


def prompt_set_world(name: str) -> tuple[World, bool] | None:
    """(world, validation) for a world's prompt set (``<world>`` or ``<world>-validation``), or None."""
    if name in WORLDS:
        return WORLDS[name], False
    if name.endswith("-validation") and name.removesuffix("-validation") in WORLDS:
        return WORLDS[name.removesuffix("-validation")], True
    return None
