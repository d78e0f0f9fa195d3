"""The moving-shapes world's entry in the world registry (:mod:`sspo.worlds.registry`)."""

from __future__ import annotations

from pathlib import Path

from sspo.paths import CONFIGS
from sspo.video_io import encode_clip
from sspo.worlds.moving_shapes import evaluator, world
from sspo.worlds.registry import DemoSettings, PairLevel, PairsSettings, TrainingDataRequest, World
from sspo.worlds.shapes.world import WORLD_VERSION


def training_data(request: TrainingDataRequest) -> Path:
    return world.cached_motion_parquet(request.split_seed, request.pairs_per_prompt, request.frames, request.resolution, request.without_validation)


def build_base(preset: str, output: str | Path | None = None, force: bool = False) -> Path:
    from sspo.worlds.moving_shapes.base_model import VideoBaseConfig, build_video_base

    return build_video_base(VideoBaseConfig.preset(preset), output=output, force=force)


def find_base(preset: str) -> Path | None:
    from sspo.worlds.base_building import existing_base
    from sspo.worlds.moving_shapes.base_model import PACKAGED_VIDEO_BASE, VideoBaseConfig

    return existing_base(VideoBaseConfig.preset(preset), "video-base", PACKAGED_VIDEO_BASE)


def evaluate(clip, prompt: str) -> dict[str, float]:
    return evaluator.evaluate_clip(clip, prompt).as_dict()


def round_trip(folder: Path) -> dict[str, dict[str, float]]:
    return {name: {"reward": reward} for name, reward in evaluator.round_trip_clip_scores(folder).items()}


def vae_round_trip(model: str, clips: list) -> list:
    import numpy as np

    return list(evaluator.round_trip_clips(evaluator.load_vae(model), np.stack(clips)))


# `sspo pairs --world moving-shapes`: G is the base after N SFT steps of the video demo's recipe
# (its motion-module LoRA); pairs are drawn from a seeded half of the training prompts, about as
# many as the demo's training sees, and sampled as the demo samples (10 steps). One level: the
# winners' R_win barely moves past 30 steps (0.47 at 30 and 60, 0.42 at 150, docs/data.md), so
# "mid" is G after the demo's own SFT budget (60 steps).
PAIRS = PairsSettings(
    generator_config=CONFIGS / "demo-moving-shapes.yaml",
    levels={"mid": PairLevel(60, 0.47)},
    encode=encode_clip,
    vae_round_trip=vae_round_trip,
    version=f"{WORLD_VERSION}.{world.MOTION_WORLD_VERSION}",
    sampler_steps=10,
    max_prompts=480,
)


WORLD = World(
    name="moving-shapes",
    clips=True,
    parse_prompt=world.parse_motion_prompt,
    make_split=world.make_motion_split,
    eval_specs=world.motion_eval_prompts,
    training_data=training_data,
    pair_columns=("video_0", "video_1"),
    base="moving-shapes-base",
    build_base=build_base,
    find_base=find_base,
    base_presets=("default", "quick"),
    base_pipeline="tiny AnimateDiff pipeline",
    base_guidance_scale=5.0,
    base_family="animatediff",
    evaluate=evaluate,
    components=evaluator.COMPONENT_NAMES,
    # the groups, the two motion components a frozen or reversed clip fails, and the share of clips
    # without a visible temporal defect
    table_columns=("attributes", "motion", "coherence", "quality", "direction", "amplitude", "steady"),
    round_trip=round_trip,
    # 48 prompts x 2 seeds per split, sampled as the demo's negatives (10 steps): its time budget.
    demo=DemoSettings(CONFIGS / "demo-moving-shapes.yaml", methods=("sft", "sspo"), prompts_per_split=48, sampler_steps=10),
    pairs=PAIRS,
)
