"""SD3 end to end on a tiny offline StableDiffusion3Pipeline (two CLIP encoders, no T5, an MMDiT
transformer): every method trains by flow matching, and what it saves loads in stock diffusers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sspo.models.families import family_of
from sspo.models.pipeline import load_pipeline
from sspo.training.config import TrainConfig
from sspo.training.trainer import Trainer, train

from test_trainer import metrics, pairs_config

PROMPT = "a large red circle on the left, white background"
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}  # what plain diffusers needs to load an SD3 saved without T5


def sd3_config(out: Path, model: str, data: Path, *overrides: str) -> TrainConfig:
    """:func:`pairs_config` with negatives from the pipeline's flow sampler."""
    return pairs_config(out, model, data, "negatives.scheduler=pipeline", *overrides)


def sample(pipe) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_auto_detects_sd3_and_conditions_carry_clip_and_t5_slots(tiny_sd3):
    pipe = load_pipeline(tiny_sd3)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    family = family_of(pipe)
    assert family.name == "sd3" and family.denoiser is pipe.transformer
    cond = family.encode_prompts([PROMPT, "a small blue square"], "cpu")
    clip_tokens = pipe.tokenizer.model_max_length
    # The two CLIPs' penultimate states side by side, then T5's 256 token slots (zeros without T5).
    assert cond.embeds.shape == (2, clip_tokens + 256, pipe.transformer.config.joint_attention_dim)
    assert not cond.embeds[:, clip_tokens:].any() and cond.embeds[:, :clip_tokens].any()
    assert cond.pooled.shape == (2, pipe.transformer.config.pooled_projection_dim)


def test_with_t5_the_condition_holds_t5s_token_embeddings_and_sspo_trains(pairs, tmp_path):
    from tiny_pipelines import build_sd3_pipeline

    model = str(build_sd3_pipeline(tmp_path / "sd3-t5", t5=True))
    pipe = load_pipeline(model)
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    cond = family_of(pipe).encode_prompts([PROMPT], "cpu")
    clip_tokens = pipe.tokenizer.model_max_length
    assert cond.embeds[:, clip_tokens:].abs().sum(-1).gt(0).all()  # every T5 slot holds an embedding (its padding's too)
    final = Trainer(sd3_config(tmp_path / "run", model, pairs)).train()
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(tmp_path / "run"))


@pytest.mark.parametrize("method", ["sft", "dpo", "spin", "sspo"])
def test_every_method_trains_the_transformer_by_flow_matching(method, tiny_sd3, pairs, tmp_path):
    trainer = Trainer(sd3_config(tmp_path / "run", tiny_sd3, pairs, f"method={method}"))
    assert trainer.family.name == "sd3"
    base = {k: v.clone() for k, v in trainer.family.denoiser.state_dict().items() if "lora_" in k}
    final = trainer.train()
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert f'DiffusionPipeline.from_pretrained("{tiny_sd3}", text_encoder_3=None, tokenizer_3=None, dtype=dtype)' in (final / "README.md").read_text()
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    trained = trainer.family.denoiser.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in base.items())
    assert all(key.startswith("transformer.") for key in load_file(str(final / "pytorch_lora_weights.safetensors")))


# Stock diffusers only, in a process of its own: the LoRA loads by StableDiffusion3Pipeline.load_lora_weights.
STOCK_LOADING = r"""
import sys
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import save_file

base, lora, prompt, out = sys.argv[1:]
pipe = StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None)
pipe.set_progress_bar_config(disable=True)
def sample():
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
before = sample()
pipe.load_lora_weights(lora)
save_file({"before": before.contiguous(), "after": sample().contiguous()}, out)
"""


def test_the_lora_loads_in_stock_diffusers_and_samples_as_trained(tiny_sd3, pairs, tmp_path):
    # Attention projections (which diffusers' UNet layout renames) beside layers it does not rename:
    # the transformer's loader must get every one of them back.
    targets = "model.lora_targets=[to_q, to_k, to_v, to_out.0, add_k_proj, ff.net.2, ff_context.net.0.proj]"
    trainer = Trainer(sd3_config(tmp_path / "run", tiny_sd3, pairs, "model.lora_rank=4", "model.lora_alpha=16", targets))
    final = trainer.train()
    with torch.no_grad():
        trained = sample(trainer.pipe)
    out = tmp_path / "latents.safetensors"
    proc = subprocess.run([sys.executable, "-c", STOCK_LOADING, tiny_sd3, str(final), PROMPT, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stock = load_file(str(out))
    assert not torch.allclose(stock["before"], stock["after"], atol=1e-3)  # the LoRA changes the image
    torch.testing.assert_close(stock["after"], trained, rtol=1e-4, atol=1e-5)  # at its trained scale (alpha != rank)


def test_full_finetune_saves_a_folder_from_pretrained_loads(tiny_sd3, pairs, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    final = train(sd3_config(tmp_path / "run", tiny_sd3, pairs, "model.lora=false"))
    assert json.loads((final / "model_index.json").read_text())["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    pipe = StableDiffusion3Pipeline.from_pretrained(str(final), **NO_T5)
    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, **NO_T5)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), base.transformer.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder_2.parameters(), base.text_encoder_2.parameters()))


def test_a_diffusion_sampler_is_refused_in_one_line(tiny_sd3, pairs, tmp_path):
    from sspo.errors import SSPOError
    from sspo.training.trainer import dry_run

    for run in (train, dry_run):
        with pytest.raises(SSPOError, match="negatives.scheduler 'ddim' is a diffusion sampler; sd3 samples by flow matching"):
            run(sd3_config(tmp_path / "run", tiny_sd3, pairs, "negatives.scheduler=ddim"))
    assert train(sd3_config(tmp_path / "dpo", tiny_sd3, pairs, "negatives.scheduler=ddim", "method=dpo")).is_dir()  # it samples nothing


def test_sspo_sample_draws_a_grid_from_the_trained_lora(tiny_sd3, pairs, tmp_path):
    """The VAE's shift_factor (SD3's latents are shifted, then scaled) is undone in decoding."""
    from sspo.cli import main

    final = train(sd3_config(tmp_path / "run", tiny_sd3, pairs, "method=sft", "iterations=1"))
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", tiny_sd3, "--lora", str(final), "--prompt", PROMPT, "--steps", "2", "--out", str(grid)]) == 0
    assert grid.is_file()


def test_a_unet_lora_on_a_transformer_model_names_both(quick_base, tiny_sd3, tmp_path):
    from test_bad_inputs import write_lora

    from sspo.errors import ModelError

    lora = write_lora(tmp_path / "lora", quick_base)
    with pytest.raises(ModelError) as error:
        load_pipeline(tiny_sd3, lora=lora)
    assert str(error.value) == f"LoRA {lora} holds unet weights, but the denoiser of model {tiny_sd3} is its transformer; pass the base model the LoRA was trained on"
