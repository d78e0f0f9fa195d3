"""Text-to-video through the one trainer: a tiny AnimateDiff pipeline trained by every method and
ablation on the moving-shapes world, and outputs that stock diffusers loads."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sspo.commands.compare import VARIANTS
from sspo.config import load_config
from sspo.models.families import family_of
from sspo.models.pipeline import load_pipeline
from sspo.models.tiny import motion_adapter_for
from sspo.training.config import TrainConfig
from sspo.training.methods import METHODS
from sspo.training.trainer import train
from sspo.worlds.moving_shapes.base_model import vocabulary

from tiny_pipelines import build_video_pipeline

PROMPT = "a red circle growing, white background"


@pytest.fixture(scope="module")
def video_model(tmp_path_factory) -> str:
    # A random (not identity) adapter, as a pretrained one is: a LoRA on the attention of motion
    # modules whose proj_out is zero gets no gradient.
    return str(build_video_pipeline(tmp_path_factory.mktemp("video") / "model", vocabulary(), max_frames=16, identity_motion=False))


def video_config(model: str, out, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"model.pretrained={model}", "data.source=moving-shapes", "data.frames=8", "data.resolution=32", "data.world_pairs_per_prompt=1",
        "iterations=2", "steps_per_iteration=1", "optim.batch_size=2", "optim.learning_rate=1e-3", "negatives.steps=2",
        f"output_dir={out}", "report_to=none", *overrides,
    ])


def clip(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_frames=8, num_inference_steps=2, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0))
    return out.frames[0]


def test_identity_motion_modules_leave_the_image_unet_unchanged_frame_by_frame():
    from diffusers import UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16)
    video = UNetMotionModel.from_unet2d(unet, motion_adapter_for(unet, max_frames=8))
    latents, embeds, t = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 16), torch.tensor([10, 900])
    with torch.no_grad():
        frames = video(latents, t, encoder_hidden_states=embeds.repeat_interleave(3, 0)).sample
        images = unet(latents.transpose(1, 2).flatten(0, 1), t.repeat_interleave(3), encoder_hidden_states=embeds.repeat_interleave(3, 0)).sample
    torch.testing.assert_close(frames.transpose(1, 2).flatten(0, 1), images, atol=1e-5, rtol=1e-5)


def test_video_errors_condition_every_frame_on_its_own_sample(video_model):
    """Two samples of different prompts: each frame's error is the one of its own prompt's condition."""
    family = family_of(load_pipeline(video_model))
    assert family.name == "animatediff"
    cond = family.encode_prompts([PROMPT, "a blue square moving from left to right, black background"], "cpu")
    denoiser = family.denoiser
    latents = torch.randn(2, denoiser.config.in_channels, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    noise, t = torch.randn_like(latents), torch.tensor([300, 300])
    with torch.no_grad():
        both = family.denoising_errors(denoiser, latents, noise, t, cond)
        alone = torch.cat([family.denoising_errors(denoiser, latents[i : i + 1], noise[i : i + 1], t[i : i + 1], cond[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(both, alone)


ARMS = {**{name: [f"method={name}"] for name in METHODS}, **VARIANTS}


@pytest.mark.slow
@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_method_and_ablation_trains_the_video_model(video_model, tmp_path, arm):
    final = train(video_config(video_model, tmp_path / arm, *ARMS[arm]))
    weights = load_file(str(final / "pytorch_lora_weights.safetensors"))
    assert weights and all("motion_modules" in key for key in weights)  # the default: LoRA on the motion modules only
    assert any(value.abs().max() > 0 for key, value in weights.items() if "lora.up" in key)  # it learned


@pytest.mark.slow
def test_motion_lora_loads_with_stock_diffusers_and_changes_the_clip(video_model, tmp_path):
    from diffusers import AnimateDiffPipeline

    final = train(video_config(video_model, tmp_path / "run", "method=sspo"))
    pipe = AnimateDiffPipeline.from_pretrained(video_model)
    before = clip(pipe)
    pipe.load_lora_weights(str(final))
    assert np.abs(clip(pipe) - before).max() > 1e-4
    assert "motion modules" in (final / "README.md").read_text()


@pytest.mark.slow
def test_full_finetune_of_the_motion_modules_writes_a_motion_adapter(video_model, tmp_path):
    from diffusers import AnimateDiffPipeline, MotionAdapter

    final = train(video_config(video_model, tmp_path / "run", "method=sspo", "model.lora=false"))
    base, trained = AnimateDiffPipeline.from_pretrained(video_model), AnimateDiffPipeline.from_pretrained(str(final))
    spatial = [key for key in base.unet.state_dict() if "motion_modules" not in key]
    assert all(torch.equal(base.unet.state_dict()[k], trained.unet.state_dict()[k]) for k in spatial)  # only motion modules trained
    before = clip(base)
    # The motion adapter folder alone: stock diffusers puts it into the base's UNet.
    base.unet.load_motion_modules(MotionAdapter.from_pretrained(str(final / "motion_adapter")))
    np.testing.assert_allclose(clip(base), clip(trained), atol=1e-6)
    assert np.abs(clip(trained) - before).max() > 1e-4


@pytest.mark.slow
def test_whole_unet_lora_reaches_the_spatial_layers(video_model, tmp_path):
    final = train(video_config(video_model, tmp_path / "run", "method=sft", "model.train_modules=unet"))
    keys = load_file(str(final / "pytorch_lora_weights.safetensors"))
    assert any("motion_modules" in k for k in keys) and any("attentions" in k and "motion_modules" not in k for k in keys)


def test_motion_modules_on_an_image_model_is_a_config_error(tmp_path):
    from sspo.errors import ModelError
    from sspo.models.families.sd import StableDiffusion

    with pytest.raises(ModelError, match="model.train_modules: motion"):
        StableDiffusion({}).trained_modules("motion")


def test_word_table_positions_keep_the_words_and_add_the_order(tmp_path):
    from sspo.models.tiny import text_encoder_for, video_size, word_table_text_encoder, write_word_tokenizer

    tokenizer = write_word_tokenizer(tmp_path / "tokenizer", vocabulary())
    ids = tokenizer(["a red circle growing, white background"], padding="max_length", return_tensors="pt").input_ids
    bag = word_table_text_encoder(text_encoder_for(video_size("quick"), tokenizer), tokenizer, vocabulary())(ids)[0]
    ordered = word_table_text_encoder(text_encoder_for(video_size("quick"), tokenizer), tokenizer, vocabulary(), positions=True)(ids)[0]
    positions = ordered * 2**0.5 - bag  # (word + position) / sqrt(2), the words' vectors unchanged
    gram = positions[0] @ positions[0].T
    torch.testing.assert_close(gram, torch.eye(len(gram)) * gram.diagonal().mean(), atol=1e-3, rtol=1e-3)  # orthogonal, one per position
    assert torch.allclose(bag[0] @ positions[0].T, torch.zeros(len(gram), len(gram)), atol=1e-3)  # and orthogonal to the words


def test_more_frames_than_the_motion_modules_make_is_one_line(video_model):
    from sspo.errors import ConfigError
    from sspo.evaluation.sampling import generate

    pipe = load_pipeline(video_model)
    longest = pipe.unet.config.motion_max_seq_length
    with pytest.raises(ConfigError, match=rf"frames: {longest + 1}, but this model's motion modules make clips of at most {longest} frames"):
        generate(pipe, ["a red circle"], [0], steps=1, guidance_scale=1.0, frames=longest + 1)


def test_training_more_frames_than_the_motion_modules_make_is_refused(video_model, tmp_path):
    from sspo.errors import ConfigError

    with pytest.raises(ConfigError, match="'data.frames': is 17, but this model's motion modules make clips of at most 16 frames; set 16 or fewer"):
        train(video_config(video_model, tmp_path / "run", "data.frames=17"))
    assert not (tmp_path / "run").exists()


def test_images_for_a_video_model_are_refused_before_any_row_is_read(video_model, tmp_path, monkeypatch):
    import sspo.training.trainer
    from sspo.errors import ConfigError

    monkeypatch.setattr(sspo.training.trainer, "load_dataset_from_config", lambda *a, **k: pytest.fail("the data was opened"))
    with pytest.raises(ConfigError, match="'data.frames': is 0 \\(images\\), but the model makes clips"):
        train(video_config(video_model, tmp_path / "run", "data.source=imagefolder", f"data.path={tmp_path}", "data.frames=0"))
