"""The moving-shapes world's base: shipped for the default recipe, a plain AnimateDiff folder."""

from pathlib import Path

from sspo.worlds.moving_shapes.base_model import PACKAGED_VIDEO_BASE, VideoBaseConfig, build_video_base
from sspo.worlds.shapes.base_model import packaged_base


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
