"""The shipped configs: every training YAML loads, the real-model ones run on tiny stand-ins, accelerate's parse."""

from pathlib import Path

import pytest

from sspo.config import load_config
from sspo.training.config import TrainConfig
from sspo.training.trainer import train

from tiny_pipelines import build_flux_pipeline, build_pixart_pipeline, build_sd3_pipeline, build_sdxl_pipeline

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TRAINING = sorted(CONFIGS.glob("*.yaml"))
ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))
REAL = ["sd15-lora.yaml", "sd15-full.yaml", "sdxl-lora.yaml", "sd35-lora.yaml", "flux-lora.yaml", "pixart-lora.yaml"]
VIDEO = "animatediff-lora.yaml"


def test_the_real_model_configs_exist():
    assert {*REAL, VIDEO} <= {p.name for p in TRAINING}
    assert {"ddp.yaml", "deepspeed-zero2.yaml"} <= {p.name for p in ACCELERATE}


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.iterations * cfg.steps_per_iteration > 0


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_are_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))  # rejects unknown keys
    assert cfg.num_processes > 1 and not cfg.use_cpu


@pytest.mark.parametrize("name", REAL)
def test_real_configs_train_with_tiny_stand_ins(name, quick_base, pairs, tmp_path, bf16_runs):
    """The config's own settings (bf16, gradient checkpointing, sampler, validation grid) on tiny sizes."""
    builders = {"sdxl": build_sdxl_pipeline, "sd35": build_sd3_pipeline, "flux": build_flux_pipeline, "pixart": build_pixart_pipeline}
    builder = next((build for prefix, build in builders.items() if name.startswith(prefix)), None)
    model = str(builder(tmp_path / "model")) if builder else quick_base
    tiny = [
        f"model.pretrained={model}", f"data.path={pairs}", "data.resolution=32", f"output_dir={tmp_path / 'run'}",
        "report_to=none", "iterations=1", "steps_per_iteration=1", "optim.batch_size=2",
        "optim.gradient_accumulation_steps=2", "negatives.steps=2", 'validation.prompts=["a large red circle on the left, white background"]',
        f"data.cache_dir={tmp_path / 'latents'}",
        "optim.use_8bit_adam=false",  # bitsandbytes' 8-bit Adam needs CUDA
    ]
    final = train(load_config(TrainConfig, CONFIGS / name, tiny))
    assert (final / "README.md").is_file() and (final / "validation.png").is_file()


def test_the_animatediff_config_runs_on_tiny_stand_ins(tmp_path, bf16_runs):
    """An image pipeline plus a motion adapter (as SD-1.5 + AnimateDiff's) and a clip folder with
    metadata: the dry run validates it, then the config's own settings train on tiny sizes."""
    from sspo.training.trainer import dry_run
    from sspo.worlds.moving_shapes.base_model import vocabulary
    from sspo.worlds.moving_shapes.world import make_motion_split, write_clip_folder

    from tiny_pipelines import build_video_pipeline

    parts = build_video_pipeline(tmp_path / "model", vocabulary(), max_frames=16, identity_motion=False, separate=True)
    clips = write_clip_folder(tmp_path / "clips", make_motion_split().train[:4], frames=8)
    tiny = [
        f"model.pretrained={parts / 'image'}", f"model.motion_adapter={parts / 'motion_adapter'}", f"data.path={clips}", "data.resolution=32",
        "data.frames=4", "data.frame_stride=2", f"output_dir={tmp_path / 'run'}", "report_to=none", "iterations=1", "steps_per_iteration=1",
        "optim.gradient_accumulation_steps=2", "negatives.steps=2", 'validation.prompts=["a red circle growing, white background"]',
    ]
    cfg = load_config(TrainConfig, CONFIGS / VIDEO, tiny)
    summary = dry_run(cfg)
    assert "StableDiffusionPipeline + motion adapter" in summary and "of the motion modules" in summary and "4 rows of single clips" in summary
    final = train(cfg)
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / "validation.png").is_file()
    assert (tmp_path / "run" / "validation" / "step-00000001.gif").is_file()
