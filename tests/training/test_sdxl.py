"""SDXL end to end on a tiny offline StableDiffusionXLPipeline: two text encoders, pooled embeds, time ids."""

import json
from pathlib import Path

import pytest
import torch

from sspo.models.families import family_of
from sspo.models.pipeline import load_pipeline
from sspo.training.config import TrainConfig
from sspo.training.trainer import Trainer, train

from lora_checks import assert_lora_reloads_as_trained
from test_trainer import pairs_config
from tiny_pipelines import build_sdxl_pipeline

PROMPT = "a large red circle on the left, white background"


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    return str(build_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipeline"))


def sdxl_config(out: Path, model: str, data: Path, *overrides: str) -> TrainConfig:
    """:func:`pairs_config` with the 32 px pairs trained at 64 px, not the model's native 32."""
    return pairs_config(out, model, data, "data.resolution=64", *overrides)


def test_conditions_carry_pooled_embeds_and_the_training_size(tiny_sdxl):
    pipe = load_pipeline(tiny_sdxl)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    family = family_of(pipe)
    assert family.name == "sdxl"
    cond = family.encode_prompts([PROMPT, PROMPT], "cpu", size=64)
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cond.embeds.shape[-1] == hidden and cond.pooled.shape == (2, pipe.text_encoder_2.config.projection_dim)
    assert cond.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # original size, crop top-left, target size
    uncond = family.encode_unconditional("cpu", size=64)
    assert not uncond.embeds.any() and not uncond.pooled.any()  # force_zeros_for_empty_prompt, as the pipeline does


def test_sdxl_lora_training_loads_with_stock_load_lora_weights(tiny_sdxl, pairs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    final = train(sdxl_config(tmp_path / "run", tiny_sdxl, pairs))
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert f'DiffusionPipeline.from_pretrained("{tiny_sdxl}", dtype=dtype)' in (final / "README.md").read_text()
    pool = json.loads((tmp_path / "run" / "pool" / "pool.json").read_text())["entries"]
    assert [e["step"] for e in pool] == [0, 1, 2]

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    before = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    pipe.load_lora_weights(str(final))
    after = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert not torch.allclose(before, after)


def test_sdxl_lora_with_alpha_not_rank_reloads_at_its_trained_scale(tiny_sdxl, pairs, tmp_path):
    trainer = Trainer(sdxl_config(tmp_path / "run", tiny_sdxl, pairs, "model.lora_rank=4", "model.lora_alpha=16"))
    final = trainer.train()
    assert_lora_reloads_as_trained(trainer, tiny_sdxl, final, PROMPT)


def test_sdxl_full_finetune_loads_with_from_pretrained(tiny_sdxl, pairs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    final = train(sdxl_config(tmp_path / "run", tiny_sdxl, pairs, "model.lora=false"))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(final))
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters()))
    assert pipe.text_encoder_2.config.projection_dim == base.text_encoder_2.config.projection_dim
