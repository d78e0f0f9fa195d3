"""The shapes world's entry in the world registry (:mod:`sspo.worlds.registry`)."""

from __future__ import annotations

from pathlib import Path

from sspo.paths import CONFIGS
from sspo.worlds.registry import DemoSettings, PairLevel, PairsSettings, TrainingDataRequest, World
from sspo.worlds.shapes import evaluator, world
from sspo.worlds.world_data import eval_prompts, png_bytes


def training_data(request: TrainingDataRequest) -> Path:
    return world.cached_pickapic_parquet(request.split_seed, request.pairs_per_prompt, request.resolution, request.without_validation)


def build_base(preset: str, output: str | Path | None = None, force: bool = False) -> Path:
    from sspo.worlds.shapes.base_model import BaseConfig
    from sspo.worlds.shapes.base_model import build_base as build
    from sspo.worlds.shapes.flow_base import PRESETS, FlowBaseConfig, build_flow_base

    if preset in PRESETS:  # the flow-matching (SD3-style) base
        return build_flow_base(FlowBaseConfig.preset(preset), output=output, force=force)
    return build(BaseConfig.preset(preset), output=output, force=force)


def find_base(preset: str) -> Path | None:
    from sspo.worlds.base_building import existing_base
    from sspo.worlds.shapes.base_model import PACKAGED_BASE, BaseConfig
    from sspo.worlds.shapes.flow_base import PACKAGED_FLOW_BASE, PRESETS, FlowBaseConfig

    if preset in PRESETS:
        return existing_base(FlowBaseConfig.preset(preset), "base-flow", PACKAGED_FLOW_BASE)
    return existing_base(BaseConfig.preset(preset), "base", PACKAGED_BASE)


def evaluate(image, prompt: str) -> dict[str, float]:
    return evaluator.evaluate_prompt(image, prompt).as_dict()


def round_trip(folder: Path) -> dict[str, dict[str, float]]:
    """The reward, and the quality and attributes it multiplies, of 96 held-out renders after a VAE round trip."""
    from sspo.worlds.shapes.base_model import round_trip_scores

    return {name: {part: scores[part] for part in ("reward", "quality", "attributes")} for name, scores in round_trip_scores(folder).items()}


def vae_round_trip(model: str, images: list) -> list:
    from diffusers import AutoencoderKL

    from sspo.worlds.base_building import round_trip_images

    return round_trip_images(AutoencoderKL.from_pretrained(model, subfolder="vae").eval(), images)


# `sspo pairs`: G is the base after N SFT steps of the image demo's recipe (docs/data.md
# "Pick-a-Pic-shaped pairs"). Each level's steps are read off the measured R_win-vs-steps curve,
# from winner statistics alone. G saturates at R_win ~0.78 (its stored winners at ~0.80), so
# "high" is the saturated G: its 0.80 target is above what this G reaches.
PAIRS = PairsSettings(
    generator_config=CONFIGS / "demo-shapes.yaml",
    levels={"low": PairLevel(3, 0.65), "mid": PairLevel(7, 0.72), "high": PairLevel(50, 0.80)},
    encode=png_bytes,
    vae_round_trip=vae_round_trip,
    version=world.WORLD_VERSION,
)


WORLD = World(
    name="shapes",
    clips=False,
    parse_prompt=world.parse_prompt,
    make_split=world.make_split,
    eval_specs=eval_prompts,
    training_data=training_data,
    pair_columns=("jpg_0", "jpg_1"),
    base="shapes-base",
    build_base=build_base,
    find_base=find_base,
    base_presets=("default", "quick", "64px", "flow", "flow-quick"),
    base_pipeline="tiny SD pipeline",
    base_guidance_scale=5.0,
    evaluate=evaluate,
    components=evaluator.COMPONENT_NAMES,
    # the components a prompt asks for, and the quality
    table_columns=("color", "shape", "size", "position", "background", "quality"),
    round_trip=round_trip,
    preset_pipelines={"flow": "tiny flow-matching SD3 pipeline", "flow-quick": "tiny flow-matching SD3 pipeline"},
    preset_families={"flow": "sd3", "flow-quick": "sd3"},
    preset_guidance_scales={"flow": 1.0, "flow-quick": 1.0},  # the flow base samples best without guidance (chosen on validation: docs/results/flow-base.md)
    # The regime closest to the paper's: winners sampled from another model (the middle level of
    # `sspo pairs`), the comparison's budget and each arm's settings as the comparison chose them
    # there (docs/results/regimes.md). 96 prompts x 2 seeds per split: paired gains of ~0.02 need
    # that many for a CI excluding zero.
    demo=DemoSettings(CONFIGS / "compare-shapes.yaml", methods=("sft", "dpo", "sspo"), prompts_per_split=96, data_level="mid",
                      arm_overrides={"sft": ("optim.learning_rate=3e-3",), "dpo": ("optim.learning_rate=3e-3", "beta=500"),
                                     "sspo": ("optim.learning_rate=3e-4", "beta=0.05")}),
    # The flow-matching base (`sspo demo --base shapes-base:flow`): the same regime and budget, each
    # arm's settings as the flow base's comparison chose them on validation (docs/results/flow.md).
    preset_demos={"flow": DemoSettings(CONFIGS / "compare-shapes-flow.yaml", methods=("sft", "dpo", "sspo"), prompts_per_split=96,
                                       data_level="mid", quick_preset="flow-quick",
                                       arm_overrides={"sft": ("optim.learning_rate=1e-2",), "dpo": ("optim.learning_rate=1e-3", "beta=500"),
                                                      "sspo": ("optim.learning_rate=3e-3", "beta=0.05")})},
    pairs=PAIRS,
)
