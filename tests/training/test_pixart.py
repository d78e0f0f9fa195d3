"""PixArt end to end on tiny offline PixArtSigmaPipeline and PixArtAlphaPipeline (T5, a DiT with
learned sigma; the Alpha one conditioned on the image's size): detected, every method trains the
transformer, and what it saves loads outside sspo (the LoRA by the model card's peft code, a full
fine-tune as a plain PixArt folder)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sspo.models.families import family_of
from sspo.models.pipeline import load_pipeline
from sspo.training.trainer import Trainer, train

from test_trainer import metrics, pairs_config

PROMPT = "a large red circle on the left, white background"


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory) -> str:
    from tiny_pipelines import build_pixart_pipeline

    return str(build_pixart_pipeline(tmp_path_factory.mktemp("pixart") / "pipe"))


def test_auto_detects_pixart_and_its_condition_carries_t5_and_its_mask(tiny_pixart):
    index = json.loads((Path(tiny_pixart) / "model_index.json").read_text())
    assert family_of(index).name == "pixart"  # from the files alone, as a dry run and export see it
    pipe = load_pipeline(tiny_pixart)
    family = family_of(pipe)
    assert family.name == "pixart" and family.denoiser is pipe.transformer
    cond = family.encode_prompts([PROMPT, "a small blue square"], "cpu")
    assert cond.embeds.shape == (2, 300, pipe.text_encoder.config.d_model) and cond.mask.shape == (2, 300)
    assert cond.mask[0].sum() > cond.mask[1].sum() > 0  # the longer prompt has more tokens, the rest is padding
    # The noise is the first half of the output (the variance the second), predicted with T5's padding masked out.
    noisy, timesteps = torch.randn(2, pipe.transformer.config.in_channels, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        predicted = family.predict(pipe.transformer, noisy, timesteps, cond)
        out = pipe.transformer(noisy, timestep=timesteps, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        unmasked = pipe.transformer(noisy, timestep=timesteps, encoder_hidden_states=cond.embeds,
                                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert out.shape[1] == 2 * noisy.shape[1] and torch.equal(predicted, out[:, : noisy.shape[1]])
    assert not torch.allclose(unmasked, out, atol=1e-3)  # the mask matters: a prediction without it is another


@pytest.fixture(scope="module")
def tiny_pixart_alpha(tmp_path_factory) -> str:
    from tiny_pipelines import build_pixart_pipeline

    return str(build_pixart_pipeline(tmp_path_factory.mktemp("pixart-alpha") / "pipe", alpha=True))


def test_pixart_alpha_is_told_each_images_size_and_aspect_ratio_as_its_pipeline_tells_it(tiny_pixart_alpha, pairs, tmp_path):
    trainer = Trainer(pairs_config(tmp_path / "run", tiny_pixart_alpha, pairs, "data.resolution=48"))
    assert trainer.family.name == "pixart" and type(trainer.pipe).__name__ == "PixArtAlphaPipeline"
    seen = []
    transformer = trainer.family.denoiser
    hook = transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True)
    trainer.train()
    hook.remove()
    trained = [c for c in seen if c["resolution"] is not None and c["resolution"].shape[0] == 2 * 2]  # the losses' calls: winners and losers of 2 pairs
    assert trained and all(c["resolution"].tolist() == [[48.0, 48.0]] * 4 and c["aspect_ratio"].tolist() == [[1.0]] * 4 for c in trained)
    assert all(c["resolution"] is not None for c in seen)  # the negatives' and validation's calls too, by the pipeline
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(tmp_path / "run"))


@pytest.mark.parametrize("method", ["sft", "dpo", "spin", "sspo"])
def test_every_method_trains_the_transformers_lora(method, tiny_pixart, pairs, tmp_path):
    trainer = Trainer(pairs_config(tmp_path / "run", tiny_pixart, pairs, f"method={method}"))
    assert trainer.family.name == "pixart"
    assert (trainer.cfg.negatives.scheduler, trainer.cfg.negatives.guidance_scale) == ("dpm++", 4.5)  # resolved from the family
    base = {k: v.clone() for k, v in trainer.family.denoiser.state_dict().items() if "lora_" in k}
    final = trainer.train()
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    trained = trainer.family.denoiser.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in base.items())
    assert all(key.startswith("transformer.") for key in load_file(str(final / "pytorch_lora_weights.safetensors")))
    load_pipeline(tiny_pixart, lora=final)  # sspo's own loading, with its check that every tensor landed


# After the model card's own loading code: the latents the loaded pipeline samples, to compare with the trained one's.
SAMPLED = r"""
from safetensors.torch import save_file
latents = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
               use_resolution_binning=False).images
save_file({"latents": latents.contiguous()}, "latents.safetensors")
"""


def test_the_model_cards_code_loads_the_lora_in_stock_diffusers_as_trained(tiny_pixart, pairs, tmp_path):
    targets = "model.lora_targets=[to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2]"  # the shipped config's
    trainer = Trainer(pairs_config(tmp_path / "run", tiny_pixart, pairs, "model.lora_rank=4", "model.lora_alpha=16", targets))
    final = trainer.train()
    with torch.no_grad():
        trained = trainer.pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
                               use_resolution_binning=False).images
        base = load_pipeline(tiny_pixart)(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
                                          use_resolution_binning=False).images
    code = (final / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert "load_lora_weights" not in code and "set_peft_model_state_dict(pipe.transformer, weights)" in code
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and (tmp_path / "sample.png").is_file(), done.stderr[-3000:]
    loading = code.split("pipe.to(device)", 1)[0]
    done = subprocess.run([sys.executable, "-c", f"{loading}\nPROMPT = {PROMPT!r}\n{SAMPLED}"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    stock = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    assert not torch.allclose(stock, base, atol=1e-3)  # the LoRA changes the sample
    torch.testing.assert_close(stock, trained, rtol=1e-4, atol=1e-5)  # at its trained scale (alpha != rank)


def test_the_lora_exports_as_its_final_file_and_kohyas_layout_is_refused(tiny_pixart, pairs, tmp_path, capsys):
    from sspo.cli import main

    run, out = tmp_path / "run", tmp_path / "lora.safetensors"
    final = train(pairs_config(run, tiny_pixart, pairs, "method=sft"))
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out)]) == 0
    assert out.read_bytes() == (final / "pytorch_lora_weights.safetensors").read_bytes()
    assert main(["export", str(run), "--format", "kohya", "--out", str(tmp_path / "kohya.safetensors")]) == 2
    assert "kohya's layout is for UNet LoRAs" in capsys.readouterr().err and not (tmp_path / "kohya.safetensors").exists()


def test_full_finetune_saves_a_plain_pixart_sigma_folder(tiny_pixart, pairs, tmp_path):
    from diffusers import PixArtSigmaPipeline

    final = train(pairs_config(tmp_path / "run", tiny_pixart, pairs, "model.lora=false", "method=sft"))
    index = json.loads((final / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline" and index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    pipe = PixArtSigmaPipeline.from_pretrained(str(final))
    base = PixArtSigmaPipeline.from_pretrained(tiny_pixart)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), base.transformer.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.parameters(), base.text_encoder.parameters()))


def test_sspo_sample_draws_a_grid_from_the_trained_lora(tiny_pixart, pairs, tmp_path):
    from sspo.cli import main

    final = train(pairs_config(tmp_path / "run", tiny_pixart, pairs, "method=sft", "iterations=1"))
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", tiny_pixart, "--lora", str(final), "--prompt", PROMPT, "--steps", "2", "--resolution", "32", "--out", str(grid)]) == 0
    assert grid.is_file()
