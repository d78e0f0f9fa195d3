"""The moving-shapes world's base: shipped for the default recipe, a plain AnimateDiff folder."""

from pathlib import Path

from sspo.worlds.base_building import packaged_base
from sspo.worlds.moving_shapes.base_model import PACKAGED_VIDEO_BASE, VideoBaseConfig, build_video_base


def test_the_shipped_video_base_is_the_default_recipe():
    rebuild = "rebuild it: sspo base --world moving-shapes --force --out sspo/worlds/moving_shapes/weights/moving-shapes-base"
    assert packaged_base(VideoBaseConfig(), PACKAGED_VIDEO_BASE) == PACKAGED_VIDEO_BASE, rebuild
    assert sum(p.stat().st_size for p in Path(PACKAGED_VIDEO_BASE).rglob("*") if p.is_file()) <= 10 * 2**20
    assert build_video_base(VideoBaseConfig()) == PACKAGED_VIDEO_BASE


def test_the_video_base_loads_with_stock_diffusers():
    from diffusers import AnimateDiffPipeline, UNetMotionModel

    pipe = AnimateDiffPipeline.from_pretrained(str(PACKAGED_VIDEO_BASE))
    assert isinstance(pipe.unet, UNetMotionModel) and pipe.tokenizer.model_max_length == 16
    # every prompt of the world is one token per word and fits the tokenizer
    from sspo.worlds.moving_shapes.world import all_motion_specs

    longest = max(len(pipe.tokenizer(spec.prompt).input_ids) for spec in all_motion_specs())
    assert longest <= 16


def test_the_video_base_reads_word_order():
    """"from left to right" and "from right to left" are the same words: only positions tell them apart."""
    import torch
    from diffusers import AnimateDiffPipeline

    from sspo.models.families import family_of

    pipe = AnimateDiffPipeline.from_pretrained(str(PACKAGED_VIDEO_BASE))
    cond = family_of(pipe).encode_prompts(["a small red circle moving from left to right, white background",
                                           "a small red circle moving from right to left, white background"], "cpu")
    assert not torch.allclose(cond.embeds[0], cond.embeds[1], atol=1e-3)


def test_the_shipped_video_base_moves_objects_the_prompted_way():
    """What the video base learned last: the sign of a motion (each axis had one direction whatever
    the prompt said until late in its pretraining)."""
    from diffusers import AnimateDiffPipeline

    from sspo.evaluation.sampling import generate
    from sspo.worlds.moving_shapes.evaluator import evaluate_clip

    pipe = AnimateDiffPipeline.from_pretrained(str(PACKAGED_VIDEO_BASE))
    prompts = [f"a large red circle moving from {a} to {b}, white background" for a, b in (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))]
    clips = generate(pipe, prompts, [0] * len(prompts), steps=10, guidance_scale=5.0, frames=8)
    directions = [evaluate_clip(clip, prompt).as_dict()["direction"] for clip, prompt in zip(clips, prompts)]
    assert min(directions) > 0.9, dict(zip(prompts, directions))


def test_quick_video_build_is_bitwise_repeatable(tmp_path):
    """The cache key promises one model per seed: on one machine, a rebuild gives the same bytes."""
    import hashlib

    def hashes(folder: Path) -> dict:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.safetensors"))}

    cached = build_video_base(VideoBaseConfig.preset("quick"))
    again = build_video_base(VideoBaseConfig.preset("quick"), tmp_path / "again", force=True)
    assert hashes(again) == hashes(Path(cached)) and len(hashes(again)) >= 3


def test_a_video_build_is_the_same_whether_its_image_base_was_cached_or_built_then(tmp_path, monkeypatch):
    import dataclasses
    import hashlib

    import torch

    from sspo.worlds.moving_shapes import base_model

    def hashes(folder: Path) -> dict:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.safetensors"))}

    cfg = dataclasses.replace(VideoBaseConfig.preset("quick"), vae_steps=1, denoiser_steps=2, defect_steps=0, vae_defect_steps=0)
    cached = build_video_base(cfg, tmp_path / "cached")
    image_base = base_model.build_base
    monkeypatch.setattr(base_model, "build_base", lambda config: (torch.rand(5), image_base(config))[1])  # a build draws from torch's RNG
    assert hashes(build_video_base(cfg, tmp_path / "built")) == hashes(cached)


def test_every_loser_type_survives_the_video_base_vae():
    """A loser the latent cannot tell from a clean clip teaches nothing: through the shipped base's
    VAE each defect keeps its clip at least 0.15 below the clean ones (the checkerboard only since
    the decoder learned it; pixel noise is the closest, 0.16 below)."""
    from sspo.worlds.moving_shapes.evaluator import round_trip_clip_scores

    table = round_trip_clip_scores(PACKAGED_VIDEO_BASE)
    assert table["clean"] >= 0.85, table
    for defect, reward in table.items():
        assert defect == "clean" or reward <= table["clean"] - 0.15, (defect, table)


def test_the_shipped_video_base_shows_temporal_defects_that_a_short_sft_removes(tmp_path):
    """The base's headroom: part of its clips shake, flicker or stutter (docs/video.md: 58% of 192
    clips; 60% of these 48), and the demo's SFT on clean winners (4 x 15 steps) makes fewer of them
    do so (44% here)."""
    from sspo.config import load_config
    from sspo.evaluation.evaluate import EvalConfig, evaluate_model
    from sspo.paths import CONFIGS
    from sspo.training.config import TrainConfig
    from sspo.training.trainer import train

    eval_cfg = EvalConfig(prompts="moving-shapes", prompts_per_split=12, seeds=(0, 1), steps=10, guidance_scale=5.0)

    def jerky(lora=None) -> float:
        summary, _ = evaluate_model(str(PACKAGED_VIDEO_BASE), eval_cfg, lora=lora)
        return 1.0 - sum(split["moving-shapes.steady"] for split in summary.values()) / len(summary)

    before = jerky()
    assert before >= 0.4, before
    overrides = ["method=sft", f"output_dir={tmp_path}", "validation.every_iterations=0", "report_to=none"]
    after = jerky(train(load_config(TrainConfig, CONFIGS / "demo-moving-shapes.yaml", overrides)))
    assert after <= before - 0.1, (before, after)
